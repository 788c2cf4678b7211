//! Tests of the kernel-upscaled state (`rwkv_tune::tune::upscale`): its
//! gradient against central finite differences in f64 (U, the ordinary
//! state, chunked recomputation, observer term), U = 0 reproducing the plain
//! model, the logits path, the kernel fit and input validation.
use rwkv_tune::model::weights::{Config, Weights};
use rwkv_tune::rng::Rng;
use rwkv_tune::tune::grad::{
    forward_logits, loss_only_f64, Example, GradOpts, HeadVector, TunedState, TunedStateOf,
};
use rwkv_tune::tune::upscale::{
    forward_logits_upscaled, loss_and_grad_upscaled, loss_and_grad_upscaled_f64,
    loss_only_upscaled_f64, Kernel, UpscaleConfig, UpscaledState, UpscaledStateOf,
};
use rwkv_tune::Error;

mod common;
use common::tune::tiny_config as small_config;

fn sym(rng: &mut Rng, s: f64) -> f64 {
    rng.range(-s, s)
}

fn example(t: usize, vocab: usize, soft: bool, rng: &mut Rng) -> Example {
    let tokens: Vec<u32> = (0..t).map(|_| rng.below(vocab as u64) as u32).collect();
    let targets: Vec<u32> = (0..t).map(|_| rng.below(vocab as u64) as u32).collect();
    let mask: Vec<f32> = (0..t)
        .map(|i| {
            if i < 2 || i == t - 1 {
                0.0
            } else {
                (0.5 + rng.uniform()) as f32
            }
        })
        .collect();
    let soft = soft.then(|| {
        let mut p = Vec::with_capacity(t * vocab);
        for _ in 0..t {
            let row: Vec<f64> = (0..vocab).map(|_| sym(rng, 2.0).exp()).collect();
            let z: f64 = row.iter().sum();
            p.extend(row.iter().map(|v| (v / z) as f32));
        }
        p
    });
    Example {
        tokens,
        targets,
        mask,
        soft,
    }
}

/// A kernel fitted on the model's keys, M = 24 > N = 16.
fn setup(seed: u64) -> (Weights, Kernel, Vec<Example>) {
    let cfg = small_config();
    let w = Weights::random(&cfg, seed).unwrap();
    let mut rng = Rng::new(seed + 1);
    let batch: Vec<Example> = (0..3)
        .map(|i| example(9 + i, cfg.vocab, i == 1, &mut rng))
        .collect();
    let uc = UpscaleConfig {
        m: 24,
        kmeans_iters: 5,
        ..UpscaleConfig::new(cfg.head_size)
    };
    let k = Kernel::fit(&w, &TunedState::zeros(&cfg, false), &batch, &uc).unwrap();
    (w, k, batch)
}

fn random_up(k: &Kernel, cfg: &Config, rng: &mut Rng) -> UpscaledStateOf<f64> {
    let mut s = UpscaledStateOf::new(TunedStateOf::<f64>::zeros(cfg, false), k);
    for p in s.params_mut() {
        p.iter_mut().for_each(|v| *v = sym(rng, 0.8));
    }
    s
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-300)
}

/// (tensor index in `params()`, element) → analytic vs central differences.
fn check_fd(w: &Weights, k: &Kernel, s: &UpscaledStateOf<f64>, batch: &[Example], o: &GradOpts) {
    let (_, _, g) = loss_and_grad_upscaled_f64(w, k, s, batch, o).unwrap();
    let gp = g.params();
    let np = s.params().len();
    let mut rng = Rng::new(99);
    let mut ana = Vec::new();
    let mut num = Vec::new();
    let h = 1e-5;
    // every U tensor (the last L params) and every wkv tensor, 6 coords each
    for (p, gt) in gp.iter().enumerate().take(np) {
        let len = s.params()[p].len();
        for _ in 0..6 {
            let i = rng.below(len as u64) as usize;
            let mut sp = s.clone();
            sp.params_mut()[p][i] += h;
            let lp = loss_only_upscaled_f64(w, k, &sp, batch, o).unwrap().0;
            sp.params_mut()[p][i] -= 2.0 * h;
            let lm = loss_only_upscaled_f64(w, k, &sp, batch, o).unwrap().0;
            ana.push(gt[i]);
            num.push((lp - lm) / (2.0 * h));
        }
    }
    let e = rel_err(&ana, &num);
    eprintln!(
        "chunk {} λ {}: relative error {e:e} over {} coordinates",
        o.chunk,
        o.observer_weight,
        ana.len()
    );
    assert!(e < 1e-6, "relative error {e:e}\nana {ana:?}\nnum {num:?}");
    assert!(
        ana.iter().any(|v| v.abs() > 1e-6),
        "gradient vanished: {ana:?}"
    );
}

#[test]
fn gradient_matches_finite_differences_f64() {
    let (w, k, batch) = setup(11);
    let mut rng = Rng::new(5);
    let s = random_up(&k, &w.config, &mut rng);
    for chunk in [64, 3] {
        let o = GradOpts {
            observer_weight: 0.0,
            chunk,
        };
        check_fd(&w, &k, &s, &batch, &o);
    }
    // with the observer term too
    let o = GradOpts {
        observer_weight: 0.7,
        chunk: 4,
    };
    check_fd(&w, &k, &s, &batch, &o);
}

