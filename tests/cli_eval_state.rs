//! `rwkv-tune eval --state`: a state tuned on the synthetic demo task lowers
//! the evaluation loss of held-out task texts against the zero state, and
//! evaluating with the zero state file equals evaluating without one; the
//! emulated device forward (`--device emu`) prints the same loss as the CPU.
use std::process::Command;

use rwkv_tune::model::{Model, Naming, StoreDType};
use rwkv_tune::tune::data::ByteTokenizer;
use rwkv_tune::tune::demo;
use rwkv_tune::tune::grad::TunedState;
use rwkv_tune::tune::train::{export_state, train, TrainConfig};

/// The `loss:` value `rwkv-tune eval` prints.
fn eval_loss(args: &[&str]) -> f64 {
    let out = Command::new(env!("CARGO_BIN_EXE_rwkv-tune"))
        .arg("eval")
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "eval failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("loss:"))
        .unwrap_or_else(|| panic!("no loss line in {text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn eval_with_a_tuned_state_beats_the_zero_state() {
    let dir = std::env::temp_dir().join(format!("rwkv-tune-eval-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let w = demo::demo_weights(demo::DEMO_MODEL_SEED).unwrap();
    let cfg = w.config.clone();
    let mpath = dir.join("model.safetensors");
    w.save(&mpath, Naming::Official, StoreDType::F32).unwrap();
    let model = Model::new(w).unwrap();
    let (tr, _) = demo::synthetic_datasets(256, 8, 11, &ByteTokenizer).unwrap();
    let mut tc = TrainConfig::new(40);
    tc.batch = 8;
    tc.seed = 3;
    let rep = train(&model, &tr, None, &tc, None).unwrap();
    let tuned = dir.join("tuned.safetensors");
    export_state(&tuned, &cfg, &rep.state).unwrap();
    let zero = dir.join("zero.safetensors");
    export_state(&zero, &cfg, &TunedState::zeros(&cfg, false)).unwrap();
    // held-out task texts (a seed the training set did not use)
    let mut rng = rwkv_tune::rng::Rng::new(12345);
    let mut lines = String::new();
    for _ in 0..24 {
        let (p, r) = demo::synthetic_pair(&mut rng);
        lines += &serde_json::json!({ "text": format!("{p}{r}") }).to_string();
        lines.push('\n');
    }
    let data = dir.join("valid.jsonl");
    std::fs::write(&data, lines).unwrap();
    let (m, d) = (mpath.to_str().unwrap(), data.to_str().unwrap());
    let base = eval_loss(&["--model", m, "--data", d]);
    let with_zero = eval_loss(&["--model", m, "--data", d, "--state", zero.to_str().unwrap()]);
    let with_tuned = eval_loss(&[
        "--model",
        m,
        "--data",
        d,
        "--state",
        tuned.to_str().unwrap(),
    ]);
    println!("eval loss: zero state {base:.4}, zero file {with_zero:.4}, tuned {with_tuned:.4}");
    assert_eq!(base, with_zero);
    assert!(
        with_tuned < base - 0.3,
        "the tuned state should lower the loss by > 0.3 nats/token: {base:.4} -> {with_tuned:.4}"
    );
    // the device forward (emulated kernels) gives the same numbers
    let tuned_s = tuned.to_str().unwrap();
    let cpu6 = eval_loss(&[
        "--model", m, "--data", d, "--state", tuned_s, "--limit", "6",
    ]);
    let emu6 = eval_loss(&[
        "--model", m, "--data", d, "--state", tuned_s, "--limit", "6", "--device", "emu",
    ]);
    println!("first 6 documents: cpu {cpu6:.4}, emu {emu6:.4}");
    assert!((cpu6 - emu6).abs() <= 2e-4, "cpu {cpu6} vs emu {emu6}");
    std::fs::remove_dir_all(&dir).ok();
}
