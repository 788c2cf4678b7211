//! The CUDA kernel source of `kernels/wkv7_v1.cu` run on the CPU under the
//! emulation header (feature `emu`, on by default), forward and backward,
//! checked against the CPU reference:
//! `cargo run --release --example wkv7_emu`.
mod common;

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
    let (ref_out, ref_g) = Backend::Cpu.forward_backward(&d, &x, &gi)?;
    println!(
        "wkv7_emu: B={} T={} H={} N={}: emulated forward + backward in {ms:.0} ms (this machine)",
        d.b, d.t, d.h, d.n
    );
    let mut worst = 0f64;
    for (name, got, want) in [
        ("y", &out.y, &ref_out.y),
        ("h_t", &out.h_t, &ref_out.h_t),
        ("dr", &g.dr, &ref_g.dr),
        ("dw", &g.dw, &ref_g.dw),
        ("dk", &g.dk, &ref_g.dk),
        ("dv", &g.dv, &ref_g.dv),
        ("da", &g.da, &ref_g.da),
        ("db", &g.db, &ref_g.db),
        ("dh0", &g.dh0, &ref_g.dh0),
    ] {
        let e = common::rel_inf(got, want);
        println!("  {name:>3}: max |emu - cpu| / max |cpu| = {e:.1e}");
        worst = worst.max(e);
    }
    // Both run in f32 with different summation orders: 1e-4 relative.
    if worst > 1e-4 {
        eprintln!("wkv7_emu: FAILED (worst relative error {worst:.1e} > 1e-4)");
        std::process::exit(1);
    }
    println!("wkv7_emu: ok");
    Ok(())
}
