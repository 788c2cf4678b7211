//! Kill `rwkv-tune tune` with SIGKILL after it has written a checkpoint, run
//! it again with `--resume`, and check that it continues from the checkpoint's
//! step and ends with exactly the state of an uninterrupted run, leaving no
//! partial files behind: state tuning, and SDLoRA (LoRA factors and sparse
//! deltas, after a warm-up the resumed run repeats).
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rwkv_tune::model::{Config, Naming, State, StoreDType, Weights};
use rwkv_tune::tune::checkpoint::Checkpoint;

const STEPS: &str = "24";

fn args(dir: &Path, model: &Path, data: &Path, method: &[&str]) -> Vec<String> {
    let s = |p: PathBuf| p.to_string_lossy().into_owned();
    vec![
        "tune".into(),
        "--model".into(),
        s(model.to_path_buf()),
        "--data".into(),
        s(data.to_path_buf()),
        "--valid-frac".into(),
        "0".into(),
        "--out".into(),
        s(dir.join("state.safetensors")),
        "--metrics".into(),
        s(dir.join("metrics.jsonl")),
        "--steps".into(),
        STEPS.into(),
        "--batch".into(),
        "4".into(),
        "--warmup".into(),
        "3".into(),
        "--checkpoint-every".into(),
        "2".into(),
        "--seed".into(),
        "5".into(),
        "--threads".into(),
        "2".into(),
        "--quiet".into(),
    ]
    .into_iter()
    .chain(method.iter().map(|m| m.to_string()))
    .collect()
}

fn run_to_end(dir: &Path, model: &Path, data: &Path, method: &[&str], extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rwkv-tune"))
        .args(args(dir, model, data, method))
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "run failed:\n{text}");
    text
}

fn no_partial_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        assert!(
            !n.starts_with('.') && !n.contains(".tmp"),
            "partial file left: {n}"
        );
    }
}

#[test]
fn killed_run_resumes_exactly() {
    let cfg = Config::with_defaults(2, 64, 32, 256);
    let (a, b, root) = kill_and_resume("state", &[]);
    // Bitwise-equal tensors (the files' JSON headers may order metadata keys
    // differently).
    let bits = |d: &Path| -> Vec<Vec<u32>> {
        let st = State::load(d.join("state.safetensors"), &cfg).unwrap();
        st.layers
            .iter()
            .map(|l| l.wkv.iter().map(|x| x.to_bits()).collect())
            .collect()
    };
    let (sa, sb) = (bits(&a), bits(&b));
    assert!(
        sa.iter().flatten().any(|&x| x != 0),
        "the state was not tuned"
    );
    assert!(sa == sb, "resumed and uninterrupted final states differ");
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn killed_sdlora_run_resumes_exactly() {
    let cfg = Config::with_defaults(2, 64, 32, 256);
    let method = [
        "--method",
        "sdlora",
        "--sdt-warmup",
        "3",
        "--lora-rank",
        "2",
        "--lr",
        "0.01",
    ];
    let (a, b, root) = kill_and_resume("sdlora", &method);
    let load = |d: &Path| {
        rwkv_tune::model::lora::Adapter::load(&d.join("state.safetensors"), &cfg).unwrap()
    };
    let (x, y) = (load(&a), load(&b));
    assert!(x.lora.is_some() && !x.sparse.is_empty());
    assert!(x == y, "resumed and uninterrupted adapters differ");
    std::fs::remove_dir_all(&root).ok();
}

/// Runs `tune` (with `method`'s flags) until it has written a checkpoint,
/// kills it, resumes it to the end, runs the same job uninterrupted, and
/// checks the checkpoints, the metrics log and that no partial file is
/// left. Returns the two run directories and their root.
fn kill_and_resume(tag: &str, method: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    let root = std::env::temp_dir().join(format!("rwkv-tune-resume-{tag}-{}", std::process::id()));
    let (a, b) = (root.join("a"), root.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();

    // A small random model and prompt/response data.
    let cfg = Config::with_defaults(2, 64, 32, 256);
    let model = root.join("model.safetensors");
    Weights::random(&cfg, 99)
        .unwrap()
        .save(&model, Naming::Official, StoreDType::F32)
        .unwrap();
    let data = root.join("train.jsonl");
    let mut lines = String::new();
    for i in 0..40 {
        let (end, resp) = [("?", " yes"), ("!", " wow")][i % 2];
        lines += &format!(
            "{{\"prompt\": \"Q: item {i}{end}\", \"response\": \"{resp} {}\\n\"}}\n",
            i % 7
        );
    }
    std::fs::write(&data, lines).unwrap();

    // Interrupted run: SIGKILL once a checkpoint exists.
    let ckpt = a.join("state.safetensors.ckpt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rwkv-tune"))
        .args(args(&a, &model, &data, method))
        .args(["--throttle-ms", "150"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ckpt.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    assert!(
        !a.join("state.safetensors").exists(),
        "the run finished before it was killed"
    );
    let ck = Checkpoint::load(&ckpt).expect("the checkpoint left by the killed run is readable");
    assert!(
        ck.step >= 2 && ck.step < 24 && ck.step % 2 == 0,
        "checkpoint step {}",
        ck.step
    );
    assert_eq!(ck.history.len() as u64, ck.step);

    // Resume and finish.
    let text = run_to_end(&a, &model, &data, method, &["--resume"]);
    let resumed: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("resumed from step "))
        .unwrap_or_else(|| panic!("no `resumed from step` line in:\n{text}"))
        .trim()
        .parse()
        .unwrap();
    assert!(
        resumed >= ck.step && resumed < 24,
        "resumed from {resumed}, checkpoint {}",
        ck.step
    );

    // Uninterrupted reference run.
    run_to_end(&b, &model, &data, method, &[]);

    let ca = Checkpoint::load(&a.join("state.safetensors.ckpt")).unwrap();
    let cb = Checkpoint::load(&b.join("state.safetensors.ckpt")).unwrap();
    assert_eq!(ca.step, 24);
    assert_eq!(
        ca, cb,
        "final checkpoints (state, moments, data position, history) differ"
    );

    // The metrics log has each step exactly once.
    let steps: Vec<u64> = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"train\""))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=24).collect::<Vec<_>>());

    no_partial_files(&a);
    no_partial_files(&b);
    (a, b, root)
}
