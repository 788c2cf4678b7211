//! The CUDA kernel source of `kernels/wkv7_v1.cu` run on the CPU under the
//! emulation header (feature `emu`, on by default), forward and backward,
//! checked against the CPU reference run in f64:
//! `cargo run --release --example wkv7_emu`.
mod common;

use rwkv_tune::wkv7::reference::{self, RefInputs};
use rwkv_tune::wkv7::{Backend, Dims, GradInputs, Inputs};

fn main() -> Result<(), rwkv_tune::Error> {
    // Small: the emulator runs one OS thread per CUDA thread.
    let d = Dims {
        b: 1,
        t: 24,
        h: 2,
        n: 32,
    };
    let p = common::random_problem(&d, 11);
    let x = Inputs {
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
    let t0 = std::time::Instant::now();
    let (out, g) = Backend::Emu.forward_backward(&d, &x, &gi)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    // The f64 reference on the same inputs (an independent summation).
    let wide = |v: &[f32]| v.iter().map(|&e| e as f64).collect::<Vec<f64>>();
    let (r6, w6, k6, v6, a6, b6, h06, dy6) = (
        wide(&p.r),
        wide(&p.w),
        wide(&p.k),
        wide(&p.v),
        wide(&p.a),
        wide(&p.b),
        wide(&p.h0),
        wide(&p.dy),
    );
    let x6 = RefInputs {
        r: &r6,
        w: &w6,
        k: &k6,
        v: &v6,
        a: &a6,
        b: &b6,
        h0: Some(&h06),
    };
    let (y6, ht6) = reference::forward(&d, &x6)?;
    let g6 = reference::backward(&d, &x6, &dy6, None)?;
    let narrow = |v: &[f64]| v.iter().map(|&e| e as f32).collect::<Vec<f32>>();
    println!(
        "wkv7_emu: B={} T={} H={} N={}: emulated forward + backward in {ms:.0} ms (this machine)",
        d.b, d.t, d.h, d.n
    );
    let mut worst = 0f64;
    for (name, got, want) in [
        ("y", &out.y, &y6),
        ("h_t", &out.h_t, &ht6),
        ("dr", &g.dr, &g6.dr),
        ("dw", &g.dw, &g6.dw),
        ("dk", &g.dk, &g6.dk),
        ("dv", &g.dv, &g6.dv),
        ("da", &g.da, &g6.da),
        ("db", &g.db, &g6.db),
        ("dh0", &g.dh0, &g6.dh0),
    ] {
        let e = common::rel_inf(got, &narrow(want));
        println!("  {name:>3}: max |emu - ref64| / max |ref64| = {e:.1e}");
        worst = worst.max(e);
    }
    // f32 kernels against f64: 1e-5 relative, as tests/wkv7_backends.rs.
    if worst > 1e-5 {
        eprintln!("wkv7_emu: FAILED (worst relative error {worst:.1e} > 1e-5)");
        std::process::exit(1);
    }
    println!("wkv7_emu: ok");
    Ok(())
}
