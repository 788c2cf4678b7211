//! One test body for the WKV-7 op, run on every backend: cpu (Rust f32),
//! emu (the CUDA source on the CPU) and cuda (when a GPU is present; the
//! test says it skipped otherwise). Every result is compared with the f64
//! reference on the same (for bf16: bf16-rounded) inputs.
//!
//! Tolerances (per tensor, `err = ‖x − ref‖∞ / ‖ref‖∞`):
//! - f32 I/O: err ≤ 1e-5;
//! - bf16 I/O: relative Frobenius error ‖x − ref‖₂ / ‖ref‖₂ ≤ 1e-2.
mod common;

use common::{cast, rel_fro, rel_inf, to64};
use half::bf16;
use rwkv_tune::dtype::IoType;
use rwkv_tune::wkv7::reference::{self, RefInputs};
use rwkv_tune::wkv7::testdata::{random_problem, Problem};
use rwkv_tune::wkv7::{Backend, Dims, GradInputs, Inputs};

/// Runs `backend` in dtype X on `p` and checks y, h_t and all gradients.
fn check_backend<X: IoType>(backend: &Backend, p: &Problem, with_h0: bool, tol: f64, fro: bool) {
    let d = p.dims;
    let (r, w, k, v, a, b, dy) = (
        cast::<X>(&p.r),
        cast::<X>(&p.w),
        cast::<X>(&p.k),
        cast::<X>(&p.v),
        cast::<X>(&p.a),
        cast::<X>(&p.b),
        cast::<X>(&p.dy),
    );
    let h0 = with_h0.then_some(&p.h0[..]);
    let x = Inputs {
        r: &r,
        w: &w,
        k: &k,
        v: &v,
        a: &a,
        b: &b,
        h0,
    };
    let dh_t = with_h0.then_some(&p.dh_t[..]);
    let gi = GradInputs { dy: &dy, dh_t };
    let (out, g) = backend.forward_backward(&d, &x, &gi).expect("backend run");
    let out_f = backend.forward(&d, &x).expect("forward-only run");

    // f64 reference on exactly the inputs the backend saw
    let (r6, w6, k6, v6, a6, b6, dy6) = (
        to64(&r),
        to64(&w),
        to64(&k),
        to64(&v),
        to64(&a),
        to64(&b),
        to64(&dy),
    );
    let h06: Option<Vec<f64>> = h0.map(|h| h.iter().map(|&e| e as f64).collect());
    let dht6: Option<Vec<f64>> = dh_t.map(|h| h.iter().map(|&e| e as f64).collect());
    let ri = RefInputs {
        r: &r6,
        w: &w6,
        k: &k6,
        v: &v6,
        a: &a6,
        b: &b6,
        h0: h06.as_deref(),
    };
    let (y_ref, ht_ref) = reference::forward(&d, &ri).unwrap();
    let gr = reference::backward(&d, &ri, &dy6, dht6.as_deref()).unwrap();

    let f32s = |v: &[f32]| v.iter().map(|&e| e as f64).collect::<Vec<f64>>();
    let checks: Vec<(&str, Vec<f64>, &Vec<f64>)> = vec![
        ("y", to64(&out.y), &y_ref),
        ("y (forward only)", to64(&out_f.y), &y_ref),
        ("h_t", f32s(&out.h_t), &ht_ref),
        ("h_t (forward only)", f32s(&out_f.h_t), &ht_ref),
        ("dr", to64(&g.dr), &gr.dr),
        ("dw", to64(&g.dw), &gr.dw),
        ("dk", to64(&g.dk), &gr.dk),
        ("dv", to64(&g.dv), &gr.dv),
        ("da", to64(&g.da), &gr.da),
        ("db", to64(&g.db), &gr.db),
        ("dh0", f32s(&g.dh0), &gr.dh0),
    ];
    for (name, got, want) in checks {
        let e = if fro {
            rel_fro(&got, want)
        } else {
            rel_inf(&got, want)
        };
        if std::env::var_os("WKV7_TEST_VERBOSE").is_some() {
            eprintln!("{} {} {d:?} {name}: {e:.2e}", backend.name(), X::DTYPE);
        }
        assert!(
            e <= tol,
            "{}: {name} error {e:.3e} > {tol:.0e} (dtype {}, dims {d:?}, h0 {with_h0})",
            backend.name(),
            X::DTYPE
        );
    }
}

/// The shapes every backend is checked on: T ∈ {1, 17, 100, 64}, B·H > 1,
/// head sizes 32/64/128, decays near 1 and down to 0.05.
fn cases() -> Vec<(Dims, f64, f64, bool)> {
    let dd = |b, t, h, n| Dims { b, t, h, n };
    vec![
        (dd(2, 1, 2, 64), 0.05, 1.0, true),
        (dd(1, 17, 2, 64), 0.05, 1.0, true),
        (dd(2, 17, 1, 64), 0.98, 1.0, false),
        (dd(1, 100, 2, 64), 0.5, 1.0, true),
        (dd(2, 64, 1, 32), 0.05, 0.3, true),
        (dd(1, 33, 2, 32), 0.9, 1.0, false),
        (dd(1, 20, 2, 128), 0.05, 1.0, true),
    ]
}

fn run_all(backend: &Backend) {
    for (i, (d, lo, hi, h0)) in cases().into_iter().enumerate() {
        let p = random_problem(d, 1000 + i as u64, lo, hi);
        check_backend::<f32>(backend, &p, h0, 1e-5, false);
        check_backend::<bf16>(backend, &p, h0, 1e-2, true);
    }
}

#[test]
fn cpu_matches_f64_reference() {
    run_all(&Backend::Cpu);
}

#[test]
fn emulated_kernels_match_f64_reference() {
    run_all(&Backend::Emu);
}

#[test]
fn cuda_kernels_match_f64_reference() {
    match Backend::from_name("cuda") {
        Ok(b) => run_all(&b),
        Err(e) => rwkv_tune::cuda::skip_gpu("cuda_kernels_match_f64_reference", &e),
    }
}
