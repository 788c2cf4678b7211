//! WKV-7 on a GPU through cudarc: `kernels/wkv7_v*.cu` launched on one
//! CUDA stream. What this module owns:
//! - [`Wkv7Kernels`]: the kernels loaded for the caller's own stream (every
//!   kernel function resolved once), with [`Wkv7Kernels::forward`],
//!   [`Wkv7Kernels::backward`] on device buffers (each a `CudaSlice` or a
//!   `CudaView`, see [`DevInputs`], [`DevGradsMut`]), the [`Workspace`] the
//!   backward needs, and [`Wkv7Kernels::launch_raw`] (a filled
//!   [`Wkv7Params`] with raw device addresses, e.g. of another runtime's
//!   allocations). This is the API for embedding.
//! - Free functions on a [`Gpu`] (which holds one [`Wkv7Kernels`] for its
//!   stream, see [`Gpu::wkv7`]): [`forward_host`] / [`forward_backward_host`]
//!   (host slices in and out), [`forward_dev`] / [`backward_dev`] (device
//!   buffers, no copies), [`launch_raw`]. The plain names run v1; the `_v`
//!   forms take a [`Version`].
//! - [`time_device`]: CUDA-event timing for the benchmark suite.
//!
//! Nothing here uses the context's legacy default stream: every launch,
//! allocation and copy is queued on the stream given.
//!
//! # Embedding
//!
//! Your context, your stream, your buffers (the README's "Embed the
//! kernels" shows the same code; `examples/wkv7_cuda.rs` adds random
//! inputs, timing and the check against the CPU reference):
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # if !rwkv_tune::cuda::driver_present() || !rwkv_tune::cuda::kernels_built() {
//! #     return Ok(()); // no GPU here: the example compiles, and runs where there is one
//! # }
//! # if rwkv_tune::cudarc::driver::CudaContext::new(0).is_err() { return Ok(()); }
//! use rwkv_tune::cudarc::driver::CudaContext;
//! use rwkv_tune::wkv7::cuda::{DevGradsMut, DevInputs, Wkv7Kernels};
//! use rwkv_tune::wkv7::{Dims, Version};
//!
//! let ctx = CudaContext::new(0)?;
//! let stream = ctx.new_stream()?; // yours: the kernels never use the default stream
//! let kernels = Wkv7Kernels::new(stream.clone())?; // every kernel resolved once
//! let d = Dims { b: 1, t: 64, h: 4, n: 64 };
//! // your buffers (any stream of this context): r, w, k, v, a, b, dy [B, T, H, N]
//! let up = |x: f32| stream.clone_htod(&vec![x; d.seq_len()]);
//! let (r, w, k, v, a, b, dy) = (up(0.1)?, up(0.9)?, up(0.2)?, up(0.3)?, up(-0.1)?, up(0.05)?, up(1.0)?);
//! let x = DevInputs { r: &r.slice(..), w: &w, k: &k, v: &v, a: &a, b: &b, h0: None }; // views or slices
//! let (z, s, hs) = (|n| stream.alloc_zeros::<f32>(n), d.seq_len(), d.state_len());
//! let (mut y, mut dr, mut dw, mut dk) = (z(s)?, z(s)?, z(s)?, z(s)?);
//! let (mut dv, mut da, mut db, mut dh0) = (z(s)?, z(s)?, z(s)?, z(hs)?);
//! let mut ws = kernels.workspace(Version::V1, &d)?; // checkpoints + backward scratch
//! kernels.forward(Version::V1, &d, &x, &mut y, None, Some(&mut ws.ckpt))?;
//! let g = DevGradsMut { dr: &mut dr, dw: &mut dw, dk: &mut dk, dv: &mut dv, da: &mut da, db: &mut db, dh0: &mut dh0 };
//! kernels.backward(Version::V1, &d, &x, &ws.ckpt, &dy, None, g, &mut ws.scratch)?;
//! # Ok(())
//! # }
//! ```
use super::{Dims, Dir, GradInputs, Grads, Inputs, Outputs, Version};
pub use crate::cuda::Wkv7Kernels;
use crate::cuda::{cuda_ctx, cuda_err, kernels_built, load_module, Gpu};
use crate::dtype::{DType, IoType};
use crate::error::{Error, Result};
use crate::params::Wkv7Params;
use cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use std::sync::Arc;

/// A device buffer the kernels read: a `CudaSlice` or a `CudaView` (any
/// stream of the kernels' context).
pub type DevIn<'a, T> = &'a dyn DevicePtr<T>;

