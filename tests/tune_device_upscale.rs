//! The kernel-upscaled state (docs/upscale.md) on the device engine
//! (`tune::device::{DeviceTuner, DeviceEngine}::new_upscaled`) against the
//! CPU engine (`tune::upscale`, itself checked against f64 finite differences
//! in tests/tune_upscale.rs): the gradient of `S_0` and `U` on the cpu
//! backend (Rust twins) and the emu backend (the CUDA kernels on the CPU
//! emulator), optimiser steps, checkpoints and evaluation.
//!
//! Tolerance: as in tests/tune_device.rs, 1e-3 relative (Frobenius, per
//! tensor) against the f64 CPU gradient — the device engine is f32 and sums
//! in a different order.
use rwkv_tune::model::weights::{Config, Weights};
use rwkv_tune::model::Model;
use rwkv_tune::ops::backward::BackwardOps;
use rwkv_tune::ops::cpu::CpuOps;
use rwkv_tune::ops::emu::EmuOps;
use rwkv_tune::tune::data::ByteTokenizer;
use rwkv_tune::tune::demo;
use rwkv_tune::tune::device::{DeviceEngine, DeviceTuner};
use rwkv_tune::tune::engine::Engine;
use rwkv_tune::tune::grad::{Example, GradOpts, TunedState};
use rwkv_tune::tune::optim::AdamConfig;
use rwkv_tune::tune::upscale::{
    evaluate_upscaled, loss_and_grad_upscaled, loss_and_grad_upscaled_f64, Kernel, UpscaleConfig,
    UpscaledState, UpscaledStateOf,
};
use rwkv_tune::Error;

mod common;
use common::tune::{
    host_update, random_example, random_state, rel_err, small_config, tiny_config, Rng,
};

/// Weights, a kernel with `m` support vectors fitted on the receptances of
/// a few examples, and a state with random `S_0` (and shift states) and `U`.
fn setup(cfg: &Config, m: usize, seed: u64) -> (Weights, Kernel, UpscaledState, Rng) {
    let w = Weights::random(cfg, seed).unwrap();
    let mut rng = Rng(seed + 1);
    let fit: Vec<Example> = (0..3)
        .map(|i| random_example(10 + i, cfg.vocab, false, false, &mut rng))
        .collect();
    let uc = UpscaleConfig {
        m,
        kmeans_iters: 5,
        ..UpscaleConfig::new(cfg.head_size)
    };
    let k = Kernel::fit(&w, &TunedState::zeros(cfg, false), &fit, &uc).unwrap();
    let mut s = UpscaledState::new(random_state(cfg, true, 0.3, &mut rng), &k);
    for u in s.u.iter_mut() {
        u.iter_mut().for_each(|v| *v = rng.sym(0.5) as f32);
    }
    (w, k, s, rng)
}

/// Worst per-tensor relative error of the state part and of the `U` part.
fn worst(g: &UpscaledState, r: &UpscaledStateOf<f64>) -> (f64, f64) {
    let g = g.map(|v| v as f64);
    let n_state = g.state.params().len();
    let (mut ws, mut wu) = (0.0f64, 0.0f64);
    for (i, (a, b)) in g.params().into_iter().zip(r.params()).enumerate() {
        let mx = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(mx > 0.0, "tensor {i}: the reference gradient is zero");
        let e = rel_err(a, b);
        if i < n_state {
            ws = ws.max(e);
        } else {
            wu = wu.max(e);
        }
    }
    (ws, wu)
}

fn check_backend<O: BackwardOps>(ops: O, label: &str) {
    // M = 40 > 32: the kernels' second tile of support vectors is partial;
    // head size 32 (the emulated WKV kernels need N ≥ 32)
    let cfg = small_config();
    let (w, k, s, mut rng) = setup(&cfg, 40, 31);
    let batch = vec![
        random_example(9, cfg.vocab, false, true, &mut rng),
        random_example(14, cfg.vocab, true, true, &mut rng),
    ];
    let o = GradOpts {
        observer_weight: 0.3,
        chunk: 64,
    };
    let (l64, n64, g64) =
        loss_and_grad_upscaled_f64(&w, &k, &s.map(|v| v as f64), &batch, &o).unwrap();
    let tuner = DeviceTuner::new_upscaled(ops, &w, &k).unwrap();
    assert_eq!(tuner.upscale_m(), Some(40));
    let (loss, n, g, peak) = tuner.loss_and_grad_upscaled(&s, &batch, &o).unwrap();
    let (es, eu) = worst(&g, &g64);
    println!(
        "{label}: loss {loss:.6} vs f64 {l64:.6}; worst tensor rel. error: S_0 {es:.2e}, \
         U {eu:.2e}; peak activations {peak} B"
    );
    assert_eq!(n, n64);
    assert!(
        (loss - l64).abs() <= 1e-5 * l64.abs(),
        "{label}: loss {loss} vs {l64}"
    );
    assert!(es <= 1e-3, "{label}: S_0 gradient rel. error {es:.3e}");
    assert!(eu <= 1e-3, "{label}: U gradient rel. error {eu:.3e}");
    // a plain state (no U) given to the upscaled tuner: a typed error
    let plain = tuner.upload_state(&s.state).unwrap();
    let r = tuner.grad(&plain, &batch, &o, false);
    assert!(matches!(r, Err(Error::Shape { .. })), "{:?}", r.err());
}

