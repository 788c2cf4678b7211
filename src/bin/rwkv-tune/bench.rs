//! `rwkv-tune bench`: time the WKV-7 op over a table of shapes and passes,
//! print median ms, GB/s, TFLOP/s and % of the memory roofline, write JSON.
use anyhow::{bail, Context, Result};
use rwkv_tune::bench::{bench_problem, format_table, run_problem, SEED};
use rwkv_tune::dtype::DType;
use rwkv_tune::tensors::read_f32;
use rwkv_tune::wkv7::testdata::Problem;
use rwkv_tune::wkv7::{Backend, Dims, Version};
use std::path::PathBuf;

/// Benchmark the WKV-7 kernels.
///
/// With a GPU (`--backend cuda`, the default when one is present) it times
/// the CUDA kernels with CUDA events; without one it benchmarks the CPU
/// paths (the Rust reference, and the emulated kernels with --backend emu)
/// and says so. Bytes are the tensors' I/O plus fp32 states (docs/kernels.md);
/// the roofline defaults to 3000 GB/s on a GPU (H100 copy bandwidth measured
/// on the project's GPU machines) and is unknown on the CPU.
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct BenchArgs {
    /// cpu | emu | cuda | auto (cuda when available, else cpu)
    #[arg(long, default_value = "auto")]
    backend: String,
    /// shapes as B,T,H,N[,dtype] separated by spaces/semicolons
    /// (default: the target shape 8,4096,64,64,bf16 and smaller ones on a GPU;
    /// small shapes on the CPU)
    #[arg(long)]
    shapes: Option<String>,
    /// kernel version: v1 (FMA, any decay), v2 (tensor cores, N = 32/64,
    /// decays ≥ 0.5 — the benchmark's random decays are in [0.55, 1)), v3
    /// (mixed precision) or v3x (exact precision; both with v2's bounds), or
    /// all (every version on the same inputs: v1, v2, v3, v3x)
    #[arg(long, default_value = "v1", value_parser = ["v1", "v2", "v3", "v3x", "all"])]
    kernel: String,
    /// time these inputs instead of random ones: a safetensors file with
    /// r, w, k, v, a, b, h0, dy, dhT (as `rwkv-tune wkv7` reads; the shape
    /// comes from the file, --shapes is ignored)
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// I/O precision for --inputs
    #[arg(long, default_value = "bf16", value_parser = ["f32", "bf16"])]
    dtype: String,
    /// timed repetitions per measurement (median reported)
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// untimed warm-up runs
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// memory bandwidth (GB/s) for the roofline column
    #[arg(long)]
    peak_gbs: Option<f64>,
    /// write the rows as JSON here
    #[arg(long)]
    json: Option<PathBuf>,
    /// with --backend emu: print the emulator's performance counters of the
    /// v1/v2/v3/v3x kernels (N = 64) per chunk and ESTIMATED H100/H200 times at the
    /// shape (default 8,4096,64,64,bf16) instead of timing (docs/emulation.md)
    #[arg(long)]
    counters: bool,
    /// with --counters: `.ci/ptxas-report`'s output, for registers and shared
    /// memory per kernel (occupancy)
    #[arg(long)]
    ptxas_report: Option<PathBuf>,
}

