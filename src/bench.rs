//! WKV-7 benchmark suite shared by `rwkv-tune bench` and `benches/wkv7.rs`:
//! byte and FLOP accounting (docs/kernels.md, after §5 of the math notes),
//! timing on every backend (CUDA events on a GPU, wall clock on the CPU),
//! median over repeats after warm-up, on random (never zero) inputs.
use crate::dtype::{DType, IoType};
use crate::error::Result;
use crate::wkv7::testdata::{random_problem, Problem};
use crate::wkv7::{Backend, Dims, GradInputs, Inputs, Version};
use serde::Serialize;
use std::time::Instant;

// `Pass` lives in `wkv7` (the CUDA timing there takes it); this path keeps
// working.
pub use crate::wkv7::Pass;

/// Bytes that must cross memory for `pass` (token·head I/O of the tensors
/// plus the fp32 states in and out), not counting saved checkpoints:
/// forward 6 inputs + y; backward 7 inputs (r,w,k,v,a,b,dy) + 6 gradients;
/// h0, h_t, dh_t, dh0 at 4 B per element.
pub fn bytes_moved(d: &Dims, dtype: DType, pass: Pass) -> f64 {
    let s = match dtype {
        DType::F32 => 4.0,
        DType::BF16 => 2.0,
    };
    let th = (d.b * d.t * d.h) as f64 * d.n as f64 * s;
    let state = d.state_len() as f64 * 4.0;
    let fwd = 7.0 * th + 2.0 * state;
    let bwd = 13.0 * th + 2.0 * state;
    match pass {
        Pass::Forward => fwd,
        Pass::Backward => bwd,
        Pass::ForwardBackward => fwd + bwd,
    }
}

/// FLOPs of the recurrent algorithm per token·head: forward ≈ 9N², backward
/// ≈ 30N² (counted as in the math notes §5).
pub fn flops(d: &Dims, pass: Pass) -> f64 {
    let th = (d.b * d.t * d.h) as f64;
    let n2 = (d.n * d.n) as f64;
    match pass {
        Pass::Forward => 9.0 * n2 * th,
        Pass::Backward => 30.0 * n2 * th,
        Pass::ForwardBackward => 39.0 * n2 * th,
    }
}

/// One row of the benchmark table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Backend name (`cpu`, `emu`, `cuda`).
    pub backend: String,
    /// Kernel version that ran (`V1`, `V2`, `V3` or `V3Exact`).
    pub kernel: String,
    /// What ran it (GPU name or CPU thread count).
    pub device: String,
    /// Batch size B.
    pub b: usize,
    /// Sequence length T.
    pub t: usize,
    /// Heads H.
    pub h: usize,
    /// Head size N.
    pub n: usize,
    /// I/O dtype (`f32`, `bf16`).
    pub dtype: String,
    /// What was timed.
    pub pass: Pass,
    /// Median milliseconds per repetition.
    pub median_ms: f64,
    /// Fastest repetition, milliseconds.
    pub min_ms: f64,
    /// Timed repetitions.
    pub reps: usize,
    /// Bytes moved (inputs, outputs, states) per second at the median, GB/s.
    pub gb_per_s: f64,
    /// FLOP rate at the median, TFLOP/s.
    pub tflop_per_s: f64,
    /// Percent of the memory roofline at `peak_gb_per_s`, when known.
    pub pct_roofline: Option<f64>,
    /// Where the inputs came from (the random seed, or the file given to
    /// `rwkv-tune bench --inputs`).
    pub inputs: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The seed of the benchmark's random problems (`inputs` of the rows).
pub const SEED: u64 = 0x5eed;

/// Host memory (bytes) that timing one problem of dims `d` takes: the f32
/// problem (7 token·head tensors, 2 states), its converted copy, the
/// outputs and gradients (7 token·head tensors, 2 states) and the
/// kernels' workspaces, rounded up generously. Saturates instead of
/// overflowing.
pub fn host_bytes(d: &Dims) -> u64 {
    let seq = [d.b, d.t, d.h, d.n]
        .iter()
        .fold(1u64, |a, &x| a.saturating_mul(x as u64));
    let st = [d.b, d.h, d.n, d.n]
        .iter()
        .fold(1u64, |a, &x| a.saturating_mul(x as u64));
    seq.saturating_mul(24 * 4)
        .saturating_add(st.saturating_mul(8 * 4))
}

