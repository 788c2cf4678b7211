//! The CPU backend of the ops traits: [`CpuOps<R>`] runs the Rust twins
//! ([`reference`](mod@super::reference), [`backward_ref`](mod@super::backward_ref))
//! on host `Vec<R>` buffers, for `R = f32` (the CPU tuning engine, fast:
//! the chunked WKV of [`crate::wkv7::fast`], the blocked GEMM of
//! [`super::gemm`]) and `R = f64` (the finite-difference checks run the
//! production code path in double precision: the plain WKV reference
//! [`crate::wkv7::reference`]).
//!
//! The traits speak f32 at the host boundary (`upload`, `download`,
//! `write`); [`DeviceOps::upload_f64`] / [`DeviceOps::download_f64`] move
//! f64 data without rounding. Token ids are stored as the f32 bit patterns of
//! the `u32` ids (as on every backend); in an f64 buffer they are those f32
//! values widened, which is exact, and read back through f32.
//!
//! The hooks run the Rust twins, which index safely (a size the provided
//! method did not check would panic, never read out of bounds).
use std::marker::PhantomData;

use super::backward::{BackwardOps, GnBwdBufs, GnBwdGrads, KkBwdBufs, SdtBwdBufs, UpBufs};
use super::backward_ref::{self as bref, AdamStep};
use super::{
    counters, gemm, par_rows, reference, row_pieces, split_rows, Act, BonusBufs, DeviceOps,
    GemmPrecision,
};
use crate::error::Result;
use crate::real::Real;
use crate::wkv7::{self, reference::RefInputs, Dims};
use rayon::prelude::*;

/// The float types [`CpuOps`] runs in, with the WKV implementation each
/// uses: `f32` the chunked, checkpointing [`crate::wkv7::fast`]; `f64` the
/// plain reference [`crate::wkv7::reference`] (which keeps no checkpoints:
/// its backward re-runs the forward from the initial state).
pub trait CpuReal: Real + wkv7::reference::Real {
    /// (checkpoints, scratch) elements of [`Self::wkv_fwd_ckpt`] /
    /// [`Self::wkv_bwd_ckpt`], at least 1 each.
    fn wkv_ws_len(b: usize, t: usize, h: usize, n: usize) -> (usize, usize);
    /// WKV forward of `b` sequences from `h0`, writing `y`, the checkpoints
    /// and (when given) the final state.
    #[allow(clippy::too_many_arguments)]
    fn wkv_fwd_ckpt(
        d: &Dims,
        x: [&[Self]; 6],
        h0: &[Self],
        y: &mut [Self],
        ckpt: &mut [Self],
        h_t: Option<&mut [Self]>,
    ) -> Result<()>;
    /// WKV backward from the forward's checkpoints (or from `h0`).
    #[allow(clippy::too_many_arguments)]
    fn wkv_bwd_ckpt(
        d: &Dims,
        x: [&[Self]; 6],
        h0: &[Self],
        ckpt: &[Self],
        dy: &[Self],
        grads: [&mut [Self]; 6],
        dh0: &mut [Self],
        scratch: &mut [Self],
    ) -> Result<()>;
}

impl CpuReal for f32 {
    fn wkv_ws_len(b: usize, t: usize, h: usize, n: usize) -> (usize, usize) {
        let (ck, sc) = wkv7::fast::ws_len(b, t, h, n);
        (ck.max(1), sc.max(1))
    }
    fn wkv_fwd_ckpt(
        d: &Dims,
        x: [&[f32]; 6],
        h0: &[f32],
        y: &mut [f32],
        ckpt: &mut [f32],
        h_t: Option<&mut [f32]>,
    ) -> Result<()> {
        let [r, w, k, v, a, b] = x;
        let x = wkv7::fast::Inputs { r, w, k, v, a, b };
        wkv7::fast::forward(d.b, d.t, d.h, d.n, &x, h0, y, ckpt, h_t);
        Ok(())
    }
    fn wkv_bwd_ckpt(
        d: &Dims,
        x: [&[f32]; 6],
        _h0: &[f32],
        ckpt: &[f32],
        dy: &[f32],
        grads: [&mut [f32]; 6],
        dh0: &mut [f32],
        scratch: &mut [f32],
    ) -> Result<()> {
        let [r, w, k, v, a, b] = x;
        let x = wkv7::fast::Inputs { r, w, k, v, a, b };
        wkv7::fast::backward(d.b, d.t, d.h, d.n, &x, ckpt, dy, grads, dh0, scratch);
        Ok(())
    }
}