/// `--counters`: the emulator's counters and the estimates, no timing.
fn run_counters(a: &BenchArgs) -> Result<()> {
    let (d, dtype) = match &a.shapes {
        Some(s) => *parse_shapes(s)?
            .first()
            .context("--counters needs one shape")?,
        None => parse_shapes("8,4096,64,64,bf16")?[0],
    };
    if d.n != 64 {
        bail!(
            "--counters profiles the N = 64 kernels; shape has N = {}",
            d.n
        );
    }
    let report = match &a.ptxas_report {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    let text =
        rwkv_tune::emu::counters_report((d.b, d.t, d.h), dtype == DType::BF16, report.as_deref())?;
    print!("{text}");
    Ok(())
}

fn parse_shapes(s: &str) -> Result<Vec<(Dims, DType)>> {
    let mut out = Vec::new();
    for item in s.split([';', ' ']).map(str::trim).filter(|x| !x.is_empty()) {
        let f: Vec<&str> = item.split(',').collect();
        if f.len() != 4 && f.len() != 5 {
            bail!("shape `{item}`: expected B,T,H,N[,f32|bf16]");
        }
        let num = |i: usize| {
            f[i].parse::<usize>()
                .with_context(|| format!("shape `{item}`: `{}` is not a number", f[i]))
        };
        let dtype = match f.get(4).copied().unwrap_or("bf16") {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            o => bail!("shape `{item}`: dtype `{o}` (expected f32 or bf16)"),
        };
        let d = Dims {
            b: num(0)?,
            t: num(1)?,
            h: num(2)?,
            n: num(3)?,
        };
        d.validate()?;
        rwkv_tune::guard::check_host_memory(
            &format!("shape `{item}`"),
            rwkv_tune::bench::host_bytes(&d),
        )?;
        out.push((d, dtype));
    }
    Ok(out)
}

/// Reads a problem (r … b, h0, dy, dhT, all required) from a safetensors file.
fn read_problem(path: &std::path::Path) -> Result<Problem> {
    let mut t = read_f32(path)?;
    let shape = t
        .get("r")
        .with_context(|| format!("{}: no tensor `r`", path.display()))?
        .shape
        .clone();
    let [b, tt, h, n] = shape[..] else {
        bail!(
            "{}: `r` has shape {shape:?}, expected [B, T, H, N]",
            path.display()
        );
    };
    let dims = Dims { b, t: tt, h, n };
    dims.validate()?;
    let (s, st) = (dims.seq_shape(), dims.state_shape());
    let mut take = |name: &str, want: &[usize]| -> Result<Vec<f32>> {
        let x = t
            .remove(name)
            .with_context(|| format!("{}: no tensor `{name}`", path.display()))?;
        if x.shape != want {
            bail!(
                "{}: `{name}` has shape {:?}, expected {want:?}",
                path.display(),
                x.shape
            );
        }
        Ok(x.data)
    };
    Ok(Problem {
        dims,
        r: take("r", &s)?,
        w: take("w", &s)?,
        k: take("k", &s)?,
        v: take("v", &s)?,
        a: take("a", &s)?,
        b: take("b", &s)?,
        h0: take("h0", &st)?,
        dy: take("dy", &s)?,
        dh_t: take("dhT", &st)?,
    })
}

pub fn run(a: BenchArgs) -> Result<()> {
    let backend = match a.backend.as_str() {
        "auto" => match Backend::from_name("cuda") {
            Ok(b) => b,
            Err(e) => {
                eprintln!("no GPU ({e}); benchmarking the CPU reference instead");
                Backend::Cpu
            }
        },
        other => Backend::from_name(other)?,
    };
    if a.counters {
        if backend.name() != "emu" {
            bail!("--counters needs --backend emu (the counters come from the CPU emulator)");
        }
        return run_counters(&a);
    }
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let gpu = matches!(backend, Backend::Cuda(_));
    let shapes = match &a.shapes {
        Some(s) => parse_shapes(s)?,
        None if gpu => parse_shapes(
            "8,4096,64,64,bf16; 8,4096,64,64,f32; 8,4096,12,64,bf16; 1,4096,64,64,bf16",
        )?,
        None if backend.name() == "emu" => parse_shapes("1,64,2,64,f32; 1,64,2,64,bf16")?,
        None => parse_shapes("1,1024,4,64,f32; 1,1024,4,64,bf16; 2,4096,2,64,f32")?,
    };
    if !gpu {
        eprintln!(
            "note: timing the {} backend on the CPU — these are not GPU kernel timings",
            backend.name()
        );
    }
    if let Backend::Cuda(g) = &backend {
        for (d, _) in &shapes {
            g.check_memory(
                &format!("shape {},{},{},{}", d.b, d.t, d.h, d.n),
                rwkv_tune::bench::host_bytes(d),
            )?;
        }
    }
    let peak = a.peak_gbs.or(if gpu { Some(3000.0) } else { None });
    let versions = match a.kernel.as_str() {
        "all" => Version::ALL.to_vec(),
        k => vec![Version::parse(k)?],
    };
    if let (Some(j), Some(i)) = (&a.json, &a.inputs) {
        rwkv_tune::guard::check_outputs(&[("--inputs", i.as_path())], &[("--json", j.as_path())])?;
    } else if let Some(j) = &a.json {
        rwkv_tune::guard::check_outputs(&[], &[("--json", j.as_path())])?;
    }
    let rows = match &a.inputs {
        None => {
            let mut rows = Vec::new();
            for (d, dtype) in &shapes {
                let p = bench_problem(d);
                let src = format!("random seed {SEED:#x}");
                rows.extend(run_problem(
                    &backend, &versions, &p, &src, *dtype, a.warmup, a.reps, peak,
                )?);
            }
            rows
        }
        Some(path) => {
            let p = read_problem(path)?;
            let dtype = if a.dtype == "f32" {
                DType::F32
            } else {
                DType::BF16
            };
            let src = path.display().to_string();
            run_problem(&backend, &versions, &p, &src, dtype, a.warmup, a.reps, peak)?
        }
    };
    if let Some(r) = rows.first() {
        println!("device: {}", r.device);
        println!("inputs: {}", r.inputs);
    }
    print!("{}", format_table(&rows));
    if let Some(p) = &a.json {
        let js = serde_json::to_string_pretty(&rows)?;
        rwkv_tune::tensors::write_atomic(p, js.as_bytes())?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
