//! The kernel-upscaled state end to end: its files (the ai00 state file plus
//! the `<stem>.upscale.safetensors` sidecar), the CPU engine driven by the
//! ordinary tuning loop (`train_with`), exact engine save/load, and the CLI
//! (`tune --upscale M`, resume, `generate --state` with the sidecar).
use std::path::{Path, PathBuf};
use std::process::Command;

use rwkv_tune::model::load::{read_f32_tensors, read_metadata, write_f32_tensors};
use rwkv_tune::model::weights::{Config, Weights};
use rwkv_tune::model::{Model, Naming, State, StoreDType};
use rwkv_tune::ops::cpu::CpuOps;
use rwkv_tune::rng::Rng;
use rwkv_tune::tune::data::{pad_batch, ByteTokenizer};
use rwkv_tune::tune::demo;
use rwkv_tune::tune::device::DeviceEngine;
use rwkv_tune::tune::engine::Engine;
use rwkv_tune::tune::grad::{Example, GradOpts, TunedState};
use rwkv_tune::tune::optim::AdamConfig;
use rwkv_tune::tune::train::{train_with, TrainConfig};
use rwkv_tune::tune::upscale::{
    evaluate_upscaled, forward_logits_upscaled, load_upscaled, save_upscaled, sidecar_from_bytes,
    sidecar_path, sidecar_to_bytes, Kernel, UpscaleConfig, UpscaledState,
};
use rwkv_tune::Error;

mod common;
use common::tune::tiny_config as small_config;

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rwkv-tune-upcli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn random_example(t: usize, vocab: usize, rng: &mut Rng) -> Example {
    Example {
        tokens: (0..t).map(|_| rng.below(vocab as u64) as u32).collect(),
        targets: (0..t).map(|_| rng.below(vocab as u64) as u32).collect(),
        mask: (0..t).map(|i| if i < 2 { 0.0 } else { 1.0 }).collect(),
        soft: None,
    }
}

fn bits(s: &UpscaledState) -> Vec<u32> {
    s.params()
        .iter()
        .flat_map(|p| p.iter().map(|x| x.to_bits()))
        .collect()
}

/// The kernel as stored (centres and widths rounded to f32).
fn rounded(k: &Kernel) -> Kernel {
    let r = |v: &Vec<Vec<f64>>| -> Vec<Vec<f64>> {
        v.iter()
            .map(|x| x.iter().map(|&a| a as f32 as f64).collect())
            .collect()
    };
    Kernel {
        centres: r(&k.centres),
        gamma: r(&k.gamma),
        ..k.clone()
    }
}

/// Rewrites sidecar bytes with `edit` applied to its tensor list.
fn edited(bytes: &[u8], edit: impl FnOnce(&mut Vec<rwkv_tune::model::load::F32Tensor>)) -> Vec<u8> {
    let p = Path::new("edited");
    let mut t = read_f32_tensors(bytes, p).unwrap();
    let meta = read_metadata(bytes, p).unwrap();
    edit(&mut t);
    write_f32_tensors(&t, StoreDType::F32, Some(meta)).unwrap()
}

