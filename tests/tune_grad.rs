//! Tests of the state-tuning gradient engine (`rwkv_tune::tune::grad`):
//! finite differences in f64 on a random model and on the real tiny fixture,
//! the fixture's golden logits, chunked recomputation, input validation.
use rwkv_tune::model::weights::{Config, Weights};
use rwkv_tune::tune::grad::{
    forward_logits, loss_and_grad, loss_and_grad_dbp, loss_and_grad_f64, loss_only, loss_only_f64,
    loss_only_with, Example, GradOpts, TunedState, TunedStateOf,
};
use rwkv_tune::Error;

mod common;
use common::tune::{random_example, random_state, rel_err, small_config, Rng};

/// Which coordinate of the state: (part 0 = wkv, 1 = shift_att, 2 = shift_ffn, layer, index).
type Coord = (usize, usize, usize);

fn get(s: &mut TunedStateOf<f64>, (p, l, i): Coord) -> &mut f64 {
    match p {
        0 => &mut s.wkv[l][i],
        1 => &mut s.shift_att.as_mut().unwrap()[l][i],
        _ => &mut s.shift_ffn.as_mut().unwrap()[l][i],
    }
}

fn grad_at<R: Copy>(g: &TunedStateOf<R>, (p, l, i): Coord) -> R {
    match p {
        0 => g.wkv[l][i],
        1 => g.shift_att.as_ref().unwrap()[l][i],
        _ => g.shift_ffn.as_ref().unwrap()[l][i],
    }
}

/// Central finite differences of the f64 loss at the given coordinates.
fn fd(
    w: &Weights,
    s: &TunedStateOf<f64>,
    batch: &[Example],
    o: &GradOpts,
    coords: &[Coord],
    h: f64,
) -> Vec<f64> {
    coords
        .iter()
        .map(|&c| {
            let mut sp = s.clone();
            *get(&mut sp, c) += h;
            let lp = loss_only_f64(w, &sp, batch, o).unwrap().0;
            *get(&mut sp, c) -= 2.0 * h;
            let lm = loss_only_f64(w, &sp, batch, o).unwrap().0;
            (lp - lm) / (2.0 * h)
        })
        .collect()
}

fn sample_coords(cfg: &Config, part: usize, layer: usize, k: usize, rng: &mut Rng) -> Vec<Coord> {
    let n = if part == 0 {
        cfg.n_head * cfg.head_size * cfg.head_size
    } else {
        cfg.n_embd
    };
    (0..k).map(|_| (part, layer, rng.below(n))).collect()
}

/// Checks the gradient on `coords` groups; returns the worst f64 and f32 relative errors.
fn check_groups(
    w: &Weights,
    s32: &TunedState,
    batch: &[Example],
    o: &GradOpts,
    groups: &[(String, Vec<Coord>)],
    h: f64,
) -> (f64, f64) {
    let s64 = s32.map(|v| v as f64);
    let (_, _, g64) = loss_and_grad_f64(w, &s64, batch, o).unwrap();
    let g32 = loss_and_grad(w, s32, batch, o).unwrap().grad;
    let (mut worst64, mut worst32) = (0.0f64, 0.0f64);
    for (name, coords) in groups {
        let f = fd(w, &s64, batch, o, coords, h);
        let a64: Vec<f64> = coords.iter().map(|&c| grad_at(&g64, c)).collect();
        let a32: Vec<f64> = coords.iter().map(|&c| grad_at(&g32, c) as f64).collect();
        let (e64, e32) = (rel_err(&a64, &f), rel_err(&a32, &f));
        let fnorm = f.iter().map(|v| v * v).sum::<f64>().sqrt();
        println!("{name:>18}: |fd| = {fnorm:.3e}  rel.err f64 = {e64:.2e}  f32 = {e32:.2e}");
        assert!(
            fnorm > 1e-8,
            "{name}: finite differences are all ~0; the check would be vacuous"
        );
        worst64 = worst64.max(e64);
        worst32 = worst32.max(e32);
    }
    (worst64, worst32)
}

fn fixture_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/rwkv7-tiny-834k")
}

