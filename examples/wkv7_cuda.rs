//! Embedding the WKV-7 kernels: the caller's own CUDA context, own stream
//! (not the legacy default stream) and own device buffers; forward and
//! backward timed with CUDA events, with no host copy in the timed path;
//! the results copied back once and checked against the CPU reference.
//! Feature `cuda`: `cargo run --release --example wkv7_cuda`. Without a
//! GPU, a driver or the compiled kernels it says so and exits 0 (1 when
//! `RWKV_TUNE_REQUIRE_GPU=1`).
mod common;

use rwkv_tune::cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use rwkv_tune::wkv7::cuda::{DevGrads, DevInputs, Wkv7Kernels};
use rwkv_tune::wkv7::{Backend, Dims, GradInputs, Inputs, Version};
use std::sync::Arc;

/// Prints why the example cannot run and exits (0, or 1 when a GPU is required).
fn unavailable(why: &dyn std::fmt::Display) -> ! {
    println!("wkv7_cuda: no GPU run: {why}");
    if rwkv_tune::cuda::require_gpu() {
        eprintln!("wkv7_cuda: RWKV_TUNE_REQUIRE_GPU=1, failing");
        std::process::exit(1);
    }
    std::process::exit(0);
}

/// Any CUDA error as the library's error, with what was being done.
fn dev<T>(r: Result<T, rwkv_tune::cudarc::driver::DriverError>, what: &str) -> T {
    r.unwrap_or_else(|e| {
        eprintln!("wkv7_cuda: {what}: {e}");
        std::process::exit(1)
    })
}

fn upload(stream: &Arc<CudaStream>, v: &[f32]) -> CudaSlice<f32> {
    dev(stream.clone_htod(v), "upload")
}

fn main() -> Result<(), rwkv_tune::Error> {
    if !rwkv_tune::cuda::driver_present() {
        unavailable(&"no NVIDIA driver (libcuda.so) on this machine");
    }
    if !rwkv_tune::cuda::kernels_built() {
        unavailable(&rwkv_tune::Error::KernelsNotBuilt);
    }
    let ctx = match CudaContext::new(0) {
        Ok(c) => c,
        Err(e) => unavailable(&format!("cannot open CUDA device 0: {e}")),
    };
    // The caller's own stream: the kernels must not use the default one.
    let stream = dev(ctx.new_stream(), "creating a stream");
    assert_ne!(
        stream.cu_stream(),
        ctx.default_stream().cu_stream(),
        "new_stream returned the default stream"
    );
    let kernels = Wkv7Kernels::new(stream.clone())?;
    assert_eq!(kernels.stream().cu_stream(), stream.cu_stream());

    let d = Dims {
        b: 2,
        t: 256,
        h: 8,
        n: 64,
    };
    let ver = Version::V1;
    let p = common::random_problem(&d, 5);

    // The caller's buffers, allocated and filled on its stream.
    let (r, w, k, v, a, b) = (
        upload(&stream, &p.r),
        upload(&stream, &p.w),
        upload(&stream, &p.k),
        upload(&stream, &p.v),
        upload(&stream, &p.a),
        upload(&stream, &p.b),
    );
    let h0 = upload(&stream, &p.h0);
    let dy = upload(&stream, &p.dy);
    let zeros = |n: usize| dev(stream.alloc_zeros::<f32>(n), "alloc");
    let mut y = zeros(d.seq_len());
    let mut h_t = zeros(d.state_len());
    let mut g = DevGrads {
        dr: zeros(d.seq_len()),
        dw: zeros(d.seq_len()),
        dk: zeros(d.seq_len()),
        dv: zeros(d.seq_len()),
        da: zeros(d.seq_len()),
        db: zeros(d.seq_len()),
        dh0: zeros(d.state_len()),
    };
    let mut ws = kernels.workspace(ver, &d)?;
    let x = DevInputs {
        r: &r,
        w: &w,
        k: &k,
        v: &v,
        a: &a,
        b: &b,
        h0: Some(&h0),
    };

    // Timed path: launches and events only, all on the caller's stream.
    let mut run = || -> Result<(), rwkv_tune::Error> {
        kernels.forward(ver, &d, &x, &mut y, Some(&mut h_t), Some(&mut ws.ckpt))?;
        kernels.backward(
            ver,
            &d,
            &x,
            &ws.ckpt,
            &dy,
            None,
            g.as_mut(),
            &mut ws.scratch,
        )
    };
    run()?; // warm-up
    let reps = 20;
    let start = dev(stream.record_event(None), "event");
    for _ in 0..reps {
        run()?;
    }
    let end = dev(stream.record_event(None), "event");
    let ms = dev(start.elapsed_ms(&end), "elapsed") as f64 / reps as f64;

    // One copy back, after the timing, and the check against the CPU.
    let down = |s: &CudaSlice<f32>| dev(stream.clone_dtoh(s), "download");
    let xh = Inputs {
        r: &p.r,
        w: &p.w,
        k: &p.k,
        v: &p.v,
        a: &p.a,
        b: &p.b,
        h0: Some(&p.h0),
    };
    let gi = GradInputs {
        dy: &p.dy,
        dh_t: None,
    };
    let (ro, rg) = Backend::Cpu.forward_backward(&d, &xh, &gi)?;
    println!(
        "wkv7_cuda: {} B={} T={} H={} N={} f32, v1, caller's stream: forward + backward {ms:.3} ms (mean of {reps}, CUDA events)",
        describe(&ctx),
        d.b,
        d.t,
        d.h,
        d.n
    );
    let mut worst = 0f64;
    for (name, got, want) in [
        ("y", down(&y), &ro.y),
        ("h_t", down(&h_t), &ro.h_t),
        ("dr", down(&g.dr), &rg.dr),
        ("dw", down(&g.dw), &rg.dw),
        ("dk", down(&g.dk), &rg.dk),
        ("dv", down(&g.dv), &rg.dv),
        ("da", down(&g.da), &rg.da),
        ("db", down(&g.db), &rg.db),
        ("dh0", down(&g.dh0), &rg.dh0),
    ] {
        let e = common::rel_inf(&got, want);
        println!("  {name:>3}: max |gpu - cpu| / max |cpu| = {e:.1e}");
        worst = worst.max(e);
    }
    // f32 on both sides, different summation orders (and FMA): 1e-4.
    if worst > 1e-4 {
        eprintln!("wkv7_cuda: FAILED (worst relative error {worst:.1e} > 1e-4)");
        std::process::exit(1);
    }
    println!("wkv7_cuda: ok");
    Ok(())
}

fn describe(ctx: &CudaContext) -> String {
    let name = ctx.name().unwrap_or_else(|_| "GPU".into());
    match ctx.compute_capability() {
        Ok((a, b)) => format!("{name} (sm_{a}{b})"),
        Err(_) => name,
    }
}
