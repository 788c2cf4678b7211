//! One state-tuning optimiser step (loss, state gradients, clipping, Adam;
//! DBP off): the CPU engine (`DeviceEngine` over `CpuOps`) on the tiny model
//! shape (12 layers, C = 64, byte vocab; the real fixture when ../shared has
//! it), and the device engine (`tune::device::DeviceEngine`, the whole batch
//! in one pass, activations kept) on a GPU when one is present, on the tiny
//! shape, a 0.1B-class shape (12 layers, C = 768, 12 heads × 64, vocab
//! 65536) and a 1.5B-class shape (24 layers, C = 2048, 32 heads × 64, vocab
//! 65536), batch 8 × ctx 512, random weights (the speed does not depend on
//! the values), with the v1 and the v2 (tensor-core) WKV kernels.
//! Throughput is in target tokens per second. On the emulator a small shape
//! is stepped once (not timed) and the ops counters of that step are
//! printed: launches per op, device allocations, transfers.
//!
//! `cargo bench --bench tune_step`; CI runs it once in test mode.
//! `TUNE_STEP_SHAPES=0.1b` limits the device rows to the shapes so named.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rwkv_tune::model::{Config, Weights};
use rwkv_tune::ops::backward::BackwardOps;
use rwkv_tune::ops::DeviceOps;
use rwkv_tune::tune::device::DeviceEngine;
use rwkv_tune::tune::engine::Engine;
use rwkv_tune::tune::grad::{Example, GradOpts, TunedState};
use rwkv_tune::tune::optim::AdamConfig;

fn tiny_weights() -> Weights {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/rwkv7-tiny-834k/rwkv7-tiny-834k.safetensors");
    if p.is_file() {
        return Weights::load(&p).expect("load the tiny model");
    }
    eprintln!(
        "note: {} not found; random weights of the same shape",
        p.display()
    );
    Weights::random(&Config::with_defaults(12, 64, 64, 256), 7).unwrap()
}

/// `b` examples of `t` text-like tokens, loss on every position.
fn batch(b: usize, t: usize, vocab: usize) -> Vec<Example> {
    let text = b"First Citizen: Before we proceed any further, hear me speak. ";
    (0..b)
        .map(|i| {
            let toks: Vec<u32> = text
                .iter()
                .cycle()
                .skip(7 * i)
                .take(t + 1)
                .map(|&c| c as u32 % vocab as u32)
                .collect();
            Example {
                tokens: toks[..t].to_vec(),
                targets: toks[1..].to_vec(),
                mask: vec![1.0; t],
                soft: None,
            }
        })
        .collect()
}

fn time_steps(e: &mut dyn Engine, bt: &[Example], iters: u64) -> Duration {
    let t0 = Instant::now();
    for _ in 0..iters {
        e.step(bt, 1e-3, 1.0).unwrap();
    }
    t0.elapsed()
}