/// The reference's inputs from the six `[B, T, H, N]` slices (cut to the
/// problem's size) and `h0`.
fn ref_inputs<'a, R>(d: &Dims, x: [&'a [R]; 6], h0: &'a [R]) -> RefInputs<'a, R> {
    let (sl, st) = (d.seq_len(), d.state_len());
    RefInputs {
        r: &x[0][..sl],
        w: &x[1][..sl],
        k: &x[2][..sl],
        v: &x[3][..sl],
        a: &x[4][..sl],
        b: &x[5][..sl],
        h0: Some(&h0[..st]),
    }
}

impl CpuReal for f64 {
    fn wkv_ws_len(_b: usize, _t: usize, _h: usize, _n: usize) -> (usize, usize) {
        (1, 1)
    }
    fn wkv_fwd_ckpt(
        d: &Dims,
        x: [&[f64]; 6],
        h0: &[f64],
        y: &mut [f64],
        _ckpt: &mut [f64],
        h_t: Option<&mut [f64]>,
    ) -> Result<()> {
        let (yy, hh) = wkv7::reference::forward(d, &ref_inputs(d, x, h0))?;
        y[..yy.len()].copy_from_slice(&yy);
        if let Some(h_t) = h_t {
            h_t[..hh.len()].copy_from_slice(&hh);
        }
        Ok(())
    }
    fn wkv_bwd_ckpt(
        d: &Dims,
        x: [&[f64]; 6],
        h0: &[f64],
        _ckpt: &[f64],
        dy: &[f64],
        grads: [&mut [f64]; 6],
        dh0: &mut [f64],
        _scratch: &mut [f64],
    ) -> Result<()> {
        let g = wkv7::reference::backward(d, &ref_inputs(d, x, h0), &dy[..d.seq_len()], None)?;
        let [dr, dw, dk, dv, da, db] = grads;
        for (dst, src) in [dr, dw, dk, dv, da, db]
            .into_iter()
            .zip([&g.dr, &g.dw, &g.dk, &g.dv, &g.da, &g.db])
        {
            dst[..src.len()].copy_from_slice(src);
        }
        dh0[..g.dh0.len()].copy_from_slice(&g.dh0);
        Ok(())
    }
}

/// Parts a tuning step cuts a batch of several sequences into on the CPU
/// ([`DeviceOps::host_parts`]): run at once on rayon's threads, each a
/// batched step of its own (as many as the 2-core machines CI and
/// development run on, times two, so the parts also balance on 4 cores).
pub const HOST_PARTS: usize = 4;

/// The operations on the CPU in float type `R` (f32 by default).
#[derive(Clone, Debug, Default)]
pub struct CpuOps<R = f32> {
    counters: std::sync::Arc<counters::Counters>,
    _r: PhantomData<R>,
}

impl CpuOps {
    /// The f32 CPU backend with fresh counters.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<R: Real> CpuOps<R> {
    /// A new buffer holding `h` converted (counted as an upload).
    fn up<A: Real>(&self, h: &[A]) -> Vec<R> {
        let bytes = std::mem::size_of::<R>() * h.len();
        self.counters.alloc(bytes);
        self.counters.upload(bytes);
        conv(h)
    }
    /// `b` converted to the host type (counted as a download).
    fn down<A: Real>(&self, b: &[R]) -> Vec<A> {
        self.counters.download(std::mem::size_of_val(b));
        conv(b)
    }
}

impl CpuOps<f64> {
    /// The f64 CPU backend with fresh counters (for checks).
    pub fn f64() -> Self {
        Self::default()
    }
}

/// `x` converted element-wise.
fn conv<A: Real, B: Real>(x: &[A]) -> Vec<B> {
    x.iter().map(|&v| B::from_f64(v.to_f64())).collect()
}

/// The `u32` ids stored (as f32 bit patterns) in the first `n` elements.
fn ids_of<R: Real>(x: &[R], n: usize) -> Vec<u32> {
    x[..n].iter().map(|v| v.to_f32().to_bits()).collect()
}

/// The WKV forward of `b = 1` sequence in f64 (the reference), from and
/// into `state`: what [`DeviceOps::wkv`] and [`BackwardOps::wkv_bwd`] run on
/// the CPU in every float type.
fn wkv_f64<R: Real>(t: usize, h: usize, n: usize, x: [&[R]; 6], h0: &[R]) -> Result<WkvF64> {
    let d = Dims { b: 1, t, h, n };
    let (sl, st) = (d.seq_len(), d.state_len());
    let f: Vec<Vec<f64>> = x.iter().map(|v| conv(&v[..sl])).collect();
    let h0: Vec<f64> = conv(&h0[..st]);
    Ok(WkvF64 { d, f, h0 })
}