/// A device buffer the kernels write: a `CudaSlice` or a `CudaViewMut`.
pub type DevOut<'a, T> = &'a mut dyn DevicePtrMut<T>;

/// Device inputs: r … b `[B, T, H, N]`, h0 `[B, H, N, N]` f32 (None = zero).
/// Each is a `&CudaSlice` or a `&CudaView` (the field takes either).
pub struct DevInputs<'a, X> {
    /// Receptance.
    pub r: DevIn<'a, X>,
    /// Per-step decay in (0, 1].
    pub w: DevIn<'a, X>,
    /// Key.
    pub k: DevIn<'a, X>,
    /// Value.
    pub v: DevIn<'a, X>,
    /// In-context learning rate term `a` (the model passes −κ̂).
    pub a: DevIn<'a, X>,
    /// In-context learning rate term `b` (the model passes κ̂ ⊙ α).
    pub b: DevIn<'a, X>,
    /// Initial state (None = zero).
    pub h0: Option<DevIn<'a, f32>>,
}

impl<X> Clone for DevInputs<'_, X> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<X> Copy for DevInputs<'_, X> {}

/// The gradient buffers [`Wkv7Kernels::backward`] overwrites: dr … db
/// `[B, T, H, N]`, dh0 `[B, H, N, N]` f32, each a `&mut CudaSlice` or a
/// `&mut CudaViewMut` of the caller's.
pub struct DevGradsMut<'a, X> {
    /// Gradient of r.
    pub dr: DevOut<'a, X>,
    /// Gradient of w.
    pub dw: DevOut<'a, X>,
    /// Gradient of k.
    pub dk: DevOut<'a, X>,
    /// Gradient of v.
    pub dv: DevOut<'a, X>,
    /// Gradient of a.
    pub da: DevOut<'a, X>,
    /// Gradient of b.
    pub db: DevOut<'a, X>,
    /// Gradient of the initial state.
    pub dh0: DevOut<'a, f32>,
}

/// Owned device gradients: dr … db `[B, T, H, N]`, dh0 `[B, H, N, N]` f32
/// (what [`backward_dev`] fills; [`DevGrads::as_mut`] lends them to
/// [`Wkv7Kernels::backward`]).
pub struct DevGrads<X> {
    /// Gradient of r.
    pub dr: CudaSlice<X>,
    /// Gradient of w.
    pub dw: CudaSlice<X>,
    /// Gradient of k.
    pub dk: CudaSlice<X>,
    /// Gradient of v.
    pub dv: CudaSlice<X>,
    /// Gradient of a.
    pub da: CudaSlice<X>,
    /// Gradient of b.
    pub db: CudaSlice<X>,
    /// Gradient of the initial state.
    pub dh0: CudaSlice<f32>,
}

impl<X: DeviceRepr> DevGrads<X> {
    /// The buffers, borrowed for [`Wkv7Kernels::backward`].
    pub fn as_mut(&mut self) -> DevGradsMut<'_, X> {
        DevGradsMut {
            dr: &mut self.dr,
            dw: &mut self.dw,
            dk: &mut self.dk,
            dv: &mut self.dv,
            da: &mut self.da,
            db: &mut self.db,
            dh0: &mut self.dh0,
        }
    }
}

/// `[B, H, ceil(T / chunk), N, N]`
fn ckpt_shape(ver: Version, d: &Dims) -> Vec<usize> {
    vec![d.b, d.h, d.t.div_ceil(ver.chunk()), d.n, d.n]
}

/// Checks that buffer `name` has the elements of `shape` and lives in the
/// context of `stream` (a pointer of another context is not valid there).
fn check_dev<T>(
    stream: &CudaStream,
    name: &str,
    s: &(impl cudarc::driver::DeviceSlice<T> + ?Sized),
    shape: Vec<usize>,
) -> Result<()> {
    if s.stream().context().cu_ctx() != stream.context().cu_ctx() {
        return Err(Error::Invalid(format!(
            "device buffer `{name}` belongs to another CUDA context than the kernels' stream"
        )));
    }
    let want: usize = shape.iter().product();
    if s.len() != want {
        return Err(Error::Shape {
            name: name.into(),
            expected: shape,
            got: vec![s.len()],
        });
    }
    Ok(())
}

/// Elements of the checkpoint buffer the forward writes for the backward:
/// `[B, H, ceil(T / 16), N, N]` f32.
pub fn ckpt_len(d: &Dims) -> usize {
    Version::V1.ckpt_len(d)
}