fn device_rows<O: BackwardOps>(c: &mut Criterion, ops: impl Fn() -> O, label: &str) {
    let mut g = c.benchmark_group(format!("tune_step_{label}"));
    g.sample_size(10);
    type Shape = (&'static str, fn() -> Weights, usize, usize);
    let shapes: [Shape; 3] = [
        ("tiny_b4_t256", tiny_weights, 4, 256),
        (
            "0.1b_b8_t512",
            || Weights::random(&Config::with_defaults(12, 768, 64, 65536), 3).unwrap(),
            8,
            512,
        ),
        (
            "1.5b_b8_t512",
            || Weights::random(&Config::with_defaults(24, 2048, 64, 65536), 4).unwrap(),
            8,
            512,
        ),
    ];
    // TUNE_STEP_SHAPES=0.1b (comma-separated name prefixes) builds and times
    // only those shapes (.ci/gpu-run: the 0.1B row within its time budget).
    let only = std::env::var("TUNE_STEP_SHAPES").ok();
    for (name, make, b, t) in shapes {
        if let Some(o) = &only {
            if !o.split(',').any(|p| !p.is_empty() && name.starts_with(p)) {
                continue;
            }
        }
        let w = &make();
        let bt = batch(b, t, w.config.vocab);
        let init = TunedState::zeros(&w.config, false);
        let mut e = DeviceEngine::new(
            ops(),
            w,
            &init,
            AdamConfig::default(),
            None,
            GradOpts::default(),
        )
        .unwrap();
        eprintln!(
            "{label} {name}: planned activation memory {:.2} GiB",
            e.tuner().plan_bytes(b, t, e.tuner().recompute()) as f64 / (1u64 << 30) as f64
        );
        g.throughput(Throughput::Elements((b * t) as u64));
        g.bench_function(name, |bn| bn.iter_custom(|n| time_steps(&mut e, &bt, n)));
    }
    g.finish();
}

/// One step on the emulator at a small shape (2 layers, C = 64, batch 4 ×
/// 16): what the ops layer counts for a step after a warm-up step.
fn emu_counters() {
    let w = Weights::random(&Config::with_defaults(2, 64, 32, 256), 9).unwrap();
    let bt = batch(4, 16, w.config.vocab);
    let init = TunedState::zeros(&w.config, false);
    let mut e = DeviceEngine::new(
        rwkv_tune::ops::emu::EmuOps::default(),
        &w,
        &init,
        AdamConfig::default(),
        None,
        GradOpts::default(),
    )
    .unwrap();
    e.step(&bt, 1e-3, 1.0).unwrap();
    let c0 = e.tuner().ops().counters().snapshot();
    e.step(&bt, 1e-3, 1.0).unwrap();
    let d = e.tuner().ops().counters().snapshot().since(&c0);
    eprintln!("tune_step emu (L2 C64 H2×32, batch 4 × 16), one step after warm-up: {d}");
}

fn bench(c: &mut Criterion) {
    if std::env::var_os("TUNE_STEP_SHAPES").is_some() {
        // the GPU check: only the named device rows
        return cuda_rows(c);
    }
    let w = tiny_weights();
    let mut g = c.benchmark_group("tune_step_cpu");
    g.sample_size(10);
    let (b, t) = (4, 256);
    let bt = batch(b, t, w.config.vocab);
    // the CPU engine: the device engine over the CPU twins
    let mut e = DeviceEngine::new(
        rwkv_tune::ops::cpu::CpuOps::new(),
        &w,
        &TunedState::zeros(&w.config, false),
        AdamConfig::default(),
        None,
        GradOpts::default(),
    )
    .unwrap();
    g.throughput(Throughput::Elements((b * t) as u64));
    g.bench_function("tiny_b4_t256", |bn| {
        bn.iter_custom(|n| time_steps(&mut e, &bt, n))
    });
    g.finish();
    emu_counters();
    cuda_rows(c);
}

fn cuda_rows(c: &mut Criterion) {
    match rwkv_tune::cuda::Gpu::new(0) {
        Ok(gpu) => {
            let gpu = Arc::new(gpu);
            eprintln!("device: {}", gpu.describe());
            device_rows(
                c,
                || rwkv_tune::ops::cuda::CudaOps::new(gpu.clone()).unwrap(),
                "cuda",
            );
            device_rows(
                c,
                || {
                    rwkv_tune::ops::cuda::CudaOps::new(gpu.clone())
                        .unwrap()
                        .with_wkv(rwkv_tune::wkv7::Version::V2)
                },
                "cuda_wkv_v2",
            );
            device_rows(
                c,
                || {
                    rwkv_tune::ops::cuda::CudaOps::new(gpu.clone())
                        .unwrap()
                        .with_wkv(rwkv_tune::wkv7::Version::V3)
                },
                "cuda_wkv_v3",
            );
        }
        Err(e) => eprintln!("tune_step: no GPU ({e}); only the CPU engine is timed"),
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
