//! WKV-7 version 2: the chunked tensor-core kernels of `kernels/wkv7_v2.cu`
//! (bf16 `mma.sync` with hi/lo-split operands, fp32 accumulation and state,
//! 16-token chunks), on the emulated backend and on a GPU.
//!
//! Same tensors, [`Wkv7Params`] and checkpoint layout as v1; the backward
//! workspace (`scratch`) is only `[B, H, N, N]` f32. Head sizes 32 and 64.
//!
//! **Decay bound.** The chunked form divides by cumulative decay products
//! within a chunk, so v2 needs `w ≥` [`W_MIN`] (1/∏w ≤ 2¹⁶ over a chunk).
//! The x070 model guarantees `w ≥ e^{−e^{−0.5}} ≈ 0.5452`. Policy: the
//! host-data entry points ([`Backend::forward_v`](super::Backend::forward_v))
//! check the bound on the w they are given and run v1 when it does not hold
//! (or the head size is not 32/64); the device-buffer entry point
//! [`launch_raw`] trusts the caller.
use super::{n_chunks, Dims, Dir, GradInputs, Grads, Inputs, Outputs};
use crate::dtype::{DType, IoType};
use crate::error::{Error, Result};
use crate::params::Wkv7Params;

/// Tokens per chunk of the v2 kernels (`WKV7_V2_CHUNK` in kernels/wkv7_v2.cu).
pub const CHUNK: usize = 16;

/// Smallest decay v2 accepts (the model's bound is ≈ 0.5452).
pub const W_MIN: f32 = 0.5;

/// Whether v2 can run this problem: head size 32 or 64 and every decay in
/// `[W_MIN, 1]` (NaN fails).
pub fn supports<X: IoType>(d: &Dims, w: &[X]) -> bool {
    matches!(d.n, 32 | 64)
        && w.iter().all(|e| {
            let x = e.to_f32();
            (W_MIN..=1.0).contains(&x)
        })
}

/// Kernel symbol: `wkv7_fwd_v2_bf16_n64`.
pub fn kernel_name(dir: Dir, dtype: DType, n: usize) -> Result<String> {
    if !matches!(n, 32 | 64) {
        return Err(Error::UnsupportedHeadSize(n));
    }
    let d = match dir {
        Dir::Fwd => "fwd",
        Dir::Bwd => "bwd",
    };
    Ok(format!("wkv7_{d}_v2_{}_n{n}", dtype.kernel_name()))
}

/// Launch geometry: grid (H, B), block 2N threads (N/16 warps).
pub fn launch_dims(d: &Dims) -> ((u32, u32, u32), (u32, u32, u32)) {
    ((d.h as u32, d.b as u32, 1), (2 * d.n as u32, 1, 1))
}

/// Elements of the backward workspace: `[B, H, N, N]` f32.
pub fn scratch_len(d: &Dims) -> usize {
    d.b * d.h * d.n * d.n
}

/// Elements of the checkpoint buffer: `[B, H, ceil(T / 16), N, N]` f32.
pub fn ckpt_len(d: &Dims) -> usize {
    d.b * d.h * n_chunks(d) * d.n * d.n
}

/// Parameters with sizes filled in and all pointers null.
pub fn base_params(d: &Dims) -> Wkv7Params {
    Wkv7Params {
        B: d.b as i32,
        T: d.t as i32,
        H: d.h as i32,
        N: d.n as i32,
        chunk: CHUNK as i32,
        n_chunks: d.t.div_ceil(CHUNK) as i32,
        ..Default::default()
    }
}

fn addr<T>(s: &[T]) -> u64 {
    s.as_ptr() as u64
}
fn addr_mut<T>(s: &mut [T]) -> u64 {
    s.as_mut_ptr() as u64
}

fn set_inputs<X>(p: &mut Wkv7Params, x: &Inputs<X>) {
    p.r = addr(x.r);
    p.w = addr(x.w);
    p.k = addr(x.k);
    p.v = addr(x.v);
    p.a = addr(x.a);
    p.b = addr(x.b);
    p.h0 = x.h0.map_or(0, addr);
}

fn zero_grads<X: IoType>(d: &Dims) -> Grads<X> {
    let z = || vec![X::default(); d.seq_len()];
    Grads {
        dr: z(),
        dw: z(),
        dk: z(),
        dv: z(),
        da: z(),
        db: z(),
        dh0: vec![0f32; d.state_len()],
    }
}

