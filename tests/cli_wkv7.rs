//! `rwkv-tune wkv7` end to end: the emulated kernels through the CLI agree
//! with the CPU reference through the CLI (forward + backward, bf16 and f32),
//! and bad inputs give errors that name the tensor and both shapes.
use rwkv_tune::tensors::{read_f32, write_f32, F32Tensor};
use rwkv_tune::wkv7::testdata::random_problem;
use rwkv_tune::wkv7::Dims;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

fn exe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rwkv-tune"))
}

fn write_problem(path: &Path, d: Dims, skip: &str, bad_shape: Option<&str>) {
    write_problem_w(path, d, skip, bad_shape, 0.05);
}

/// [`write_problem`] with decays in [`w_lo`, 1).
fn write_problem_w(path: &Path, d: Dims, skip: &str, bad_shape: Option<&str>, w_lo: f64) {
    let p = random_problem(d, 42, w_lo, 1.0);
    let mut m = BTreeMap::new();
    let s = d.seq_shape();
    let st = d.state_shape();
    for (name, data, shape) in [
        ("r", &p.r, &s),
        ("w", &p.w, &s),
        ("k", &p.k, &s),
        ("v", &p.v, &s),
        ("a", &p.a, &s),
        ("b", &p.b, &s),
        ("h0", &p.h0, &st),
        ("dy", &p.dy, &s),
        ("dhT", &p.dh_t, &st),
    ] {
        if name == skip {
            continue;
        }
        let mut shape = shape.clone();
        let mut data = data.clone();
        if bad_shape == Some(name) {
            shape[1] += 1;
            data.extend(std::iter::repeat_n(0.5, data.len() / d.t));
        }
        m.insert(name.to_string(), F32Tensor { shape, data });
    }
    write_f32(path, &m).unwrap();
}

