//! WKV-7 on a GPU through cudarc: `kernels/wkv7_v*.cu` launched on the
//! [`Gpu`]'s stream. Three levels of API (the plain names run v1; the `_v`
//! forms take a [`Version`]):
//! - [`forward_host`] / [`forward_backward_host`]: host slices in and out;
//! - [`forward_dev`] / [`backward_dev`]: device buffers (`CudaSlice`), no copies;
//! - [`launch_raw`]: a filled [`Wkv7Params`] with raw device addresses, for
//!   runtimes that manage their own memory.
use super::{Dims, Dir, GradInputs, Grads, Inputs, Outputs, Version};
use crate::cuda::{cuda_err, Gpu};
use crate::dtype::{DType, IoType};
use crate::error::{Error, Result};
use crate::params::Wkv7Params;
use cudarc::driver::{
    CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

/// Device inputs: r … b `[B, T, H, N]`, h0 `[B, H, N, N]` f32 (None = zero).
pub struct DevInputs<'a, X> {
    pub r: &'a CudaSlice<X>,
    pub w: &'a CudaSlice<X>,
    pub k: &'a CudaSlice<X>,
    pub v: &'a CudaSlice<X>,
    pub a: &'a CudaSlice<X>,
    pub b: &'a CudaSlice<X>,
    pub h0: Option<&'a CudaSlice<f32>>,
}

/// Device gradients: dr … db `[B, T, H, N]`, dh0 `[B, H, N, N]` f32.
pub struct DevGrads<X> {
    pub dr: CudaSlice<X>,
    pub dw: CudaSlice<X>,
    pub dk: CudaSlice<X>,
    pub dv: CudaSlice<X>,
    pub da: CudaSlice<X>,
    pub db: CudaSlice<X>,
    pub dh0: CudaSlice<f32>,
}

/// `[B, H, ceil(T / chunk), N, N]`
fn ckpt_shape(ver: Version, d: &Dims) -> Vec<usize> {
    vec![d.b, d.h, d.t.div_ceil(ver.chunk()), d.n, d.n]
}

fn check_dev<T>(name: &str, s: &CudaSlice<T>, shape: Vec<usize>) -> Result<()> {
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

/// Launches the v1 kernel for `dir` with parameters whose pointers are raw
/// device addresses.
///
/// # Safety
/// Every non-zero address in `p` must be device memory of the current
/// context, of the size `kernels/params.h` documents for the sizes in `p`,
/// not written by other work while the kernel runs.
pub unsafe fn launch_raw(gpu: &Gpu, dir: Dir, dtype: DType, p: &Wkv7Params) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { launch_raw_v(gpu, Version::V1, dir, dtype, p) }
}

