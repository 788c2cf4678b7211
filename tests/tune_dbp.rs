//! Tests of decorrelated backpropagation for the tuned state
//! (`rwkv_tune::tune::dbp`): the decorrelation rule on synthetic correlated
//! data, the chain rule of `S = S′R` (finite differences, including through
//! the real gradient engine), state-preserving updates, errors.
use rwkv_tune::model::weights::{Config, Weights};
use rwkv_tune::tune::dbp::{offdiag_correlation, Dbp, DbpStats};
use rwkv_tune::tune::grad::{
    loss_and_grad_dbp, loss_and_grad_f64, loss_only_f64, Example, GradOpts, TunedState,
    TunedStateOf,
};
use rwkv_tune::Error;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn sym(&mut self, s: f64) -> f64 {
        (2.0 * self.uniform() - 1.0) * s
    }
    fn normal(&mut self) -> f64 {
        (-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn cfg(n_layer: usize, n_head: usize, head_size: usize) -> Config {
    let c = n_head * head_size;
    Config {
        n_layer,
        n_embd: c,
        n_head,
        head_size,
        vocab: 40,
        d_w: 8,
        d_a: 8,
        d_v: 8,
        d_g: 8,
        d_ffn: 2 * c,
    }
}

/// Samples `x = A g` (g ~ N(0, I)) with a strongly mixing `A` per head.
fn correlated_stats(c: &Config, samples: usize, rng: &mut Rng) -> DbpStats {
    let n = c.head_size;
    let mut st = DbpStats::zeros(c.n_layer, c.n_head, n);
    for l in 0..c.n_layer {
        for h in 0..c.n_head {
            let a: Vec<f64> = (0..n * n)
                .map(|i| if i / n == i % n { 1.0 } else { 0.0 } + rng.sym(0.6))
                .collect();
            for _ in 0..samples {
                let g: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
                let x: Vec<f64> = (0..n)
                    .map(|i| (0..n).map(|j| a[i * n + j] * g[j]).sum::<f64>() * 2.0)
                    .collect();
                st.add_sample(l, h, &x);
            }
        }
    }
    st.count = samples as f64;
    st
}

fn mean_corr(d: &Dbp, st: &DbpStats) -> f64 {
    let mut s = 0.0;
    for l in 0..d.n_layer {
        for h in 0..d.n_head {
            s += offdiag_correlation(&d.z_moment(st, l, h).unwrap(), d.head_size);
        }
    }
    s / (d.n_layer * d.n_head) as f64
}

#[test]
fn update_decorrelates_synthetic_inputs() {
    let c = cfg(2, 2, 16);
    let mut rng = Rng(1);
    let st = correlated_stats(&c, 4000, &mut rng);
    for kappa in [0.0, 0.5] {
        let mut d = Dbp::new(&c, 0.02, kappa).unwrap();
        let before = mean_corr(&d, &st);
        let mut first = None;
        let mut last = 0.0;
        for _ in 0..400 {
            let rep = d.update(&st).unwrap();
            first.get_or_insert(rep.loss);
            last = rep.loss;
        }
        let after = mean_corr(&d, &st);
        println!("κ = {kappa}: RMS off-diagonal correlation {before:.4} → {after:.4}; DBP loss {:.4e} → {last:.4e}", first.unwrap());
        assert!(
            before > 0.2,
            "the synthetic data should start correlated ({before})"
        );
        assert!(after < 0.1 * before, "κ = {kappa}: {before} → {after}");
        assert!(last < first.unwrap());
        if kappa > 0.0 {
            // whitening pressure: unit variances
            for h in 0..c.n_head {
                let z = d.z_moment(&st, 0, h).unwrap();
                for i in 0..c.head_size {
                    let v = z[i * c.head_size + i];
                    assert!((v - 1.0).abs() < 0.1, "variance {v}");
                }
            }
        }
    }
}

fn random_dbp(c: &Config, rng: &mut Rng) -> Dbp {
    let mut d = Dbp::new(c, 0.01, 0.3).unwrap();
    let n = c.head_size;
    for (i, v) in d.r.iter_mut().enumerate() {
        *v = if (i % (n * n)) / n == i % n { 1.0 } else { 0.0 } + rng.sym(0.3);
    }
    d
}

fn random_state64(c: &Config, with_shift: bool, rng: &mut Rng) -> TunedStateOf<f64> {
    let mut s = TunedStateOf::<f64>::zeros(c, with_shift);
    for p in s.params_mut() {
        p.iter_mut().for_each(|v| *v = rng.sym(0.5));
    }
    s
}

#[test]
fn chain_rule_of_the_reparametrisation_quadratic() {
    let c = cfg(2, 2, 8);
    let mut rng = Rng(2);
    let d = random_dbp(&c, &mut rng);
    let sp = random_state64(&c, true, &mut rng);
    let coef = random_state64(&c, true, &mut rng);
    // f(S) = Σ coef⊙S + ½ Σ S²  ⇒  dS = coef + S
    let f = |s: &TunedStateOf<f64>| -> f64 {
        s.params()
            .iter()
            .zip(coef.params())
            .map(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| y * x + 0.5 * x * x)
                    .sum::<f64>()
            })
            .sum()
    };
    let s = d.effective_state(&sp).unwrap();
    let mut ds = s.clone();
    for (g, b) in ds.params_mut().into_iter().zip(coef.params()) {
        g.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    }
    let dsp = d.grad_to_prime(&ds).unwrap();
    let h = 1e-6;
    let mut worst: f64 = 0.0;
    for _ in 0..40 {
        let (l, i) = (rng.below(c.n_layer), rng.below(c.n_head * 64));
        let mut p = sp.clone();
        p.wkv[l][i] += h;
        let fp = f(&d.effective_state(&p).unwrap());
        p.wkv[l][i] -= 2.0 * h;
        let fm = f(&d.effective_state(&p).unwrap());
        let fd = (fp - fm) / (2.0 * h);
        worst = worst.max((fd - dsp.wkv[l][i]).abs() / (1.0 + fd.abs()));
    }
    println!("quadratic chain rule: worst error {worst:.2e}");
    assert!(worst < 1e-7, "{worst}");
    // the shift parts pass through unchanged
    assert_eq!(s.shift_att, sp.shift_att);
    assert_eq!(dsp.shift_ffn, ds.shift_ffn);
}