fn load_fixture() -> Option<Weights> {
    let p = fixture_dir().join("rwkv7-tiny-834k.safetensors");
    if !p.exists() {
        println!("SKIP: fixture {} not found", p.display());
        return None;
    }
    Some(Weights::load(&p).expect("load fixture"))
}

#[test]
fn gradient_matches_finite_differences_random_model() {
    let cfg = small_config();
    let w = Weights::random(&cfg, 7).unwrap();
    let mut rng = Rng(11);
    let s = random_state(&cfg, true, 0.5, &mut rng);
    let batch = vec![
        random_example(9, cfg.vocab, false, true, &mut rng),
        random_example(12, cfg.vocab, true, true, &mut rng),
    ];
    let o = GradOpts {
        observer_weight: 0.3,
        chunk: 4,
    };
    let mut groups = Vec::new();
    for l in 0..cfg.n_layer {
        groups.push((format!("wkv[{l}]"), sample_coords(&cfg, 0, l, 10, &mut rng)));
        groups.push((
            format!("shift_att[{l}]"),
            sample_coords(&cfg, 1, l, 8, &mut rng),
        ));
        groups.push((
            format!("shift_ffn[{l}]"),
            sample_coords(&cfg, 2, l, 8, &mut rng),
        ));
    }
    let (e64, e32) = check_groups(&w, &s, &batch, &o, &groups, 1e-5);
    println!("worst relative error: f64 {e64:.2e}, f32 {e32:.2e}");
    assert!(
        e64 <= 1e-4,
        "f64 gradient vs f64 finite differences: {e64:.3e}"
    );
    assert!(
        e32 <= 2e-2,
        "f32 gradient vs f64 finite differences: {e32:.3e}"
    );
}

#[test]
fn f32_and_f64_gradients_agree_on_whole_tensors() {
    let cfg = small_config();
    let w = Weights::random(&cfg, 3).unwrap();
    let mut rng = Rng(5);
    let s = random_state(&cfg, true, 1.0, &mut rng);
    let batch = vec![
        random_example(16, cfg.vocab, true, true, &mut rng),
        random_example(10, cfg.vocab, false, false, &mut rng),
    ];
    let o = GradOpts {
        observer_weight: 0.5,
        chunk: 5,
    };
    let (l64, n64, g64) = loss_and_grad_f64(&w, &s.map(|v| v as f64), &batch, &o).unwrap();
    let out = loss_and_grad(&w, &s, &batch, &o).unwrap();
    assert!(
        (out.loss - l64).abs() <= 1e-5 * l64.abs(),
        "{} vs {l64}",
        out.loss
    );
    assert_eq!(out.n_tokens, n64);
    let g32 = out.grad.map(|v| v as f64);
    for (i, (a, b)) in g32.params().into_iter().zip(g64.params()).enumerate() {
        let e = rel_err(a, b);
        assert!(
            e <= 1e-3,
            "tensor {i}: f32 vs f64 gradient rel. error {e:.3e}"
        );
    }
}

#[test]
fn gradient_without_shift_states_has_no_shift_grads() {
    let cfg = small_config();
    let w = Weights::random(&cfg, 9).unwrap();
    let mut rng = Rng(1);
    let s = random_state(&cfg, false, 0.5, &mut rng);
    let batch = vec![random_example(7, cfg.vocab, true, false, &mut rng)];
    let out = loss_and_grad(
        &w,
        &s,
        &batch,
        &GradOpts {
            observer_weight: 0.0,
            chunk: 3,
        },
    )
    .unwrap();
    assert!(out.grad.shift_att.is_none() && out.grad.shift_ffn.is_none());
    assert_eq!(out.grad.wkv.len(), cfg.n_layer);
    assert!(out.grad.wkv.iter().all(|g| g.iter().any(|v| *v != 0.0)));
    assert!(out.dbp_stats.is_none());
}