/// [`launch_raw`] for a kernel version. For [`Version::V2`] every w must
/// also be ≥ [`super::v2::W_MIN`] (not checked here).
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
    let d = Dims {
        b: p.B.max(0) as usize,
        t: p.T.max(0) as usize,
        h: p.H.max(0) as usize,
        n: p.N.max(0) as usize,
    };
    d.validate()?;
    let want = ver.base_params(&d);
    if p.chunk != want.chunk || p.n_chunks != want.n_chunks {
        return Err(Error::Invalid(format!(
            "Wkv7Params: chunk / n_chunks do not match the {ver:?} kernels"
        )));
    }
    let f = gpu.function(ver.stem(), &ver.kernel_name(dir, dtype, d.n)?)?;
    let (grid_dim, block_dim) = ver.launch_dims(&d);
    let cfg = LaunchConfig {
        grid_dim,
        block_dim,
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(p);
    // SAFETY: the caller guarantees the memory behind `p`; the geometry is
    // the one the kernel version is written for (Version::launch_dims).
    unsafe { b.launch(cfg) }.map_err(cuda_err)?;
    Ok(())
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

/// [`forward_dev`] for a kernel version (v2: every w must be ≥
/// [`super::v2::W_MIN`]; use [`Version::effective`] on host data to check).
pub fn forward_dev_v<X: IoType + DeviceRepr>(
    gpu: &Gpu,
    ver: Version,
    d: &Dims,
    x: &DevInputs<X>,
    y: &mut CudaSlice<X>,
    h_t: Option<&mut CudaSlice<f32>>,
    ckpt: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    d.validate()?;
    for (n, s) in [
        ("r", x.r),
        ("w", x.w),
        ("k", x.k),
        ("v", x.v),
        ("a", x.a),
        ("b", x.b),
    ] {
        check_dev(n, s, d.seq_shape())?;
    }
    check_dev("y", y, d.seq_shape())?;
    if let Some(h0) = x.h0 {
        check_dev("h0", h0, d.state_shape())?;
    }
    let st = &gpu.stream;
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
    let ht = match h_t {
        Some(s) => {
            check_dev("h_t", s, d.state_shape())?;
            Some(s.device_ptr_mut(st))
        }
        None => None,
    };
    p.h_t = ht.as_ref().map_or(0, |(q, _)| *q);
    let ck = match ckpt {
        Some(s) => {
            if s.len() != ver.ckpt_len(d) {
                return Err(Error::Shape {
                    name: "ckpt".into(),
                    expected: ckpt_shape(ver, d),
                    got: vec![s.len()],
                });
            }
            Some(s.device_ptr_mut(st))
        }
        None => None,
    };
    p.ckpt = ck.as_ref().map_or(0, |(q, _)| *q);
    // SAFETY: every address comes from a CudaSlice on this context whose
    // length was checked above; the guards keep them alive until queued.
    unsafe { launch_raw_v(gpu, ver, Dir::Fwd, X::DTYPE, &p) }
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

/// [`backward_dev`] for a kernel version, after [`forward_dev_v`] with the
/// same version filled `ckpt`; `scratch` has [`Version::scratch_len`] elements.
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
    d.validate()?;
    for (n, s) in [
        ("r", x.r),
        ("w", x.w),
        ("k", x.k),
        ("v", x.v),
        ("a", x.a),
        ("b", x.b),
        ("dy", dy),
    ] {
        check_dev(n, s, d.seq_shape())?;
    }
    for (n, s) in [
        ("dr", &g.dr),
        ("dw", &g.dw),
        ("dk", &g.dk),
        ("dv", &g.dv),
        ("da", &g.da),
        ("db", &g.db),
    ] {
        check_dev(n, s, d.seq_shape())?;
    }
    check_dev("dh0", &g.dh0, d.state_shape())?;
    check_dev("ckpt", ckpt, ckpt_shape(ver, d))?;
    if scratch.len() != ver.scratch_len(d) {
        return Err(Error::Shape {
            name: "scratch".into(),
            expected: vec![ver.scratch_len(d)],
            got: vec![scratch.len()],
        });
    }
    if let Some(s) = dh_t {
        check_dev("dh_t", s, d.state_shape())?;
    }
    let st = &gpu.stream;
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
    let (dr, _h1) = g.dr.device_ptr_mut(st);
    let (dw, _h2) = g.dw.device_ptr_mut(st);
    let (dk, _h3) = g.dk.device_ptr_mut(st);
    let (dv, _h4) = g.dv.device_ptr_mut(st);
    let (da, _h5) = g.da.device_ptr_mut(st);
    let (db, _h6) = g.db.device_ptr_mut(st);
    let (dh0, _h7) = g.dh0.device_ptr_mut(st);
    let (sc, _h8) = scratch.device_ptr_mut(st);
    (p.dr, p.dw, p.dk, p.dv, p.da, p.db, p.dh0, p.scratch) = (dr, dw, dk, dv, da, db, dh0, sc);
    // SAFETY: every address comes from a CudaSlice on this context whose
    // length was checked above; the guards keep them alive until queued.
    unsafe { launch_raw_v(gpu, ver, Dir::Bwd, X::DTYPE, &p) }
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
            h0: self.h0.as_ref(),
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