/// f64 copies of a WKV problem (see [`wkv_f64`]).
struct WkvF64 {
    d: Dims,
    f: Vec<Vec<f64>>,
    h0: Vec<f64>,
}

impl WkvF64 {
    fn inputs(&self) -> RefInputs<'_, f64> {
        RefInputs {
            r: &self.f[0],
            w: &self.f[1],
            k: &self.f[2],
            v: &self.f[3],
            a: &self.f[4],
            b: &self.f[5],
            h0: Some(&self.h0),
        }
    }
}

fn put<R: Real>(dst: &mut [R], src: &[f64]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = R::from_f64(s);
    }
}

impl<R: CpuReal> DeviceOps for CpuOps<R> {
    type Buf = Vec<R>;

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn host_parts(&self) -> usize {
        HOST_PARTS
    }
    fn len(&self, b: &Vec<R>) -> usize {
        b.len()
    }
    fn counters(&self) -> &counters::Counters {
        &self.counters
    }
    fn zeros(&self, n: usize) -> Result<Vec<R>> {
        self.counters.alloc(std::mem::size_of::<R>() * n);
        Ok(vec![R::ZERO; n])
    }
    fn upload(&self, h: &[f32]) -> Result<Vec<R>> {
        Ok(self.up(h))
    }
    fn download(&self, b: &Vec<R>) -> Result<Vec<f32>> {
        Ok(self.down(b))
    }
    fn upload_f64(&self, h: &[f64]) -> Result<Vec<R>> {
        Ok(self.up(h))
    }
    fn download_f64(&self, b: &Vec<R>) -> Result<Vec<f64>> {
        Ok(self.down(b))
    }
    unsafe fn raw_write(&self, h: &[f32], dst: &mut Vec<R>) -> Result<()> {
        put(&mut dst[..h.len()], &conv::<f32, f64>(h));
        Ok(())
    }
    unsafe fn raw_zero(&self, x: &mut Vec<R>) -> Result<()> {
        x.fill(R::ZERO);
        Ok(())
    }
    unsafe fn raw_copy(
        &self,
        src: &Vec<R>,
        src_off: usize,
        dst: &mut Vec<R>,
        dst_off: usize,
        n: usize,
    ) -> Result<()> {
        dst[dst_off..dst_off + n].copy_from_slice(&src[src_off..src_off + n]);
        Ok(())
    }
    unsafe fn raw_embed(
        &self,
        t: usize,
        ids: &Vec<R>,
        table: &Vec<R>,
        c: usize,
        out: &mut Vec<R>,
    ) -> Result<()> {
        reference::embed(&ids_of(ids, t), table, c, out);
        Ok(())
    }
    unsafe fn raw_matmul(
        &self,
        x: &Vec<R>,
        x_off: usize,
        ldx: usize,
        m: usize,
        w: &Vec<R>,
        n: usize,
        k: usize,
        y: &mut Vec<R>,
    ) -> Result<()> {
        if m > 0 {
            gemm::xwt_ld(&x[x_off..], ldx, m, k, w, n, y);
        }
        Ok(())
    }
    type Mat = Vec<R>;
    fn gemm_precision(&self) -> GemmPrecision {
        GemmPrecision::F32
    }
    fn upload_mat(&self, h: &[f32]) -> Result<Vec<R>> {
        Ok(conv(h))
    }
    fn mat_len(&self, w: &Vec<R>) -> usize {
        w.len()
    }
    unsafe fn raw_matmul_w(
        &self,
        x: &Vec<R>,
        x_off: usize,
        ldx: usize,
        m: usize,
        w: &Vec<R>,
        n: usize,
        k: usize,
        y: &mut Vec<R>,
    ) -> Result<()> {
        // matrices are plain buffers here: the same product as `matmul`
        // SAFETY: the caller checked the same sizes `raw_matmul` relies on.
        unsafe { self.raw_matmul(x, x_off, ldx, m, w, n, k, y) }
    }
    unsafe fn raw_layer_norm(
        &self,
        x: &Vec<R>,
        x_off: usize,
        rows: usize,
        c: usize,
        weight: &Vec<R>,
        bias: &Vec<R>,
        eps: f32,
        y: &mut Vec<R>,
    ) -> Result<()> {
        let x = &x[x_off..];
        par_rows(rows, c, y, |r0, nr, yr| {
            reference::layer_norm(&x[r0 * c..], nr, c, weight, bias, eps, yr)
        });
        Ok(())
    }
    unsafe fn raw_group_norm(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        eps: f32,
        x: &mut Vec<R>,
        weight: &Vec<R>,
        bias: &Vec<R>,
        bonus: Option<BonusBufs<'_, Vec<R>>>,
        g: Option<&Vec<R>>,
    ) -> Result<()> {
        let c = h * n;
        let pcs = row_pieces(rows, c);
        let xs = split_rows(x, &pcs, c);
        pcs.par_iter().zip(xs).for_each(|(&(r0, nr), xr)| {
            let o = r0 * c;
            let bonus = bonus.as_ref().map(|b| reference::Bonus {
                r: &b.r[o..],
                k: &b.k[o..],
                v: &b.v[o..],
                r_k: b.r_k,
            });
            let g = g.map(|v| &v[o..]);
            reference::group_norm(xr, nr, h, n, eps, weight, bias, bonus, g);
        });
        Ok(())
    }
    unsafe fn raw_kk_prep(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &Vec<R>,
        da: &Vec<R>,
        a0: &Vec<R>,
        k_k: &Vec<R>,
        k_a: &Vec<R>,
        k_out: &mut Vec<R>,
        a: &mut Vec<R>,
        b: &mut Vec<R>,
    ) -> Result<()> {
        let c = h * n;
        let pcs = row_pieces(rows, c);
        let (ko, aa, bb) = (
            split_rows(k_out, &pcs, c),
            split_rows(a, &pcs, c),
            split_rows(b, &pcs, c),
        );
        pcs.par_iter()
            .zip(ko)
            .zip(aa)
            .zip(bb)
            .for_each(|(((&(r0, nr), ko), aa), bb)| {
                let o = r0 * c;
                reference::kk_prep(nr, h, n, &k[o..], &da[o..], a0, k_k, k_a, ko, aa, bb);
            });
        Ok(())
    }
    unsafe fn raw_token_shift(
        &self,
        b: usize,
        t: usize,
        c: usize,
        x: &Vec<R>,
        state: &mut Vec<R>,
        mu: &Vec<R>,
        n_mix: usize,
        out: &mut Vec<R>,
    ) -> Result<()> {
        let pcs: Vec<(usize, usize)> = (0..b).map(|i| (i, 1)).collect();
        let (ss, os) = (
            split_rows(state, &pcs, c),
            split_rows(out, &pcs, t * n_mix * c),
        );
        ss.into_par_iter()
            .zip(os)
            .enumerate()
            .for_each(|(i, (st, o))| {
                reference::token_shift(t, c, &x[i * t * c..], st, mu, n_mix, o);
            });
        Ok(())
    }
    unsafe fn raw_act(
        &self,
        mode: Act,
        x: &mut Vec<R>,
        c: usize,
        bias: Option<&Vec<R>>,
    ) -> Result<()> {
        let bias = bias.map(|b| &b[..]);
        let rows = x.len() / c;
        let (head, tail) = x.split_at_mut(rows * c);
        par_rows(rows, c, head, |_, _, xr| reference::act(mode, xr, c, bias));
        reference::act(mode, tail, c, bias);
        Ok(())
    }
    unsafe fn raw_value_residual(
        &self,
        c: usize,
        v: &mut Vec<R>,
        v_first: &Vec<R>,
        v0: &Vec<R>,
        dv: &Vec<R>,
    ) -> Result<()> {
        let rows = v.len() / c;
        par_rows(rows, c, v, |r0, _, vr| {
            reference::value_residual(c, vr, &v_first[r0 * c..], v0, &dv[r0 * c..])
        });
        Ok(())
    }
    unsafe fn raw_add(&self, n: usize, x: &mut Vec<R>, y: &Vec<R>) -> Result<()> {
        par_rows(n, 1, x, |i0, ni, xr| reference::add(xr, &y[i0..i0 + ni]));
        Ok(())
    }
    unsafe fn raw_wkv(
        &self,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Vec<R>; 6],
        state: &mut Vec<R>,
        y: &mut Vec<R>,
    ) -> Result<()> {
        let p = wkv_f64(t, h, n, rwkvab.map(|v| v.as_slice()), state)?;
        let (yy, hh) = wkv7::reference::forward(&p.d, &p.inputs())?;
        *y = conv(&yy);
        *state = conv(&hh);
        Ok(())
    }
}