/// The random problem `rwkv-tune bench` times for dims `d` (decays in
/// [0.55, 1), so v2 runs wherever the head size allows).
pub fn bench_problem(d: &Dims) -> Problem {
    random_problem(*d, SEED, 0.55, 1.0)
}

/// The token·head inputs of a problem converted to the I/O type once.
struct Converted<X> {
    r: Vec<X>,
    w: Vec<X>,
    k: Vec<X>,
    v: Vec<X>,
    a: Vec<X>,
    b: Vec<X>,
    dy: Vec<X>,
}

impl<X: IoType> Converted<X> {
    fn new(p: &Problem) -> Self {
        let c = |v: &[f32]| v.iter().map(|&e| X::from_f32(e)).collect::<Vec<X>>();
        Converted {
            r: c(&p.r),
            w: c(&p.w),
            k: c(&p.k),
            v: c(&p.v),
            a: c(&p.a),
            b: c(&p.b),
            dy: c(&p.dy),
        }
    }
}

/// Times `pass` of the WKV-7 op (kernel `version`; v2 falls back to v1 where
/// it cannot run) on `backend` for dims `d` and dtype X on the benchmark's
/// random problem: `warmup` untimed runs, then `reps` timed ones; returns
/// per-run ms.
pub fn time_wkv7<X: IoType>(
    backend: &Backend,
    version: Version,
    d: &Dims,
    pass: Pass,
    warmup: usize,
    reps: usize,
) -> Result<Vec<f64>> {
    let p = bench_problem(d);
    time_converted(
        backend,
        version,
        &p,
        &Converted::<X>::new(&p),
        pass,
        warmup,
        reps,
    )
}

fn time_converted<X: IoType>(
    backend: &Backend,
    version: Version,
    p: &Problem,
    c: &Converted<X>,
    pass: Pass,
    warmup: usize,
    reps: usize,
) -> Result<Vec<f64>> {
    let d = &p.dims;
    if let Backend::Cuda(gpu) = backend {
        return crate::wkv7::cuda::time_device::<X>(
            gpu,
            d,
            [&c.r, &c.w, &c.k, &c.v, &c.a, &c.b],
            &p.h0,
            &c.dy,
            &p.dh_t,
            version,
            pass,
            warmup,
            reps,
        );
    }
    let x = Inputs {
        r: &c.r,
        w: &c.w,
        k: &c.k,
        v: &c.v,
        a: &c.a,
        b: &c.b,
        h0: Some(&p.h0),
    };
    let g = GradInputs {
        dy: &c.dy,
        dh_t: Some(&p.dh_t),
    };
    let mut times = Vec::with_capacity(reps);
    for i in 0..warmup + reps {
        let t0 = Instant::now();
        match pass {
            Pass::Forward => {
                std::hint::black_box(backend.forward_v(version, d, &x)?);
            }
            // On host backends the backward needs the forward's saved states,
            // so "backward" is reported as (forward+backward) − forward.
            Pass::Backward | Pass::ForwardBackward => {
                std::hint::black_box(backend.forward_backward_v(version, d, &x, &g)?);
            }
        }
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times)
}

/// Runs every (shape, dtype, pass) on `backend` and returns the table rows.
/// `peak_gb_per_s` sets the roofline (e.g. 3000 for an H100); None = unknown.
/// Each shape's random problem is generated once (see [`run_problem`]).
pub fn run_suite(
    backend: &Backend,
    version: Version,
    shapes: &[(Dims, DType)],
    warmup: usize,
    reps: usize,
    peak_gb_per_s: Option<f64>,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (d, dtype) in shapes {
        let p = bench_problem(d);
        let src = format!("random seed {SEED:#x}");
        rows.extend(run_problem(
            backend,
            &[version],
            &p,
            &src,
            *dtype,
            warmup,
            reps,
            peak_gb_per_s,
        )?);
    }
    Ok(rows)
}