/// Elements of the v1 backward workspace: `[B, H, 18, N, N]` f32.
pub fn scratch_len(d: &Dims) -> usize {
    Version::V1.scratch_len(d)
}

/// Position of a kernel in [`Wkv7Kernels`]'s table, or `None` when that
/// version has no kernel for head size `n`.
/// Dynamic shared memory of a kernel launch (only v3's backward has any).
fn dyn_smem(ver: Version, dir: Dir, n: usize) -> u32 {
    match (ver, dir) {
        (Version::V3 | Version::V3Exact, Dir::Bwd) => super::v3::bwd_smem_bytes(n),
        _ => 0,
    }
}

fn slot(ver: Version, dir: Dir, dtype: DType, n: usize) -> Option<usize> {
    let v = match ver {
        Version::V1 => 0,
        Version::V2 => 1,
        Version::V3 => 2,
        Version::V3Exact => 3,
    };
    let dr = match dir {
        Dir::Fwd => 0,
        Dir::Bwd => 1,
    };
    let t = match dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
    };
    if matches!(ver, Version::V3 | Version::V3Exact) && dtype != DType::BF16 {
        return None; // v3 is bf16-only
    }
    let ni = match (ver, n) {
        (_, 32) => 0,
        (_, 64) => 1,
        (Version::V1, 128) => 2,
        _ => return None,
    };
    Some(((v * 2 + dr) * 2 + t) * 3 + ni)
}

/// The device buffers the backward needs besides inputs and gradients:
/// the checkpoints the forward writes (`ckpt`, [`Version::ckpt_len`]
/// elements) and the backward's scratch ([`Version::scratch_len`]), both f32.
pub struct Workspace {
    /// Saved states, `[B, H, ceil(T / chunk), N, N]` f32 ([`Version::chunk`]:
    /// 16 for v1 and v2, [`super::v3::CKPT_TOKENS`] for v3).
    pub ckpt: CudaSlice<f32>,
    /// The backward's workspace (`[B, H, 18, N, N]` for v1, `[B, H, N, N]` for v2,
    /// [`super::v3::scratch_len`] for v3).
    pub scratch: CudaSlice<f32>,
}

