//! The lean build (`default-features = false, features = ["cuda", "emu"]`,
//! run by CI as `cargo test --release --no-default-features --features
//! cuda,emu --test lean`; also part of the default `cargo test`): the
//! embedding API compiles without the model, tuning or CLI dependencies,
//! and the kernels it exposes agree with the CPU reference.
//!
//! - the raw launch ([`wkv7::emu::launch_raw`], the emulator's twin of
//!   `Wkv7Kernels::launch_raw`, sharing its checks) on host buffers, forward
//!   then backward, against the f64 reference: `‖x − ref‖∞ / ‖ref‖∞ ≤ 1e-5`
//!   for every output (f32 I/O, as tests/wkv7_backends.rs);
//! - the raw launch refuses parameters that do not match the kernel version;
//! - [`Error::Cuda`] keeps the driver's error as its source (out of memory
//!   is recognisable);
//! - on a GPU (else SKIPPED): [`Wkv7Kernels`] on a stream the test creates
//!   (not the default one), with r given as a `CudaView` into a larger
//!   buffer: forward + backward against the f64 reference, same tolerance;
//!   `Wkv7Kernels::launch_raw` on device addresses, same check; a short
//!   buffer, a buffer of another context and parameters of another version
//!   are refused before any launch.
use rwkv_tune::cudarc::driver::sys::cudaError_enum;
use rwkv_tune::cudarc::driver::DriverError;
use rwkv_tune::dtype::DType;
use rwkv_tune::wkv7::cuda::{DevGrads, DevInputs, Wkv7Kernels};
use rwkv_tune::wkv7::reference::{self, RefInputs};
use rwkv_tune::wkv7::testdata::{random_problem, Problem};
use rwkv_tune::wkv7::{self, Dims, Dir, Version};
use rwkv_tune::Error;

/// `‖x − r‖∞ / ‖r‖∞`.
fn rel_inf(x: &[f32], r: &[f64]) -> f64 {
    assert_eq!(x.len(), r.len());
    let num = x
        .iter()
        .zip(r)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    let den = r.iter().map(|b| b.abs()).fold(0.0, f64::max);
    assert!(den > 0.0, "reference is all zeros");
    num / den
}

/// f64 reference outputs: y, h_t, then dr, dw, dk, dv, da, db, dh0.
fn reference_of(p: &Problem) -> Vec<(&'static str, Vec<f64>)> {
    let w = |v: &[f32]| v.iter().map(|&e| e as f64).collect::<Vec<f64>>();
    let (r, ww, k, v, a, b, h0, dy, dht) = (
        w(&p.r),
        w(&p.w),
        w(&p.k),
        w(&p.v),
        w(&p.a),
        w(&p.b),
        w(&p.h0),
        w(&p.dy),
        w(&p.dh_t),
    );
    let x = RefInputs {
        r: &r,
        w: &ww,
        k: &k,
        v: &v,
        a: &a,
        b: &b,
        h0: Some(&h0),
    };
    let (y, h_t) = reference::forward(&p.dims, &x).unwrap();
    let g = reference::backward(&p.dims, &x, &dy, Some(&dht)).unwrap();
    vec![
        ("y", y),
        ("h_t", h_t),
        ("dr", g.dr),
        ("dw", g.dw),
        ("dk", g.dk),
        ("dv", g.dv),
        ("da", g.da),
        ("db", g.db),
        ("dh0", g.dh0),
    ]
}

fn check(got: &[(&str, Vec<f32>)], want: &[(&str, Vec<f64>)], what: &str) {
    for ((name, g), (_, r)) in got.iter().zip(want) {
        let e = rel_inf(g, r);
        assert!(e <= 1e-5, "{what}: {name}: relative error {e:.2e} > 1e-5");
    }
}

/// B=1, T=20 (two chunks, the second partial), H=2, N=32: small enough for
/// the emulator, every code path of the v1 kernels.
fn problem() -> Problem {
    let d = Dims {
        b: 1,
        t: 20,
        h: 2,
        n: 32,
    };
    random_problem(d, 1234, 0.6, 0.99)
}