#[test]
fn cpu_backend_upscaled_gradient_matches_the_cpu_engine() {
    check_backend(CpuOps::new(), "cpu");
}

#[test]
fn emulated_kernels_upscaled_gradient_matches_the_cpu_engine() {
    check_backend(EmuOps::default(), "emu");
}

#[test]
fn cuda_upscaled_gradient_matches_the_cpu_engine() {
    match rwkv_tune::cuda::Gpu::new(0) {
        Ok(gpu) => {
            let ops = rwkv_tune::ops::cuda::CudaOps::new(std::sync::Arc::new(gpu)).unwrap();
            check_backend(ops, "cuda");
        }
        Err(e) => rwkv_tune::cuda::skip_gpu("cuda", &e),
    }
}

/// Steps of the upscaled device engine (cpu backend) track the host
/// reference step (the gradient of `loss_and_grad_upscaled`, host clipping
/// and Adam) with clipping and the token-shift states; a save → load round
/// trip is bit-identical.
#[test]
fn upscaled_device_engine_steps_track_the_host_reference() {
    let cfg = tiny_config();
    let (w, k, mut init, mut rng) = setup(&cfg, 24, 41);
    // start from U = 0 as the CLI does
    init.u.iter_mut().for_each(|u| u.fill(0.0));
    let batches: Vec<Vec<Example>> = (0..4)
        .map(|_| {
            vec![
                random_example(8, cfg.vocab, true, false, &mut rng),
                random_example(11, cfg.vocab, false, false, &mut rng),
            ]
        })
        .collect();
    // active on some steps (norms ≈ 0.05), not on all
    const CLIP: f64 = 0.052;
    let o = GradOpts::default();
    let adam = AdamConfig::default();
    let mut hs = init.clone();
    let sizes: Vec<usize> = hs.params().iter().map(|p| p.len()).collect();
    let mut host_adam = rwkv_tune::tune::optim::Adam::new(adam, &sizes);
    let mut dev =
        DeviceEngine::new_upscaled(CpuOps::new(), &w, &k, &init, adam, None, o.clone()).unwrap();
    assert_eq!(sizes, dev.sizes());
    let mut clipped = 0;
    for (i, b) in batches.iter().enumerate() {
        let r = loss_and_grad_upscaled(&w, &k, &hs, b, &o).unwrap();
        let mut g = r.grad;
        let an = host_update(
            &mut host_adam,
            hs.params_mut(),
            g.params_mut(),
            r.n_tokens,
            CLIP,
            0.05,
        )
        .unwrap();
        let d = dev.step(b, 0.05, CLIP).unwrap();
        println!(
            "step {i}: loss {:.6} / {:.6}, |g| {:.5} / {:.5}",
            r.loss, d.loss_sum, an, d.grad_norm
        );
        clipped += (an > CLIP) as usize;
        assert!((r.loss - d.loss_sum).abs() <= 1e-4 * r.loss.abs());
        assert!((an - d.grad_norm).abs() <= 1e-3 * an);
    }
    println!("clipped steps: {clipped} of 4");
    assert!(
        clipped > 0 && clipped < 4,
        "clipping should be active on some steps"
    );
    let ds = dev.upscaled().unwrap();
    let moved: f64 =
        hs.u.iter()
            .flatten()
            .map(|x| x.abs() as f64)
            .fold(0.0, f64::max);
    assert!(moved > 1e-2, "the steps should move U ({moved:.2e})");
    let mut e_max = 0.0f64;
    for (a, b) in ds.params().iter().zip(hs.params()) {
        let e = rel_err(
            &a.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &b.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        );
        e_max = e_max.max(e);
    }
    println!("S_0 and U after 4 steps: worst tensor rel. error {e_max:.2e}");
    assert!(e_max <= 1e-4, "after 4 steps: rel. error {e_max:.3e}");
    assert_eq!(dev.tuned().unwrap(), ds.state);
    // save → load into a fresh engine → the next step is identical
    let saved = dev.save().unwrap();
    let mut dev2 =
        DeviceEngine::new_upscaled(CpuOps::new(), &w, &k, &init, adam, None, o.clone()).unwrap();
    dev2.load(saved.clone()).unwrap();
    assert_eq!(dev2.upscaled().unwrap(), ds);
    let x = dev.step(&batches[0], 0.01, 1.0).unwrap();
    let y = dev2.step(&batches[0], 0.01, 1.0).unwrap();
    assert_eq!(x, y);
    assert_eq!(dev.save().unwrap(), dev2.save().unwrap());
    // the checkpoint holds the parameters in UpscaledStateOf::params order
    let p: Vec<Vec<f32>> = ds.params().iter().map(|x| x.to_vec()).collect();
    assert_eq!(saved.params, p);
    // a checkpoint with DBP matrices is refused
    let mut bad = saved;
    bad.dbp_r = Some(vec![0.0; 4]);
    assert!(matches!(dev2.load(bad), Err(Error::Tune(_))));
}