impl Wkv7Kernels {
    /// Loads the kernels into the context of `stream`; every launch of the
    /// result is queued on `stream`. Errors when the kernels were not
    /// compiled into this build ([`Error::KernelsNotBuilt`]) or the driver
    /// refuses the module (e.g. a GPU older than sm_80).
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        if !kernels_built() {
            return Err(Error::KernelsNotBuilt);
        }
        let ctx = stream.context().clone();
        let mut funcs = vec![None; Version::ALL.len() * 2 * 2 * 3];
        for ver in Version::ALL {
            let module = load_module(&ctx, ver.stem())?;
            for dir in [Dir::Fwd, Dir::Bwd] {
                for dtype in [DType::F32, DType::BF16] {
                    for n in [32, 64, 128] {
                        let Some(i) = slot(ver, dir, dtype, n) else {
                            continue;
                        };
                        let name = ver.kernel_name(dir, dtype, n)?;
                        let f = module
                            .load_function(&name)
                            .map_err(cuda_ctx(format!("looking up kernel {name}")))?;
                        let smem = dyn_smem(ver, dir, n);
                        if smem > 48 * 1024 {
                            // above 48 KiB a kernel must opt in to its dynamic shared memory
                            f.set_attribute(
                                cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                smem as i32,
                            )
                            .map_err(cuda_ctx(format!("allowing {smem} B of shared memory to {name}")))?;
                        }
                        funcs[i] = Some(f);
                    }
                }
            }
        }
        Ok(Wkv7Kernels { stream, funcs })
    }

    /// Allocates (zeroed, on [`Wkv7Kernels::stream`]) the checkpoint and
    /// scratch buffers of `ver` for problems of size `d`.
    pub fn workspace(&self, ver: Version, d: &Dims) -> Result<Workspace> {
        d.validate()?;
        Ok(Workspace {
            ckpt: self
                .stream
                .alloc_zeros(ver.ckpt_len(d))
                .map_err(cuda_ctx("allocating the WKV-7 checkpoints"))?,
            scratch: self
                .stream
                .alloc_zeros(ver.scratch_len(d))
                .map_err(cuda_ctx("allocating the WKV-7 backward scratch"))?,
        })
    }

    /// Launches the `ver` kernel for `dir` and `dtype` with parameters whose
    /// pointers are raw device addresses (from `DevicePtr::device_ptr` on a
    /// `CudaSlice` or `CudaView`, or another runtime's allocations). The
    /// sizes, `chunk` and `n_chunks` are checked against `ver`
    /// ([`Version::base_params`] fills them); for [`Version::V2`],
    /// [`Version::V3`] and [`Version::V3Exact`] every w must also be
    /// ≥ [`super::v2::W_MIN`] (not checked here).
    ///
    /// # Safety
    /// Every non-zero address in `p` must be device memory of this stream's
    /// context, of the size `kernels/params.h` documents for the sizes in
    /// `p` and version `ver`, alive and not written by other work until the
    /// kernel has finished on [`Wkv7Kernels::stream`].
    pub unsafe fn launch_raw(
        &self,
        ver: Version,
        dir: Dir,
        dtype: DType,
        p: &Wkv7Params,
    ) -> Result<()> {
        let d = super::raw_dims(ver, p)?;
        let f = slot(ver, dir, dtype, d.n)
            .and_then(|i| self.funcs[i].as_ref())
            .ok_or(Error::UnsupportedHeadSize(d.n))?;
        if matches!(ver, Version::V3 | Version::V3Exact) {
            // v3 moves inputs (and the bf16 states) in 16-byte pieces
            let ptrs = [
                ("r", p.r),
                ("w", p.w),
                ("k", p.k),
                ("v", p.v),
                ("a", p.a),
                ("b", p.b),
                ("dy", p.dy),
                ("ckpt", p.ckpt),
            ];
            if let Some((name, _)) = ptrs.iter().find(|(_, a)| a % 16 != 0) {
                return Err(Error::Invalid(format!(
                    "the v3 WKV-7 kernels need 16-byte aligned buffers; {name} is not"
                )));
            }
        }
        let (grid_dim, block_dim) = ver.launch_dims(&d);
        let cfg = LaunchConfig {
            grid_dim,
            block_dim,
            shared_mem_bytes: dyn_smem(ver, dir, d.n),
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(p);
        // SAFETY: the caller guarantees the memory behind `p`; the sizes
        // were validated and the geometry is the one the kernel version is
        // written for (Version::launch_dims).
        unsafe { b.launch(cfg) }.map_err(cuda_ctx("launching a WKV-7 kernel"))?;
        Ok(())
    }

    /// Forward of `ver` on device buffers: writes `y` `[B, T, H, N]`,
    /// `h_t` `[B, H, N, N]` when given, and the checkpoints for
    /// [`Wkv7Kernels::backward`] when `ckpt` ([`Version::ckpt_len`]
    /// elements, e.g. [`Workspace::ckpt`]) is given. Every buffer is a
    /// `CudaSlice` or a `CudaView(Mut)` of this stream's context; lengths
    /// are checked (an error names the buffer). For v2 and v3 every w must be
    /// ≥ [`super::v2::W_MIN`] (use [`Version::effective`] on host data).
    pub fn forward<X: IoType + DeviceRepr>(
        &self,
        ver: Version,
        d: &Dims,
        x: &DevInputs<X>,
        y: DevOut<X>,
        h_t: Option<DevOut<f32>>,
        ckpt: Option<DevOut<f32>>,
    ) -> Result<()> {
        d.validate()?;
        let st = &self.stream;
        self.check_inputs(d, x)?;
        check_dev(st, "y", y, d.seq_shape())?;
        if let Some(s) = &h_t {
            check_dev(st, "h_t", *s, d.state_shape())?;
        }
        if let Some(s) = &ckpt {
            check_dev(st, "ckpt", *s, ckpt_shape(ver, d))?;
        }
        let mut p = ver.base_params(d);
        let (r, _g1) = x.r.device_ptr(st);
        let (w, _g2) = x.w.device_ptr(st);
        let (k, _g3) = x.k.device_ptr(st);
        let (v, _g4) = x.v.device_ptr(st);
        let (a, _g5) = x.a.device_ptr(st);
        let (bb, _g6) = x.b.device_ptr(st);
        let h0 = x.h0.map(|s| s.device_ptr(st));
        let (yp, _g7) = y.device_ptr_mut(st);
        (p.r, p.w, p.k, p.v, p.a, p.b, p.y) = (r, w, k, v, a, bb, yp);
        p.h0 = h0.as_ref().map_or(0, |(q, _)| *q);
        let ht = h_t.map(|s| s.device_ptr_mut(st));
        p.h_t = ht.as_ref().map_or(0, |(q, _)| *q);
        let ck = ckpt.map(|s| s.device_ptr_mut(st));
        p.ckpt = ck.as_ref().map_or(0, |(q, _)| *q);
        // SAFETY: every address comes from a buffer of this stream's context
        // (checked) whose length was checked above against what params.h
        // documents for `ver` and `d`; the outputs are distinct `&mut`
        // borrows; the guards keep every buffer alive until the launch is
        // queued and order it after (and later work after) their other uses.
        unsafe { self.launch_raw(ver, Dir::Fwd, X::DTYPE, &p) }
    }

    /// Backward of `ver` on device buffers, after [`Wkv7Kernels::forward`]
    /// with the same version and inputs filled `ckpt`: overwrites every
    /// gradient of `g` (not accumulated); `scratch` has
    /// [`Version::scratch_len`] elements (e.g. [`Workspace::scratch`]);
    /// `dh_t` `[B, H, N, N]` is the gradient on the final state (None = 0).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<X: IoType + DeviceRepr>(
        &self,
        ver: Version,
        d: &Dims,
        x: &DevInputs<X>,
        ckpt: DevIn<f32>,
        dy: DevIn<X>,
        dh_t: Option<DevIn<f32>>,
        g: DevGradsMut<X>,
        scratch: DevOut<f32>,
    ) -> Result<()> {
        d.validate()?;
        let st = &self.stream;
        self.check_inputs(d, x)?;
        check_dev(st, "dy", dy, d.seq_shape())?;
        for (n, s) in [
            ("dr", &*g.dr),
            ("dw", &*g.dw),
            ("dk", &*g.dk),
            ("dv", &*g.dv),
            ("da", &*g.da),
            ("db", &*g.db),
        ] {
            check_dev(st, n, s, d.seq_shape())?;
        }
        check_dev(st, "dh0", &*g.dh0, d.state_shape())?;
        check_dev(st, "ckpt", ckpt, ckpt_shape(ver, d))?;
        check_dev(st, "scratch", &*scratch, vec![ver.scratch_len(d)])?;
        if let Some(s) = dh_t {
            check_dev(st, "dh_t", s, d.state_shape())?;
        }
        let mut p = ver.base_params(d);
        let (r, _g1) = x.r.device_ptr(st);
        let (w, _g2) = x.w.device_ptr(st);
        let (k, _g3) = x.k.device_ptr(st);
        let (v, _g4) = x.v.device_ptr(st);
        let (a, _g5) = x.a.device_ptr(st);
        let (bb, _g6) = x.b.device_ptr(st);
        (p.r, p.w, p.k, p.v, p.a, p.b) = (r, w, k, v, a, bb);
        let (ck, _g7) = ckpt.device_ptr(st);
        let (dyp, _g8) = dy.device_ptr(st);
        let dht = dh_t.map(|s| s.device_ptr(st));
        (p.ckpt, p.dy) = (ck, dyp);
        p.dh_t = dht.as_ref().map_or(0, |(q, _)| *q);
        let DevGradsMut {
            dr,
            dw,
            dk,
            dv,
            da,
            db,
            dh0,
        } = g;
        let (dr, _h1) = dr.device_ptr_mut(st);
        let (dw, _h2) = dw.device_ptr_mut(st);
        let (dk, _h3) = dk.device_ptr_mut(st);
        let (dv, _h4) = dv.device_ptr_mut(st);
        let (da, _h5) = da.device_ptr_mut(st);
        let (db, _h6) = db.device_ptr_mut(st);
        let (dh0, _h7) = dh0.device_ptr_mut(st);
        let (sc, _h8) = scratch.device_ptr_mut(st);
        (p.dr, p.dw, p.dk, p.dv, p.da, p.db, p.dh0, p.scratch) = (dr, dw, dk, dv, da, db, dh0, sc);
        // SAFETY: as in `forward`: every buffer is of this context with the
        // length params.h documents for `ver` and `d` (checked above), the
        // outputs are distinct `&mut` borrows, and the guards keep them
        // alive and ordered until the launch is queued.
        unsafe { self.launch_raw(ver, Dir::Bwd, X::DTYPE, &p) }
    }

    /// Checks r … b and h0 against `d` and this stream's context.
    fn check_inputs<X>(&self, d: &Dims, x: &DevInputs<X>) -> Result<()> {
        let st = &self.stream;
        for (n, s) in [
            ("r", x.r),
            ("w", x.w),
            ("k", x.k),
            ("v", x.v),
            ("a", x.a),
            ("b", x.b),
        ] {
            check_dev(st, n, s, d.seq_shape())?;
        }
        if let Some(h0) = x.h0 {
            check_dev(st, "h0", h0, d.state_shape())?;
        }
        Ok(())
    }
}