#[test]
fn emulated_raw_launch_matches_the_reference() {
    let p = problem();
    let d = p.dims;
    let ver = Version::V1;
    let sl = d.seq_len();
    let mut y = vec![0f32; sl];
    let mut h_t = vec![0f32; d.state_len()];
    let mut ckpt = vec![0f32; ver.ckpt_len(&d)];
    let mut scratch = vec![0f32; ver.scratch_len(&d)];
    let mut grads: Vec<Vec<f32>> = vec![vec![0f32; sl]; 6];
    let mut dh0 = vec![0f32; d.state_len()];
    let mut prm = ver.base_params(&d);
    let addr = |v: &[f32]| v.as_ptr() as u64;
    (prm.r, prm.w, prm.k, prm.v, prm.a, prm.b) = (
        addr(&p.r),
        addr(&p.w),
        addr(&p.k),
        addr(&p.v),
        addr(&p.a),
        addr(&p.b),
    );
    (prm.h0, prm.dy, prm.dh_t) = (addr(&p.h0), addr(&p.dy), addr(&p.dh_t));
    prm.y = y.as_mut_ptr() as u64;
    prm.h_t = h_t.as_mut_ptr() as u64;
    prm.ckpt = ckpt.as_mut_ptr() as u64;
    prm.scratch = scratch.as_mut_ptr() as u64;
    let gp: Vec<u64> = grads.iter_mut().map(|g| g.as_mut_ptr() as u64).collect();
    (prm.dr, prm.dw, prm.dk, prm.dv, prm.da, prm.db) = (gp[0], gp[1], gp[2], gp[3], gp[4], gp[5]);
    prm.dh0 = dh0.as_mut_ptr() as u64;
    // SAFETY: every pointer refers to a live Vec of the length params.h
    // documents for these sizes and version v1 (inputs from the problem,
    // outputs, ckpt and scratch allocated above), outputs not aliased; the
    // calls are synchronous.
    unsafe {
        wkv7::emu::launch_raw(ver, Dir::Fwd, DType::F32, &prm).unwrap();
        wkv7::emu::launch_raw(ver, Dir::Bwd, DType::F32, &prm).unwrap();
    }
    let [dr, dw, dk, dv, da, db]: [Vec<f32>; 6] = grads.try_into().unwrap();
    let got = vec![
        ("y", y),
        ("h_t", h_t),
        ("dr", dr),
        ("dw", dw),
        ("dk", dk),
        ("dv", dv),
        ("da", da),
        ("db", db),
        ("dh0", dh0),
    ];
    check(&got, &reference_of(&p), "emu launch_raw");
}

#[test]
fn raw_launch_refuses_parameters_of_another_version() {
    let d = Dims {
        b: 1,
        t: 20,
        h: 1,
        n: 32,
    };
    let mut p = Version::V1.base_params(&d);
    p.chunk = 8;
    // SAFETY: refused before any pointer is read (all null anyway).
    let e = unsafe { wkv7::emu::launch_raw(Version::V1, Dir::Fwd, DType::F32, &p) };
    assert!(matches!(e, Err(Error::Invalid(_))), "{e:?}");
    let mut p = Version::V1.base_params(&d);
    p.N = 48;
    p.n_chunks = 2;
    // SAFETY: as above.
    let e = unsafe { wkv7::emu::launch_raw(Version::V1, Dir::Fwd, DType::F32, &p) };
    assert!(matches!(e, Err(Error::UnsupportedHeadSize(48))), "{e:?}");
    let mut p = Version::V1.base_params(&d);
    p.T = -1;
    // SAFETY: as above.
    let e = unsafe { wkv7::emu::launch_raw(Version::V1, Dir::Bwd, DType::F32, &p) };
    assert!(matches!(e, Err(Error::Invalid(_))), "{e:?}");
}

#[test]
fn cuda_errors_keep_the_driver_error() {
    let oom = Error::Cuda {
        what: "allocating".into(),
        source: DriverError(cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY),
    };
    assert!(oom.is_out_of_memory());
    assert!(oom.clone_source_is_driver());
    let wrapped = oom.context("uploading the weights");
    assert!(wrapped.is_out_of_memory());
    let bad = Error::Cuda {
        what: "launching".into(),
        source: DriverError(cudaError_enum::CUDA_ERROR_INVALID_VALUE),
    };
    assert!(!bad.is_out_of_memory());
}

/// Whether `std::error::Error::source` gives the `DriverError` back.
trait SourceIsDriver {
    fn clone_source_is_driver(&self) -> bool;
}
impl SourceIsDriver for Error {
    fn clone_source_is_driver(&self) -> bool {
        std::error::Error::source(self)
            .and_then(|s| s.downcast_ref::<DriverError>())
            .is_some_and(|d| d.0 == cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY)
    }
}

