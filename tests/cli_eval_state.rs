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

fn cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rwkv-tune"))
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?} failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `eval --json` through a `.pth` model and a `.pth` state (made with
/// `rwkv-tune convert`, the state in the RWKV-PEFT layout) equals eval
/// through the safetensors originals exactly; the JSON agrees with the text
/// report; `--logits` holds the CPU model's logits of the first documents.
#[test]
fn eval_json_logits_and_pth_inputs() {
    use rwkv_tune::model::load::read_tensors;
    use rwkv_tune::model::State;
    let dir = std::env::temp_dir().join(format!("rwkv-tune-eval-pth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let w = demo::demo_weights(demo::DEMO_MODEL_SEED).unwrap();
    let cfg = w.config.clone();
    let m_st = dir.join("model.safetensors");
    w.save(&m_st, Naming::Official, StoreDType::BF16).unwrap();
    let m_pth = dir.join("RWKV-x070-demo.pth");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    cli(&["convert", &s(&m_st), &s(&m_pth)]);
    // a random state, safetensors → RWKV-PEFT .pth
    let mut st = State::zeros(&cfg);
    let mut rng = rwkv_tune::rng::Rng::new(77);
    for l in &mut st.layers {
        l.wkv
            .iter_mut()
            .for_each(|x| *x = 0.3 * rng.normal() as f32);
    }
    let s_st = dir.join("state.safetensors");
    st.save(&s_st, &cfg, StoreDType::F32).unwrap();
    let s_pth = dir.join("state.pth");
    cli(&["convert", &s(&s_st), &s(&s_pth), "--to", "peft"]);
    let mut lines = String::new();
    for t in ["hello there world", "abc def ghi", "one two", "x"] {
        lines += &serde_json::json!({ "text": t }).to_string();
        lines.push('\n');
    }
    let data = dir.join("d.jsonl");
    std::fs::write(&data, lines).unwrap();
    let d = s(&data);
    let json = |m: &std::path::Path, st: &std::path::Path| -> serde_json::Value {
        let out = cli(&[
            "eval",
            "--model",
            &s(m),
            "--data",
            &d,
            "--state",
            &s(st),
            "--json",
        ]);
        assert_eq!(out.trim().lines().count(), 1, "one JSON line: {out}");
        serde_json::from_str(out.trim()).unwrap()
    };
    let a = json(&m_st, &s_st);
    let b = json(&m_pth, &s_pth);
    for k in [
        "loss",
        "bits_per_byte",
        "perplexity",
        "tokens",
        "bytes",
        "documents",
        "last_word_accuracy",
        "last_word_perplexity",
        "last_word_count",
    ] {
        assert!(a.get(k).is_some(), "{k} missing in {a}");
        assert_eq!(a[k], b[k], "{k}: safetensors {} vs pth {}", a[k], b[k]);
    }
    assert!(a["seconds"].as_f64().unwrap() >= 0.0);
    // 4 documents of 17, 11, 7 and 1 bytes: 16 + 10 + 6 + 0 predicted tokens
    assert_eq!(a["tokens"], 32);
    let loss = a["loss"].as_f64().unwrap();
    assert!((a["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-12);
    let text = eval_loss(&["--model", &s(&m_pth), "--data", &d, "--state", &s(&s_pth)]);
    assert!((text - loss).abs() <= 5e-5, "text {text} vs json {loss}");
    // --logits: the first two documents' logits equal the CPU model's
    let lf = dir.join("logits.safetensors");
    let lf_s = s(&lf);
    let args = [
        "eval",
        "--model",
        &s(&m_pth),
        "--data",
        &d,
        "--state",
        &s(&s_pth),
    ];
    cli(&[
        &args[..],
        &["--logits", &lf_s, "--logits-docs", "2", "--json"],
    ]
    .concat());
    let got = read_tensors(&std::fs::read(&lf).unwrap(), &lf);
    // tokens are i64, which the f32 reader refuses: read them by hand
    assert!(got.is_err());
    let bytes = std::fs::read(&lf).unwrap();
    let stf = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = stf.names();
    assert_eq!(names.len(), 4, "{names:?}");
    let model = rwkv_tune::model::Model::load(&m_st).unwrap();
    for (i, doc) in ["hello there world", "abc def ghi"].iter().enumerate() {
        let toks: Vec<u32> = stf
            .tensor(&format!("doc{i}.tokens"))
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect();
        let want_toks: Vec<u32> = doc.bytes().map(|b| b as u32).collect();
        assert_eq!(toks, want_toks[..want_toks.len() - 1]);
        let lg = stf.tensor(&format!("doc{i}.logits")).unwrap();
        assert_eq!(lg.shape(), [toks.len(), cfg.vocab]);
        let lg: Vec<f32> = lg
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mut state = st.clone();
        let want = model.forward_seq(&toks, &mut state).unwrap();
        let dmax = want
            .iter()
            .zip(&lg)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        // the same CPU forward on the same weights: equal up to 1e-5
        assert!(dmax <= 1e-5, "doc {i}: max |Δ| {dmax}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