impl<R: CpuReal> BackwardOps for CpuOps<R> {
    unsafe fn raw_matmul_t(
        &self,
        dy: &Vec<R>,
        m: usize,
        w: &Vec<R>,
        n: usize,
        k: usize,
        dx: &mut Vec<R>,
    ) -> Result<()> {
        gemm::xw(dy, m, n, w, k, dx);
        Ok(())
    }
    unsafe fn raw_matmul_tn(
        &self,
        dy: &Vec<R>,
        m: usize,
        n: usize,
        x: &Vec<R>,
        x_off: usize,
        ldx: usize,
        k: usize,
        dw: &mut Vec<R>,
        accumulate: bool,
    ) -> Result<()> {
        // dw = dyᵀ · x through the blocked GEMM: dyᵀ [n, m] and x [m, k]
        // made dense first
        let mut dyt = vec![R::ZERO; n * m];
        for i in 0..m {
            for o in 0..n {
                dyt[o * m + i] = dy[i * n + o];
            }
        }
        let xs = &x[x_off..];
        let xd: Vec<R> = (0..m)
            .flat_map(|i| xs[i * ldx..i * ldx + k].iter().copied())
            .collect();
        let mut out = vec![R::ZERO; n * k];
        if m > 0 {
            gemm::xw(&dyt, n, m, &xd, k, &mut out);
        }
        for (d, o) in dw[..n * k].iter_mut().zip(out) {
            *d = if accumulate { *d + o } else { o };
        }
        Ok(())
    }
    unsafe fn raw_layer_norm_bwd(
        &self,
        x: &Vec<R>,
        off: usize,
        rows: usize,
        c: usize,
        weight: &Vec<R>,
        eps: f32,
        dy: &Vec<R>,
        dx: &mut Vec<R>,
    ) -> Result<()> {
        // rows are independent: dx rows and (x, dy) rows split together
        let (x, dx) = (&x[off..], &mut dx[off..]);
        par_rows(rows, c, dx, |r0, nr, dc| {
            bref::layer_norm_bwd(&x[r0 * c..], nr, c, weight, eps, &dy[r0 * c..], dc)
        });
        Ok(())
    }
    unsafe fn raw_token_shift_bwd(
        &self,
        b: usize,
        t: usize,
        c: usize,
        dmix: &[&Vec<R>],
        mu: &Vec<R>,
        dstate: &mut Vec<R>,
        dx: &mut Vec<R>,
    ) -> Result<()> {
        let tc = t * c;
        if t == 0 {
            return Ok(());
        }
        dstate[..b * c]
            .par_chunks_mut(c)
            .zip(dx[..b * tc].par_chunks_mut(tc))
            .enumerate()
            .for_each(|(i, (ds, dxi))| {
                let dm: Vec<&[R]> = dmix.iter().map(|d| &d[i * tc..]).collect();
                bref::token_shift_bwd(t, c, &dm, mu, ds, dxi);
            });
        Ok(())
    }
    unsafe fn raw_sum_batch(
        &self,
        b: usize,
        n: usize,
        src: &Vec<R>,
        dst: &mut Vec<R>,
        accumulate: bool,
    ) -> Result<()> {
        bref::sum_batch(b, n, src, dst, accumulate);
        Ok(())
    }
    fn wkv_ws_len(&self, b: usize, t: usize, h: usize, n: usize) -> (usize, usize) {
        R::wkv_ws_len(b, t, h, n)
    }
    unsafe fn raw_wkv_fwd_ckpt(
        &self,
        b: usize,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Vec<R>; 6],
        h0: &Vec<R>,
        y: &mut Vec<R>,
        ckpt: &mut Vec<R>,
        h_t: Option<&mut Vec<R>>,
    ) -> Result<()> {
        let d = Dims { b, t, h, n };
        R::wkv_fwd_ckpt(
            &d,
            rwkvab.map(|x| x.as_slice()),
            h0,
            y,
            ckpt,
            h_t.map(|v| v.as_mut_slice()),
        )
    }
    unsafe fn raw_wkv_bwd_ckpt(
        &self,
        b: usize,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Vec<R>; 6],
        h0: &Vec<R>,
        ckpt: &Vec<R>,
        dy: &Vec<R>,
        grads: [&mut Vec<R>; 6],
        dh0: &mut Vec<R>,
        scratch: &mut Vec<R>,
    ) -> Result<()> {
        let d = Dims { b, t, h, n };
        R::wkv_bwd_ckpt(
            &d,
            rwkvab.map(|x| x.as_slice()),
            h0,
            ckpt,
            dy,
            grads.map(|g| g.as_mut_slice()),
            dh0,
            scratch,
        )
    }
    unsafe fn raw_act_bwd(
        &self,
        mode: Act,
        n: usize,
        c: usize,
        pre: &Vec<R>,
        bias: Option<&Vec<R>>,
        dy: &mut Vec<R>,
    ) -> Result<()> {
        let bias = bias.map(|b| b.as_slice());
        let rows = n / c;
        let (dh, dt) = dy[..n].split_at_mut(rows * c);
        par_rows(rows, c, dh, |r0, nr, d| {
            bref::act_bwd(mode, nr * c, c, &pre[r0 * c..], bias, d)
        });
        bref::act_bwd(mode, n - rows * c, c, &pre[rows * c..], bias, dt);
        Ok(())
    }
    unsafe fn raw_kk_prep_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        x: &KkBwdBufs<'_, Vec<R>>,
        dk: &mut Vec<R>,
        dda: &mut Vec<R>,
    ) -> Result<()> {
        let c = h * n;
        let pcs = row_pieces(rows, c);
        let (ks, ds) = (split_rows(dk, &pcs, c), split_rows(dda, &pcs, c));
        pcs.par_iter()
            .zip(ks)
            .zip(ds)
            .for_each(|((&(r0, nr), dk), dda)| {
                bref::kk_prep_bwd(nr, h, n, &kk_rows(x, r0 * c), dk, dda);
            });
        Ok(())
    }
    unsafe fn raw_value_residual_bwd(
        &self,
        n: usize,
        c: usize,
        vraw: &Vec<R>,
        v_first: &Vec<R>,
        v0: &Vec<R>,
        dvp: &Vec<R>,
        dv: &mut Vec<R>,
        dvf: &mut Vec<R>,
        ddv: &mut Vec<R>,
    ) -> Result<()> {
        if n % c != 0 {
            bref::value_residual_bwd(n, c, vraw, v_first, v0, dvp, dv, dvf, ddv);
            return Ok(());
        }
        let pcs = row_pieces(n / c, c);
        let (a, b, d) = (
            split_rows(dv, &pcs, c),
            split_rows(dvf, &pcs, c),
            split_rows(ddv, &pcs, c),
        );
        pcs.par_iter()
            .zip(a)
            .zip(b)
            .zip(d)
            .for_each(|(((&(r0, nr), dv), dvf), ddv)| {
                let o = r0 * c;
                let (vr, vf, dp) = (&vraw[o..], &v_first[o..], &dvp[o..]);
                bref::value_residual_bwd(nr * c, c, vr, vf, v0, dp, dv, dvf, ddv);
            });
        Ok(())
    }
    unsafe fn raw_group_norm_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        eps: f32,
        x: &GnBwdBufs<'_, Vec<R>>,
        g: GnBwdGrads<'_, Vec<R>>,
    ) -> Result<()> {
        let r = bref::GnBwd {
            y: x.y,
            weight: x.weight,
            bias: x.bias,
            r: x.r,
            k: x.k,
            v: x.v,
            r_k: x.r_k,
            g: x.g,
            dout: x.dout,
        };
        let c = h * n;
        let pcs = row_pieces(rows, c);
        let outs = split_rows(g.dy, &pcs, c)
            .into_iter()
            .zip(split_rows(g.dr, &pcs, c))
            .zip(split_rows(g.dk, &pcs, c))
            .zip(split_rows(g.dv, &pcs, c))
            .zip(split_rows(g.dg, &pcs, c))
            .map(|((((dy, dr), dk), dv), dg)| bref::GnBwdOut { dy, dr, dk, dv, dg })
            .collect::<Vec<_>>();
        pcs.par_iter().zip(outs).for_each(|(&(r0, nr), out)| {
            let o = r0 * c;
            let r = bref::GnBwd {
                y: &r.y[o..],
                weight: r.weight,
                bias: r.bias,
                r: &r.r[o..],
                k: &r.k[o..],
                v: &r.v[o..],
                r_k: r.r_k,
                g: &r.g[o..],
                dout: &r.dout[o..],
            };
            bref::group_norm_bwd(nr, h, n, eps, &r, out);
        });
        Ok(())
    }
    unsafe fn raw_wkv_bwd(
        &self,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Vec<R>; 6],
        h0: &Vec<R>,
        dy: &Vec<R>,
        grads: [&mut Vec<R>; 6],
        dh0: &mut Vec<R>,
    ) -> Result<()> {
        let p = wkv_f64(t, h, n, rwkvab.map(|v| v.as_slice()), h0)?;
        let dy: Vec<f64> = conv(&dy[..p.d.seq_len()]);
        let g = wkv7::reference::backward(&p.d, &p.inputs(), &dy, None)?;
        let [dr, dw, dk, dv, da, db] = grads;
        for (dst, src) in [dr, dw, dk, dv, da, db]
            .into_iter()
            .zip([&g.dr, &g.dw, &g.dk, &g.dv, &g.da, &g.db])
        {
            *dst = conv(src);
        }
        *dh0 = conv(&g.dh0);
        Ok(())
    }
    unsafe fn raw_xent(
        &self,
        r0: usize,
        rows: usize,
        v: usize,
        logits: &mut Vec<R>,
        targets: &Vec<R>,
        mask: &Vec<R>,
        soft: Option<&Vec<R>>,
        lam: f32,
        loss: &mut Vec<R>,
    ) -> Result<()> {
        let tg = ids_of(&targets[r0..], rows);
        let mask = &mask[r0..];
        let pcs = row_pieces(rows, v);
        let (ls, ss) = (split_rows(logits, &pcs, v), split_rows(loss, &pcs, 1));
        pcs.par_iter()
            .zip(ls)
            .zip(ss)
            .for_each(|((&(q0, nr), lg), lo)| {
                let soft = soft.map(|s| &s[q0 * v..]);
                bref::xent(nr, v, lg, &tg[q0..], &mask[q0..], soft, lam, lo);
            });
        Ok(())
    }
    unsafe fn raw_softmax(
        &self,
        rows: usize,
        v: usize,
        inv_temp: f32,
        x: &mut Vec<R>,
    ) -> Result<()> {
        par_rows(rows, v, x, |_, nr, xr| bref::softmax(nr, v, inv_temp, xr));
        Ok(())
    }
    unsafe fn raw_outer_acc(
        &self,
        off: usize,
        rows: usize,
        h: usize,
        n: usize,
        r: &Vec<R>,
        acc: &mut Vec<R>,
    ) -> Result<()> {
        // per head, Σ_t r rᵀ = Rᵀ·R through the blocked GEMM (R the head's
        // [rows, N] columns, made dense), heads in parallel
        let (c, nn) = (h * n, n * n);
        let r = &r[off..];
        acc[..h * nn]
            .par_chunks_mut(nn)
            .enumerate()
            .for_each(|(hh, a)| {
                let mut rt = vec![R::ZERO; n * rows];
                let mut rd = vec![R::ZERO; rows * n];
                for t in 0..rows {
                    for i in 0..n {
                        let v = r[t * c + hh * n + i];
                        rt[i * rows + t] = v;
                        rd[t * n + i] = v;
                    }
                }
                let mut o = vec![R::ZERO; nn];
                if rows > 0 {
                    gemm::xw(&rt, n, rows, &rd, n, &mut o);
                }
                for (d, v) in a.iter_mut().zip(o) {
                    *d += v;
                }
            });
        Ok(())
    }
    unsafe fn raw_up_fwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &UpBufs<'_, Vec<R>>,
        r: &Vec<R>,
        phi: &mut Vec<R>,
        y: &mut Vec<R>,
    ) -> Result<()> {
        bref::up_fwd(rows, h, n, &up_ref(k), r, phi, y);
        Ok(())
    }
    unsafe fn raw_up_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &UpBufs<'_, Vec<R>>,
        r: &Vec<R>,
        phi: &Vec<R>,
        dy: &Vec<R>,
        du: &mut Vec<R>,
        dr: &mut Vec<R>,
    ) -> Result<()> {
        bref::up_bwd(rows, h, n, &up_ref(k), r, phi, dy, du, dr);
        Ok(())
    }
    unsafe fn raw_batched_matmul(
        &self,
        groups: usize,
        n: usize,
        a: &Vec<R>,
        b: &Vec<R>,
        trans_b: bool,
        out: &mut Vec<R>,
    ) -> Result<()> {
        // one blocked GEMM per [N, N] group, groups in parallel
        let nn = n * n;
        out[..groups * nn]
            .par_chunks_mut(nn)
            .enumerate()
            .for_each(|(g, o)| {
                let (a, b) = (&a[g * nn..(g + 1) * nn], &b[g * nn..(g + 1) * nn]);
                if trans_b {
                    gemm::xwt_ld(a, n, n, n, b, n, o);
                } else {
                    gemm::xw(a, n, n, b, n, o);
                }
            });
        Ok(())
    }
    unsafe fn raw_adam(
        &self,
        n: usize,
        s: &AdamStep,
        clip: f32,
        stats: Option<&Vec<R>>,
        p: &mut Vec<R>,
        g: &Vec<R>,
        m: &mut Vec<R>,
        v: &mut Vec<R>,
    ) -> Result<()> {
        let mut s = *s;
        if let Some(st) = stats {
            match bref::clip_scale(st[1].to_f32(), s.grad_scale, clip) {
                Some(f) => s.grad_scale *= f,
                None => return Ok(()),
            }
        }
        bref::adam(n, &s, p, g, m, v);
        Ok(())
    }
    unsafe fn raw_reduce_acc(
        &self,
        squares: bool,
        n: usize,
        x: &Vec<R>,
        out: &mut Vec<R>,
        slot: usize,
    ) -> Result<()> {
        out[slot] += bref::reduce(squares, &x[..n]);
        Ok(())
    }
    unsafe fn raw_dbp_step(
        &self,
        groups: usize,
        n: usize,
        scale: f32,
        eta: f32,
        kappa: f32,
        max_norm: f32,
        z: &Vec<R>,
        m: &mut Vec<R>,
    ) -> Result<()> {
        bref::dbp_step(groups, n, scale, eta, kappa, max_norm, z, m);
        Ok(())
    }
    unsafe fn raw_sdt_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        x: &SdtBwdBufs<'_, Vec<R>>,
        dkk: &mut Vec<R>,
        dka: &mut Vec<R>,
        drk: &mut Vec<R>,
    ) -> Result<()> {
        let c = h * n;
        let pcs = row_pieces(rows, c);
        let (a, b, d) = (
            split_rows(dkk, &pcs, c),
            split_rows(dka, &pcs, c),
            split_rows(drk, &pcs, c),
        );
        pcs.par_iter()
            .zip(a)
            .zip(b)
            .zip(d)
            .for_each(|(((&(r0, nr), dkk), dka), drk)| {
                let o = r0 * c;
                let y = bref::SdtBwd {
                    kk: kk_rows(&x.kk, o),
                    r: &x.r[o..],
                    kt: &x.kt[o..],
                    v: &x.v[o..],
                    g: &x.g[o..],
                    dout: &x.dout[o..],
                };
                bref::sdt_bwd(nr, h, n, &y, dkk, dka, drk);
            });
        Ok(())
    }
    unsafe fn raw_mask_mul(&self, n: usize, m: &Vec<R>, x: &mut Vec<R>) -> Result<()> {
        for (x, &m) in x[..n].iter_mut().zip(&m[..n]) {
            *x *= m;
        }
        Ok(())
    }
    unsafe fn raw_lora_in(
        &self,
        rows: usize,
        k: usize,
        x: &Vec<R>,
        x_off: usize,
        ldx: usize,
        seqs: (usize, usize),
        seed: u32,
        keep: f32,
        scale: f32,
        out: &mut Vec<R>,
    ) -> Result<()> {
        let x = &x[x_off..];
        let (t, seq0) = seqs;
        par_rows(rows, k, out, |r0, nr, o| {
            let at = (t, seq0, r0);
            bref::lora_in(nr, k, &x[r0 * ldx..], ldx, at, seed, keep, scale, o)
        });
        Ok(())
    }
    unsafe fn raw_eye_axpy(
        &self,
        groups: usize,
        n: usize,
        alpha: f32,
        beta: f32,
        x: Option<&Vec<R>>,
        out: &mut Vec<R>,
    ) -> Result<()> {
        let nn = groups * n * n;
        let src: Vec<R> = match x {
            Some(x) => x[..nn].to_vec(),
            None => out[..nn].to_vec(),
        };
        bref::eye_axpy(groups, n, alpha, beta, &src, &mut out[..nn]);
        Ok(())
    }
    unsafe fn raw_sumsq(&self, n: usize, x: &Vec<R>) -> Result<f64> {
        Ok(bref::sumsq(n, x))
    }
}

fn up_ref<'a, R>(k: &'a UpBufs<'_, Vec<R>>) -> bref::Up<'a, R> {
    bref::Up {
        m: k.m,
        linear: k.linear,
        centres: k.centres,
        gamma: k.gamma,
        u: k.u,
    }
}

/// The CPU twins' view of [`KkBwdBufs`] from element `o` of its `[rows, C]`
/// tensors on (the `[C]` vectors whole): one row piece of the kk_prep
/// backward or of the SDT gradients.
fn kk_rows<'a, R>(x: &KkBwdBufs<'a, Vec<R>>, o: usize) -> bref::KkBwd<'a, R> {
    bref::KkBwd {
        k: &x.k[o..],
        da: &x.da[o..],
        a0: x.a0,
        k_k: x.k_k,
        k_a: x.k_a,
        d_kout: &x.d_kout[o..],
        d_a: &x.d_a[o..],
        d_b: &x.d_b[o..],
    }
}