impl Gpu {
    /// The WKV-7 kernels on this GPU's stream, loaded on first use and
    /// kept (every kernel function resolved once).
    pub fn wkv7(&self) -> Result<&Wkv7Kernels> {
        self.wkv7_with(Wkv7Kernels::new)
    }
}

/// Launches the v1 kernel for `dir` on `gpu`'s stream with parameters whose
/// pointers are raw device addresses ([`Wkv7Kernels::launch_raw`]).
///
/// # Safety
/// Every non-zero address in `p` must be device memory of `gpu`'s context,
/// of the size `kernels/params.h` documents for the sizes in `p`, not
/// written by other work while the kernel runs.
pub unsafe fn launch_raw(gpu: &Gpu, dir: Dir, dtype: DType, p: &Wkv7Params) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { launch_raw_v(gpu, Version::V1, dir, dtype, p) }
}

/// [`launch_raw`] for a kernel version. For [`Version::V2`], [`Version::V3`]
/// and [`Version::V3Exact`] every w must also be ≥ [`super::v2::W_MIN`]
/// (not checked here).
///
/// # Safety
/// As for [`launch_raw`], with the buffer sizes of `ver`.
pub unsafe fn launch_raw_v(
    gpu: &Gpu,
    ver: Version,
    dir: Dir,
    dtype: DType,
    p: &Wkv7Params,
) -> Result<()> {
    // SAFETY: forwarded from the caller (same context and stream).
    unsafe { gpu.wkv7()?.launch_raw(ver, dir, dtype, p) }
}