fn set_grads<X>(p: &mut Wkv7Params, g: &mut Grads<X>) {
    p.dr = addr_mut(&mut g.dr);
    p.dw = addr_mut(&mut g.dw);
    p.dk = addr_mut(&mut g.dk);
    p.dv = addr_mut(&mut g.dv);
    p.da = addr_mut(&mut g.da);
    p.db = addr_mut(&mut g.db);
    p.dh0 = addr_mut(&mut g.dh0);
}

/// Emulated v2 kernels on host buffers.
pub mod emu {
    use super::*;

    /// Forward (lengths already checked by the caller; w must satisfy the bound).
    pub fn forward<X: IoType>(d: &Dims, x: &Inputs<X>) -> Result<Outputs<X>> {
        let name = kernel_name(Dir::Fwd, X::DTYPE, d.n)?;
        let mut y = vec![X::default(); d.seq_len()];
        let mut h_t = vec![0f32; d.state_len()];
        let mut p = base_params(d);
        set_inputs(&mut p, x);
        p.y = addr_mut(&mut y);
        p.h_t = addr_mut(&mut h_t);
        let (g, b) = launch_dims(d);
        // SAFETY: every non-null pointer in `p` refers to a live buffer of the
        // length params.h documents for these sizes (inputs checked by the
        // caller, outputs allocated above); ckpt is null (not written).
        unsafe { crate::emu::launch_wkv7(&name, g, b, &p)? };
        Ok(Outputs { y, h_t })
    }

    /// Forward (saving chunk states) then backward.
    pub fn forward_backward<X: IoType>(
        d: &Dims,
        x: &Inputs<X>,
        gi: &GradInputs<X>,
    ) -> Result<(Outputs<X>, Grads<X>)> {
        let fwd = kernel_name(Dir::Fwd, X::DTYPE, d.n)?;
        let bwd = kernel_name(Dir::Bwd, X::DTYPE, d.n)?;
        let mut y = vec![X::default(); d.seq_len()];
        let mut h_t = vec![0f32; d.state_len()];
        let mut ckpt = vec![0f32; ckpt_len(d)];
        let mut scratch = vec![0f32; scratch_len(d)];
        let mut g = zero_grads::<X>(d);
        let mut p = base_params(d);
        set_inputs(&mut p, x);
        p.y = addr_mut(&mut y);
        p.h_t = addr_mut(&mut h_t);
        p.ckpt = addr_mut(&mut ckpt);
        p.dy = addr(gi.dy);
        p.dh_t = gi.dh_t.map_or(0, addr);
        set_grads(&mut p, &mut g);
        p.scratch = addr_mut(&mut scratch);
        let (gd, bd) = launch_dims(d);
        // SAFETY: as in `forward`; ckpt, scratch and the gradients are
        // allocated above with the documented sizes, dy / dh_t were checked.
        unsafe {
            crate::emu::launch_wkv7(&fwd, gd, bd, &p)?;
            crate::emu::launch_wkv7(&bwd, gd, bd, &p)?;
        }
        Ok((Outputs { y, h_t }, g))
    }
}

/// v2 kernels on a GPU (host data in and out, or raw device addresses).
pub mod cuda {
    use super::*;
    use crate::cuda::{cuda_err, Gpu};
    use cudarc::driver::{
        CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
        ValidAsZeroBits,
    };