#[test]
fn sidecar_round_trip_is_bit_exact_and_bad_files_are_typed_errors() {
    let cfg = small_config();
    let w = Weights::random(&cfg, 21).unwrap();
    let mut rng = Rng::new(4);
    let batch: Vec<Example> = (0..3)
        .map(|i| random_example(10 + i, cfg.vocab, &mut rng))
        .collect();
    let uc = UpscaleConfig {
        m: 24,
        kmeans_iters: 4,
        ..UpscaleConfig::new(cfg.head_size)
    };
    let k = Kernel::fit(&w, &TunedState::zeros(&cfg, false), &batch, &uc).unwrap();
    let mut s = UpscaledState::new(TunedState::zeros(&cfg, false), &k);
    for p in s.params_mut() {
        p.iter_mut().for_each(|v| *v = rng.range(-0.8, 0.8) as f32);
    }
    let dir = tmp_dir("rt");
    let out = dir.join("tuned.safetensors");
    assert!(
        load_upscaled(&out, &cfg).unwrap().is_none(),
        "no sidecar yet"
    );
    let side = save_upscaled(&out, &cfg, &k, &s).unwrap();
    assert_eq!(side, dir.join("tuned.upscale.safetensors"));
    assert_eq!(sidecar_path(&out), side);

    // The main file is an ordinary ai00 state file.
    let st = State::load(&out, &cfg).unwrap();
    for (l, ls) in st.layers.iter().enumerate() {
        assert_eq!(ls.wkv, s.state.wkv[l]);
    }
    // Bit-exact round trip of S₀ and U; the kernel comes back f32-rounded,
    // which the f32 read-out uses anyway: identical logits.
    let (k2, s2) = load_upscaled(&out, &cfg)
        .unwrap()
        .expect("the sidecar is found");
    assert_eq!(bits(&s2), bits(&s));
    assert_eq!(k2, rounded(&k));
    let toks = &batch[1].tokens;
    let a = forward_logits_upscaled(&w, &k, &s, toks).unwrap();
    let b = forward_logits_upscaled(&w, &k2, &s2, toks).unwrap();
    assert!(
        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        "logits from the loaded files differ"
    );
    // Saving the loaded pair again reproduces it exactly.
    let out2 = dir.join("again.safetensors");
    save_upscaled(&out2, &cfg, &k2, &s2).unwrap();
    let (k3, s3) = load_upscaled(&out2, &cfg).unwrap().unwrap();
    assert_eq!((k3, bits(&s3)), (k2.clone(), bits(&s2)));
    // A state file without a sidecar is plain.
    let plain = dir.join("plain.safetensors");
    std::fs::copy(&out, &plain).unwrap();
    assert!(load_upscaled(&plain, &cfg).unwrap().is_none());

    // Bad sidecars: typed errors naming the tensor.
    let bytes = sidecar_to_bytes(&cfg, &k, &s).unwrap();
    let p = Path::new("side.safetensors");
    let ok = sidecar_from_bytes(&bytes, p, &cfg, s.state.clone()).unwrap();
    assert_eq!(ok.0, k2);
    let bad_shape = edited(&bytes, |t| {
        let u = t
            .iter_mut()
            .find(|t| t.name == "blocks.1.att.upscale_u")
            .unwrap();
        u.data.truncate(2 * 16 * 23);
        u.shape = vec![2, 16, 23];
    });
    match sidecar_from_bytes(&bad_shape, p, &cfg, s.state.clone()) {
        Err(Error::Shape {
            name,
            expected,
            got,
        }) => {
            assert_eq!(name, "blocks.1.att.upscale_u");
            assert_eq!((expected, got), (vec![2, 16, 24], vec![2, 16, 23]));
        }
        other => panic!("expected a shape error, got {other:?}"),
    }
    let missing = edited(&bytes, |t| {
        t.retain(|t| t.name != "blocks.0.att.upscale_gamma")
    });
    match sidecar_from_bytes(&missing, p, &cfg, s.state.clone()) {
        Err(Error::MissingTensor(n)) => assert_eq!(n, "blocks.0.att.upscale_gamma"),
        other => panic!("expected a missing-tensor error, got {other:?}"),
    }
    // A sidecar of another state (hash), a plain state file, another model.
    let other_state = TunedState::zeros(&cfg, false);
    assert!(matches!(
        sidecar_from_bytes(&bytes, p, &cfg, other_state),
        Err(Error::Tune(m)) if m.contains("different state file")
    ));
    let state_bytes = std::fs::read(&out).unwrap();
    assert!(matches!(
        sidecar_from_bytes(&state_bytes, p, &cfg, s.state.clone()),
        Err(Error::Tune(m)) if m.contains("not an upscale sidecar")
    ));
    let big = Config {
        n_layer: 3,
        ..cfg.clone()
    };
    assert!(matches!(
        sidecar_from_bytes(&bytes, p, &big, TunedState::zeros(&big, false)),
        Err(Error::Shape { .. })
    ));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn upscale_engine_trains_through_the_loop_and_its_files_reproduce_the_logits() {
    let w = demo::demo_weights(demo::DEMO_MODEL_SEED).unwrap();
    let cfg = w.config.clone();
    let model = Model::new(w.clone()).unwrap();
    let (tr, va) = demo::synthetic_datasets(256, 48, 11, &ByteTokenizer).unwrap();
    let uc = UpscaleConfig {
        m: 16,
        seed: 3,
        ..UpscaleConfig::new(cfg.head_size)
    };
    let zero = TunedState::zeros(&cfg, false);
    let k = Kernel::fit(&w, &zero, &tr.examples, &uc).unwrap();
    // The fit is deterministic, also with another thread count (resume
    // refits it and relies on that; the kernel's fingerprint guards it).
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let k1 = one.install(|| Kernel::fit(&w, &zero, &tr.examples, &uc).unwrap());
    assert_eq!(k1, k);
    assert_eq!(k1.fingerprint(), k.fingerprint());

    // DBP is refused.
    let start = UpscaledState::new(zero.clone(), &k);
    assert!(matches!(
        DeviceEngine::new_upscaled(
            CpuOps::new(),
            &w,
            &k,
            &start,
            AdamConfig::default(),
            Some((0.05, 0.0)),
            GradOpts::default()
        ),
        Err(Error::Tune(m)) if m.contains("DBP")
    ));

    let mut eng = DeviceEngine::new_upscaled(
        CpuOps::new(),
        &w,
        &k,
        &start,
        AdamConfig::default(),
        None,
        GradOpts::default(),
    )
    .unwrap();
    let mut tc = TrainConfig::new(40);
    tc.batch = 8;
    tc.seed = 3;
    let t0 = std::time::Instant::now();
    let rep = train_with(&model, &mut eng, &tr, Some(&va), &tc, None).unwrap();
    let (b, a) = (rep.before.unwrap(), rep.after.unwrap());
    eprintln!(
        "upscaled M=16: before {b:?}\nafter  {a:?}\n{:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(rep.steps, 40);
    assert_eq!(b.exact, Some((0, 48)));
    assert!(
        a.loss < b.loss - 1.5,
        "held-out loss should fall by > 1.5 nats: {:.3} -> {:.3}",
        b.loss,
        a.loss
    );
    let es = eng.upscaled().unwrap();
    assert!(
        es.u.iter().flatten().any(|&x| x != 0.0),
        "U was not trained"
    );
    assert_eq!(rep.state, es.state);

    // Write both files, load them: the same logits and the same validation.
    let dir = tmp_dir("engine");
    let out = dir.join("state.safetensors");
    save_upscaled(&out, &cfg, &k, &es).unwrap();
    let (k2, s2) = load_upscaled(&out, &cfg).unwrap().unwrap();
    assert_eq!(bits(&s2), bits(&es));
    for e in va.examples.iter().take(4) {
        let x = forward_logits_upscaled(&w, &k, &es, &e.tokens).unwrap();
        let y = forward_logits_upscaled(&w, &k2, &s2, &e.tokens).unwrap();
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
    assert_eq!(evaluate_upscaled(&w, &k2, &s2, &va, 0).unwrap(), a);
    std::fs::remove_dir_all(&dir).ok();

    // Engine save/load is exact: 3 steps, save, 3 more; a fresh engine that
    // loads the save and does the same 3 steps ends bit-identical.
    let batches: Vec<Vec<Example>> = (0..6)
        .map(|i| {
            let refs: Vec<&Example> = tr.examples[i * 4..i * 4 + 4].iter().collect();
            pad_batch(&refs)
        })
        .collect();
    let new_eng = || {
        DeviceEngine::new_upscaled(
            CpuOps::new(),
            &w,
            &k,
            &start,
            AdamConfig::default(),
            None,
            GradOpts::default(),
        )
        .unwrap()
    };
    let mut e1 = new_eng();
    for bt in &batches[..3] {
        e1.step(bt, 0.5, 1.0).unwrap();
    }
    let saved = e1.save().unwrap();
    for bt in &batches[3..] {
        e1.step(bt, 0.5, 1.0).unwrap();
    }
    let mut e2 = new_eng();
    e2.load(saved.clone()).unwrap();
    for bt in &batches[3..] {
        e2.step(bt, 0.5, 1.0).unwrap();
    }
    assert_eq!(bits(&e1.upscaled().unwrap()), bits(&e2.upscaled().unwrap()));
    let mut with_dbp = saved.clone();
    with_dbp.dbp_r = Some(vec![0.0; 4]);
    assert!(matches!(new_eng().load(with_dbp), Err(Error::Tune(_))));
    let mut short = saved;
    short.params.pop();
    assert!(matches!(new_eng().load(short), Err(Error::Tune(_))));
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rwkv-tune"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_tune_upscale_writes_both_files_resumes_and_generate_uses_the_sidecar() {
    let dir = tmp_dir("cli");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let out = dir.join("state.safetensors");
    let out_s = s(&out);
    let tune = |extra: &[&str]| {
        let mut a = vec![
            "tune",
            "--demo",
            "--upscale",
            "16",
            "--steps",
            "20",
            "--batch",
            "8",
            "--out",
            &out_s,
            "--quiet",
        ];
        a.extend_from_slice(extra);
        cli(&a)
    };
    let (ok, so, se) = tune(&["--threads", "2"]);
    assert!(ok, "tune --upscale failed:\n{so}\n{se}");
    assert!(so.contains("note: --upscale trains without DBP"), "{so}");
    assert!(so.contains("upscale: fitting M = 16"), "{so}");
    assert!(so.contains("upscaled read-out"), "{so}");
    let side = dir.join("state.upscale.safetensors");
    assert!(out.is_file() && side.is_file(), "{so}");
    let cfg = demo::demo_config();
    let (k, up) = load_upscaled(&out, &cfg).unwrap().unwrap();
    assert_eq!(k.m, 16);
    assert!(up.u.iter().flatten().any(|&x| x != 0.0));

    // Resume (after the end: no steps) with another thread count: the kernel
    // is refitted identically and the files are reproduced exactly.
    let (ok, so, se) = tune(&["--threads", "1", "--resume"]);
    assert!(ok, "resume failed:\n{so}\n{se}");
    assert!(so.contains("resumed from step 20"), "{so}");
    let (k2, up2) = load_upscaled(&out, &cfg).unwrap().unwrap();
    assert_eq!((k2, bits(&up2)), (k.clone(), bits(&up)));
    // ... but not with another M, and --dbp is refused with --upscale.
    let out_s2 = out_s.clone();
    let (ok, so, se) = cli(&[
        "tune",
        "--demo",
        "--upscale",
        "8",
        "--steps",
        "20",
        "--batch",
        "8",
        "--out",
        &out_s2,
        "--quiet",
        "--resume",
    ]);
    assert!(!ok && se.contains("different run"), "{so}\n{se}");
    let (ok, _, se) = cli(&["tune", "--demo", "--upscale", "8", "--dbp"]);
    assert!(!ok && se.contains("--dbp"), "{se}");

    // generate: the demo model as a file; greedy output equals the
    // upscaled read-out computed here from the loaded files.
    let w = demo::demo_weights(demo::DEMO_MODEL_SEED).unwrap();
    let model = dir.join("model.safetensors");
    w.save(&model, Naming::Official, StoreDType::F32).unwrap();
    let prompt = "Q: abc def?";
    let gen = |state: &Path, device: &str| {
        cli(&[
            "generate",
            "--model",
            &s(&model),
            "--state",
            &s(state),
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--max-tokens",
            "6",
            "--device",
            device,
        ])
    };
    let (ok, so, se) = gen(&out, "cpu");
    assert!(ok, "generate failed:\n{so}\n{se}");
    assert!(se.contains("upscale sidecar in use"), "{se}");
    let mut seq: Vec<u32> = prompt.bytes().map(u32::from).collect();
    let mut want = Vec::new();
    for _ in 0..6 {
        let lg = forward_logits_upscaled(&w, &k, &up, &seq).unwrap();
        let row = &lg[lg.len() - 256..];
        let next = rwkv_tune::model::argmax(row) as u32;
        want.push(next as u8);
        seq.push(next);
    }
    let want = String::from_utf8_lossy(&want).into_owned();
    assert_eq!(so.trim_end_matches('\n'), want, "stderr: {se}");
    // Other devices refuse the sidecar; a plain copy does not use it.
    let (ok, _, se) = gen(&out, "emu");
    assert!(!ok && se.contains("cpu only"), "{se}");
    let plain = dir.join("plain.safetensors");
    std::fs::copy(&out, &plain).unwrap();
    let (ok, _, se) = gen(&plain, "cpu");
    assert!(ok && !se.contains("upscale sidecar"), "{se}");

    // A plain run to the same --out removes the stale sidecar.
    let (ok, so, se) = cli(&[
        "tune",
        "--demo",
        "--no-dbp",
        "--steps",
        "2",
        "--out",
        &out_s,
        "--checkpoint",
        &s(&dir.join("plain.ckpt")),
        "--quiet",
    ]);
    assert!(ok, "{so}\n{se}");
    assert!(so.contains("removed") && !side.exists(), "{so}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `tune --upscale M --device emu`: the device engine trains S₀ and U
/// (emulated kernels), writes both files, and its checkpoint resumes on the
/// CPU engine (the parameter lists are the same) reproducing the files.
#[test]
fn cli_tune_upscale_on_the_emulated_device() {
    let dir = tmp_dir("emu");
    let out = dir.join("state.safetensors");
    let out_s = out.to_string_lossy().into_owned();
    let tune = |device: &str, extra: &[&str]| {
        let mut a = vec![
            "tune",
            "--demo",
            "--upscale",
            "16",
            "--steps",
            "2",
            "--batch",
            "2",
            "--eval-max",
            "2",
            "--out",
            &out_s,
            "--quiet",
            "--device",
            device,
        ];
        a.extend_from_slice(extra);
        cli(&a)
    };
    let (ok, so, se) = tune("emu", &[]);
    assert!(ok, "tune --upscale --device emu failed:\n{so}\n{se}");
    assert!(so.contains("upscale: fitting M = 16"), "{so}");
    assert!(so.contains("upscaled read-out"), "{so}");
    assert!(so.contains("activations: "), "{so}");
    let side = dir.join("state.upscale.safetensors");
    assert!(out.is_file() && side.is_file(), "{so}");
    let cfg = demo::demo_config();
    let (k, up) = load_upscaled(&out, &cfg).unwrap().unwrap();
    assert_eq!(k.m, 16);
    assert!(
        up.u.iter().flatten().any(|&x| x != 0.0),
        "U was not trained"
    );
    // the CPU engine resumes the device engine's checkpoint (after the end)
    let (ok, so, se) = tune("cpu", &["--resume"]);
    assert!(ok, "resume on cpu failed:\n{so}\n{se}");
    assert!(so.contains("resumed from step 2"), "{so}");
    let (k2, up2) = load_upscaled(&out, &cfg).unwrap().unwrap();
    assert_eq!((k2, bits(&up2)), (k, bits(&up)));
    std::fs::remove_dir_all(&dir).ok();
}
