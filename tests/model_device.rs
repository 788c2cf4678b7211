//! The device forward (`model::device::DeviceModel`) against the CPU model
//! (`model::Model`): a random model with several layers and heads, sequence
//! mode and one-token mode, logits and the full final state, within 1e-4
//! relative (‖x − ref‖∞ / ‖ref‖∞); on the emulated GPU path (always), the
//! Rust-twin path, and cuda (when a GPU is present; SKIPPED otherwise). Also
//! the golden logits of the tiny trained model on the emulated path (when
//! ../shared is present).
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use rwkv_tune::model::device::DeviceModel;
use rwkv_tune::model::{Config, Logits, Model, State, Weights};
use rwkv_tune::ops::{cpu::CpuOps, emu::EmuOps};

const TOL: f64 = 1e-4;

fn rel(x: &[f32], r: &[f32]) -> f64 {
    assert_eq!(x.len(), r.len());
    let m = r
        .iter()
        .fold(0f64, |a, &b| a.max((b as f64).abs()))
        .max(1e-30);
    x.iter()
        .zip(r)
        .fold(0f64, |a, (&p, &q)| a.max((p as f64 - q as f64).abs()))
        / m
}

fn state_rel(a: &State, b: &State) -> f64 {
    let mut e = 0f64;
    for (x, y) in a.layers.iter().zip(&b.layers) {
        e = e.max(rel(&x.att_x, &y.att_x));
        e = e.max(rel(&x.ffn_x, &y.ffn_x));
        e = e.max(rel(&x.wkv, &y.wkv));
    }
    e
}

fn random_model() -> (Weights, Model) {
    // C = 128, H = 2, N = 64, 3 layers, V = 97
    let mut cfg = Config::with_defaults(3, 128, 64, 97);
    cfg.d_w = 32;
    cfg.d_a = 32;
    cfg.d_v = 32;
    cfg.d_g = 32;
    let w = Weights::random(&cfg, 42).unwrap();
    let m = Model::new(w.clone()).unwrap();
    (w, m)
}

fn tokens(t: usize) -> Vec<u32> {
    (0..t).map(|i| ((i * 37 + 11) % 97) as u32).collect()
}

/// Sequence mode (T = 20 from a non-zero state) and one-token mode (6 steps)
/// vs the CPU model.
fn check_device<D: rwkv_tune::ops::backward::BackwardOps>(ops: D, label: &str) {
    let (w, cpu) = random_model();
    let t0 = Instant::now();
    let dm = DeviceModel::new(ops, &w).unwrap();
    let toks = tokens(20);

    // a non-zero starting state: run a few tokens on the CPU first
    let mut s_cpu = cpu.new_state();
    cpu.forward(&[5, 6, 7], &mut s_cpu, Logits::None).unwrap();
    let mut s_dev = s_cpu.clone();

    let want = cpu.forward_seq(&toks, &mut s_cpu).unwrap();
    let got = dm.forward_seq(&toks, &mut s_dev).unwrap();
    let (el, es) = (rel(&got, &want), state_rel(&s_dev, &s_cpu));
    eprintln!("{label}: sequence mode T=20: logits rel err {el:.2e}, state rel err {es:.2e}");
    assert!(
        el <= TOL && es <= TOL,
        "{label} sequence mode: {el:e} / {es:e}"
    );

    // Logits::Last and a device-resident state
    let mut ds = dm.new_state().unwrap();
    let last = dm.forward_dev(&toks, &mut ds, Logits::Last).unwrap();
    let mut s0 = cpu.new_state();
    let all0 = cpu.forward_seq(&toks, &mut s0).unwrap();
    let e = rel(&last, &all0[19 * 97..]);
    eprintln!("{label}: Logits::Last from zero state: rel err {e:.2e}");
    assert!(e <= TOL);
    assert!(state_rel(&dm.download_state(&ds).unwrap(), &s0) <= TOL);

    // one-token mode, continuing from the state above
    for (i, &tok) in [3u32, 96, 0, 50, 50, 8].iter().enumerate() {
        let want = cpu.step(tok, &mut s_cpu).unwrap();
        let got = dm.step(tok, &mut s_dev).unwrap();
        let (el, es) = (rel(&got, &want), state_rel(&s_dev, &s_cpu));
        if i == 5 {
            eprintln!("{label}: one-token mode after 6 steps: logits {el:.2e}, state {es:.2e}");
        }
        assert!(el <= TOL && es <= TOL, "{label} step {i}: {el:e} / {es:e}");
    }
    assert!(
        dm.forward_seq(&[97], &mut s_dev).is_err(),
        "token out of range"
    );
    eprintln!("{label}: {:.2} s", t0.elapsed().as_secs_f64());
}

#[test]
fn device_model_emu_matches_cpu_model() {
    check_device(EmuOps::default(), "emu");
}

#[test]
fn device_model_twins_match_cpu_model() {
    check_device(CpuOps::new(), "cpu-twins");
}

#[test]
fn device_model_cuda_matches_cpu_model() {
    let gpu = match rwkv_tune::cuda::Gpu::new(0) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            rwkv_tune::cuda::skip_gpu("device model on cuda", &e);
            return;
        }
    };
    check_device(rwkv_tune::ops::cuda::CudaOps::new(gpu).unwrap(), "cuda");
}

#[test]
fn golden_logits_tiny_model_emu() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/rwkv7-tiny-834k");
    let path = dir.join("rwkv7-tiny-834k.safetensors");
    if !path.is_file() {
        eprintln!("SKIPPED: {} not found", path.display());
        return;
    }
    let b = std::fs::read(dir.join("expected-logits-7v0-834K.bin")).unwrap();
    let want: Vec<f32> = b
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(want.len(), 256);
    let w = Weights::load(&path).unwrap();
    let dm = DeviceModel::new(EmuOps::default(), &w).unwrap();
    let prompt = [34u32, 105, 110];

    let mut ds = dm.new_state().unwrap();
    let got = dm.forward_dev(&prompt, &mut ds, Logits::Last).unwrap();
    let d = got
        .iter()
        .zip(&want)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    eprintln!("tiny model on emu, sequence mode: max |Δ| = {d:e}");
    assert!(d < 1e-5, "sequence mode max |Δ| = {d}");

    let mut ds = dm.new_state().unwrap();
    let mut got = Vec::new();
    for &t in &prompt {
        got = dm.forward_dev(&[t], &mut ds, Logits::Last).unwrap();
    }
    let d = got
        .iter()
        .zip(&want)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    eprintln!("tiny model on emu, one-token mode: max |Δ| = {d:e}");
    assert!(d < 1e-5, "one-token mode max |Δ| = {d}");
}