#[test]
fn loss_only_matches_and_chunking_does_not_change_gradients() {
    let cfg = small_config();
    let w = Weights::random(&cfg, 21).unwrap();
    let mut rng = Rng(2);
    let s = random_state(&cfg, true, 0.7, &mut rng);
    let batch = vec![
        random_example(13, cfg.vocab, true, false, &mut rng),
        random_example(8, cfg.vocab, false, false, &mut rng),
        random_example(11, cfg.vocab, true, false, &mut rng),
    ];
    let a = loss_and_grad(
        &w,
        &s,
        &batch,
        &GradOpts {
            observer_weight: 0.0,
            chunk: 3,
        },
    )
    .unwrap();
    let b = loss_and_grad(
        &w,
        &s,
        &batch,
        &GradOpts {
            observer_weight: 0.0,
            chunk: 1000,
        },
    )
    .unwrap();
    let (l, n) = loss_only(&w, &s, &batch).unwrap();
    println!(
        "loss {} / {} tokens; peak bytes chunk=3: {}, chunk=1000: {}",
        a.loss, a.n_tokens, a.peak_bytes, b.peak_bytes
    );
    assert!(
        (l - a.loss).abs() <= 1e-6 * l.abs(),
        "loss_only {l} vs loss_and_grad {}",
        a.loss
    );
    assert!((b.loss - a.loss).abs() <= 1e-6 * l.abs());
    assert_eq!(n, a.n_tokens);
    assert!(a.peak_bytes > 0 && b.peak_bytes > 0);
    for (i, (x, y)) in a.grad.params().into_iter().zip(b.grad.params()).enumerate() {
        let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let y: Vec<f64> = y.iter().map(|&v| v as f64).collect();
        let e = rel_err(&x, &y);
        assert!(
            e <= 1e-5,
            "tensor {i}: chunk 3 vs 1000 gradient rel. error {e:.3e}"
        );
    }
    // observer on: loss_only_with agrees with loss_and_grad too
    let mut rng = Rng(4);
    let soft_batch: Vec<Example> = (0..2)
        .map(|_| random_example(9, cfg.vocab, true, true, &mut rng))
        .collect();
    let o = GradOpts {
        observer_weight: 0.7,
        chunk: 4,
    };
    let g = loss_and_grad(&w, &s, &soft_batch, &o).unwrap();
    let (l2, _) = loss_only_with(&w, &s, &soft_batch, &o).unwrap();
    assert!((l2 - g.loss).abs() <= 1e-6 * l2.abs());
}

#[test]
fn sums_over_the_batch() {
    let cfg = small_config();
    let w = Weights::random(&cfg, 8).unwrap();
    let mut rng = Rng(3);
    let s = random_state(&cfg, true, 0.5, &mut rng);
    let e1 = random_example(6, cfg.vocab, false, false, &mut rng);
    let e2 = random_example(9, cfg.vocab, true, false, &mut rng);
    let o = GradOpts::default();
    let a = loss_and_grad(&w, &s, std::slice::from_ref(&e1), &o).unwrap();
    let b = loss_and_grad(&w, &s, std::slice::from_ref(&e2), &o).unwrap();
    let ab = loss_and_grad(&w, &s, &[e1, e2], &o).unwrap();
    assert!((a.loss + b.loss - ab.loss).abs() < 1e-6 * ab.loss);
    assert_eq!(a.n_tokens + b.n_tokens, ab.n_tokens);
    for ((x, y), z) in a
        .grad
        .params()
        .into_iter()
        .zip(b.grad.params())
        .zip(ab.grad.params())
    {
        for ((p, q), r) in x.iter().zip(y).zip(z) {
            assert!((p + q - r).abs() <= 1e-5 * (1.0 + r.abs()));
        }
    }
    // an all-zero mask contributes nothing
    let mut e3 = random_example(5, cfg.vocab, false, false, &mut rng);
    e3.mask.iter_mut().for_each(|m| *m = 0.0);
    let z = loss_and_grad(&w, &s, &[e3], &o).unwrap();
    assert_eq!(z.loss, 0.0);
    assert!(z.grad.params().iter().all(|p| p.iter().all(|v| *v == 0.0)));
}