/// Forward on device buffers. `ckpt` (len [`ckpt_len`]) is filled when given
/// (needed by [`backward_dev`]); `h_t` `[B, H, N, N]` when given.
pub fn forward_dev<X: IoType + DeviceRepr>(
    gpu: &Gpu,
    d: &Dims,
    x: &DevInputs<X>,
    y: &mut CudaSlice<X>,
    h_t: Option<&mut CudaSlice<f32>>,
    ckpt: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    forward_dev_v(gpu, Version::V1, d, x, y, h_t, ckpt)
}

/// [`forward_dev`] for a kernel version ([`Wkv7Kernels::forward`] on
/// `gpu`'s stream).
pub fn forward_dev_v<X: IoType + DeviceRepr>(
    gpu: &Gpu,
    ver: Version,
    d: &Dims,
    x: &DevInputs<X>,
    y: &mut CudaSlice<X>,
    h_t: Option<&mut CudaSlice<f32>>,
    ckpt: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    let h_t = h_t.map(|s| s as DevOut<f32>);
    let ckpt = ckpt.map(|s| s as DevOut<f32>);
    gpu.wkv7()?.forward(ver, d, x, y, h_t, ckpt)
}

/// Backward on device buffers, after [`forward_dev`] filled `ckpt`.
#[allow(clippy::too_many_arguments)]
pub fn backward_dev<X: IoType + DeviceRepr>(
    gpu: &Gpu,
    d: &Dims,
    x: &DevInputs<X>,
    ckpt: &CudaSlice<f32>,
    dy: &CudaSlice<X>,
    dh_t: Option<&CudaSlice<f32>>,
    g: &mut DevGrads<X>,
    scratch: &mut CudaSlice<f32>,
) -> Result<()> {
    backward_dev_v(gpu, Version::V1, d, x, ckpt, dy, dh_t, g, scratch)
}

/// [`backward_dev`] for a kernel version ([`Wkv7Kernels::backward`] on
/// `gpu`'s stream).
#[allow(clippy::too_many_arguments)]
pub fn backward_dev_v<X: IoType + DeviceRepr>(
    gpu: &Gpu,
    ver: Version,
    d: &Dims,
    x: &DevInputs<X>,
    ckpt: &CudaSlice<f32>,
    dy: &CudaSlice<X>,
    dh_t: Option<&CudaSlice<f32>>,
    g: &mut DevGrads<X>,
    scratch: &mut CudaSlice<f32>,
) -> Result<()> {
    let dh_t = dh_t.map(|s| s as DevIn<f32>);
    gpu.wkv7()?
        .backward(ver, d, x, ckpt, dy, dh_t, g.as_mut(), scratch)
}

fn up<T: DeviceRepr>(gpu: &Gpu, s: &[T]) -> Result<CudaSlice<T>> {
    gpu.stream.clone_htod(s).map_err(cuda_err)
}
fn zeros<T: DeviceRepr + ValidAsZeroBits>(gpu: &Gpu, n: usize) -> Result<CudaSlice<T>> {
    gpu.stream.alloc_zeros::<T>(n).map_err(cuda_err)
}
fn down<T: DeviceRepr + Default + Clone>(gpu: &Gpu, s: &CudaSlice<T>) -> Result<Vec<T>> {
    gpu.stream.clone_dtoh(s).map_err(cuda_err)
}