#[test]
fn cuda_kernels_on_the_callers_stream() {
    use rwkv_tune::cudarc::driver::CudaContext;
    let what = "Wkv7Kernels on the caller's stream";
    if !rwkv_tune::cuda::driver_present() {
        return rwkv_tune::cuda::skip_gpu(what, &"no NVIDIA driver");
    }
    if !rwkv_tune::cuda::kernels_built() {
        return rwkv_tune::cuda::skip_gpu(what, &Error::KernelsNotBuilt);
    }
    let ctx = match CudaContext::new(0) {
        Ok(c) => c,
        Err(e) => return rwkv_tune::cuda::skip_gpu(what, &e),
    };
    let stream = ctx.new_stream().unwrap();
    assert_ne!(stream.cu_stream(), ctx.default_stream().cu_stream());
    let kernels = Wkv7Kernels::new(stream.clone()).unwrap();
    let p = problem();
    let d = p.dims;
    let up = |v: &[f32]| stream.clone_htod(v).unwrap();
    let (r, w, k, v, a, b, h0, dy, dht) = (
        up(&p.r),
        up(&p.w),
        up(&p.k),
        up(&p.v),
        up(&p.a),
        up(&p.b),
        up(&p.h0),
        up(&p.dy),
        up(&p.dh_t),
    );
    // r as a view of a larger buffer (offset 3): views work like slices.
    let mut r_big = stream.alloc_zeros::<f32>(d.seq_len() + 5).unwrap();
    stream
        .memcpy_dtod(&r, &mut r_big.slice_mut(3..3 + d.seq_len()))
        .unwrap();
    let r_view = r_big.slice(3..3 + d.seq_len());
    let x = DevInputs {
        r: &r_view,
        w: &w,
        k: &k,
        v: &v,
        a: &a,
        b: &b,
        h0: Some(&h0),
    };
    let z = |n: usize| stream.alloc_zeros::<f32>(n).unwrap();
    let mut y = z(d.seq_len());
    let mut h_t = z(d.state_len());
    let mut g = DevGrads {
        dr: z(d.seq_len()),
        dw: z(d.seq_len()),
        dk: z(d.seq_len()),
        dv: z(d.seq_len()),
        da: z(d.seq_len()),
        db: z(d.seq_len()),
        dh0: z(d.state_len()),
    };
    let ver = Version::V1;
    let mut ws = kernels.workspace(ver, &d).unwrap();
    kernels
        .forward(ver, &d, &x, &mut y, Some(&mut h_t), Some(&mut ws.ckpt))
        .unwrap();
    kernels
        .backward(
            ver,
            &d,
            &x,
            &ws.ckpt,
            &dy,
            Some(&dht),
            g.as_mut(),
            &mut ws.scratch,
        )
        .unwrap();
    let down = |s: &rwkv_tune::cudarc::driver::CudaSlice<f32>| stream.clone_dtoh(s).unwrap();
    let got = vec![
        ("y", down(&y)),
        ("h_t", down(&h_t)),
        ("dr", down(&g.dr)),
        ("dw", down(&g.dw)),
        ("dk", down(&g.dk)),
        ("dv", down(&g.dv)),
        ("da", down(&g.da)),
        ("db", down(&g.db)),
        ("dh0", down(&g.dh0)),
    ];
    check(&got, &reference_of(&p), "cuda Wkv7Kernels");
    // A wrong buffer length is an error, not a launch.
    let short = z(d.seq_len() - 1);
    let bad = DevInputs { r: &short, ..x };
    let e = kernels.forward(ver, &d, &bad, &mut y, None, None);
    assert!(matches!(e, Err(Error::Shape { .. })), "{e:?}");
    // The raw launch on device addresses: a forward-only run into a fresh
    // buffer, against the reference; parameters of another version are
    // refused before the launch.
    let mut y2 = z(d.seq_len());
    {
        use rwkv_tune::cudarc::driver::{DevicePtr, DevicePtrMut};
        let mut prm = ver.base_params(&d);
        let (rp, _g1) = r.device_ptr(&stream);
        let (wp, _g2) = w.device_ptr(&stream);
        let (kp, _g3) = k.device_ptr(&stream);
        let (vp, _g4) = v.device_ptr(&stream);
        let (ap, _g5) = a.device_ptr(&stream);
        let (bp, _g6) = b.device_ptr(&stream);
        let (hp, _g7) = h0.device_ptr(&stream);
        let (yp, _g8) = y2.device_ptr_mut(&stream);
        (prm.r, prm.w, prm.k, prm.v, prm.a, prm.b, prm.h0, prm.y) =
            (rp, wp, kp, vp, ap, bp, hp, yp);
        // SAFETY: every address is a buffer of this context allocated above
        // with the length params.h documents for these sizes (v1, forward:
        // inputs [B, T, H, N], h0 [B, H, N, N], y [B, T, H, N]; h_t, ckpt
        // null); the guards keep them alive until the launch is queued.
        unsafe { kernels.launch_raw(ver, Dir::Fwd, DType::F32, &prm) }.unwrap();
        let mut other = prm;
        other.chunk = 8;
        // SAFETY: refused before the launch.
        let e = unsafe { kernels.launch_raw(ver, Dir::Fwd, DType::F32, &other) };
        assert!(matches!(e, Err(Error::Invalid(_))), "{e:?}");
    }
    check(
        &[("y", down(&y2))],
        &reference_of(&p)[..1],
        "cuda Wkv7Kernels::launch_raw",
    );
    // A buffer of another context is refused, not launched.
    let other = CudaContext::new_non_primary(0, 0).unwrap();
    let foreign = other.new_stream().unwrap().clone_htod(&p.r).unwrap();
    let bad = DevInputs { r: &foreign, ..x };
    let e = kernels.forward(ver, &d, &bad, &mut y, None, None);
    assert!(matches!(e, Err(Error::Invalid(_))), "{e:?}");
}