#[test]
fn invalid_inputs_are_named_errors() {
    let cfg = small_config();
    let w = Weights::random(&cfg, 1).unwrap();
    let s = TunedState::zeros(&cfg, true);
    let o = GradOpts::default();
    let mut rng = Rng(9);
    let good = random_example(5, cfg.vocab, false, false, &mut rng);
    let mut bad_tok = good.clone();
    bad_tok.tokens[2] = cfg.vocab as u32;
    assert!(matches!(
        loss_and_grad(&w, &s, &[bad_tok], &o),
        Err(Error::Tune(_))
    ));
    let mut bad_tgt = good.clone();
    bad_tgt.targets[0] = 1000;
    assert!(matches!(loss_only(&w, &s, &[bad_tgt]), Err(Error::Tune(_))));
    let mut bad_len = good.clone();
    bad_len.mask.pop();
    assert!(matches!(
        loss_and_grad(&w, &s, &[bad_len], &o),
        Err(Error::Shape { .. })
    ));
    let mut bad_soft = good.clone();
    bad_soft.soft = Some(vec![0.1; 7]);
    assert!(matches!(
        loss_and_grad(&w, &s, &[bad_soft], &o),
        Err(Error::Shape { .. })
    ));
    let mut bad_mask = good.clone();
    bad_mask.mask[1] = f32::NAN;
    assert!(matches!(
        loss_and_grad(&w, &s, &[bad_mask], &o),
        Err(Error::Tune(_))
    ));
    let mut bad_state = s.clone();
    bad_state.wkv[1].pop();
    assert!(matches!(
        loss_and_grad(&w, &bad_state, std::slice::from_ref(&good), &o),
        Err(Error::Shape { .. })
    ));
    let mut bad_state = s.clone();
    bad_state.shift_ffn.as_mut().unwrap().pop();
    assert!(matches!(
        loss_only(&w, &bad_state, std::slice::from_ref(&good)),
        Err(Error::Shape { .. })
    ));
    let zero_chunk = GradOpts {
        observer_weight: 0.0,
        chunk: 0,
    };
    assert!(matches!(
        loss_and_grad(&w, &s, std::slice::from_ref(&good), &zero_chunk),
        Err(Error::Tune(_))
    ));
    // empty batch is fine
    let e = loss_and_grad(&w, &s, &[], &o).unwrap();
    assert_eq!((e.loss, e.n_tokens), (0.0, 0.0));
}