struct Uploaded<X> {
    t: [CudaSlice<X>; 6],
    h0: Option<CudaSlice<f32>>,
}
impl<X> Uploaded<X> {
    fn inputs(&self) -> DevInputs<'_, X> {
        DevInputs {
            r: &self.t[0],
            w: &self.t[1],
            k: &self.t[2],
            v: &self.t[3],
            a: &self.t[4],
            b: &self.t[5],
            h0: self.h0.as_ref().map(|h| h as DevIn<f32>),
        }
    }
}
fn upload<X: IoType + DeviceRepr>(gpu: &Gpu, x: &Inputs<X>) -> Result<Uploaded<X>> {
    Ok(Uploaded {
        t: [
            up(gpu, x.r)?,
            up(gpu, x.w)?,
            up(gpu, x.k)?,
            up(gpu, x.v)?,
            up(gpu, x.a)?,
            up(gpu, x.b)?,
        ],
        h0: x.h0.map(|h| up(gpu, h)).transpose()?,
    })
}

/// Forward with host data in and out (kernel version `ver`; for v2 the
/// caller checked the decay bound, see [`Version::effective`]).
pub fn forward_host<X: IoType + DeviceRepr + ValidAsZeroBits>(
    gpu: &Gpu,
    ver: Version,
    d: &Dims,
    x: &Inputs<X>,
) -> Result<Outputs<X>> {
    let u = upload(gpu, x)?;
    let mut y = zeros::<X>(gpu, d.seq_len())?;
    let mut h_t = zeros::<f32>(gpu, d.state_len())?;
    forward_dev_v(gpu, ver, d, &u.inputs(), &mut y, Some(&mut h_t), None)?;
    Ok(Outputs {
        y: down(gpu, &y)?,
        h_t: down(gpu, &h_t)?,
    })
}

/// Forward and backward with host data in and out.
pub fn forward_backward_host<X: IoType + DeviceRepr + ValidAsZeroBits>(
    gpu: &Gpu,
    ver: Version,
    d: &Dims,
    x: &Inputs<X>,
    gi: &GradInputs<X>,
) -> Result<(Outputs<X>, Grads<X>)> {
    let u = upload(gpu, x)?;
    let xi = u.inputs();
    let mut y = zeros::<X>(gpu, d.seq_len())?;
    let mut h_t = zeros::<f32>(gpu, d.state_len())?;
    let mut ckpt = zeros::<f32>(gpu, ver.ckpt_len(d))?;
    forward_dev_v(gpu, ver, d, &xi, &mut y, Some(&mut h_t), Some(&mut ckpt))?;
    let dy = up(gpu, gi.dy)?;
    let dh_t = gi.dh_t.map(|h| up(gpu, h)).transpose()?;
    let sl = d.seq_len();
    let mut g = DevGrads {
        dr: zeros(gpu, sl)?,
        dw: zeros(gpu, sl)?,
        dk: zeros(gpu, sl)?,
        dv: zeros(gpu, sl)?,
        da: zeros(gpu, sl)?,
        db: zeros(gpu, sl)?,
        dh0: zeros(gpu, d.state_len())?,
    };
    let mut scratch = zeros::<f32>(gpu, ver.scratch_len(d))?;
    backward_dev_v(
        gpu,
        ver,
        d,
        &xi,
        &ckpt,
        &dy,
        dh_t.as_ref(),
        &mut g,
        &mut scratch,
    )?;
    Ok((
        Outputs {
            y: down(gpu, &y)?,
            h_t: down(gpu, &h_t)?,
        },
        Grads {
            dr: down(gpu, &g.dr)?,
            dw: down(gpu, &g.dw)?,
            dk: down(gpu, &g.dk)?,
            dv: down(gpu, &g.dv)?,
            da: down(gpu, &g.da)?,
            db: down(gpu, &g.db)?,
            dh0: down(gpu, &g.dh0)?,
        },
    ))
}