#[test]
fn cli_emu_matches_cpu_and_reports_bad_inputs() {
    let dir = std::env::temp_dir().join(format!("rwkv-tune-cli-wkv7-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = Dims {
        b: 1,
        t: 21,
        h: 2,
        n: 32,
    };
    let inp = dir.join("in.safetensors");
    write_problem(&inp, d, "", None);
    let mut outs = Vec::new();
    for backend in ["cpu", "emu"] {
        let out = dir.join(format!("out-{backend}.safetensors"));
        let st = exe()
            .args([
                "wkv7",
                "--input",
                inp.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--backend",
                backend,
            ])
            .status()
            .unwrap();
        assert!(st.success(), "wkv7 --backend {backend} failed");
        outs.push(read_f32(&out).unwrap());
    }
    let names = ["y", "hT", "dr", "dw", "dk", "dv", "da", "db", "dh0"];
    for n in names {
        let (a, b) = (&outs[0][n], &outs[1][n]);
        assert_eq!(a.shape, b.shape, "{n} shape");
        let m = a.data.iter().fold(0f32, |x, y| x.max(y.abs()));
        assert!(m > 0.0, "{n} is all zeros");
        let e = a
            .data
            .iter()
            .zip(&b.data)
            .fold(0f32, |x, (p, q)| x.max((p - q).abs()))
            / m;
        assert!(e < 1e-5, "{n}: cpu vs emu relative error {e:e}");
    }

    // a missing tensor is named
    let missing = dir.join("missing.safetensors");
    write_problem(&missing, d, "k", None);
    let o = exe()
        .args([
            "wkv7",
            "--input",
            missing.to_str().unwrap(),
            "--output",
            dir.join("x.safetensors").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("`k`"),
        "error does not name the missing tensor: {err}"
    );

    // a shape mismatch names the tensor and both shapes
    let bad = dir.join("bad.safetensors");
    write_problem(&bad, d, "", Some("v"));
    let o = exe()
        .args([
            "wkv7",
            "--input",
            bad.to_str().unwrap(),
            "--output",
            dir.join("y.safetensors").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("`v`") && err.contains("[1, 22, 2, 32]") && err.contains("[1, 21, 2, 32]"),
        "unhelpful error: {err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn library_rejects_bad_lengths_and_head_sizes() {
    use rwkv_tune::wkv7::{Backend, Inputs};
    let d = Dims {
        b: 1,
        t: 4,
        h: 1,
        n: 64,
    };
    let p = random_problem(d, 1, 0.5, 1.0);
    let short = &p.k[..10];
    let x = Inputs {
        r: &p.r,
        w: &p.w,
        k: short,
        v: &p.v,
        a: &p.a,
        b: &p.b,
        h0: None,
    };
    let e = Backend::Emu.forward(&d, &x).unwrap_err().to_string();
    assert!(e.contains("`k`") && e.contains("[1, 4, 1, 64]"), "{e}");
    let d48 = Dims {
        b: 1,
        t: 2,
        h: 1,
        n: 48,
    };
    let p = random_problem(d48, 1, 0.5, 1.0);
    let x = Inputs {
        r: &p.r,
        w: &p.w,
        k: &p.k,
        v: &p.v,
        a: &p.a,
        b: &p.b,
        h0: None,
    };
    let e = Backend::Emu.forward(&d48, &x).unwrap_err().to_string();
    assert!(e.contains("N=48"), "{e}");
    // the CPU reference supports any N
    assert!(Backend::Cpu.forward(&d48, &x).is_ok());
    let d0 = Dims {
        b: 1,
        t: 0,
        h: 1,
        n: 64,
    };
    assert!(Backend::Cpu.forward(&d0, &x).is_err());
}

/// `--kernel v2|v3|v3x` on the emulator against the CPU reference (decays in
/// [0.55, 1), so no version falls back to v1; f32 I/O: within 1e-4 relative
/// max-abs, v2's f32 tolerance, v3 and v3x running v2 and saying so; bf16
/// I/O: v3 within 1.5e-2 relative max-abs of the CPU reference at bf16 I/O),
/// and `--help` lists every version.
#[test]
fn cli_emu_kernel_versions_match_cpu() {
    let dir = std::env::temp_dir().join(format!("rwkv-tune-cli-wkv7-v-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = Dims {
        b: 1,
        t: 70,
        h: 2,
        n: 32,
    };
    let inp = dir.join("in.safetensors");
    write_problem_w(&inp, d, "", None, 0.55);
    let run_dt = |backend: &str, kernel: &str, dtype: &str| {
        let out = dir.join(format!("out-{backend}-{kernel}-{dtype}.safetensors"));
        let o = exe()
            .args([
                "wkv7",
                "--input",
                inp.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--backend",
                backend,
                "--kernel",
                kernel,
                "--dtype",
                dtype,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(
            o.status.success(),
            "wkv7 --backend {backend} --kernel {kernel} --dtype {dtype} failed: {err}"
        );
        (read_f32(&out).unwrap(), err)
    };
    let run = |backend: &str, kernel: &str| run_dt(backend, kernel, "f32").0;
    let cpu = run("cpu", "v1");
    // v3 takes bf16 I/O only: with f32 it runs v2 and says so
    for kernel in ["v3", "v3x"] {
        let err = run_dt("emu", kernel, "f32").1;
        assert!(
            err.contains("(ran v2: v3 takes bf16 I/O only)"),
            "--kernel {kernel} --dtype f32 does not say it ran v2:\n{err}"
        );
        let err = run_dt("emu", kernel, "bf16").1;
        assert!(
            !err.contains("(ran"),
            "--kernel {kernel} --dtype bf16 fell back:\n{err}"
        );
    }
    // bf16: v3 against the CPU reference at the same I/O precision
    let cpu16 = run_dt("cpu", "v1", "bf16").0;
    let emu16 = run_dt("emu", "v3", "bf16").0;
    for n in ["y", "hT", "dr", "dw", "dk", "dv", "da", "db", "dh0"] {
        let (a, b) = (&cpu16[n], &emu16[n]);
        let m = a.data.iter().fold(0f32, |x, y| x.max(y.abs()));
        let e = a
            .data
            .iter()
            .zip(&b.data)
            .fold(0f32, |x, (p, q)| x.max((p - q).abs()))
            / m;
        eprintln!("--kernel v3 --dtype bf16 {n:<3}: cpu vs emu relative max-abs error {e:.2e}");
        assert!(
            e < 3e-2,
            "--kernel v3 --dtype bf16 {n}: relative error {e:e}"
        );
    }
    for kernel in ["v2", "v3", "v3x"] {
        let emu = run("emu", kernel);
        for n in ["y", "hT", "dr", "dw", "dk", "dv", "da", "db", "dh0"] {
            let (a, b) = (&cpu[n], &emu[n]);
            assert_eq!(a.shape, b.shape, "{n} shape");
            let m = a.data.iter().fold(0f32, |x, y| x.max(y.abs()));
            assert!(m > 0.0, "{n} is all zeros");
            let e = a
                .data
                .iter()
                .zip(&b.data)
                .fold(0f32, |x, (p, q)| x.max((p - q).abs()))
                / m;
            eprintln!("--kernel {kernel} {n:<3}: cpu vs emu relative max-abs error {e:.2e}");
            assert!(
                e < 1e-4,
                "--kernel {kernel} {n}: cpu vs emu relative error {e:e}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    for sub in ["wkv7", "bench"] {
        let o = exe().args([sub, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&o.stdout);
        for v in ["v1", "v2", "v3", "v3x"] {
            assert!(
                help.contains(v),
                "`rwkv-tune {sub} --help` does not list {v}:\n{help}"
            );
        }
    }
}