#[test]
fn dbp_statistics_are_collected() {
    let cfg = small_config();
    let w = Weights::random(&cfg, 2).unwrap();
    let mut rng = Rng(6);
    let s = random_state(&cfg, false, 0.5, &mut rng);
    let batch = vec![random_example(7, cfg.vocab, true, false, &mut rng)];
    let o = GradOpts::default();
    let a = loss_and_grad_dbp(&w, &s, &batch, &o).unwrap();
    let b = loss_and_grad(&w, &s, &batch, &o).unwrap();
    assert_eq!(a.grad, b.grad);
    let st = a.dbp_stats.expect("stats");
    assert_eq!(st.count, 6.0); // positions 0..=5 (the last one is unmasked)
    let n = cfg.head_size;
    for l in 0..cfg.n_layer {
        for h in 0..cfg.n_head {
            let m = st.mean(l, h);
            for i in 0..n {
                assert!(m[i * n + i] > 0.0);
                for j in 0..n {
                    assert!((m[i * n + j] - m[j * n + i]).abs() < 1e-9);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The real tiny fixture
// ---------------------------------------------------------------------------

#[test]
fn fixture_golden_logits() {
    let Some(w) = load_fixture() else { return };
    let path = fixture_dir().join("expected-logits-7v0-834K.bin");
    let bytes = std::fs::read(&path).expect("expected logits");
    let want: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(want.len(), 256);
    let s = TunedState::zeros(&w.config, false);
    let logits = forward_logits(&w, &s, &[34, 105, 110]).unwrap();
    let last = &logits[2 * 256..3 * 256];
    let maxd = last
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("golden logits: max |Δ| = {maxd:.3e}");
    assert!(maxd <= 1e-5, "max |Δ| = {maxd}");
    // the loss engine sees the same model: its CE at the last position
    // equals the golden logits' CE
    let ex = Example {
        tokens: vec![34, 105, 110],
        targets: vec![0, 0, 32],
        mask: vec![0.0, 0.0, 1.0],
        soft: None,
    };
    let (l, n) = loss_only(&w, &s, &[ex]).unwrap();
    let mx = want.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    let lse = mx
        + want
            .iter()
            .map(|&v| (v as f64 - mx).exp())
            .sum::<f64>()
            .ln();
    assert_eq!(n, 1.0);
    assert!(
        (l - (lse - want[32] as f64)).abs() < 1e-4,
        "{l} vs {}",
        lse - want[32] as f64
    );
}

#[test]
fn fixture_gradient_matches_finite_differences() {
    let Some(w) = load_fixture() else { return };
    let cfg = w.config.clone();
    let mut rng = Rng(77);
    let s = random_state(&cfg, true, 0.3, &mut rng);
    let text = b"First Citizen:\nBefore we proceed any further, hear me speak.";
    let toks: Vec<u32> = text.iter().map(|&b| b as u32).collect();
    let t = 24;
    let mk = |off: usize, partial: bool| Example {
        tokens: toks[off..off + t].to_vec(),
        targets: toks[off + 1..off + t + 1].to_vec(),
        mask: (0..t)
            .map(|i| if partial && i < 6 { 0.0 } else { 1.0 })
            .collect(),
        soft: None,
    };
    let batch = vec![mk(0, false), mk(20, true)];
    let o = GradOpts {
        observer_weight: 0.0,
        chunk: 7,
    };
    let mut groups = Vec::new();
    for l in [0, 5, cfg.n_layer - 1] {
        groups.push((format!("wkv[{l}]"), sample_coords(&cfg, 0, l, 8, &mut rng)));
        groups.push((
            format!("shift_att[{l}]"),
            sample_coords(&cfg, 1, l, 6, &mut rng),
        ));
        groups.push((
            format!("shift_ffn[{l}]"),
            sample_coords(&cfg, 2, l, 6, &mut rng),
        ));
    }
    // h = 1e-4: the summed loss is ~170 nats, so smaller steps drown the
    // smallest gradients (|g| ~ 1e-6) in f64 rounding of the loss.
    let (e64, e32) = check_groups(&w, &s, &batch, &o, &groups, 1e-4);
    println!("fixture worst relative error: f64 {e64:.2e}, f32 {e32:.2e}");
    assert!(e64 <= 1e-4, "f64: {e64:.3e}");
    assert!(e32 <= 2e-2, "f32: {e32:.3e}");
}

/// Throughput of `loss_and_grad` on the fixture at T=256, batch 4
/// (`cargo test --release --test tune_grad -- --ignored --nocapture speed`).
#[test]
#[ignore]
fn speed_fixture_t256_b4() {
    let Some(w) = load_fixture() else { return };
    let cfg = w.config.clone();
    let mut rng = Rng(1);
    let s = random_state(&cfg, true, 0.3, &mut rng);
    let batch: Vec<Example> = (0..4)
        .map(|_| random_example(256, cfg.vocab, false, false, &mut rng))
        .collect();
    for chunk in [16usize, 64, 256] {
        let o = GradOpts {
            observer_weight: 0.0,
            chunk,
        };
        let _ = loss_and_grad(&w, &s, &batch, &o).unwrap();
        let reps = 3;
        let t0 = std::time::Instant::now();
        let mut peak = 0;
        for _ in 0..reps {
            peak = loss_and_grad(&w, &s, &batch, &o).unwrap().peak_bytes;
        }
        let dt = t0.elapsed().as_secs_f64() / reps as f64;
        let t1 = std::time::Instant::now();
        for _ in 0..reps {
            let _ = loss_only(&w, &s, &batch).unwrap();
        }
        let df = t1.elapsed().as_secs_f64() / reps as f64;
        println!(
            "chunk {chunk:>3}: loss_and_grad {:.0} tok/s ({:.1} ms/batch), peak {:.2} MiB; loss_only {:.0} tok/s; threads {}",
            1024.0 / dt,
            dt * 1e3,
            peak as f64 / (1 << 20) as f64,
            1024.0 / df,
            rayon::current_num_threads()
        );
    }
}
