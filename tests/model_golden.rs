//! Golden test: the tiny trained RWKV-7 model from rwkv.cpp's test suite
//! (../shared/fixtures/rwkv7-tiny-834k) must reproduce its expected logits
//! after the bytes `"in` (34, 105, 110) from the zero state, within 1e-5, in
//! sequence mode and in one-token mode. Skips when ../shared is absent.
use std::path::PathBuf;

use rwkv_tune::model::{Logits, Model};

fn fixture_dir() -> Option<PathBuf> {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/rwkv7-tiny-834k");
    if d.join("rwkv7-tiny-834k.safetensors").is_file() {
        Some(d)
    } else {
        eprintln!(
            "SKIP: {} not found (the shared fixtures are absent)",
            d.display()
        );
        None
    }
}

fn expected(dir: &std::path::Path) -> Vec<f32> {
    let b = std::fs::read(dir.join("expected-logits-7v0-834K.bin")).unwrap();
    assert_eq!(b.len(), 1024);
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const PROMPT: [u32; 3] = [34, 105, 110];

#[test]
fn golden_logits_sequence_mode() {
    let Some(dir) = fixture_dir() else { return };
    let model = Model::load(dir.join("rwkv7-tiny-834k.safetensors")).unwrap();
    let cfg = model.config();
    assert_eq!(
        (
            cfg.n_layer,
            cfg.n_embd,
            cfg.n_head,
            cfg.head_size,
            cfg.vocab
        ),
        (12, 64, 1, 64, 256)
    );
    assert_eq!(
        (cfg.d_w, cfg.d_a, cfg.d_v, cfg.d_g, cfg.d_ffn),
        (32, 32, 32, 32, 256)
    );
    assert_eq!(cfg.n_params(), 829_888);
    let want = expected(&dir);

    let mut st = model.new_state();
    let all = model.forward_seq(&PROMPT, &mut st).unwrap();
    assert_eq!(all.len(), 3 * 256);
    let d = max_abs_diff(&all[2 * 256..], &want);
    eprintln!("sequence mode: max |Δ| = {d:e}");
    assert!(d < 1e-5, "sequence mode max |Δ| = {d}");

    let mut st2 = model.new_state();
    let last = model.forward(&PROMPT, &mut st2, Logits::Last).unwrap();
    assert_eq!(last, all[2 * 256..].to_vec());
    assert_eq!(st, st2);
}

#[test]
fn golden_logits_one_token_mode() {
    let Some(dir) = fixture_dir() else { return };
    let model = Model::load(dir.join("rwkv7-tiny-834k.safetensors")).unwrap();
    let want = expected(&dir);
    let mut st = model.new_state();
    let mut logits = Vec::new();
    for &t in &PROMPT {
        logits = model.step(t, &mut st).unwrap();
    }
    let d = max_abs_diff(&logits, &want);
    eprintln!("one-token mode: max |Δ| = {d:e}");
    assert!(d < 1e-5, "one-token mode max |Δ| = {d}");
    // The model is trained: after `"in` the top byte is a space.
    assert_eq!(rwkv_tune::model::argmax(&logits), b' ' as u32);
}