#[test]
fn chain_rule_through_the_gradient_engine() {
    let c = Config {
        n_layer: 2,
        n_embd: 64,
        n_head: 2,
        head_size: 32,
        vocab: 40,
        d_w: 16,
        d_a: 16,
        d_v: 8,
        d_g: 16,
        d_ffn: 128,
    };
    let w = Weights::random(&c, 5).unwrap();
    let mut rng = Rng(3);
    let d = random_dbp(&c, &mut rng);
    let sp = random_state64(&c, false, &mut rng);
    let batch: Vec<Example> = (0..2)
        .map(|_| {
            let t = 8;
            Example {
                tokens: (0..t).map(|_| rng.below(c.vocab) as u32).collect(),
                targets: (0..t).map(|_| rng.below(c.vocab) as u32).collect(),
                mask: vec![1.0; t],
                soft: None,
            }
        })
        .collect();
    let o = GradOpts {
        observer_weight: 0.0,
        chunk: 3,
    };
    let (_, _, g) = loss_and_grad_f64(&w, &d.effective_state(&sp).unwrap(), &batch, &o).unwrap();
    let gp = d.grad_to_prime(&g).unwrap();
    let h = 1e-5;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for _ in 0..24 {
        let (l, i) = (rng.below(c.n_layer), rng.below(c.n_head * 32 * 32));
        let mut p = sp.clone();
        p.wkv[l][i] += h;
        let lp = loss_only_f64(&w, &d.effective_state(&p).unwrap(), &batch, &o)
            .unwrap()
            .0;
        p.wkv[l][i] -= 2.0 * h;
        let lm = loss_only_f64(&w, &d.effective_state(&p).unwrap(), &batch, &o)
            .unwrap()
            .0;
        let fd = (lp - lm) / (2.0 * h);
        num += (fd - gp.wkv[l][i]).powi(2);
        den += fd * fd;
    }
    let rel = (num / den).sqrt();
    println!(
        "engine chain rule: relative error {rel:.2e} (|fd| = {:.3e})",
        den.sqrt()
    );
    assert!(den > 1e-12);
    assert!(rel < 1e-5, "{rel}");
}

