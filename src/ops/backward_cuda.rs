//! [`BackwardOps`] on an NVIDIA GPU: `kernels/tune_ops.cu` launched through
//! cudarc on the [`CudaOps`] stream, [`BackwardOps::matmul_t`] through cuBLAS
//! `sgemm`, the WKV backward through [`crate::wkv7::cuda::forward_dev`]
//! (with checkpoints) and [`crate::wkv7::cuda::backward_dev`].
use super::backward::{BackwardOps, GnBwdBufs, GnBwdGrads, KkBwdBufs, SdtBwdBufs, UpBufs};
use super::backward_emu::{block_geom, sumsq_blocks};
use super::backward_ref::AdamStep;
use super::cuda::CudaOps;
use super::{Act, DeviceOps};
use crate::cuda::cuda_err;
use crate::error::Result;
use crate::params::{
    ActBwdParams, AdamParams, BatchedMatmulParams, GroupNormBwdParams, KkPrepBwdParams,
    LayerNormBwdParams, OuterAccParams, SoftmaxParams, SumBatchParams, SumsqParams,
    TokenShiftBwdParams, UpBwdParams, UpFwdParams, ValueResidualBwdParams, XentParams,
};
use crate::params::{DbpStepParams, EyeAxpyParams, LoraInParams, ReduceParams};
use crate::params::{MaskMulParams, SdtBwdParams};
use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};

// SAFETY (all thirteen): #[repr(C)] plain-old-data structs generated from
// kernels/params.h (i32, f32 and u64 fields only), matching the C structs the
// kernels take by value; any bit pattern is valid.
unsafe impl DeviceRepr for LayerNormBwdParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for TokenShiftBwdParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for ActBwdParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for KkPrepBwdParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for ValueResidualBwdParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for GroupNormBwdParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for XentParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for SoftmaxParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for OuterAccParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for BatchedMatmulParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for AdamParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for SumsqParams {}
// SAFETY: #[repr(C)] plain old data (i32 and u64 fields), as above.
unsafe impl DeviceRepr for SumBatchParams {}
// SAFETY: #[repr(C)] plain old data (i32 and u64 fields), as above.
unsafe impl DeviceRepr for ReduceParams {}
// SAFETY: #[repr(C)] plain old data (i32, f32 and u64 fields), as above.
unsafe impl DeviceRepr for DbpStepParams {}
// SAFETY: #[repr(C)] plain old data (i32, f32 and u64 fields), as above.
unsafe impl DeviceRepr for EyeAxpyParams {}
// SAFETY: as above (int32, f32 and u64 device-pointer fields only).
unsafe impl DeviceRepr for LoraInParams {}
// SAFETY: as above (int32 and u64 device-pointer fields only).
unsafe impl DeviceRepr for SdtBwdParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for MaskMulParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for UpFwdParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for UpBwdParams {}

const STEM: &str = "tune_ops";
const F32_BYTES: u64 = 4;

impl CudaOps {
    /// # Safety
    /// The device addresses in `p` must satisfy what kernels/params.h
    /// documents for `P` at its sizes (the provided [`BackwardOps`] methods
    /// check every length before calling the hooks that launch).
    unsafe fn tune<P: DeviceRepr>(
        &self,
        name: &str,
        g: ((u32, u32, u32), (u32, u32, u32)),
        p: &P,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.launch_in(STEM, name, g, p) }
    }
}

