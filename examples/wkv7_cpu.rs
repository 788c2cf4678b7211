//! The WKV-7 recurrence on the CPU reference (plain Rust): forward and
//! backward on random inputs, with a finite-difference check of one
//! gradient entry. Needs no feature: `cargo run --release --example wkv7_cpu`.
mod common;

use rwkv_tune::wkv7::reference::{self, RefInputs};
use rwkv_tune::wkv7::Dims;

fn main() -> Result<(), rwkv_tune::Error> {
    let d = Dims {
        b: 2,
        t: 48,
        h: 2,
        n: 32,
    };
    let p = common::random_problem(&d, 7);
    let x = RefInputs {
        r: &p.r,
        w: &p.w,
        k: &p.k,
        v: &p.v,
        a: &p.a,
        b: &p.b,
        h0: Some(&p.h0),
    };
    let t0 = std::time::Instant::now();
    let (y, h_t) = reference::forward(&d, &x)?;
    let g = reference::backward(&d, &x, &p.dy, None)?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;

    // The gradient of L = Σ dy ⊙ y with respect to one entry of k, against
    // a central difference in f64 (the reference is generic over f32 / f64).
    let wide = |v: &[f32]| v.iter().map(|&e| e as f64).collect::<Vec<f64>>();
    let (r6, w6, v6, a6, b6, h06, dy6) = (
        wide(&p.r),
        wide(&p.w),
        wide(&p.v),
        wide(&p.a),
        wide(&p.b),
        wide(&p.h0),
        wide(&p.dy),
    );
    let loss = |k6: &[f64]| -> Result<f64, rwkv_tune::Error> {
        let x6 = RefInputs {
            r: &r6,
            w: &w6,
            k: k6,
            v: &v6,
            a: &a6,
            b: &b6,
            h0: Some(&h06),
        };
        let (y6, _) = reference::forward(&d, &x6)?;
        Ok(y6.iter().zip(&dy6).map(|(a, b)| a * b).sum())
    };
    let i = d.seq_len() / 3;
    let eps = 1e-4;
    let mut k6 = wide(&p.k);
    k6[i] += eps;
    let up = loss(&k6)?;
    k6[i] -= 2.0 * eps;
    let down = loss(&k6)?;
    let fd = (up - down) / (2.0 * eps);
    let rel = (fd - g.dk[i] as f64).abs() / fd.abs().max(1e-6);

    println!(
        "wkv7_cpu: B={} T={} H={} N={}: forward + backward in {ms:.1} ms (CPU reference, this machine)",
        d.b, d.t, d.h, d.n
    );
    println!(
        "  |y|max = {:.4}, |h_t|max = {:.4}, |dk|max = {:.4}",
        y.iter().fold(0f32, |m, e| m.max(e.abs())),
        h_t.iter().fold(0f32, |m, e| m.max(e.abs())),
        g.dk.iter().fold(0f32, |m, e| m.max(e.abs())),
    );
    println!(
        "  dk[{i}] = {:.6}, central difference (f64) = {fd:.6}, relative difference {rel:.1e}",
        g.dk[i]
    );
    // f32 backward against an f64 difference quotient: 1e-3 is loose
    // enough for the f32 rounding and tight enough to catch a wrong term.
    if rel > 1e-3 {
        eprintln!("wkv7_cpu: gradient check FAILED (relative difference {rel:.1e} > 1e-3)");
        std::process::exit(1);
    }
    println!("wkv7_cpu: ok");
    Ok(())
}