/// Times `pass` on the GPU with CUDA events (per repetition, after `warmup`
/// untimed runs, the L2 cache flushed before each), with every buffer allocated
/// and uploaded beforehand. Returns milliseconds per repetition.
#[allow(clippy::too_many_arguments)]
pub fn time_device<X: IoType>(
    gpu: &Gpu,
    d: &Dims,
    x: [&[X]; 6],
    h0: &[f32],
    dy: &[X],
    dh_t: &[f32],
    version: Version,
    pass: super::Pass,
    warmup: usize,
    reps: usize,
) -> Result<Vec<f64>> {
    use super::Pass;
    use cudarc::driver::sys::CUevent_flags;
    let xs = Inputs {
        r: x[0],
        w: x[1],
        k: x[2],
        v: x[3],
        a: x[4],
        b: x[5],
        h0: Some(h0),
    };
    xs.check(d)?;
    let ver = version.effective(d, xs.w);
    let u = upload(gpu, &xs)?;
    let xi = u.inputs();
    let sl = d.seq_len();
    let mut y = zeros::<X>(gpu, sl)?;
    let mut h_t = zeros::<f32>(gpu, d.state_len())?;
    let mut ckpt = zeros::<f32>(gpu, ver.ckpt_len(d))?;
    let dyd = up(gpu, dy)?;
    let dhd = up(gpu, dh_t)?;
    let mut g = DevGrads {
        dr: zeros(gpu, sl)?,
        dw: zeros(gpu, sl)?,
        dk: zeros(gpu, sl)?,
        dv: zeros(gpu, sl)?,
        da: zeros(gpu, sl)?,
        db: zeros(gpu, sl)?,
        dh0: zeros(gpu, d.state_len())?,
    };
    let mut scratch = zeros::<f32>(gpu, ver.scratch_len(d))?;
    if pass == Pass::Backward {
        forward_dev_v(gpu, ver, d, &xi, &mut y, Some(&mut h_t), Some(&mut ckpt))?;
    }
    // L2 flush between repetitions (outside the timed region): zero a buffer
    // of twice the L2 size (64 MiB when the attribute is unavailable) so that
    // no rep reads inputs left in L2 by the previous one.
    let l2 = gpu
        .ctx
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .ok()
        .filter(|&b| b > 0)
        .map_or(32 << 20, |b| b as usize);
    let mut flush = zeros::<u8>(gpu, 2 * l2)?;
    let mut times = Vec::with_capacity(reps);
    for i in 0..warmup + reps {
        gpu.stream.memset_zeros(&mut flush).map_err(cuda_err)?;
        let start = gpu
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err)?;
        match pass {
            Pass::Forward => forward_dev_v(gpu, ver, d, &xi, &mut y, Some(&mut h_t), None)?,
            Pass::Backward => backward_dev_v(
                gpu,
                ver,
                d,
                &xi,
                &ckpt,
                &dyd,
                Some(&dhd),
                &mut g,
                &mut scratch,
            )?,
            Pass::ForwardBackward => {
                forward_dev_v(gpu, ver, d, &xi, &mut y, Some(&mut h_t), Some(&mut ckpt))?;
                backward_dev_v(
                    gpu,
                    ver,
                    d,
                    &xi,
                    &ckpt,
                    &dyd,
                    Some(&dhd),
                    &mut g,
                    &mut scratch,
                )?;
            }
        }
        let end = gpu
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err)?;
        let ms = start.elapsed_ms(&end).map_err(cuda_err)? as f64;
        if i >= warmup {
            times.push(ms);
        }
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel the versions name has its own slot in the table, and
    /// head sizes without a kernel have none (so `launch_raw` reports them).
    #[test]
    fn every_kernel_has_its_own_slot() {
        let mut seen = std::collections::HashSet::new();
        for ver in Version::ALL {
            for dir in [Dir::Fwd, Dir::Bwd] {
                for dtype in [DType::F32, DType::BF16] {
                    for n in [16, 32, 48, 64, 128, 256] {
                        let named = ver.kernel_name(dir, dtype, n).is_ok();
                        match slot(ver, dir, dtype, n) {
                            Some(i) => {
                                assert!(named, "{ver:?} n={n} has a slot but no kernel");
                                assert!(
                                    i < Version::ALL.len() * 2 * 2 * 3,
                                    "slot {i} out of the table"
                                );
                                assert!(seen.insert(i), "slot {i} used twice");
                            }
                            None => assert!(!named, "{ver:?} {dir:?} {dtype} n={n}: no slot"),
                        }
                    }
                }
            }
        }
        // v1: f32 and bf16 at N = 32, 64, 128; v2: both dtypes at 32, 64;
        // v3 and v3x: bf16 at 32, 64; each forward and backward
        assert_eq!(seen.len(), 2 * (2 * 3 + 2 * 2 + 2 + 2));
    }
}