#[test]
fn upscaled_device_engine_refuses_dbp_and_bad_shapes() {
    let cfg = tiny_config();
    let (w, k, s, _) = setup(&cfg, 20, 51);
    let adam = AdamConfig::default();
    let o = GradOpts::default();
    let r = DeviceEngine::new_upscaled(
        CpuOps::new(),
        &w,
        &k,
        &s,
        adam,
        Some((0.05, 0.5)),
        o.clone(),
    );
    assert!(matches!(r, Err(Error::Tune(_))));
    let mut short = s.clone();
    short.u[1].pop();
    let r = DeviceEngine::new_upscaled(CpuOps::new(), &w, &k, &short, adam, None, o.clone());
    assert!(matches!(r, Err(Error::Shape { .. })));
    // a plain engine has no upscaled state; a plain tuner takes no U
    let plain = DeviceEngine::new(CpuOps::new(), &w, &s.state, adam, None, o).unwrap();
    assert!(matches!(plain.upscaled(), Err(Error::Tune(_))));
    let t = DeviceTuner::new(CpuOps::new(), &w).unwrap();
    assert!(matches!(t.upload_upscaled(&s), Err(Error::Tune(_))));
}

/// The device engine's evaluation includes the read-out: it matches
/// `evaluate_upscaled` (emulated kernels, demo model and task).
#[test]
fn upscaled_device_evaluation_matches_the_cpu() {
    let w = demo::demo_weights(demo::DEMO_MODEL_SEED).unwrap();
    let cfg = w.config.clone();
    let (tr, va) = demo::synthetic_datasets(8, 3, 5, &ByteTokenizer).unwrap();
    let uc = UpscaleConfig {
        m: 24,
        kmeans_iters: 3,
        ..UpscaleConfig::new(cfg.head_size)
    };
    let k = Kernel::fit(&w, &TunedState::zeros(&cfg, false), &tr.examples, &uc).unwrap();
    let mut rng = Rng(9);
    let mut s = UpscaledState::new(TunedState::zeros(&cfg, false), &k);
    for u in s.u.iter_mut() {
        u.iter_mut().for_each(|v| *v = rng.sym(1.0) as f32);
    }
    let model = Model::new(w.clone()).unwrap();
    let dev = DeviceEngine::new_upscaled(
        EmuOps::default(),
        &w,
        &k,
        &s,
        AdamConfig::default(),
        None,
        GradOpts::default(),
    )
    .unwrap();
    let got = dev.evaluate(&model, &va, 0).unwrap();
    let want = evaluate_upscaled(&w, &k, &s, &va, 0).unwrap();
    let plain = rwkv_tune::tune::train::evaluate(&model, &s.state, &va, 0).unwrap();
    println!("device {got:?}\ncpu    {want:?}\nplain  {plain:?}");
    assert!(
        (got.loss - want.loss).abs() <= 1e-4 * want.loss.abs(),
        "{got:?} vs {want:?}"
    );
    assert_eq!(got.exact, want.exact);
    assert!(
        (plain.loss - want.loss).abs() > 1e-3,
        "U should change the loss"
    );
}