impl BackwardOps for CudaOps {
    unsafe fn raw_matmul_t(
        &self,
        dy: &CudaSlice<f32>,
        m: usize,
        w: &CudaSlice<f32>,
        n: usize,
        k: usize,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if m == 0 || k == 0 {
            return Ok(());
        }
        let st = &self.gpu().stream;
        if n == 0 {
            // an empty sum: dx[..m·k] = 0, as the CPU twin does
            return st
                .memset_zeros(&mut dx.slice_mut(..m * k))
                .map_err(cuda_err);
        }
        // Row-major dx[m, k] = dy[m, n] · w[n, k] is column-major
        // dx_cm[k, m] = w_cm[k, n] · dy_cm[n, m]: no transposes, A = w
        // (lda = k), B = dy (ldb = n), C = dx (ldc = k).
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: k as i32,
            n: m as i32,
            k: n as i32,
            alpha: 1.0f32,
            lda: k as i32,
            ldb: n as i32,
            beta: 0.0f32,
            ldc: k as i32,
        };
        // SAFETY: sizes checked by the caller (w n·k, dy m·n, dx ≥ m·k floats, all
        // fitting i32); all three buffers live on the cuBLAS handle's stream.
        unsafe { self.blas().gemm(cfg, w, dy, dx) }.map_err(cuda_err)
    }

    unsafe fn raw_matmul_tn(
        &self,
        dy: &CudaSlice<f32>,
        m: usize,
        n: usize,
        x: &CudaSlice<f32>,
        x_off: usize,
        ldx: usize,
        k: usize,
        dw: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<()> {
        if n == 0 || k == 0 {
            return Ok(());
        }
        let st = &self.gpu().stream;
        if m == 0 {
            // an empty sum: dw unchanged, or 0, as the CPU twin does
            if !accumulate {
                st.memset_zeros(&mut dw.slice_mut(..n * k))
                    .map_err(cuda_err)?;
            }
            return Ok(());
        }
        // Row-major dw[n, k] = dy[m, n]ᵀ · x[m, k] is column-major
        // dw_cm[k, n] = x_cm[k, m] · (dy_cm[n, m])ᵀ: A = x (lda = ldx), op(B)
        // = Bᵀ with B = dy (ldb = n), C = dw (ldc = k).
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_T,
            m: k as i32,
            n: n as i32,
            k: m as i32,
            alpha: 1.0f32,
            lda: ldx as i32,
            ldb: n as i32,
            beta: if accumulate { 1.0f32 } else { 0.0f32 },
            ldc: k as i32,
        };
        let xv = x.slice(x_off..);
        // SAFETY: sizes checked by the caller (dy m·n, x from x_off (m−1)·ldx
        // + k, dw ≥ n·k floats, all fitting i32); all on the handle's stream.
        unsafe { self.blas().gemm(cfg, &xv, dy, dw) }.map_err(cuda_err)
    }

    unsafe fn raw_layer_norm_bwd(
        &self,
        x: &CudaSlice<f32>,
        off: usize,
        rows: usize,
        c: usize,
        weight: &CudaSlice<f32>,
        eps: f32,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let (xp, _g1) = x.device_ptr(st);
        let (wp, _g2) = weight.device_ptr(st);
        let (dyp, _g3) = dy.device_ptr(st);
        let (dxp, _g4) = dx.device_ptr_mut(st);
        let p = LayerNormBwdParams {
            rows: rows as i32,
            C: c as i32,
            eps,
            x: xp + off as u64 * F32_BYTES,
            weight: wp,
            dy: dyp,
            dx: dxp + off as u64 * F32_BYTES,
        };
        // SAFETY: lengths checked by the caller (x, dx from `off`); dx is a
        // distinct buffer; the guards keep every buffer alive until the launch is
        // queued.
        unsafe { self.tune("tune_layer_norm_bwd_f32", self.geom.rows(rows), &p) }
    }

    unsafe fn raw_token_shift_bwd(
        &self,
        b: usize,
        t: usize,
        c: usize,
        dmix: &[&CudaSlice<f32>],
        mu: &CudaSlice<f32>,
        dstate: &mut CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let guards: Vec<_> = dmix.iter().map(|d| d.device_ptr(st)).collect();
        let mut d = [0u64; 6];
        for (slot, (q, _)) in d.iter_mut().zip(&guards) {
            *slot = *q;
        }
        let (mp, _g1) = mu.device_ptr(st);
        let (sp, _g2) = dstate.device_ptr_mut(st);
        let (xp, _g3) = dx.device_ptr_mut(st);
        let p = TokenShiftBwdParams {
            B: b as i32,
            T: t as i32,
            C: c as i32,
            n_mix: dmix.len() as i32,
            d0: d[0],
            d1: d[1],
            d2: d[2],
            d3: d[3],
            d4: d[4],
            d5: d[5],
            mu: mp,
            dstate: sp,
            dx: xp,
        };
        // SAFETY: lengths checked by the caller (the kernel reads only the n_mix
        // given mixes); dstate and dx are distinct buffers; guards alive until
        // queued.
        unsafe { self.tune("tune_token_shift_bwd_f32", self.geom.elems(b * c), &p) }
    }

    unsafe fn raw_sum_batch(
        &self,
        b: usize,
        n: usize,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let (sp, _g1) = src.device_ptr(st);
        let (dp, _g2) = dst.device_ptr_mut(st);
        let p = SumBatchParams {
            B: b as i32,
            n: n as i32,
            accumulate: accumulate as i32,
            src: sp,
            dst: dp,
        };
        // SAFETY: src ≥ B·n, dst ≥ n floats (checked by the caller), distinct
        // buffers; guards alive until queued.
        unsafe { self.tune("tune_sum_batch_f32", self.geom.elems(n), &p) }
    }

    fn wkv_ws_len(&self, b: usize, t: usize, h: usize, n: usize) -> (usize, usize) {
        super::backward::kernel_wkv_ws_len(b, t, h, n)
    }

    unsafe fn raw_wkv_fwd_ckpt(
        &self,
        b: usize,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&CudaSlice<f32>; 6],
        h0: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        ckpt: &mut CudaSlice<f32>,
        h_t: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let d = crate::wkv7::Dims { b, t, h, n };
        let ver = self.wkv_version(n);
        let st = &self.gpu().stream;
        let g: Vec<_> = rwkvab.iter().map(|x| x.device_ptr(st)).collect();
        let (h0p, _g1) = h0.device_ptr(st);
        let (yp, _g2) = y.device_ptr_mut(st);
        let (cp, _g3) = ckpt.device_ptr_mut(st);
        let ht = h_t.map(|x| x.device_ptr_mut(st));
        let mut p = ver.base_params(&d);
        (p.r, p.w, p.k, p.v, p.a, p.b) = (g[0].0, g[1].0, g[2].0, g[3].0, g[4].0, g[5].0);
        (p.h0, p.y, p.ckpt) = (h0p, yp, cp);
        p.h_t = ht.as_ref().map_or(0, |(q, _)| *q);
        // SAFETY: r … b and y hold exactly B·T·H·N floats, h0 B·H·N·N and
        // ckpt at least the checkpoint length of either version, h_t (when
        // given, a distinct &mut) B·H·N·N (checked by the caller); scratch is
        // null; guards alive until queued.
        unsafe {
            crate::wkv7::cuda::launch_raw_v(
                self.gpu(),
                ver,
                crate::wkv7::Dir::Fwd,
                crate::dtype::DType::F32,
                &p,
            )
        }
    }

    unsafe fn raw_wkv_bwd_ckpt(
        &self,
        b: usize,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&CudaSlice<f32>; 6],
        h0: &CudaSlice<f32>,
        ckpt: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        grads: [&mut CudaSlice<f32>; 6],
        dh0: &mut CudaSlice<f32>,
        scratch: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = crate::wkv7::Dims { b, t, h, n };
        let ver = self.wkv_version(n);
        let st = &self.gpu().stream;
        let g: Vec<_> = rwkvab.iter().map(|x| x.device_ptr(st)).collect();
        let (h0p, _g1) = h0.device_ptr(st);
        let (cp, _g2) = ckpt.device_ptr(st);
        let (dyp, _g3) = dy.device_ptr(st);
        let (dhp, _g4) = dh0.device_ptr_mut(st);
        let (scp, _g5) = scratch.device_ptr_mut(st);
        let [g0, g1, g2, g3, g4, g5] = grads;
        let (d0, _h0) = g0.device_ptr_mut(st);
        let (d1, _h1) = g1.device_ptr_mut(st);
        let (d2, _h2) = g2.device_ptr_mut(st);
        let (d3, _h3) = g3.device_ptr_mut(st);
        let (d4, _h4) = g4.device_ptr_mut(st);
        let (d5, _h5) = g5.device_ptr_mut(st);
        let mut p = ver.base_params(&d);
        (p.r, p.w, p.k, p.v, p.a, p.b) = (g[0].0, g[1].0, g[2].0, g[3].0, g[4].0, g[5].0);
        (p.h0, p.ckpt, p.dy, p.dh0, p.scratch) = (h0p, cp, dyp, dhp, scp);
        (p.dr, p.dw, p.dk, p.dv, p.da, p.db) = (d0, d1, d2, d3, d4, d5);
        // SAFETY: every buffer was checked by the caller (exact [B, T, H, N] /
        // [B, H, N, N], ckpt and scratch at least either version's length);
        // the gradient buffers are distinct &mut borrows; dh_t is null;
        // guards alive until queued.
        unsafe {
            crate::wkv7::cuda::launch_raw_v(
                self.gpu(),
                ver,
                crate::wkv7::Dir::Bwd,
                crate::dtype::DType::F32,
                &p,
            )
        }
    }

    unsafe fn raw_act_bwd(
        &self,
        mode: Act,
        n: usize,
        c: usize,
        pre: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        dy: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let (pp, _g1) = pre.device_ptr(st);
        let bp = bias.map(|b| b.device_ptr(st));
        let (dp, _g2) = dy.device_ptr_mut(st);
        let p = ActBwdParams {
            n: n as i32,
            C: c as i32,
            mode: mode.code(),
            pre: pp,
            bias: bp.as_ref().map_or(0, |(q, _)| *q),
            dy: dp,
        };
        // SAFETY: pre, dy ≥ n floats, bias ≥ C (checked by the caller); guards
        // alive until queued.
        unsafe { self.tune("tune_act_bwd_f32", self.geom.elems(n), &p) }
    }

    unsafe fn raw_kk_prep_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        x: &KkBwdBufs<'_, CudaSlice<f32>>,
        dk: &mut CudaSlice<f32>,
        dda: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let (kp, _g1) = x.k.device_ptr(st);
        let (dap, _g2) = x.da.device_ptr(st);
        let (a0p, _g3) = x.a0.device_ptr(st);
        let (kkp, _g4) = x.k_k.device_ptr(st);
        let (kap, _g5) = x.k_a.device_ptr(st);
        let (dkop, _g6) = x.d_kout.device_ptr(st);
        let (dap2, _g7) = x.d_a.device_ptr(st);
        let (dbp, _g8) = x.d_b.device_ptr(st);
        let (dkp, _g9) = dk.device_ptr_mut(st);
        let (ddap, _g10) = dda.device_ptr_mut(st);
        let p = KkPrepBwdParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            k: kp,
            da: dap,
            a0: a0p,
            k_k: kkp,
            k_a: kap,
            d_kout: dkop,
            d_a: dap2,
            d_b: dbp,
            dk: dkp,
            dda: ddap,
        };
        // SAFETY: lengths checked by the caller; the outputs are distinct buffers;
        // guards alive until queued.
        unsafe { self.tune("tune_kk_prep_bwd_f32", self.geom.rows(rows * h), &p) }
    }

    unsafe fn raw_value_residual_bwd(
        &self,
        n: usize,
        c: usize,
        vraw: &CudaSlice<f32>,
        v_first: &CudaSlice<f32>,
        v0: &CudaSlice<f32>,
        dvp: &CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
        dvf: &mut CudaSlice<f32>,
        ddv: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let (rp, _g1) = vraw.device_ptr(st);
        let (fp, _g2) = v_first.device_ptr(st);
        let (v0p, _g3) = v0.device_ptr(st);
        let (dvpp, _g4) = dvp.device_ptr(st);
        let (dvq, _g5) = dv.device_ptr_mut(st);
        let (dvfq, _g6) = dvf.device_ptr_mut(st);
        let (ddvq, _g7) = ddv.device_ptr_mut(st);
        let p = ValueResidualBwdParams {
            n: n as i32,
            C: c as i32,
            vraw: rp,
            v_first: fp,
            v0: v0p,
            dvp: dvpp,
            dv: dvq,
            dvf: dvfq,
            ddv: ddvq,
        };
        // SAFETY: lengths checked by the caller; outputs are distinct buffers;
        // guards alive until queued.
        unsafe { self.tune("tune_value_residual_bwd_f32", self.geom.elems(n), &p) }
    }

    unsafe fn raw_group_norm_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        eps: f32,
        x: &GnBwdBufs<'_, CudaSlice<f32>>,
        g: GnBwdGrads<'_, CudaSlice<f32>>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let (yp, _g1) = x.y.device_ptr(st);
        let (wp, _g2) = x.weight.device_ptr(st);
        let (bp, _g3) = x.bias.device_ptr(st);
        let (rp, _g4) = x.r.device_ptr(st);
        let (kp, _g5) = x.k.device_ptr(st);
        let (vp, _g6) = x.v.device_ptr(st);
        let (rkp, _g7) = x.r_k.device_ptr(st);
        let (gp, _g8) = x.g.device_ptr(st);
        let (op, _g9) = x.dout.device_ptr(st);
        let (dyp, _h1) = g.dy.device_ptr_mut(st);
        let (drp, _h2) = g.dr.device_ptr_mut(st);
        let (dkp, _h3) = g.dk.device_ptr_mut(st);
        let (dvp, _h4) = g.dv.device_ptr_mut(st);
        let (dgp, _h5) = g.dg.device_ptr_mut(st);
        let p = GroupNormBwdParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            eps,
            y: yp,
            weight: wp,
            bias: bp,
            r: rp,
            k: kp,
            v: vp,
            r_k: rkp,
            g: gp,
            dout: op,
            dy: dyp,
            dr: drp,
            dk: dkp,
            dv: dvp,
            dg: dgp,
        };
        // SAFETY: lengths checked by the caller; the five outputs are distinct
        // buffers; guards alive until queued.
        unsafe { self.tune("tune_group_norm_bwd_f32", self.geom.rows(rows * h), &p) }
    }

    unsafe fn raw_wkv_bwd(
        &self,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&CudaSlice<f32>; 6],
        h0: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        grads: [&mut CudaSlice<f32>; 6],
        dh0: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let d = crate::wkv7::Dims { b: 1, t, h, n };
        let gpu = self.gpu();
        let [r, w, k, v, a, b] = rwkvab;
        let x = crate::wkv7::cuda::DevInputs {
            r,
            w,
            k,
            v,
            a,
            b,
            h0: Some(h0),
        };
        let mut y = self.zeros(d.seq_len())?;
        let ver = self.wkv_version(n);
        let mut ckpt = self.zeros(ver.ckpt_len(&d))?;
        let mut scratch = self.zeros(ver.scratch_len(&d))?;
        crate::wkv7::cuda::forward_dev_v(gpu, ver, &d, &x, &mut y, None, Some(&mut ckpt))?;
        let mut g = crate::wkv7::cuda::DevGrads {
            dr: self.zeros(d.seq_len())?,
            dw: self.zeros(d.seq_len())?,
            dk: self.zeros(d.seq_len())?,
            dv: self.zeros(d.seq_len())?,
            da: self.zeros(d.seq_len())?,
            db: self.zeros(d.seq_len())?,
            dh0: self.zeros(d.state_len())?,
        };
        crate::wkv7::cuda::backward_dev_v(gpu, ver, &d, &x, &ckpt, dy, None, &mut g, &mut scratch)?;
        let [dr, dw, dk, dv, da, db] = grads;
        std::mem::swap(dr, &mut g.dr);
        std::mem::swap(dw, &mut g.dw);
        std::mem::swap(dk, &mut g.dk);
        std::mem::swap(dv, &mut g.dv);
        std::mem::swap(da, &mut g.da);
        std::mem::swap(db, &mut g.db);
        std::mem::swap(dh0, &mut g.dh0);
        Ok(())
    }

    unsafe fn raw_xent(
        &self,
        r0: usize,
        rows: usize,
        v: usize,
        logits: &mut CudaSlice<f32>,
        targets: &CudaSlice<f32>,
        mask: &CudaSlice<f32>,
        soft: Option<&CudaSlice<f32>>,
        lam: f32,
        loss: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let (tp, _g1) = targets.device_ptr(st);
        let (mp, _g2) = mask.device_ptr(st);
        let sp = soft.map(|s| s.device_ptr(st));
        let (lp, _g3) = logits.device_ptr_mut(st);
        let (lossp, _g4) = loss.device_ptr_mut(st);
        let p = XentParams {
            rows: rows as i32,
            V: v as i32,
            lam,
            logits: lp,
            targets: tp + 4 * r0 as u64,
            mask: mp + 4 * r0 as u64,
            soft: sp.as_ref().map_or(0, |(q, _)| *q),
            loss: lossp,
        };
        // SAFETY: logits (and soft) ≥ rows·V floats, targets (in-range int32
        // ids as f32 bits) and mask ≥ r0 + rows, loss ≥ rows (checked by the
        // caller); guards alive until queued.
        unsafe { self.tune("tune_xent_f32", block_geom(&self.geom, rows), &p) }
    }

    unsafe fn raw_softmax(
        &self,
        rows: usize,
        v: usize,
        inv_temp: f32,
        x: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let (xp, _g) = x.device_ptr_mut(st);
        let p = SoftmaxParams {
            rows: rows as i32,
            V: v as i32,
            inv_temp,
            x: xp,
        };
        // SAFETY: x ≥ rows·V floats (checked by the caller); the guard is
        // alive until the launch is queued.
        unsafe { self.tune("tune_softmax_f32", block_geom(&self.geom, rows), &p) }
    }

    unsafe fn raw_outer_acc(
        &self,
        off: usize,
        rows: usize,
        h: usize,
        n: usize,
        r: &CudaSlice<f32>,
        acc: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let (rp, _g1) = r.device_ptr(st);
        let (ap, _g2) = acc.device_ptr_mut(st);
        let p = OuterAccParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            r: rp + off as u64 * 4,
            acc: ap,
        };
        // SAFETY: r ≥ rows·H·N, acc ≥ H·N·N floats (checked by the caller); guards
        // alive until queued.
        unsafe { self.tune("tune_outer_acc_f32", self.geom.elems(h * n * n), &p) }
    }

    unsafe fn raw_up_fwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &UpBufs<'_, CudaSlice<f32>>,
        r: &CudaSlice<f32>,
        phi: &mut CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let st = &self.gpu().stream;
        let (rp, _g1) = r.device_ptr(st);
        let (cp, _g2) = k.centres.device_ptr(st);
        let (gp, _g3) = k.gamma.device_ptr(st);
        let (up, _g4) = k.u.device_ptr(st);
        let (pp, _g5) = phi.device_ptr_mut(st);
        let (yp, _g6) = y.device_ptr_mut(st);
        let p = UpFwdParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            M: k.m as i32,
            r: rp,
            centres: cp,
            gamma: gp,
            u: up,
            phi: pp,
            y: yp,
            linear: k.linear as i32,
        };
        // SAFETY: r, y ≥ rows·H·N, centres ≥ H·M·N, gamma ≥ H, u ≥ H·N·M, phi ≥
        // rows·H·M floats (checked by the caller); phi and y are distinct buffers
        // (&mut borrows); guards alive until queued.
        unsafe { self.tune("tune_up_fwd_f32", self.geom.rows(rows * h), &p) }
    }

    unsafe fn raw_up_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &UpBufs<'_, CudaSlice<f32>>,
        r: &CudaSlice<f32>,
        phi: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        du: &mut CudaSlice<f32>,
        dr: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let st = &self.gpu().stream;
        let (rp, _g1) = r.device_ptr(st);
        let (cp, _g2) = k.centres.device_ptr(st);
        let (gp, _g3) = k.gamma.device_ptr(st);
        let (up, _g4) = k.u.device_ptr(st);
        let (pp, _g5) = phi.device_ptr(st);
        let (dyp, _g6) = dy.device_ptr(st);
        let (dup, _g7) = du.device_ptr_mut(st);
        let (drp, _g8) = dr.device_ptr_mut(st);
        let p = UpBwdParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            M: k.m as i32,
            r: rp,
            centres: cp,
            gamma: gp,
            u: up,
            phi: pp,
            dy: dyp,
            du: dup,
            dr: drp,
            linear: k.linear as i32,
        };
        // SAFETY: r, dy, dr ≥ rows·H·N, phi ≥ rows·H·M, centres ≥ H·M·N, gamma ≥
        // H, u and du ≥ H·N·M floats (checked by the caller); du and dr are
        // distinct buffers (&mut borrows); guards alive until both are queued.
        unsafe {
            self.tune("tune_up_bwd_du_f32", self.geom.elems(h * n * k.m), &p)?;
            self.tune("tune_up_bwd_dr_f32", self.geom.rows(rows * h), &p)
        }
    }

    unsafe fn raw_batched_matmul(
        &self,
        groups: usize,
        n: usize,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        trans_b: bool,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let (ap, _g1) = a.device_ptr(st);
        let (bp, _g2) = b.device_ptr(st);
        let (op, _g3) = out.device_ptr_mut(st);
        let p = BatchedMatmulParams {
            groups: groups as i32,
            N: n as i32,
            trans_b: trans_b as i32,
            a: ap,
            b: bp,
            out: op,
        };
        // SAFETY: a, b, out ≥ groups·N·N floats (checked by the caller); out is a
        // distinct buffer; guards alive until queued.
        unsafe {
            self.tune(
                "tune_batched_matmul_f32",
                self.geom.elems(groups * n * n),
                &p,
            )
        }
    }

    unsafe fn raw_adam(
        &self,
        n: usize,
        s: &AdamStep,
        clip: f32,
        stats: Option<&CudaSlice<f32>>,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let (gp, _g1) = g.device_ptr(st);
        let (pp, _g2) = p.device_ptr_mut(st);
        let (mp, _g3) = m.device_ptr_mut(st);
        let (vp, _g4) = v.device_ptr_mut(st);
        let sp = stats.map(|x| x.device_ptr(st));
        let q = AdamParams {
            n: n as i32,
            lr: s.lr,
            beta1: s.beta1,
            beta2: s.beta2,
            eps: s.eps,
            weight_decay: s.weight_decay,
            bc1: s.bc1,
            bc2: s.bc2,
            grad_scale: s.grad_scale,
            clip,
            stats: sp.as_ref().map_or(0, |(q, _)| *q),
            p: pp,
            g: gp,
            m: mp,
            v: vp,
        };
        // SAFETY: p, g, m, v ≥ n floats (checked by the caller); p, m, v distinct
        // buffers; guards alive until queued.
        unsafe { self.tune("tune_adam_f32", self.geom.elems(n), &q) }
    }

    unsafe fn raw_dbp_step(
        &self,
        groups: usize,
        n: usize,
        scale: f32,
        eta: f32,
        kappa: f32,
        max_norm: f32,
        z: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let (zp, _g1) = z.device_ptr(st);
        let (mp, _g2) = m.device_ptr_mut(st);
        let p = DbpStepParams {
            groups: groups as i32,
            N: n as i32,
            scale,
            eta,
            kappa,
            max_norm,
            z: zp,
            m: mp,
        };
        // SAFETY: z, m ≥ groups·N·N floats, N ≤ 1024 (checked by the caller),
        // distinct buffers; guards alive until queued.
        unsafe { self.tune("tune_dbp_step_f32", block_geom(&self.geom, groups), &p) }
    }

    unsafe fn raw_eye_axpy(
        &self,
        groups: usize,
        n: usize,
        alpha: f32,
        beta: f32,
        x: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let xg = x.map(|x| x.device_ptr(st));
        let (op, _g2) = out.device_ptr_mut(st);
        let p = EyeAxpyParams {
            groups: groups as i32,
            N: n as i32,
            alpha,
            beta,
            x: xg.as_ref().map_or(op, |(q, _)| *q),
            out: op,
        };
        // SAFETY: x (or out itself, element-wise in place) and out hold
        // groups·N·N floats (checked by the caller); guards alive until queued.
        unsafe { self.tune("tune_eye_axpy_f32", self.geom.elems(groups * n * n), &p) }
    }

    unsafe fn raw_sdt_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        x: &SdtBwdBufs<'_, CudaSlice<f32>>,
        dkk: &mut CudaSlice<f32>,
        dka: &mut CudaSlice<f32>,
        drk: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let ins = [
            x.kk.k,
            x.kk.da,
            x.kk.a0,
            x.kk.k_k,
            x.kk.d_kout,
            x.kk.d_a,
            x.kk.d_b,
            x.r,
            x.kt,
            x.v,
            x.g,
            x.dout,
        ];
        let g: Vec<_> = ins.iter().map(|b| b.device_ptr(st)).collect();
        let q = |i: usize| g[i].0;
        let (o1, _g1) = dkk.device_ptr_mut(st);
        let (o2, _g2) = dka.device_ptr_mut(st);
        let (o3, _g3) = drk.device_ptr_mut(st);
        let p = SdtBwdParams {
            rows: rows as i32,
            H: h as i32,
            N: n as i32,
            k: q(0),
            da: q(1),
            a0: q(2),
            k_k: q(3),
            d_kout: q(4),
            d_a: q(5),
            d_b: q(6),
            r: q(7),
            kt: q(8),
            v: q(9),
            g: q(10),
            dout: q(11),
            dkk: o1,
            dka: o2,
            drk: o3,
        };
        // SAFETY: sizes checked by the caller; every guard is alive until
        // the launch is queued.
        unsafe { self.tune("tune_sdt_bwd_f32", self.geom.rows(rows * h), &p) }
    }

    unsafe fn raw_mask_mul(
        &self,
        n: usize,
        m: &CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let (mp, _g1) = m.device_ptr(st);
        let (xp, _g2) = x.device_ptr_mut(st);
        let p = MaskMulParams {
            n: n as i32,
            m: mp,
            x: xp,
        };
        // SAFETY: m and x hold ≥ n floats (checked by the caller); guards
        // alive until queued.
        unsafe { self.tune("tune_mask_mul_f32", self.geom.elems(n), &p) }
    }

    unsafe fn raw_lora_in(
        &self,
        rows: usize,
        k: usize,
        x: &CudaSlice<f32>,
        x_off: usize,
        ldx: usize,
        seqs: (usize, usize),
        seed: u32,
        keep: f32,
        scale: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let (xp, _g1) = x.device_ptr(st);
        let (op, _g2) = out.device_ptr_mut(st);
        let p = LoraInParams {
            rows: rows as i32,
            K: k as i32,
            ldx: ldx as i32,
            T: seqs.0 as i32,
            seq0: seqs.1 as i32,
            seed: seed as i32,
            keep,
            scale,
            x: xp + 4 * x_off as u64,
            out: op,
        };
        // SAFETY: x from x_off holds (rows−1)·ldx + k floats and out rows·k
        // (checked by the caller); guards alive until queued.
        unsafe { self.tune("tune_lora_in_f32", self.geom.elems(rows * k), &p) }
    }

    unsafe fn raw_reduce_acc(
        &self,
        squares: bool,
        n: usize,
        x: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        slot: usize,
    ) -> Result<()> {
        let st = &self.gpu().stream;
        let (xp, _g1) = x.device_ptr(st);
        let (op, _g2) = out.device_ptr_mut(st);
        let p = ReduceParams {
            n: n as i32,
            mode: squares as i32,
            slot: slot as i32,
            x: xp,
            out: op,
        };
        // SAFETY: x ≥ n and out ≥ slot + 1 floats (checked by the caller);
        // one block as the kernel requires; guards alive until queued.
        unsafe { self.tune("tune_reduce_f32", block_geom(&self.geom, 1), &p) }
    }

    unsafe fn raw_sumsq(&self, n: usize, x: &CudaSlice<f32>) -> Result<f64> {
        super::fits_i32("sumsq", &[n])?;
        let g = block_geom(&self.geom, sumsq_blocks(&self.geom, n));
        let mut partial = self.zeros(g.0 .0 as usize)?;
        {
            let st = &self.gpu().stream;
            let (xp, _g1) = x.device_ptr(st);
            let (pp, _g2) = partial.device_ptr_mut(st);
            let p = SumsqParams {
                n: n as i32,
                x: xp,
                partial: pp,
            };
            // SAFETY: x ≥ n floats (checked by the caller); partial holds one
            // float per block of the grid launched; guards alive until queued.
            unsafe { self.tune("tune_sumsq_f32", g, &p)? };
        }
        let h = self.download(&partial)?;
        Ok(h.iter().map(|&v| v as f64).sum())
    }
}