#[test]
fn zero_u_is_the_plain_model_and_f32_matches_f64() {
    let (w, k, batch) = setup(12);
    let cfg = &w.config;
    let mut rng = Rng::new(6);
    let mut s64 = random_up(&k, cfg, &mut rng);
    s64.u
        .iter_mut()
        .for_each(|u| u.iter_mut().for_each(|v| *v = 0.0));
    let o = GradOpts::default();
    let a = loss_only_upscaled_f64(&w, &k, &s64, &batch, &o).unwrap().0;
    let b = loss_only_f64(&w, &s64.state, &batch, &o).unwrap().0;
    assert!((a - b).abs() < 1e-12 * b.abs().max(1.0), "{a} vs {b}");
    // logits: U = 0 equals the plain forward; U ≠ 0 changes them
    let s32: UpscaledState = random_up(&k, cfg, &mut rng).map(|v| v as f32);
    let toks = &batch[0].tokens;
    let plain = forward_logits(&w, &s32.state, toks).unwrap();
    let mut z = s32.clone();
    z.u.iter_mut()
        .for_each(|u| u.iter_mut().for_each(|v| *v = 0.0));
    assert_eq!(forward_logits_upscaled(&w, &k, &z, toks).unwrap(), plain);
    let up = forward_logits_upscaled(&w, &k, &s32, toks).unwrap();
    assert!(up.iter().zip(&plain).any(|(x, y)| (x - y).abs() > 1e-4));
    // f32 gradient ≈ f64 gradient
    let g32 = loss_and_grad_upscaled(&w, &k, &s32, &batch, &o).unwrap();
    let (_, _, g64) =
        loss_and_grad_upscaled_f64(&w, &k, &s32.map(|v| v as f64), &batch, &o).unwrap();
    let a: Vec<f64> = g32
        .grad
        .params()
        .iter()
        .flat_map(|p| p.iter().map(|&v| v as f64))
        .collect();
    let b: Vec<f64> = g64
        .params()
        .iter()
        .flat_map(|p| p.iter().copied())
        .collect();
    assert!(rel_err(&a, &b) < 1e-3, "f32 vs f64 {}", rel_err(&a, &b));
}

#[test]
fn kernel_features_are_normalised_and_centres_fit_the_keys() {
    let (w, k, _) = setup(13);
    assert_eq!(k.m, 24);
    assert_eq!(k.centres.len(), w.config.n_layer);
    let x = k.centres[1][16..32].to_vec(); // layer 1, head 0, centre 1
    let phi = k.features(1, 0, &x).unwrap();
    assert!((phi.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    let best = phi.iter().cloned().fold(0.0, f64::max);
    assert_eq!(phi[1], best, "a centre's own feature is its largest");
    assert!(k.features(5, 0, &x).is_err());
    // receptances work as a source too
    let mut rng = Rng::new(3);
    let batch = vec![example(10, w.config.vocab, false, &mut rng)];
    let uc = UpscaleConfig {
        m: 20,
        source: HeadVector::Receptance,
        kmeans_iters: 3,
        ..UpscaleConfig::new(16)
    };
    let kr = Kernel::fit(&w, &TunedState::zeros(&w.config, false), &batch, &uc).unwrap();
    assert!(kr.gamma.iter().flatten().all(|g| g.is_finite() && *g > 0.0));
}

#[test]
fn bad_inputs_are_errors() {
    let (w, k, batch) = setup(14);
    let cfg = &w.config;
    let s = UpscaledState::new(TunedState::zeros(cfg, false), &k);
    let o = GradOpts::default();
    let mut bad = s.clone();
    bad.u[0].pop();
    assert!(matches!(
        loss_and_grad_upscaled(&w, &k, &bad, &batch, &o),
        Err(Error::Shape { .. })
    ));
    let mut kb = k.clone();
    kb.gamma[0][0] = -1.0;
    assert!(matches!(
        loss_and_grad_upscaled(&w, &kb, &s, &batch, &o),
        Err(Error::Tune(_))
    ));
    let other = Weights::random(
        &Config {
            n_layer: 3,
            ..small_config()
        },
        1,
    )
    .unwrap();
    assert!(loss_and_grad_upscaled(&other, &k, &s, &batch, &o).is_err());
    let uc = UpscaleConfig {
        m: 0,
        ..UpscaleConfig::new(16)
    };
    assert!(matches!(
        Kernel::fit(&w, &TunedState::zeros(cfg, false), &batch, &uc),
        Err(Error::Tune(_))
    ));
    let masked: Vec<Example> = batch
        .iter()
        .map(|e| Example {
            mask: vec![0.0; e.mask.len()],
            ..e.clone()
        })
        .collect();
    assert!(matches!(
        Kernel::fit(
            &w,
            &TunedState::zeros(cfg, false),
            &masked,
            &UpscaleConfig::new(16)
        ),
        Err(Error::Tune(_))
    ));
}