#[test]
fn update_keep_state_preserves_the_effective_state() {
    let c = cfg(2, 2, 16);
    let mut rng = Rng(4);
    let st = correlated_stats(&c, 500, &mut rng);
    let mut d = Dbp::new(&c, 0.05, 0.2).unwrap();
    let mut sp = random_state64(&c, true, &mut rng).map(|v| v as f32);
    for _ in 0..5 {
        let before = d.effective_state(&sp).unwrap();
        let r_before = d.r.clone();
        d.update_keep_state(&st, &mut sp).unwrap();
        assert_ne!(d.r, r_before);
        let after = d.effective_state(&sp).unwrap();
        for (a, b) in after.params().into_iter().zip(before.params()) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
    }
    // plain update moves the effective state
    let before = d.effective_state(&sp).unwrap();
    d.update(&st).unwrap();
    assert_ne!(d.effective_state(&sp).unwrap(), before);
}

#[test]
fn steps_are_bounded_and_errors_are_named() {
    let c = cfg(1, 1, 8);
    assert!(matches!(Dbp::new(&c, 0.0, 0.5), Err(Error::Tune(_))));
    assert!(matches!(Dbp::new(&c, 0.1, 1.5), Err(Error::Tune(_))));
    let mut d = Dbp::new(&c, 10.0, 0.5).unwrap(); // absurd η: the step is clipped
    let mut rng = Rng(5);
    let st = correlated_stats(&c, 200, &mut rng);
    let rep = d.update(&st).unwrap();
    assert_eq!(rep.clipped, 1);
    assert!(d.r.iter().all(|v| v.is_finite()));
    let wrong = DbpStats::zeros(2, 1, 8);
    assert!(matches!(d.update(&wrong), Err(Error::Shape { .. })));
    let wrong_state = TunedState::zeros(&cfg(2, 1, 8), false);
    assert!(matches!(
        d.effective_state(&wrong_state),
        Err(Error::Shape { .. })
    ));
    // empty statistics: no change
    let r0 = d.r.clone();
    d.update(&DbpStats::zeros(1, 1, 8)).unwrap();
    assert_eq!(d.r, r0);
}

#[test]
fn engine_statistics_feed_the_update() {
    let c = Config {
        n_layer: 2,
        n_embd: 64,
        n_head: 2,
        head_size: 32,
        vocab: 40,
        d_w: 16,
        d_a: 16,
        d_v: 8,
        d_g: 16,
        d_ffn: 128,
    };
    let w = Weights::random(&c, 6).unwrap();
    let mut rng = Rng(6);
    let batch: Vec<Example> = (0..3)
        .map(|_| Example {
            tokens: (0..20).map(|_| rng.below(c.vocab) as u32).collect(),
            targets: (0..20).map(|_| rng.below(c.vocab) as u32).collect(),
            mask: vec![1.0; 20],
            soft: None,
        })
        .collect();
    let mut d = Dbp::new(&c, 0.01, 0.5).unwrap();
    let sp = TunedState::zeros(&c, false);
    let out = loss_and_grad_dbp(
        &w,
        &d.effective_state(&sp).unwrap(),
        &batch,
        &GradOpts::default(),
    )
    .unwrap();
    let st = out.dbp_stats.unwrap();
    assert_eq!(st.count, 60.0);
    let mut losses = Vec::new();
    for _ in 0..50 {
        losses.push(d.update(&st).unwrap().loss);
    }
    println!(
        "DBP loss on receptance statistics: {:.4e} → {:.4e}",
        losses[0], losses[49]
    );
    assert!(losses[49] < losses[0]);
    let gp = d.grad_to_prime(&out.grad).unwrap();
    assert_eq!(gp.wkv.len(), c.n_layer);
}