/// Every pass of every kernel in `versions` on one problem `p` (described by
/// `inputs` in the rows): the inputs are converted to `dtype` once, and on a
/// GPU each measurement uploads them before its timed region.
#[allow(clippy::too_many_arguments)]
pub fn run_problem(
    backend: &Backend,
    versions: &[Version],
    p: &Problem,
    inputs: &str,
    dtype: DType,
    warmup: usize,
    reps: usize,
    peak_gb_per_s: Option<f64>,
) -> Result<Vec<Row>> {
    match dtype {
        DType::F32 => run_typed::<f32>(backend, versions, p, inputs, warmup, reps, peak_gb_per_s),
        DType::BF16 => {
            run_typed::<half::bf16>(backend, versions, p, inputs, warmup, reps, peak_gb_per_s)
        }
    }
}

fn run_typed<X: IoType>(
    backend: &Backend,
    versions: &[Version],
    p: &Problem,
    inputs: &str,
    warmup: usize,
    reps: usize,
    peak_gb_per_s: Option<f64>,
) -> Result<Vec<Row>> {
    let device = match backend {
        Backend::Cuda(gpu) => gpu.describe(),
        _ => format!("CPU ({} threads)", rayon::current_num_threads()),
    };
    let d = &p.dims;
    let dtype = X::DTYPE;
    let c = Converted::<X>::new(p);
    let mut rows = Vec::new();
    for &version in versions {
        let mut medians = std::collections::HashMap::new();
        for pass in [Pass::Forward, Pass::ForwardBackward, Pass::Backward] {
            let host_bwd = pass == Pass::Backward && !matches!(backend, Backend::Cuda(_));
            let (med, min) = if host_bwd {
                let fb: f64 = medians[&Pass::ForwardBackward];
                let f: f64 = medians[&Pass::Forward];
                ((fb - f).max(0.0), (fb - f).max(0.0))
            } else {
                let t = time_converted(backend, version, p, &c, pass, warmup, reps)?;
                let min = t.iter().cloned().fold(f64::MAX, f64::min);
                (median(t), min)
            };
            medians.insert(pass, med);
            let bytes = bytes_moved(d, dtype, pass);
            let gbs = if med > 0.0 {
                bytes / (med * 1e-3) / 1e9
            } else {
                0.0
            };
            rows.push(Row {
                backend: backend.name().into(),
                kernel: format!("{:?}", effective(version, backend, d, &c.w)),
                device: device.clone(),
                b: d.b,
                t: d.t,
                h: d.h,
                n: d.n,
                dtype: dtype.to_string(),
                pass,
                median_ms: med,
                min_ms: min,
                reps,
                gb_per_s: gbs,
                tflop_per_s: if med > 0.0 {
                    flops(d, pass) / (med * 1e-3) / 1e12
                } else {
                    0.0
                },
                pct_roofline: peak_gb_per_s.map(|p| 100.0 * gbs / p),
                inputs: inputs.to_string(),
            });
        }
    }
    Ok(rows)
}

/// Formats rows as an aligned text table.
pub fn format_table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<8} {:<6} {:>3} {:>6} {:>4} {:>4} {:>5} {:<17} {:>10} {:>9} {:>9} {:>8}\n",
        "backend",
        "kernel",
        "B",
        "T",
        "H",
        "N",
        "dtype",
        "pass",
        "median ms",
        "GB/s",
        "TFLOP/s",
        "%roof"
    );
    for r in rows {
        s += &format!(
            "{:<8} {:<6} {:>3} {:>6} {:>4} {:>4} {:>5} {:<17} {:>10.3} {:>9.2} {:>9.3} {:>8}\n",
            r.backend,
            r.kernel,
            r.b,
            r.t,
            r.h,
            r.n,
            r.dtype,
            r.pass.name(),
            r.median_ms,
            r.gb_per_s,
            r.tflop_per_s,
            r.pct_roofline
                .map_or("n/a".to_string(), |p| format!("{p:.1}"))
        );
    }
    s
}

/// The kernel version that runs on these inputs (v2 falls back to v1 for
/// other head sizes or decays below its bound). The CPU backend runs the
/// reference whatever the version.
fn effective<X: IoType>(version: Version, backend: &Backend, d: &Dims, w: &[X]) -> Version {
    match backend {
        Backend::Cpu => Version::V1,
        _ => version.effective(d, w),
    }
}
