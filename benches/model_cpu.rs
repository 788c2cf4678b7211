//! CPU forward throughput of the tiny RWKV-7 model (12 layers, C=64, byte
//! vocab): sequence mode at T=1024 and T=4096, and one-token mode with logits
//! after every token. Uses ../shared/fixtures/rwkv7-tiny-834k when present,
//! otherwise random weights of the same shape (the speed is the same).
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rwkv_tune::model::{Config, Logits, Model, Weights};

fn tiny_model() -> Model {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/rwkv7-tiny-834k/rwkv7-tiny-834k.safetensors");
    if p.is_file() {
        return Model::load(&p).expect("load the tiny model");
    }
    eprintln!(
        "note: {} not found; using random weights of the same shape",
        p.display()
    );
    let cfg = Config {
        n_layer: 12,
        n_embd: 64,
        n_head: 1,
        head_size: 64,
        vocab: 256,
        d_w: 32,
        d_a: 32,
        d_v: 32,
        d_g: 32,
        d_ffn: 256,
    };
    Model::new(Weights::random(&cfg, 7).unwrap()).unwrap()
}

/// Deterministic text-like bytes (from the Shakespeare file when present).
fn tokens(n: usize) -> Vec<u32> {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets/tinyshakespeare.txt");
    let text = std::fs::read(p).unwrap_or_else(|_| {
        b"First Citizen: Before we proceed any further, hear me speak. ".repeat(64)
    });
    text.iter().cycle().take(n).map(|&b| b as u32).collect()
}

fn bench(c: &mut Criterion) {
    let model = tiny_model();
    let mut g = c.benchmark_group("tiny_cpu");
    g.sample_size(10);
    for t in [1024usize, 4096] {
        let toks = tokens(t);
        g.throughput(Throughput::Elements(t as u64));
        g.bench_function(format!("sequence_T{t}_all_logits"), |b| {
            b.iter(|| {
                let mut st = model.new_state();
                model.forward(&toks, &mut st, Logits::All).unwrap()
            })
        });
    }
    let toks = tokens(256);
    g.throughput(Throughput::Elements(toks.len() as u64));
    g.bench_function("one_token_256_steps", |b| {
        b.iter(|| {
            let mut st = model.new_state();
            let mut last = 0.0;
            for &t in &toks {
                last = model.step(t, &mut st).unwrap()[0];
            }
            last
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