    /// Launches the v2 kernel for `dir` with raw device addresses in `p`
    /// (sizes as [`base_params`] sets them; scratch `[B, H, N, N]`).
    ///
    /// # Safety
    /// Every non-zero address in `p` must be device memory of the current
    /// context of the documented size, not written by other work while the
    /// kernel runs; every w must be ≥ [`W_MIN`] (not checked here).
    pub unsafe fn launch_raw(gpu: &Gpu, dir: Dir, dtype: DType, p: &Wkv7Params) -> Result<()> {
        let d = Dims {
            b: p.B.max(0) as usize,
            t: p.T.max(0) as usize,
            h: p.H.max(0) as usize,
            n: p.N.max(0) as usize,
        };
        d.validate()?;
        if p.chunk != CHUNK as i32 || p.n_chunks != d.t.div_ceil(CHUNK) as i32 {
            return Err(Error::Invalid(
                "Wkv7Params: chunk / n_chunks do not match the v2 kernels".into(),
            ));
        }
        let f = gpu.function("wkv7_v2", &kernel_name(dir, dtype, d.n)?)?;
        let (grid_dim, block_dim) = launch_dims(&d);
        let cfg = LaunchConfig {
            grid_dim,
            block_dim,
            shared_mem_bytes: 0,
        };
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(p);
        // SAFETY: the caller guarantees the memory behind `p`; the geometry
        // is the one the kernel is written for (grid (H, B), block 2N).
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        Ok(())
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

    /// Forward, and with `gi` also the backward, with host data in and out.
    pub fn run_host<X: IoType + DeviceRepr + ValidAsZeroBits>(
        gpu: &Gpu,
        d: &Dims,
        x: &Inputs<X>,
        gi: Option<&GradInputs<X>>,
    ) -> Result<(Outputs<X>, Option<Grads<X>>)> {
        let st = &gpu.stream;
        let ins = [x.r, x.w, x.k, x.v, x.a, x.b]
            .map(|s| up(gpu, s))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let h0 = x.h0.map(|h| up(gpu, h)).transpose()?;
        let mut y = zeros::<X>(gpu, d.seq_len())?;
        let mut h_t = zeros::<f32>(gpu, d.state_len())?;
        let mut ckpt = zeros::<f32>(gpu, ckpt_len(d))?;
        let mut p = base_params(d);
        let ptrs: Vec<_> = ins.iter().map(|s| s.device_ptr(st)).collect();
        (p.r, p.w, p.k, p.v, p.a, p.b) = (
            ptrs[0].0, ptrs[1].0, ptrs[2].0, ptrs[3].0, ptrs[4].0, ptrs[5].0,
        );
        let h0p = h0.as_ref().map(|s| s.device_ptr(st));
        p.h0 = h0p.as_ref().map_or(0, |(q, _)| *q);
        let (yp, yg) = y.device_ptr_mut(st);
        let (htp, htg) = h_t.device_ptr_mut(st);
        let (ckp, ckg) = ckpt.device_ptr_mut(st);
        (p.y, p.h_t, p.ckpt) = (yp, htp, ckp);
        // SAFETY: all addresses come from CudaSlices of this context with the
        // documented lengths, alive (guards held) until the launch is queued.
        unsafe { launch_raw(gpu, Dir::Fwd, X::DTYPE, &p)? };
        drop((yg, htg, ckg));
        let grads = match gi {
            None => None,
            Some(gi) => {
                let dy = up(gpu, gi.dy)?;
                let dh_t = gi.dh_t.map(|h| up(gpu, h)).transpose()?;
                let sl = d.seq_len();
                let mut g6 = (0..6)
                    .map(|_| zeros::<X>(gpu, sl))
                    .collect::<Result<Vec<_>>>()?;
                let mut dh0 = zeros::<f32>(gpu, d.state_len())?;
                let mut scratch = zeros::<f32>(gpu, scratch_len(d))?;
                let (dyp, _a) = dy.device_ptr(st);
                let dhtp = dh_t.as_ref().map(|s| s.device_ptr(st));
                p.dy = dyp;
                p.dh_t = dhtp.as_ref().map_or(0, |(q, _)| *q);
                let (ckp2, _b) = ckpt.device_ptr(st);
                p.ckpt = ckp2;
                {
                    let mut gp: Vec<_> = g6.iter_mut().map(|s| s.device_ptr_mut(st)).collect();
                    let (dh0p, _c) = dh0.device_ptr_mut(st);
                    let (scp, _d) = scratch.device_ptr_mut(st);
                    (p.dr, p.dw, p.dk, p.dv, p.da, p.db) =
                        (gp[0].0, gp[1].0, gp[2].0, gp[3].0, gp[4].0, gp[5].0);
                    (p.dh0, p.scratch) = (dh0p, scp);
                    // SAFETY: as for the forward; gradients, dh0 and scratch
                    // were allocated above with the documented lengths.
                    unsafe { launch_raw(gpu, Dir::Bwd, X::DTYPE, &p)? };
                    gp.clear();
                }
                Some(Grads {
                    dr: down(gpu, &g6[0])?,
                    dw: down(gpu, &g6[1])?,
                    dk: down(gpu, &g6[2])?,
                    dv: down(gpu, &g6[3])?,
                    da: down(gpu, &g6[4])?,
                    db: down(gpu, &g6[5])?,
                    dh0: down(gpu, &dh0)?,
                })
            }
        };
        drop(ptrs);
        drop(h0p);
        Ok((
            Outputs {
                y: down(gpu, &y)?,
                h_t: down(gpu, &h_t)?,
            },
            grads,
        ))
    }
}
