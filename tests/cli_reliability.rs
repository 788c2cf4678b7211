//! Regression tests for issue 11 ("nothing lost, nothing silent"): every
//! reproducer of the fuzzing pass, run through the CLI. Each bad input must
//! give one clear error (non-zero exit, the flag or file named) and leave
//! every input untouched; Ctrl-C during `tune` finishes the step, writes the
//! checkpoint and the state and exits 130; identical runs write identical
//! bytes. The README's "What rwkv-tune promises" points here.
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rwkv_tune::model::{Naming, StoreDType, Weights};
use rwkv_tune::tune::checkpoint::Checkpoint;
use rwkv_tune::tune::demo;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rwkv-tune-rel-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn run(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rwkv-tune"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs the CLI and checks that it fails with a message containing `needle`.
fn fails_with(args: &[String], needle: &str) {
    let o = run(args);
    let t = text(&o);
    assert!(!o.status.success(), "expected a failure for {args:?}:\n{t}");
    assert!(
        t.contains(needle),
        "the error for {args:?} should mention `{needle}`:\n{t}"
    );
    assert!(!t.contains("panicked"), "a panic for {args:?}:\n{t}");
}

fn ok(args: &[String]) -> String {
    let o = run(args);
    let t = text(&o);
    assert!(o.status.success(), "{args:?} failed:\n{t}");
    t
}

fn v(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// The demo model (seed `seed`) as a file.
fn model_file(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let p = dir.join(name);
    demo::demo_weights(seed)
        .unwrap()
        .save(&p, Naming::Official, StoreDType::F32)
        .unwrap();
    p
}

/// Prompt/response JSONL from the synthetic demo task.
fn data_file(dir: &Path, n: usize, seed: u64) -> PathBuf {
    let mut rng = rwkv_tune::rng::Rng::new(seed);
    let mut lines = String::new();
    for _ in 0..n {
        let (p, r) = demo::synthetic_pair(&mut rng);
        lines += &serde_json::json!({ "prompt": p, "response": r }).to_string();
        lines.push('\n');
    }
    let p = dir.join("data.jsonl");
    std::fs::write(&p, lines).unwrap();
    p
}

fn tune_args(model: &Path, data: &Path, extra: &[String]) -> Vec<String> {
    let mut a = v(&["tune", "--model"]);
    a.push(s(model));
    a.push("--data".into());
    a.push(s(data));
    a.extend(v(&[
        "--steps",
        "4",
        "--batch",
        "4",
        "--warmup",
        "1",
        "--threads",
        "2",
        "--quiet",
    ]));
    a.extend_from_slice(extra);
    a
}

#[test]
fn outputs_never_overwrite_inputs() {
    let dir = tmpdir("paths");
    let model = model_file(&dir, "model.safetensors", 1);
    let data = data_file(&dir, 32, 2);
    let (m0, d0) = (
        std::fs::read(&model).unwrap(),
        std::fs::read(&data).unwrap(),
    );
    let out = dir.join("out.safetensors");
    // the same file under another spelling, and through a symlink
    let model_alias = dir.join("sub/../model.safetensors");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let model_link = dir.join("link.safetensors");
    std::os::unix::fs::symlink(&model, &model_link).unwrap();
    for (extra, needle) in [
        (vec!["--out".into(), s(&model)], "same file as --model"),
        (
            vec!["--out".into(), s(&model_alias)],
            "same file as --model",
        ),
        (vec!["--out".into(), s(&model_link)], "same file as --model"),
        (vec!["--out".into(), s(&data)], "same file as --data"),
        (vec!["--metrics".into(), s(&data)], "same file as --data"),
        (
            vec!["--out".into(), s(&out), "--checkpoint".into(), s(&model)],
            "same file as --model",
        ),
        (
            vec!["--out".into(), s(&out), "--metrics".into(), s(&out)],
            "are the same file",
        ),
        (
            vec!["--out".into(), s(&out), "--plot".into(), s(&out)],
            "are the same file",
        ),
        (
            vec!["--out".into(), s(&dir.join("missing/out.safetensors"))],
            "does not exist",
        ),
    ] {
        let t0 = Instant::now();
        fails_with(&tune_args(&model, &data, &extra), needle);
        // refused before any training
        assert!(t0.elapsed() < Duration::from_secs(20));
    }
    assert_eq!(std::fs::read(&model).unwrap(), m0, "the model was modified");
    assert_eq!(std::fs::read(&data).unwrap(), d0, "the data was modified");
    assert!(!out.exists());
    // other commands: eval --logits, wkv7 --output, convert
    let mut e = v(&["eval", "--model"]);
    e.extend([
        s(&model),
        "--data".into(),
        s(&data),
        "--logits".into(),
        s(&model),
    ]);
    fails_with(&e, "same file as --model");
    let mut w = v(&["wkv7", "--input"]);
    w.extend([s(&model), "--output".into(), s(&model_alias)]);
    fails_with(&w, "same file as --input");
    fails_with(&["convert".into(), s(&model), s(&model_link)], "same file");
    assert_eq!(std::fs::read(&model).unwrap(), m0, "the model was modified");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn every_hyper_parameter_is_validated_up_front() {
    let cases: &[(&str, &str)] = &[
        ("--lr=-1", "--lr"),
        ("--lr=NaN", "--lr"),
        ("--clip=-1", "--clip"),
        ("--clip=NaN", "--clip"),
        ("--weight-decay=NaN", "--weight-decay"),
        ("--beta1=1.5", "--beta1"),
        ("--beta2=-1", "--beta2"),
        ("--adam-eps=-1", "--adam-eps"),
        ("--observer-temp=0", "--observer-temp"),
        ("--observer-temp=NaN", "--observer-temp"),
        ("--observer-temp=-1", "--observer-temp"),
        ("--valid-frac=-0.5", "--valid-frac"),
        ("--valid-frac=NaN", "--valid-frac"),
        ("--valid-frac=2", "--valid-frac"),
        ("--steps=0", "--steps"),
        ("--threads=100000", "--threads"),
        ("--threads=0", "--threads"),
        ("--chunk=0", "--chunk"),
        ("--ctx=0", "--ctx"),
        ("--dbp-kappa=2", "--dbp-kappa"),
    ];
    for (flag, needle) in cases {
        let t0 = Instant::now();
        fails_with(&v(&["tune", "--demo", flag]), needle);
        assert!(t0.elapsed() < Duration::from_secs(20), "{flag} was slow");
    }
}

#[test]
fn nonfinite_models_and_states_are_refused() {
    let dir = tmpdir("nan");
    let mut w = demo::demo_weights(3).unwrap();
    let cfg = w.config.clone();
    w.emb[5] = f32::NAN;
    let bad = dir.join("nan.safetensors");
    w.save(&bad, Naming::Official, StoreDType::F32).unwrap();
    let good = model_file(&dir, "good.safetensors", 3);
    let data = dir.join("d.txt");
    std::fs::write(&data, "some text to score, long enough for a few tokens").unwrap();
    let eval = |model: &Path, extra: &[&str]| {
        let mut a = v(&["eval", "--model"]);
        a.extend([s(model), "--data".into(), s(&data)]);
        a.extend(v(extra));
        a
    };
    fails_with(&eval(&bad, &[]), "non-finite");
    let mut g = v(&["generate", "--model"]);
    g.extend([s(&bad), "--max-tokens".into(), "5".into()]);
    fails_with(&g, "non-finite");
    let d = data_file(&dir, 16, 4);
    fails_with(&tune_args(&bad, &d, &[]), "non-finite");
    // the override lets it through (and says what came out)
    let t = ok(&eval(&bad, &["--allow-nonfinite"]));
    assert!(t.contains("loss:"), "{t}");
    // a state with an Inf
    let mut st = rwkv_tune::model::State::zeros(&cfg);
    st.layers[1].wkv[7] = f32::INFINITY;
    let sp = dir.join("inf-state.safetensors");
    st.save(&sp, &cfg, StoreDType::F32).unwrap();
    fails_with(&eval(&good, &["--state", &s(&sp)]), "non-finite");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn zero_scored_tokens_is_an_error() {
    let dir = tmpdir("empty");
    let model = model_file(&dir, "m.safetensors", 5);
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let blank = dir.join("blank.jsonl");
    std::fs::write(&blank, "\n   \n\n").unwrap();
    let data = dir.join("d.jsonl");
    std::fs::write(&data, "{\"text\": \"hello there world\"}\n").unwrap();
    let eval = |d: &str, extra: &[&str]| {
        let mut a = v(&["eval", "--model"]);
        a.extend([s(&model), "--data".into(), d.to_string()]);
        a.extend(v(extra));
        a
    };
    fails_with(&eval(&s(&empty), &[]), "no token was scored");
    fails_with(&eval(&s(&blank), &[]), "no token was scored");
    fails_with(&eval("/dev/null", &[]), "no token was scored");
    fails_with(&eval(&s(&data), &["--limit", "0"]), "--limit 0");
    fails_with(&eval(&s(&data), &["--chunk", "10000000"]), "--chunk");
    std::fs::remove_dir_all(&dir).ok();
}

/// JSONL documents are scored in --chunk forwards with the state carried:
/// the same loss as one forward per document, and a long document's peak
/// memory does not grow with its `[T, V]` logits.
#[test]
fn eval_streams_long_documents_in_chunks() {
    let dir = tmpdir("stream");
    let model = model_file(&dir, "m.safetensors", 6);
    let mut rng = rwkv_tune::rng::Rng::new(9);
    let mut lines = String::new();
    for _ in 0..6 {
        let (p, r) = demo::synthetic_pair(&mut rng);
        lines += &serde_json::json!({ "text": format!("{p}{r}{p}{r}") }).to_string();
        lines.push('\n');
    }
    let data = dir.join("d.jsonl");
    std::fs::write(&data, lines).unwrap();
    let loss = |chunk: &str| -> f64 {
        let mut a = v(&["eval", "--json", "--chunk", chunk, "--model"]);
        a.extend([s(&model), "--data".into(), s(&data)]);
        let t = ok(&a);
        let j: serde_json::Value = serde_json::from_str(t.lines().last().unwrap()).unwrap();
        j["loss"].as_f64().unwrap()
    };
    let (whole, small) = (loss("4096"), loss("7"));
    assert!(
        (whole - small).abs() < 1e-4 * whole.abs().max(1.0),
        "chunked {small} vs whole {whole}"
    );
    // one 100 000-byte document: its logits alone would be 100 MB at once
    let long: String = (0..100_000)
        .map(|i| (b'a' + (i % 23) as u8) as char)
        .collect();
    let big = dir.join("long.jsonl");
    std::fs::write(&big, serde_json::json!({ "text": long }).to_string() + "\n").unwrap();
    let mut a = v(&["eval", "--chunk", "1024", "--model"]);
    a.extend([s(&model), "--data".into(), s(&big)]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_rwkv-tune"))
        .args(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let peak = peak_rss_of(&mut child);
    println!("eval of a 100 kB document: peak RSS {} MB", peak >> 20);
    assert!(
        peak < 80 << 20,
        "peak RSS {} MB: the document's logits were built at once",
        peak >> 20
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `generate` reads a long prompt in chunks: the same greedy continuation
/// as one forward over the whole prompt (the library model, in the test).
#[test]
fn generate_reads_long_prompts_in_chunks() {
    let dir = tmpdir("gen");
    let model = model_file(&dir, "m.safetensors", 13);
    let prompt: String = (0..2500)
        .map(|i| (b'a' + (i * 7 % 26) as u8) as char)
        .collect();
    let mut a = v(&[
        "generate",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--model",
    ]);
    a.extend([s(&model), "--prompt".into(), prompt.clone()]);
    let o = run(&a);
    assert!(o.status.success(), "{}", text(&o));
    let m = rwkv_tune::model::Model::load(&model).unwrap();
    let mut st = m.new_state();
    let toks: Vec<u32> = prompt.bytes().map(u32::from).collect();
    let mut logits = m
        .forward(&toks, &mut st, rwkv_tune::model::Logits::Last)
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..12 {
        let t = rwkv_tune::model::argmax(&logits);
        out.push(t as u8);
        logits = m.step(t, &mut st).unwrap();
    }
    let want = String::from_utf8_lossy(&out).into_owned() + "\n";
    assert_eq!(String::from_utf8_lossy(&o.stdout), want);
    std::fs::remove_dir_all(&dir).ok();
}

/// Polls a child's VmHWM (peak resident memory) until it exits; checks it
/// succeeded.
fn peak_rss_of(child: &mut std::process::Child) -> u64 {
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    loop {
        if let Ok(t) = std::fs::read_to_string(&status_path) {
            if let Some(l) = t.lines().find(|l| l.starts_with("VmHWM:")) {
                let kb: u64 = l.split_whitespace().nth(1).unwrap().parse().unwrap();
                peak = peak.max(kb * 1024);
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "the child failed");
            return peak;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn only_regular_files_are_read_as_models() {
    let dir = tmpdir("fifo");
    let fifo = dir.join("model.fifo");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    let data = dir.join("d.txt");
    std::fs::write(&data, "abc abc abc").unwrap();
    for m in [s(&fifo), "/dev/zero".into(), s(&dir)] {
        let t0 = Instant::now();
        let mut a = v(&["eval", "--model"]);
        a.extend([m.clone(), "--data".into(), s(&data)]);
        fails_with(&a, "not a regular file");
        assert!(t0.elapsed() < Duration::from_secs(10), "{m} hung");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn wkv7_inputs_are_checked() {
    let dir = tmpdir("wkv7");
    let (b, t, h, n) = (1usize, 3usize, 1usize, 32usize);
    let mut rng = rwkv_tune::rng::Rng::new(3);
    let seq = |rng: &mut rwkv_tune::rng::Rng, lo: f64, hi: f64| rwkv_tune::tensors::F32Tensor {
        shape: vec![b, t, h, n],
        data: (0..b * t * h * n)
            .map(|_| rng.range(lo, hi) as f32)
            .collect(),
    };
    let mut base = std::collections::BTreeMap::new();
    for name in ["r", "k", "v", "a", "b"] {
        base.insert(name.to_string(), seq(&mut rng, -0.5, 0.5));
    }
    base.insert("w".to_string(), seq(&mut rng, 0.6, 0.99));
    let write = |name: &str, m: &std::collections::BTreeMap<String, _>| {
        let p = dir.join(name);
        rwkv_tune::tensors::write_f32(&p, m).unwrap();
        p
    };
    let run_on = |p: &Path| {
        let mut a = v(&["wkv7", "--input"]);
        a.extend([s(p), "--output".into(), s(&dir.join("out.safetensors"))]);
        a
    };
    ok(&run_on(&write("good.safetensors", &base)));
    let mut nan = base.clone();
    nan.get_mut("k").unwrap().data[4] = f32::NAN;
    fails_with(&run_on(&write("nan.safetensors", &nan)), "non-finite");
    let mut inf = base.clone();
    inf.get_mut("r").unwrap().data[0] = f32::NEG_INFINITY;
    fails_with(&run_on(&write("inf.safetensors", &inf)), "non-finite");
    let mut big_w = base.clone();
    big_w.get_mut("w").unwrap().data[2] = 1.5;
    fails_with(&run_on(&write("w.safetensors", &big_w)), "(0, 1]");
    let mut dht = base.clone();
    dht.insert(
        "dhT".to_string(),
        rwkv_tune::tensors::F32Tensor {
            shape: vec![b, h, n, n],
            data: vec![0.5; b * h * n * n],
        },
    );
    fails_with(&run_on(&write("dht.safetensors", &dht)), "no `dy`");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_refuses_shapes_beyond_memory() {
    fails_with(
        &v(&["bench", "--backend", "cpu", "--shapes", "1,200000000,1,64"]),
        "memory",
    );
}

/// Resume refuses another model of the same shape, a checkpoint beyond
/// --steps; resuming a finished run does not duplicate metrics lines; two
/// identical runs write identical bytes.
#[test]
fn resume_guards_and_deterministic_outputs() {
    let dir = tmpdir("resume");
    let model = model_file(&dir, "a.safetensors", 7);
    let other = model_file(&dir, "b.safetensors", 8);
    let data = data_file(&dir, 40, 9);
    let out = dir.join("s.safetensors");
    let metrics = dir.join("m.jsonl");
    let extra = |o: &Path, m: &Path| {
        vec![
            "--out".into(),
            s(o),
            "--metrics".into(),
            s(m),
            "--valid-frac".into(),
            "0.1".into(),
        ]
    };
    ok(&tune_args(&model, &data, &extra(&out, &metrics)));
    let lines = std::fs::read_to_string(&metrics).unwrap();
    // a finished run resumed: the same lines, none twice
    let mut again = tune_args(&model, &data, &extra(&out, &metrics));
    again.push("--resume".into());
    ok(&again);
    assert_eq!(std::fs::read_to_string(&metrics).unwrap(), lines);
    // another model with the same shape
    let mut wrong = tune_args(&other, &data, &extra(&out, &metrics));
    wrong.push("--resume".into());
    fails_with(&wrong, "different run");
    // a checkpoint whose step exceeds --steps (same fingerprint)
    let ckp = dir.join("s.safetensors.ckpt");
    let mut ck = Checkpoint::load(&ckp).unwrap();
    let keep = ck.clone();
    ck.step = 9;
    ck.history = vec![1.0; 9];
    ck.save(&ckp).unwrap();
    fails_with(&again, "beyond this run's 4 steps");
    keep.save(&ckp).unwrap();
    // identical runs, identical bytes (state, checkpoint, sidecar-free)
    let out2 = dir.join("s2.safetensors");
    ok(&tune_args(
        &model,
        &data,
        &extra(&out2, &dir.join("m2.jsonl")),
    ));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
    assert_eq!(
        std::fs::read(&ckp).unwrap(),
        std::fs::read(dir.join("s2.safetensors.ckpt")).unwrap()
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Ctrl-C (SIGINT) during `tune`: the current step finishes, the checkpoint
/// and the state are written, the exit code is 130; `--resume` then ends
/// with exactly the state of an uninterrupted run.
#[test]
fn ctrl_c_keeps_the_work_and_resume_is_exact() {
    let dir = tmpdir("sigint");
    let model = model_file(&dir, "m.safetensors", 10);
    let data = data_file(&dir, 40, 11);
    let args = |o: &Path, extra: &[&str]| {
        let mut a = tune_args(&model, &data, &["--out".into(), s(o)]);
        // --steps 4 of tune_args is overridden by the last --steps
        a.retain(|x| x != "--quiet");
        let i = a.iter().position(|x| x == "--steps").unwrap();
        a[i + 1] = "30".into();
        a.extend(v(&["--quiet", "--valid-frac", "0", "--metrics"]));
        a.push(s(&o.with_extension("jsonl")));
        a.extend(v(extra));
        a
    };
    let out = dir.join("s.safetensors");
    let child = Command::new(env!("CARGO_BIN_EXE_rwkv-tune"))
        .args(args(&out, &["--throttle-ms", "150"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // wait for a few steps in the metrics log, then Ctrl-C
    let m = out.with_extension("jsonl");
    let t0 = Instant::now();
    while std::fs::read_to_string(&m).map_or(0, |t| t.lines().count()) < 3 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(130), "{t}");
    assert!(t.contains("interrupted after step"), "{t}");
    let ck = Checkpoint::load(&dir.join("s.safetensors.ckpt")).unwrap();
    assert!(
        ck.step >= 3 && ck.step < 30,
        "checkpoint at step {}",
        ck.step
    );
    let train_lines = std::fs::read_to_string(&m)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"train\""))
        .count();
    assert_eq!(train_lines as u64, ck.step);
    assert!(out.is_file(), "the state was not written");
    ok(&args(&out, &["--resume"]));
    let whole = dir.join("whole.safetensors");
    ok(&args(&whole, &[]));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&whole).unwrap());
    std::fs::remove_dir_all(&dir).ok();
}

/// A second Ctrl-C exits at once (130), without waiting for the step.
#[test]
fn second_ctrl_c_aborts_at_once() {
    let dir = tmpdir("sigint2");
    let out = dir.join("s.safetensors");
    let m = dir.join("m.jsonl");
    let mut a = v(&[
        "tune",
        "--demo",
        "--steps",
        "50",
        "--throttle-ms",
        "4000",
        "--quiet",
    ]);
    a.extend(["--out".into(), s(&out), "--metrics".into(), s(&m)]);
    let child = Command::new(env!("CARGO_BIN_EXE_rwkv-tune"))
        .args(&a)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !std::fs::read_to_string(&m).is_ok_and(|t| t.contains("\"train\"")) {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    let t1 = Instant::now();
    for _ in 0..2 {
        assert!(Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success());
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(130), "{t}");
    assert!(
        t1.elapsed() < Duration::from_millis(3000),
        "the second Ctrl-C waited for the step ({:?})",
        t1.elapsed()
    );
    assert!(!t.contains("interrupted after step"), "{t}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn library_level_reproducers() {
    let dir = tmpdir("lib");
    let w: Weights = demo::demo_weights(12).unwrap();
    let cfg = w.config.clone();
    // duplicate state tensors (`blocks.0` and `blocks.00`)
    let st = rwkv_tune::model::State::zeros(&cfg);
    let mut t = st.time_state_tensors(&cfg);
    let mut dup = t[0].clone();
    dup.name = "blocks.00.att.time_state".into();
    t.push(dup);
    let bytes = rwkv_tune::model::load::write_f32_tensors(&t, StoreDType::F32, None).unwrap();
    let e = rwkv_tune::model::State::from_bytes(&bytes, Path::new("dup"), &cfg).unwrap_err();
    assert!(e.to_string().contains("two tensors for layer 0"), "{e}");
    // an exported NaN state is refused
    let mut ts = rwkv_tune::tune::grad::TunedState::zeros(&cfg, false);
    ts.wkv[0][3] = f32::NAN;
    let e =
        rwkv_tune::tune::train::export_state(&dir.join("x.safetensors"), &cfg, &ts).unwrap_err();
    assert!(matches!(e, rwkv_tune::Error::NonFinite { .. }), "{e}");
    assert!(!dir.join("x.safetensors").exists());
    // --valid-frac out of range does not panic in the library either
    let recs = vec![rwkv_tune::tune::data::Record::Text((0..50).collect())];
    for f in [2.0, -0.5, f64::NAN, f64::INFINITY] {
        let (tr, va) = rwkv_tune::tune::data::split_records(recs.clone(), f, 0);
        assert_eq!(tr.len() + va.len(), 2);
    }
    // a failed atomic write leaves no temporary file
    let target = dir.join("adir");
    std::fs::create_dir_all(target.join("inner")).unwrap();
    assert!(rwkv_tune::tensors::write_atomic(&target, b"data").is_err());
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    std::fs::remove_dir_all(&dir).ok();
}
