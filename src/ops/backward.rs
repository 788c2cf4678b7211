//! The backward-pass and optimizer operations of on-device state tuning
//! ([`BackwardOps`], an extension of [`DeviceOps`]), with the same three
//! implementations:
//!
//! | impl | element-wise / row ops | GEMM `dy·W` | WKV backward |
//! |---|---|---|---|
//! | [`super::cpu::CpuOps`] | [`super::backward_ref`] (Rust twins, f32 / f64) | Rust | `wkv7::fast` (f32) / reference (f64), from checkpoints |
//! | [`super::emu::EmuOps`] | `kernels/tune_ops.cu` on the CPU emulator | Rust | emulated `wkv7_v1` |
//! | [`super::cuda::CudaOps`] | `kernels/tune_ops.cu` on the GPU | cuBLAS sgemm | `wkv7_v1` fwd+bwd on device |
//!
//! The tuning engine that uses them is `crate::tune::device`. Layouts follow
//! [`super`]: activations `[rows, C]`, `C = H·N`, per-channel `[C]`,
//! matrices `[out, in]`. Every op checks its sizes ([`BackwardOps`] methods
//! return [`crate::Error::Shape`] naming the argument, never panic).
use super::backward_ref::AdamStep;
use super::counters;
use super::{check_heads, fits_i32, ids_buf, need, Act, DeviceOps, Ids};
use crate::error::{Error, Result};

/// The forward inputs and output gradients of [`BackwardOps::kk_prep_bwd`].
pub struct KkBwdBufs<'a, B> {
    /// `[rows, C]` the key before normalisation
    pub k: &'a B,
    /// `[rows, C]` the α LoRA output (pre-sigmoid, without a0)
    pub da: &'a B,
    /// `[C]` a0, k_k, k_a
    pub a0: &'a B,
    /// `[C]` the k_k weight.
    pub k_k: &'a B,
    /// `[C]` the k_a weight.
    pub k_a: &'a B,
    /// `[rows, C]` gradients of k̃ (k_out), a and b
    pub d_kout: &'a B,
    /// `[rows, C]` gradient of a.
    pub d_a: &'a B,
    /// `[rows, C]` gradient of b.
    pub d_b: &'a B,
}

/// The forward inputs and output gradient of [`BackwardOps::group_norm_bwd`].
pub struct GnBwdBufs<'a, B> {
    /// `[rows, C]` the WKV output before GroupNorm
    pub y: &'a B,
    /// `[C]` GroupNorm affine
    pub weight: &'a B,
    /// `[C]` GroupNorm bias.
    pub bias: &'a B,
    /// `[rows, C]` r, k̃, v of the bonus term, and the gate g
    pub r: &'a B,
    /// `[rows, C]` k̃ of the bonus term.
    pub k: &'a B,
    /// `[rows, C]` v of the bonus term.
    pub v: &'a B,
    /// `[C]`
    pub r_k: &'a B,
    /// `[rows, C]` the gate g.
    pub g: &'a B,
    /// `[rows, C]` ∂L/∂(z ⊙ g)
    pub dout: &'a B,
}

/// The outputs of [`BackwardOps::group_norm_bwd`], each `[rows, C]`, overwritten.
pub struct GnBwdGrads<'a, B> {
    /// Gradient of the WKV output.
    pub dy: &'a mut B,
    /// Gradient of r.
    pub dr: &'a mut B,
    /// Gradient of k̃.
    pub dk: &'a mut B,
    /// Gradient of v.
    pub dv: &'a mut B,
    /// Gradient of the gate g.
    pub dg: &'a mut B,
}

/// The inputs of [`BackwardOps::sdt_bwd`]: the kk_prep backward's and
/// the GroupNorm bonus's (each `[rows, C]` unless noted).
pub struct SdtBwdBufs<'a, B> {
    /// kk_prep's inputs and output gradients (`k_a` unused).
    pub kk: KkBwdBufs<'a, B>,
    /// The receptance.
    pub r: &'a B,
    /// k̃ of the bonus term.
    pub kt: &'a B,
    /// v of the bonus term.
    pub v: &'a B,
    /// The gate g.
    pub g: &'a B,
    /// ∂L/∂(z ⊙ g), the GroupNorm backward's input.
    pub dout: &'a B,
}

/// One layer's kernel-upscaled read-out (docs/upscale.md) for
/// [`BackwardOps::up_fwd`] / [`BackwardOps::up_bwd`]: `m` support vectors
/// per head, `centres [H, M, N]`, `gamma [H]` (`γ = 1/(2σ²)`) and the
/// upscaled state `u [H, N, M]` (value-major).
pub struct UpBufs<'a, B> {
    /// Support vectors per head (M).
    pub m: usize,
    /// State-offset tuning (docs/state-offset.md): `φ = r`, M = N; the
    /// centres and widths are neither read nor size-checked (any buffers).
    pub linear: bool,
    /// Support vectors `[H, M, N]`.
    pub centres: &'a B,
    /// RBF widths `[H]`.
    pub gamma: &'a B,
    /// The upscaled state `[H, N, M]`, value-major.
    pub u: &'a B,
}

/// Backward and optimizer operations on a [`DeviceOps`] backend's buffers.
///
/// Every public method is provided: it checks the sizes once, here, for all
/// backends and then calls the backend's `raw_*` hook (hidden from the docs),
/// which may rely on those checks. Implementors write only the hooks.
#[allow(clippy::too_many_arguments)]
pub trait BackwardOps: DeviceOps {
    /// `dx[m, k] = dy[m, n] · w[n, k]`: the input gradient of
    /// [`DeviceOps::matmul`] (`y = x wᵀ`, w `[n, k]` f32).
    fn matmul_t(
        &self,
        dy: &Self::Buf,
        m: usize,
        w: &Self::Buf,
        n: usize,
        k: usize,
        dx: &mut Self::Buf,
    ) -> Result<()> {
        check::matmul_t(self.len(dy), m, self.len(w), n, k, self.len(dx))?;
        self.counters().launch(counters::Op::MatmulT);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_matmul_t(dy, m, w, n, k, dx) }
    }
    /// # Safety
    /// The sizes must pass `check::matmul_t` (what [`Self::matmul_t`] checks).
    #[doc(hidden)]
    unsafe fn raw_matmul_t(
        &self,
        dy: &Self::Buf,
        m: usize,
        w: &Self::Buf,
        n: usize,
        k: usize,
        dx: &mut Self::Buf,
    ) -> Result<()>;

    /// `dw[n, k] (+)= dy[m, n]ᵀ · x[m, k]`: the weight gradient of
    /// [`DeviceOps::matmul`] (`y = x wᵀ`), for trained matrices (adapter
    /// factors). Row `i` of x starts at `x_off + i·ldx` (`ldx ≥ k`);
    /// `accumulate` adds to `dw`, else `dw` is overwritten.
    #[allow(clippy::too_many_arguments)]
    fn matmul_tn(
        &self,
        dy: &Self::Buf,
        m: usize,
        n: usize,
        x: &Self::Buf,
        x_off: usize,
        ldx: usize,
        k: usize,
        dw: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()> {
        fits_i32("matmul_tn", &[m, n])?;
        fits_i32("matmul_tn", &[n, k])?;
        fits_i32("matmul_tn", &[m.max(1), ldx])?;
        if ldx < k {
            return Err(Error::Invalid(format!(
                "matmul_tn: row stride {ldx} of x is below its width {k}"
            )));
        }
        need("dy", self.len(dy), 0, m * n)?;
        if m > 0 {
            need("x", self.len(x), x_off, (m - 1) * ldx + k)?;
        }
        need("dw", self.len(dw), 0, n * k)?;
        self.counters().launch(counters::Op::MatmulTn);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_matmul_tn(dy, m, n, x, x_off, ldx, k, dw, accumulate) }
    }
    /// # Safety
    /// What [`Self::matmul_tn`] checks: dy ≥ m·n, x from `x_off` ≥
    /// (m−1)·ldx + k with ldx ≥ k, dw ≥ n·k, all within int32.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw_matmul_tn(
        &self,
        dy: &Self::Buf,
        m: usize,
        n: usize,
        x: &Self::Buf,
        x_off: usize,
        ldx: usize,
        k: usize,
        dw: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;

    /// LayerNorm backward, accumulating: rows `[off/C, off/C + rows)` of
    /// `dx` get `+= ∂L/∂x` of `y = LN(x)·weight + bias`, given `dy [rows, C]`
    /// (from element 0). Statistics are recomputed from x (from `off`).
    fn layer_norm_bwd(
        &self,
        x: &Self::Buf,
        off: usize,
        rows: usize,
        c: usize,
        weight: &Self::Buf,
        eps: f32,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
    ) -> Result<()> {
        check::layer_norm_bwd(
            self.len(x),
            off,
            rows,
            c,
            self.len(weight),
            self.len(dy),
            self.len(dx),
        )?;
        self.counters().launch(counters::Op::LayerNormBwd);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_layer_norm_bwd(x, off, rows, c, weight, eps, dy, dx) }
    }
    /// # Safety
    /// The sizes must pass `check::layer_norm_bwd` (what
    /// [`Self::layer_norm_bwd`] checks).
    #[doc(hidden)]
    unsafe fn raw_layer_norm_bwd(
        &self,
        x: &Self::Buf,
        off: usize,
        rows: usize,
        c: usize,
        weight: &Self::Buf,
        eps: f32,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
    ) -> Result<()>;

    /// Backward of [`DeviceOps::token_shift`] for `dmix.len()` (1 to 6)
    /// mixes, each `[T, C]`; `mu [n_mix, C]`. `dstate` `[C]`: ∂L/∂(state
    /// out) in, ∂L/∂(state in) out; `dx [T, C]` overwritten.
    fn token_shift_bwd(
        &self,
        t: usize,
        c: usize,
        dmix: &[&Self::Buf],
        mu: &Self::Buf,
        dstate: &mut Self::Buf,
        dx: &mut Self::Buf,
    ) -> Result<()> {
        self.token_shift_bwd_b(1, t, c, dmix, mu, dstate, dx)
    }
    /// [`Self::token_shift_bwd`] over `b` sequences of `t` rows: dmix and
    /// dx `[B, T, C]`, dstate `[B, C]` (per sequence).
    fn token_shift_bwd_b(
        &self,
        b: usize,
        t: usize,
        c: usize,
        dmix: &[&Self::Buf],
        mu: &Self::Buf,
        dstate: &mut Self::Buf,
        dx: &mut Self::Buf,
    ) -> Result<()> {
        let lens: Vec<usize> = dmix.iter().map(|d| self.len(d)).collect();
        check::token_shift_bwd(b, t, c, &lens, self.len(mu), self.len(dstate), self.len(dx))?;
        self.counters().launch(counters::Op::TokenShiftBwd);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_token_shift_bwd(b, t, c, dmix, mu, dstate, dx) }
    }
    /// # Safety
    /// The sizes must pass `check::token_shift_bwd` (what
    /// [`Self::token_shift_bwd_b`] checks).
    #[doc(hidden)]
    unsafe fn raw_token_shift_bwd(
        &self,
        b: usize,
        t: usize,
        c: usize,
        dmix: &[&Self::Buf],
        mu: &Self::Buf,
        dstate: &mut Self::Buf,
        dx: &mut Self::Buf,
    ) -> Result<()>;

    /// Sum over a batch: `dst[i] = (accumulate ? dst[i] : 0) + Σ_b src[b·n + i]`;
    /// src `[B, n]`, dst `[n]`.
    fn sum_batch(
        &self,
        b: usize,
        n: usize,
        src: &Self::Buf,
        dst: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()> {
        if b == 0 {
            return Err(Error::Invalid("sum_batch: B must be at least 1".into()));
        }
        fits_i32("sum_batch", &[b, n])?;
        need("src", self.len(src), 0, b * n)?;
        need("dst", self.len(dst), 0, n)?;
        self.counters().launch(counters::Op::SumBatch);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_sum_batch(b, n, src, dst, accumulate) }
    }
    /// # Safety
    /// `src` must hold `b·n` elements and `dst` `n` (what [`Self::sum_batch`]
    /// checks).
    #[doc(hidden)]
    unsafe fn raw_sum_batch(
        &self,
        b: usize,
        n: usize,
        src: &Self::Buf,
        dst: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;

    /// Elements of the WKV workspace of [`Self::wkv_fwd_ckpt`] /
    /// [`Self::wkv_bwd_ckpt`] for `[B, T, H, N]`: (checkpoints, backward
    /// scratch). At least 1 each.
    fn wkv_ws_len(&self, b: usize, t: usize, h: usize, n: usize) -> (usize, usize);

    /// WKV-7 forward of `b` sequences from `h0 [B, H, N, N]` (read only)
    /// that keeps its state checkpoints in `ckpt` (length from
    /// [`Self::wkv_ws_len`]) for [`Self::wkv_bwd_ckpt`] and, when asked,
    /// the final state in `h_t` `[B, H, N, N]` (distinct from h0); r … b, y
    /// `[B, T, H, N]`; buffers at least that long.
    fn wkv_fwd_ckpt(
        &self,
        b: usize,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Self::Buf; 6],
        h0: &Self::Buf,
        y: &mut Self::Buf,
        ckpt: &mut Self::Buf,
        h_t: Option<&mut Self::Buf>,
    ) -> Result<()> {
        let names = ["r", "w", "k", "v", "a", "b"];
        let mut seq: Vec<(&str, usize)> = names
            .iter()
            .copied()
            .zip(rwkvab.iter().map(|x| self.len(x)))
            .collect();
        seq.push(("y", self.len(y)));
        let mut st = vec![("h0", self.len(h0))];
        if let Some(ht) = &h_t {
            st.push(("h_t", self.len(ht)));
        }
        check::wkv_ckpt(b, t, h, n, &seq, &st)?;
        let (ck, _) = self.wkv_ws_len(b, t, h, n);
        need("ckpt", self.len(ckpt), 0, ck)?;
        self.counters().launch(counters::Op::WkvFwd);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_wkv_fwd_ckpt(b, t, h, n, rwkvab, h0, y, ckpt, h_t) }
    }
    /// # Safety
    /// The sizes must pass what [`Self::wkv_fwd_ckpt`] checks.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw_wkv_fwd_ckpt(
        &self,
        b: usize,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Self::Buf; 6],
        h0: &Self::Buf,
        y: &mut Self::Buf,
        ckpt: &mut Self::Buf,
        h_t: Option<&mut Self::Buf>,
    ) -> Result<()>;

    /// WKV-7 backward of `b` sequences from the checkpoints a
    /// [`Self::wkv_fwd_ckpt`] with the same inputs wrote (no forward is run
    /// again on the emulator and CUDA; the CPU twin recomputes it), zero
    /// gradient on the final state: writes dr … db `[B, T, H, N]` and dh0
    /// `[B, H, N, N]`; `scratch` from [`Self::wkv_ws_len`].
    fn wkv_bwd_ckpt(
        &self,
        b: usize,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Self::Buf; 6],
        h0: &Self::Buf,
        ckpt: &Self::Buf,
        dy: &Self::Buf,
        grads: [&mut Self::Buf; 6],
        dh0: &mut Self::Buf,
        scratch: &mut Self::Buf,
    ) -> Result<()> {
        let names = ["r", "w", "k", "v", "a", "b"];
        let gnames = ["dr", "dw", "dk", "dv", "da", "db"];
        let mut seq: Vec<(&str, usize)> = names
            .iter()
            .copied()
            .zip(rwkvab.iter().map(|x| self.len(x)))
            .collect();
        seq.push(("dy", self.len(dy)));
        seq.extend(
            gnames
                .iter()
                .copied()
                .zip(grads.iter().map(|x| self.len(x))),
        );
        check::wkv_ckpt(
            b,
            t,
            h,
            n,
            &seq,
            &[("h0", self.len(h0)), ("dh0", self.len(dh0))],
        )?;
        let (ck, sc) = self.wkv_ws_len(b, t, h, n);
        need("ckpt", self.len(ckpt), 0, ck)?;
        need("scratch", self.len(scratch), 0, sc)?;
        self.counters().launch(counters::Op::WkvBwd);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_wkv_bwd_ckpt(b, t, h, n, rwkvab, h0, ckpt, dy, grads, dh0, scratch) }
    }
    /// # Safety
    /// The sizes must pass what [`Self::wkv_bwd_ckpt`] checks.
    #[doc(hidden)]
    unsafe fn raw_wkv_bwd_ckpt(
        &self,
        b: usize,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Self::Buf; 6],
        h0: &Self::Buf,
        ckpt: &Self::Buf,
        dy: &Self::Buf,
        grads: [&mut Self::Buf; 6],
        dh0: &mut Self::Buf,
        scratch: &mut Self::Buf,
    ) -> Result<()>;

    /// In place on the first `n` elements of dy: `dy *= f′(pre + bias)`
    /// (`bias [C]` broadcast), f as in [`DeviceOps::act`].
    fn act_bwd(
        &self,
        mode: Act,
        n: usize,
        c: usize,
        pre: &Self::Buf,
        bias: Option<&Self::Buf>,
        dy: &mut Self::Buf,
    ) -> Result<()> {
        check::act_bwd(n, c, self.len(pre), bias.map(|b| self.len(b)), self.len(dy))?;
        self.counters().launch(counters::Op::ActBwd);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_act_bwd(mode, n, c, pre, bias, dy) }
    }
    /// # Safety
    /// The sizes must pass `check::act_bwd` (what [`Self::act_bwd`] checks).
    #[doc(hidden)]
    unsafe fn raw_act_bwd(
        &self,
        mode: Act,
        n: usize,
        c: usize,
        pre: &Self::Buf,
        bias: Option<&Self::Buf>,
        dy: &mut Self::Buf,
    ) -> Result<()>;

    /// Backward of [`DeviceOps::kk_prep`]: `dk` = ∂L/∂k, `dda` = ∂L/∂da,
    /// both `[rows, C]`, overwritten.
    fn kk_prep_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        x: &KkBwdBufs<'_, Self::Buf>,
        dk: &mut Self::Buf,
        dda: &mut Self::Buf,
    ) -> Result<()> {
        check::rows_heads(
            "kk_prep_bwd",
            rows,
            h,
            n,
            &[
                ("k", self.len(x.k)),
                ("da", self.len(x.da)),
                ("d_kout", self.len(x.d_kout)),
                ("d_a", self.len(x.d_a)),
                ("d_b", self.len(x.d_b)),
                ("dk", self.len(dk)),
                ("dda", self.len(dda)),
            ],
            &[
                ("a0", self.len(x.a0)),
                ("k_k", self.len(x.k_k)),
                ("k_a", self.len(x.k_a)),
            ],
        )?;
        self.counters().launch(counters::Op::KkPrepBwd);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_kk_prep_bwd(rows, h, n, x, dk, dda) }
    }
    /// # Safety
    /// The sizes must pass the checks of [`Self::kk_prep_bwd`]: `[rows, C]`
    /// tensors ≥ rows·H·N elements, `[C]` vectors ≥ H·N, H, N ≥ 1.
    #[doc(hidden)]
    unsafe fn raw_kk_prep_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        x: &KkBwdBufs<'_, Self::Buf>,
        dk: &mut Self::Buf,
        dda: &mut Self::Buf,
    ) -> Result<()>;

    /// Backward of [`DeviceOps::value_residual`] over the first `n`
    /// elements: `dv` is ∂L/∂v in, ∂L/∂(v before the residual) out;
    /// `dvf += ∂L/∂v_first`; `ddv` = ∂L/∂dv (overwritten).
    fn value_residual_bwd(
        &self,
        n: usize,
        c: usize,
        vraw: &Self::Buf,
        v_first: &Self::Buf,
        v0: &Self::Buf,
        dvp: &Self::Buf,
        dv: &mut Self::Buf,
        dvf: &mut Self::Buf,
        ddv: &mut Self::Buf,
    ) -> Result<()> {
        check::elems(
            "value_residual_bwd",
            n,
            c,
            &[
                ("vraw", self.len(vraw)),
                ("v_first", self.len(v_first)),
                ("dvp", self.len(dvp)),
                ("dv", self.len(dv)),
                ("dvf", self.len(dvf)),
                ("ddv", self.len(ddv)),
            ],
            &[("v0", self.len(v0))],
        )?;
        self.counters().launch(counters::Op::ValueResidualBwd);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_value_residual_bwd(n, c, vraw, v_first, v0, dvp, dv, dvf, ddv) }
    }
    /// # Safety
    /// The sizes must pass the checks of [`Self::value_residual_bwd`]: every
    /// `[n]` buffer ≥ n elements, v0 ≥ C ≥ 1.
    #[doc(hidden)]
    unsafe fn raw_value_residual_bwd(
        &self,
        n: usize,
        c: usize,
        vraw: &Self::Buf,
        v_first: &Self::Buf,
        v0: &Self::Buf,
        dvp: &Self::Buf,
        dv: &mut Self::Buf,
        dvf: &mut Self::Buf,
        ddv: &mut Self::Buf,
    ) -> Result<()>;

    /// Backward of [`DeviceOps::group_norm`] with the bonus and the gate.
    fn group_norm_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        eps: f32,
        x: &GnBwdBufs<'_, Self::Buf>,
        g: GnBwdGrads<'_, Self::Buf>,
    ) -> Result<()> {
        check::rows_heads(
            "group_norm_bwd",
            rows,
            h,
            n,
            &[
                ("y", self.len(x.y)),
                ("r", self.len(x.r)),
                ("k", self.len(x.k)),
                ("v", self.len(x.v)),
                ("g", self.len(x.g)),
                ("dout", self.len(x.dout)),
                ("dy", self.len(g.dy)),
                ("dr", self.len(g.dr)),
                ("dk", self.len(g.dk)),
                ("dv", self.len(g.dv)),
                ("dg", self.len(g.dg)),
            ],
            &[
                ("weight", self.len(x.weight)),
                ("bias", self.len(x.bias)),
                ("r_k", self.len(x.r_k)),
            ],
        )?;
        self.counters().launch(counters::Op::GroupNormBwd);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_group_norm_bwd(rows, h, n, eps, x, g) }
    }
    /// # Safety
    /// The sizes must pass the checks of [`Self::group_norm_bwd`]: `[rows, C]`
    /// tensors ≥ rows·H·N elements, `[C]` vectors ≥ H·N, H, N ≥ 1.
    #[doc(hidden)]
    unsafe fn raw_group_norm_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        eps: f32,
        x: &GnBwdBufs<'_, Self::Buf>,
        g: GnBwdGrads<'_, Self::Buf>,
    ) -> Result<()>;

    /// WKV-7 forward (from `h0`) and backward for one sequence of `t`
    /// tokens (zero gradient on the final state): r … b and dy `[T, H, N]`,
    /// h0 `[H, N, N]`; writes dr … db `[T, H, N]` and dh0 `[H, N, N]`.
    /// All lengths exact.
    fn wkv_bwd(
        &self,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Self::Buf; 6],
        h0: &Self::Buf,
        dy: &Self::Buf,
        grads: [&mut Self::Buf; 6],
        dh0: &mut Self::Buf,
    ) -> Result<()> {
        let names = ["r", "w", "k", "v", "a", "b"];
        let gnames = ["dr", "dw", "dk", "dv", "da", "db"];
        let mut seq: Vec<(&str, usize)> = names
            .iter()
            .copied()
            .zip(rwkvab.iter().map(|b| self.len(b)))
            .collect();
        seq.push(("dy", self.len(dy)));
        seq.extend(
            gnames
                .iter()
                .copied()
                .zip(grads.iter().map(|b| self.len(b))),
        );
        check::wkv_bwd(
            t,
            h,
            n,
            &seq,
            &[("h0", self.len(h0)), ("dh0", self.len(dh0))],
        )?;
        // the forward it recomputes inside, then the backward
        self.counters().launch(counters::Op::WkvFwd);
        self.counters().launch(counters::Op::WkvBwd);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_wkv_bwd(t, h, n, rwkvab, h0, dy, grads, dh0) }
    }
    /// # Safety
    /// The sizes must pass `check::wkv_bwd` (what [`Self::wkv_bwd`] checks):
    /// valid dims, every `[T, H, N]` / `[H, N, N]` buffer of exact length.
    #[doc(hidden)]
    unsafe fn raw_wkv_bwd(
        &self,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Self::Buf; 6],
        h0: &Self::Buf,
        dy: &Self::Buf,
        grads: [&mut Self::Buf; 6],
        dh0: &mut Self::Buf,
    ) -> Result<()>;

    /// Softmax cross-entropy (+ `lam`·KL to soft targets `[rows, V]`) per
    /// row of `logits [rows, V]`, weighted by `mask`; in place the logits
    /// become ∂L/∂logits; `loss [rows]` gets each row's weighted loss.
    fn xent(
        &self,
        rows: usize,
        v: usize,
        logits: &mut Self::Buf,
        targets: &[u32],
        mask: &[f32],
        soft: Option<&Self::Buf>,
        lam: f32,
        loss: &mut Self::Buf,
    ) -> Result<()> {
        check::xent(
            rows,
            v,
            self.len(logits),
            targets,
            mask,
            soft.map(|s| self.len(s)),
            self.len(loss),
        )?;
        if rows == 0 {
            return Ok(());
        }
        let tg = self.ids(&targets[..rows], v)?;
        let mk = self.upload(&mask[..rows])?;
        self.xent_ids(0, rows, v, logits, &tg, &mk, soft, lam, loss)
    }
    /// [`Self::xent`] on device targets and mask: rows `[r0, r0 + rows)` of
    /// `targets` (ids `< V`) and `mask` for the `rows` rows of `logits`.
    fn xent_ids(
        &self,
        r0: usize,
        rows: usize,
        v: usize,
        logits: &mut Self::Buf,
        targets: &Ids<Self::Buf>,
        mask: &Self::Buf,
        soft: Option<&Self::Buf>,
        lam: f32,
        loss: &mut Self::Buf,
    ) -> Result<()> {
        if v == 0 {
            return Err(Error::Invalid("xent: V must be at least 1".into()));
        }
        if targets.bound() > v {
            return Err(Error::Invalid(format!(
                "xent: targets up to {} but V = {v}",
                targets.bound()
            )));
        }
        fits_i32("xent", &[r0 + rows, v])?;
        need("logits", self.len(logits), 0, rows * v)?;
        need("targets", targets.len(), r0, rows)?;
        need("mask", self.len(mask), r0, rows)?;
        if let Some(s) = soft {
            need("soft", self.len(s), 0, rows * v)?;
        }
        need("loss", self.len(loss), 0, rows)?;
        if rows == 0 {
            return Ok(());
        }
        self.counters().launch(counters::Op::Xent);
        // SAFETY: the sizes the hook relies on were checked just above; the
        // targets are < V (the Ids bound, checked when written).
        unsafe { self.raw_xent(r0, rows, v, logits, ids_buf(targets), mask, soft, lam, loss) }
    }
    /// # Safety
    /// What [`Self::xent_ids`] checks: logits (and soft) ≥ rows·V, targets
    /// (int32 ids < V as f32 bits) and mask ≥ r0 + rows, loss ≥ rows.
    #[doc(hidden)]
    unsafe fn raw_xent(
        &self,
        r0: usize,
        rows: usize,
        v: usize,
        logits: &mut Self::Buf,
        targets: &Self::Buf,
        mask: &Self::Buf,
        soft: Option<&Self::Buf>,
        lam: f32,
        loss: &mut Self::Buf,
    ) -> Result<()>;

    /// Softmax with temperature, in place, per row of `x` `[rows, V]`:
    /// `x = softmax(x / temperature)` (the observer's soft targets from its
    /// logits). `temperature` finite and > 0.
    fn softmax(&self, rows: usize, v: usize, temperature: f32, x: &mut Self::Buf) -> Result<()> {
        if v == 0 {
            return Err(Error::Invalid("softmax: V must be at least 1".into()));
        }
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(Error::Invalid(format!(
                "softmax: temperature {temperature} (must be finite and > 0)"
            )));
        }
        fits_i32("softmax", &[rows, v])?;
        need("x", self.len(x), 0, rows * v)?;
        if rows == 0 {
            return Ok(());
        }
        self.counters().launch(counters::Op::Softmax);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_softmax(rows, v, 1.0 / temperature, x) }
    }
    /// # Safety
    /// What [`Self::softmax`] checks: x ≥ rows·V, V ≥ 1, both within int32.
    #[doc(hidden)]
    unsafe fn raw_softmax(
        &self,
        rows: usize,
        v: usize,
        inv_temp: f32,
        x: &mut Self::Buf,
    ) -> Result<()>;

    /// `acc[h] += Σ_t r_t,h r_t,hᵀ`; r `[rows, H, N]`, acc `[H, N, N]`.
    fn outer_acc(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        r: &Self::Buf,
        acc: &mut Self::Buf,
    ) -> Result<()> {
        self.outer_acc_rows(0, rows, h, n, r, acc)
    }
    /// [`Self::outer_acc`] over rows `[r0, r0 + rows)` of r.
    fn outer_acc_rows(
        &self,
        r0: usize,
        rows: usize,
        h: usize,
        n: usize,
        r: &Self::Buf,
        acc: &mut Self::Buf,
    ) -> Result<()> {
        check::outer_acc(r0 + rows, h, n, self.len(r), self.len(acc))?;
        self.counters().launch(counters::Op::OuterAcc);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_outer_acc(r0 * h * n, rows, h, n, r, acc) }
    }
    /// # Safety
    /// The sizes must pass `check::outer_acc` for `off / (H·N) + rows` rows
    /// (what [`Self::outer_acc_rows`] checks); `off` is an element offset.
    #[doc(hidden)]
    unsafe fn raw_outer_acc(
        &self,
        off: usize,
        rows: usize,
        h: usize,
        n: usize,
        r: &Self::Buf,
        acc: &mut Self::Buf,
    ) -> Result<()>;

    /// Kernel-upscaled read-out: per row and head,
    /// `φ = softmax_m(−γ_h ‖r − c_{h,m}‖²)` into `phi [rows, H, M]`
    /// (overwritten) and `y += U_h φ`; r, y `[rows, C]`.
    fn up_fwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &UpBufs<'_, Self::Buf>,
        r: &Self::Buf,
        phi: &mut Self::Buf,
        y: &mut Self::Buf,
    ) -> Result<()> {
        check::up(
            "up_fwd",
            rows,
            h,
            n,
            k.m,
            k.linear,
            [self.len(k.centres), self.len(k.gamma), self.len(k.u)],
            &[("r", self.len(r)), ("y", self.len(y))],
            &[("phi", self.len(phi))],
            &[],
        )?;
        self.counters().launch(counters::Op::UpFwd);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_up_fwd(rows, h, n, k, r, phi, y) }
    }
    /// # Safety
    /// The sizes must pass the `check::up` of [`Self::up_fwd`]: r, y ≥
    /// rows·H·N, centres ≥ H·M·N and gamma ≥ H (unless `linear`, where
    /// M = N and neither is read), u ≥ H·N·M, phi ≥ rows·H·M.
    #[doc(hidden)]
    unsafe fn raw_up_fwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &UpBufs<'_, Self::Buf>,
        r: &Self::Buf,
        phi: &mut Self::Buf,
        y: &mut Self::Buf,
    ) -> Result<()>;

    /// Backward of [`Self::up_fwd`] given its `phi` and `dy [rows, C]`:
    /// `du [H, N, M] += Σ_t dy_t φ_tᵀ` (summed over the rows) and
    /// `dr [rows, C] += −2γ_h Σ_m dℓ_m (r − c_m)` with `g = U_hᵀ dy`,
    /// `dℓ_m = φ_m (g_m − φ·g)`.
    fn up_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &UpBufs<'_, Self::Buf>,
        r: &Self::Buf,
        phi: &Self::Buf,
        dy: &Self::Buf,
        du: &mut Self::Buf,
        dr: &mut Self::Buf,
    ) -> Result<()> {
        check::up(
            "up_bwd",
            rows,
            h,
            n,
            k.m,
            k.linear,
            [self.len(k.centres), self.len(k.gamma), self.len(k.u)],
            &[
                ("r", self.len(r)),
                ("dy", self.len(dy)),
                ("dr", self.len(dr)),
            ],
            &[("phi", self.len(phi))],
            &[("du", self.len(du))],
        )?;
        self.counters().launch(counters::Op::UpBwd);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_up_bwd(rows, h, n, k, r, phi, dy, du, dr) }
    }
    /// # Safety
    /// The sizes must pass the `check::up` of [`Self::up_bwd`]: r, dy, dr ≥
    /// rows·H·N, phi ≥ rows·H·M, centres ≥ H·M·N and gamma ≥ H (unless
    /// `linear`: M = N, neither read), u, du ≥ H·N·M.
    #[doc(hidden)]
    unsafe fn raw_up_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &UpBufs<'_, Self::Buf>,
        r: &Self::Buf,
        phi: &Self::Buf,
        dy: &Self::Buf,
        du: &mut Self::Buf,
        dr: &mut Self::Buf,
    ) -> Result<()>;

    /// `out[g] = a[g]·b[g]` (or `a[g]·b[g]ᵀ`), `groups` matrices `[N, N]`.
    fn batched_matmul(
        &self,
        groups: usize,
        n: usize,
        a: &Self::Buf,
        b: &Self::Buf,
        trans_b: bool,
        out: &mut Self::Buf,
    ) -> Result<()> {
        check::batched_matmul(groups, n, self.len(a), self.len(b), self.len(out))?;
        self.counters().launch(counters::Op::BatchedMatmul);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_batched_matmul(groups, n, a, b, trans_b, out) }
    }
    /// # Safety
    /// The sizes must pass `check::batched_matmul` (what
    /// [`Self::batched_matmul`] checks).
    #[doc(hidden)]
    unsafe fn raw_batched_matmul(
        &self,
        groups: usize,
        n: usize,
        a: &Self::Buf,
        b: &Self::Buf,
        trans_b: bool,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// One Adam / AdamW step over the first `n` elements of p, m, v (in
    /// place) with gradient g (see [`super::backward_ref::adam`]).
    fn adam(
        &self,
        n: usize,
        s: &AdamStep,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
    ) -> Result<()> {
        check::adam(n, self.len(p), self.len(g), self.len(m), self.len(v))?;
        self.counters().launch(counters::Op::Adam);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_adam(n, s, 0.0, None, p, g, m, v) }
    }
    /// [`Self::adam`] with global-norm clipping decided on the device:
    /// `stats[1]` holds the sum of squares of the whole unscaled gradient
    /// (see [`Self::reduce_acc`]); its norm is `√stats[1] · grad_scale`; a
    /// non-finite norm leaves p, m, v untouched; with `clip > 0` and a norm
    /// above it the gradient is scaled by `clip / norm` too.
    #[allow(clippy::too_many_arguments)]
    fn adam_clipped(
        &self,
        n: usize,
        s: &AdamStep,
        clip: f32,
        stats: &Self::Buf,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
    ) -> Result<()> {
        check::adam(n, self.len(p), self.len(g), self.len(m), self.len(v))?;
        need("stats", self.len(stats), 0, 2)?;
        self.counters().launch(counters::Op::Adam);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_adam(n, s, clip, Some(stats), p, g, m, v) }
    }
    /// # Safety
    /// The sizes must pass `check::adam` (what [`Self::adam`] checks) and
    /// `stats`, when given, hold 2 elements.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw_adam(
        &self,
        n: usize,
        s: &AdamStep,
        clip: f32,
        stats: Option<&Self::Buf>,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
    ) -> Result<()>;

    /// DBP's step per group ([`super::backward_ref::dbp_step`]): from
    /// `z = R Σxxᵀ Rᵀ` `[groups, N, N]` and `scale = 1/count`, writes
    /// `m = I − ηΔ` with the step's row-sum norm clipped to `max_norm`.
    #[allow(clippy::too_many_arguments)]
    fn dbp_step(
        &self,
        groups: usize,
        n: usize,
        scale: f32,
        eta: f32,
        kappa: f32,
        max_norm: f32,
        z: &Self::Buf,
        m: &mut Self::Buf,
    ) -> Result<()> {
        if n == 0 || n > 1024 || groups == 0 {
            return Err(Error::Invalid(format!(
                "dbp_step: N = {n} (1 to 1024), groups = {groups} (≥ 1)"
            )));
        }
        fits_i32("dbp_step", &[groups, n, n])?;
        need("z", self.len(z), 0, groups * n * n)?;
        need("m", self.len(m), 0, groups * n * n)?;
        self.counters().launch(counters::Op::DbpStep);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_dbp_step(groups, n, scale, eta, kappa, max_norm, z, m) }
    }
    /// # Safety
    /// What [`Self::dbp_step`] checks.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw_dbp_step(
        &self,
        groups: usize,
        n: usize,
        scale: f32,
        eta: f32,
        kappa: f32,
        max_norm: f32,
        z: &Self::Buf,
        m: &mut Self::Buf,
    ) -> Result<()>;

    /// `out = α·I + β·x` per `[N, N]` group (`out` may be a copy of `x`'s
    /// buffer only through [`Self::eye_axpy_inplace`]).
    fn eye_axpy(
        &self,
        groups: usize,
        n: usize,
        alpha: f32,
        beta: f32,
        x: &Self::Buf,
        out: &mut Self::Buf,
    ) -> Result<()> {
        fits_i32("eye_axpy", &[groups, n, n])?;
        need("x", self.len(x), 0, groups * n * n)?;
        need("out", self.len(out), 0, groups * n * n)?;
        self.counters().launch(counters::Op::EyeAxpy);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_eye_axpy(groups, n, alpha, beta, Some(x), out) }
    }
    /// In place: `x = α·I + β·x` per group.
    fn eye_axpy_inplace(
        &self,
        groups: usize,
        n: usize,
        alpha: f32,
        beta: f32,
        x: &mut Self::Buf,
    ) -> Result<()> {
        fits_i32("eye_axpy", &[groups, n, n])?;
        need("x", self.len(x), 0, groups * n * n)?;
        self.counters().launch(counters::Op::EyeAxpy);
        // SAFETY: the size the hook relies on was checked just above.
        unsafe { self.raw_eye_axpy(groups, n, alpha, beta, None, x) }
    }
    /// # Safety
    /// `x` (when given, else `out` itself is the input) and `out` hold
    /// `groups·N·N` elements.
    #[doc(hidden)]
    unsafe fn raw_eye_axpy(
        &self,
        groups: usize,
        n: usize,
        alpha: f32,
        beta: f32,
        x: Option<&Self::Buf>,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// Per element the gradients of the key-indexed vectors `k_k`, `k_a`
    /// and `r_k` (docs/sdt.md): `dkk`, `dka`, `drk` `[rows, C]`,
    /// overwritten (the caller sums them over rows, [`Self::sum_batch`]).
    fn sdt_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        x: &SdtBwdBufs<'_, Self::Buf>,
        dkk: &mut Self::Buf,
        dka: &mut Self::Buf,
        drk: &mut Self::Buf,
    ) -> Result<()> {
        check::rows_heads(
            "sdt_bwd",
            rows,
            h,
            n,
            &[
                ("k", self.len(x.kk.k)),
                ("da", self.len(x.kk.da)),
                ("d_kout", self.len(x.kk.d_kout)),
                ("d_a", self.len(x.kk.d_a)),
                ("d_b", self.len(x.kk.d_b)),
                ("r", self.len(x.r)),
                ("kt", self.len(x.kt)),
                ("v", self.len(x.v)),
                ("g", self.len(x.g)),
                ("dout", self.len(x.dout)),
                ("dkk", self.len(dkk)),
                ("dka", self.len(dka)),
                ("drk", self.len(drk)),
            ],
            &[("a0", self.len(x.kk.a0)), ("k_k", self.len(x.kk.k_k))],
        )?;
        self.counters().launch(counters::Op::SdtBwd);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_sdt_bwd(rows, h, n, x, dkk, dka, drk) }
    }
    /// # Safety
    /// The sizes must pass the checks of [`Self::sdt_bwd`].
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw_sdt_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        x: &SdtBwdBufs<'_, Self::Buf>,
        dkk: &mut Self::Buf,
        dka: &mut Self::Buf,
        drk: &mut Self::Buf,
    ) -> Result<()>;

    /// `x *= m` over the first `n` elements (a sparse delta's gradient
    /// masked, docs/sdt.md).
    fn mask_mul(&self, n: usize, m: &Self::Buf, x: &mut Self::Buf) -> Result<()> {
        fits_i32("mask_mul", &[n])?;
        need("m", self.len(m), 0, n)?;
        need("x", self.len(x), 0, n)?;
        self.counters().launch(counters::Op::MaskMul);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_mask_mul(n, m, x) }
    }
    /// # Safety
    /// `m` and `x` hold ≥ n elements, n within int32.
    #[doc(hidden)]
    unsafe fn raw_mask_mul(&self, n: usize, m: &Self::Buf, x: &mut Self::Buf) -> Result<()>;

    /// The LoRA branch's input (docs/lora.md): `out[i, j] = x[i, j]·scale`
    /// where element `(i, j)` survives dropout, else 0, for `rows` rows of
    /// width `k` read from `x_off + i·ldx` into a dense `out [rows, k]`.
    /// The rows are sequences of `t` rows, the first of them sequence
    /// `seq0` of the batch (`seqs = (t, seq0)`). With `keep` = 1 nothing is
    /// dropped; else an element survives when
    /// [`backward_ref::lora_keep`](super::backward_ref::lora_keep) says so
    /// (a hash of seed, sequence, position and column: the same on every
    /// backend and however a batch is split). Applied with the same seed to
    /// `∂L/∂out` it gives `∂L/∂x` (the map is diagonal).
    #[allow(clippy::too_many_arguments)]
    fn lora_in(
        &self,
        rows: usize,
        k: usize,
        x: &Self::Buf,
        x_off: usize,
        ldx: usize,
        seqs: (usize, usize),
        seed: u32,
        keep: f32,
        scale: f32,
        out: &mut Self::Buf,
    ) -> Result<()> {
        fits_i32("lora_in", &[rows, k])?;
        fits_i32("lora_in", &[rows.max(1), ldx])?;
        fits_i32("lora_in", &[seqs.0.max(1), seqs.1 + rows])?;
        if ldx < k || seqs.0 == 0 {
            return Err(Error::Invalid(format!(
                "lora_in: row stride {ldx} of x is below its width {k}, or 0 rows per sequence"
            )));
        }
        if !(keep > 0.0 && keep <= 1.0 && scale.is_finite()) {
            return Err(Error::Invalid(format!(
                "lora_in: keep probability {keep} (must be in (0, 1]) or scale {scale} \
                 (must be finite)"
            )));
        }
        if rows > 0 {
            need("x", self.len(x), x_off, (rows - 1) * ldx + k)?;
        }
        need("out", self.len(out), 0, rows * k)?;
        self.counters().launch(counters::Op::LoraIn);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_lora_in(rows, k, x, x_off, ldx, seqs, seed, keep, scale, out) }
    }
    /// # Safety
    /// What [`Self::lora_in`] checks: x from `x_off` ≥ (rows−1)·ldx + k with
    /// ldx ≥ k, out ≥ rows·k, all within int32.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw_lora_in(
        &self,
        rows: usize,
        k: usize,
        x: &Self::Buf,
        x_off: usize,
        ldx: usize,
        seqs: (usize, usize),
        seed: u32,
        keep: f32,
        scale: f32,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// A device scalar: `out[slot] += Σ x` (`squares` false) or `Σ x²`
    /// (true) over the first `n` elements of x; nothing leaves the device.
    fn reduce_acc(
        &self,
        squares: bool,
        n: usize,
        x: &Self::Buf,
        out: &mut Self::Buf,
        slot: usize,
    ) -> Result<()> {
        fits_i32("reduce_acc", &[n])?;
        need("x", self.len(x), 0, n)?;
        need("out", self.len(out), slot, 1)?;
        self.counters().launch(counters::Op::Reduce);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_reduce_acc(squares, n, x, out, slot) }
    }
    /// # Safety
    /// x ≥ n and out ≥ slot + 1 elements (what [`Self::reduce_acc`] checks).
    #[doc(hidden)]
    unsafe fn raw_reduce_acc(
        &self,
        squares: bool,
        n: usize,
        x: &Self::Buf,
        out: &mut Self::Buf,
        slot: usize,
    ) -> Result<()>;

    /// `Σ x²` over the first `n` elements (partial sums on the device,
    /// finished in f64 on the host).
    fn sumsq(&self, n: usize, x: &Self::Buf) -> Result<f64> {
        need("x", self.len(x), 0, n)?;
        self.counters().launch(counters::Op::Sumsq);
        // SAFETY: the sizes the hook relies on were checked just above.
        unsafe { self.raw_sumsq(n, x) }
    }
    /// # Safety
    /// `x` must hold at least `n` elements (what [`Self::sumsq`] checks; the
    /// kernels' `int32` limit is the device backends' own check).
    #[doc(hidden)]
    unsafe fn raw_sumsq(&self, n: usize, x: &Self::Buf) -> Result<f64>;
}

/// (checkpoints, scratch) of the checkpointing WKV ops on the emulator and
/// CUDA: enough for any kernel version (the version that runs can depend
/// on the decays), at least 1 each.
pub(super) fn kernel_wkv_ws_len(b: usize, t: usize, h: usize, n: usize) -> (usize, usize) {
    use crate::wkv7::Version;
    let d = crate::wkv7::Dims { b, t, h, n };
    let ck = Version::ALL
        .iter()
        .map(|v| v.ckpt_len(&d))
        .max()
        .unwrap_or(0);
    let sc = Version::ALL
        .iter()
        .map(|v| v.scratch_len(&d))
        .max()
        .unwrap_or(0);
    (ck.max(1), sc.max(1))
}

// ---- shape checks shared by the implementations ---------------------------

pub(crate) mod check {
    use super::*;

    pub fn matmul_t(dy: usize, m: usize, w: usize, n: usize, k: usize, dx: usize) -> Result<()> {
        fits_i32("matmul_t", &[m, n])?;
        fits_i32("matmul_t", &[n, k])?;
        fits_i32("matmul_t", &[m, k])?;
        need("dy", dy, 0, m * n)?;
        need("w", w, 0, n * k)?;
        need("dx", dx, 0, m * k)
    }

    pub fn layer_norm_bwd(
        x: usize,
        off: usize,
        rows: usize,
        c: usize,
        weight: usize,
        dy: usize,
        dx: usize,
    ) -> Result<()> {
        if c == 0 {
            return Err(Error::Invalid(
                "layer_norm_bwd: C must be at least 1".into(),
            ));
        }
        if off % c != 0 {
            return Err(Error::Invalid(format!(
                "layer_norm_bwd: offset {off} is not a multiple of C = {c}"
            )));
        }
        fits_i32("layer_norm_bwd", &[off / c + rows, c])?;
        need("x", x, off, rows * c)?;
        need("weight", weight, 0, c)?;
        need("dy", dy, 0, rows * c)?;
        need("dx", dx, off, rows * c)
    }

    pub fn token_shift_bwd(
        b: usize,
        t: usize,
        c: usize,
        dmix: &[usize],
        mu: usize,
        dstate: usize,
        dx: usize,
    ) -> Result<()> {
        if dmix.is_empty() || dmix.len() > 6 {
            return Err(Error::Invalid(format!(
                "token_shift_bwd: {} mixes (1 to 6 supported)",
                dmix.len()
            )));
        }
        if c == 0 {
            return Err(Error::Invalid(
                "token_shift_bwd: C must be at least 1".into(),
            ));
        }
        if b == 0 {
            return Err(Error::Invalid(
                "token_shift_bwd: B must be at least 1".into(),
            ));
        }
        fits_i32("token_shift_bwd", &[b, t, c])?;
        for (i, &d) in dmix.iter().enumerate() {
            need(&format!("dmix[{i}]"), d, 0, b * t * c)?;
        }
        need("mu", mu, 0, dmix.len() * c)?;
        need("dstate", dstate, 0, b * c)?;
        need("dx", dx, 0, b * t * c)
    }

    pub fn act_bwd(n: usize, c: usize, pre: usize, bias: Option<usize>, dy: usize) -> Result<()> {
        if c == 0 {
            return Err(Error::Invalid("act_bwd: C must be at least 1".into()));
        }
        fits_i32("act_bwd", &[n])?;
        need("pre", pre, 0, n)?;
        if let Some(b) = bias {
            need("bias", b, 0, c)?;
        }
        need("dy", dy, 0, n)
    }

    pub fn rows_heads(
        what: &str,
        rows: usize,
        h: usize,
        n: usize,
        rows_c: &[(&str, usize)],
        c_vecs: &[(&str, usize)],
    ) -> Result<()> {
        super::super::check::rows_heads(what, rows, h, n, rows_c, c_vecs)
    }

    pub fn elems(
        what: &str,
        n: usize,
        c: usize,
        bufs: &[(&str, usize)],
        cv: &[(&str, usize)],
    ) -> Result<()> {
        if c == 0 {
            return Err(Error::Invalid(format!("{what}: C must be at least 1")));
        }
        fits_i32(what, &[n])?;
        for (name, len) in bufs {
            need(name, *len, 0, n)?;
        }
        for (name, len) in cv {
            need(name, *len, 0, c)?;
        }
        Ok(())
    }

    pub fn xent(
        rows: usize,
        v: usize,
        logits: usize,
        targets: &[u32],
        mask: &[f32],
        soft: Option<usize>,
        loss: usize,
    ) -> Result<()> {
        if v == 0 {
            return Err(Error::Invalid("xent: V must be at least 1".into()));
        }
        fits_i32("xent", &[rows, v])?;
        need("logits", logits, 0, rows * v)?;
        need("targets", targets.len(), 0, rows)?;
        need("mask", mask.len(), 0, rows)?;
        if let Some((i, &t)) = targets[..rows]
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= v)
        {
            return Err(Error::Invalid(format!(
                "xent: target {t} at row {i} is out of range (V = {v})"
            )));
        }
        if let Some(s) = soft {
            need("soft", s, 0, rows * v)?;
        }
        need("loss", loss, 0, rows)
    }

    pub fn outer_acc(rows: usize, h: usize, n: usize, r: usize, acc: usize) -> Result<()> {
        check_heads(h, n)?;
        fits_i32("outer_acc", &[rows, h, n])?;
        fits_i32("outer_acc", &[h, n, n])?;
        need("r", r, 0, rows * h * n)?;
        need("acc", acc, 0, h * n * n)
    }

    /// Sizes of [`BackwardOps::up_fwd`] / [`BackwardOps::up_bwd`]:
    /// `rows_c` buffers `[rows, C]`, `rows_m` buffers `[rows, H, M]`,
    /// `hnm` buffers `[H, N, M]`, and the kernel's three tensors.
    #[allow(clippy::too_many_arguments)]
    pub fn up(
        what: &str,
        rows: usize,
        h: usize,
        n: usize,
        m: usize,
        linear: bool,
        kernel: [usize; 3],
        rows_c: &[(&str, usize)],
        rows_m: &[(&str, usize)],
        hnm: &[(&str, usize)],
    ) -> Result<()> {
        check_heads(h, n)?;
        if m == 0 {
            return Err(Error::Invalid(format!(
                "{what}: M (support vectors) must be at least 1"
            )));
        }
        if linear && m != n {
            return Err(Error::Invalid(format!(
                "{what}: the linear read-out (state offset) needs M = N, got M = {m}, N = {n}"
            )));
        }
        fits_i32(what, &[rows, h, n])?;
        fits_i32(what, &[rows, h, m])?;
        fits_i32(what, &[h, n, m])?;
        let [centres, gamma, u] = kernel;
        if !linear {
            need("centres", centres, 0, h * m * n)?;
            need("gamma", gamma, 0, h)?;
        }
        need("u", u, 0, h * n * m)?;
        for (name, len) in rows_c {
            need(name, *len, 0, rows * h * n)?;
        }
        for (name, len) in rows_m {
            need(name, *len, 0, rows * h * m)?;
        }
        for (name, len) in hnm {
            need(name, *len, 0, h * n * m)?;
        }
        Ok(())
    }

    pub fn batched_matmul(groups: usize, n: usize, a: usize, b: usize, out: usize) -> Result<()> {
        fits_i32("batched_matmul", &[groups, n, n])?;
        for (name, len) in [("a", a), ("b", b), ("out", out)] {
            need(name, len, 0, groups * n * n)?;
        }
        Ok(())
    }

    pub fn adam(n: usize, p: usize, g: usize, m: usize, v: usize) -> Result<()> {
        fits_i32("adam", &[n])?;
        for (name, len) in [("p", p), ("g", g), ("m", m), ("v", v)] {
            need(name, len, 0, n)?;
        }
        Ok(())
    }

    pub fn wkv_bwd(
        t: usize,
        h: usize,
        n: usize,
        seq: &[(&str, usize)],
        st: &[(&str, usize)],
    ) -> Result<()> {
        let d = crate::wkv7::Dims { b: 1, t, h, n };
        d.validate()?;
        for (name, len) in seq {
            exact(name, *len, d.seq_len())?;
        }
        for (name, len) in st {
            exact(name, *len, d.state_len())?;
        }
        Ok(())
    }

    /// [`wkv_bwd`]'s dims with buffers at least (not exactly) as long:
    /// the checkpointing ops read and write the first `[B, T, H, N]` /
    /// `[B, H, N, N]` elements of workspace buffers.
    pub fn wkv_ckpt(
        b: usize,
        t: usize,
        h: usize,
        n: usize,
        seq: &[(&str, usize)],
        st: &[(&str, usize)],
    ) -> Result<()> {
        let d = crate::wkv7::Dims { b, t, h, n };
        d.validate()?;
        for (name, len) in seq {
            need(name, *len, 0, d.seq_len())?;
        }
        for (name, len) in st {
            need(name, *len, 0, d.state_len())?;
        }
        Ok(())
    }

    fn exact(name: &str, len: usize, want: usize) -> Result<()> {
        if len != want {
            return Err(Error::Shape {
                name: name.to_string(),
                expected: vec![want],
                got: vec![len],
            });
        }
        Ok(())
    }
}

/// Host-buffer WKV forward+backward through a `wkv7` backend (Cpu or Emu);
/// the caller checked the sizes ([`BackwardOps::wkv_bwd`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn host_wkv_bwd(
    be: &crate::wkv7::Backend,
    ver: crate::wkv7::Version,
    t: usize,
    h: usize,
    n: usize,
    x: [&Vec<f32>; 6],
    h0: &[f32],
    dy: &[f32],
    grads: [&mut Vec<f32>; 6],
    dh0: &mut Vec<f32>,
) -> Result<()> {
    let d = crate::wkv7::Dims { b: 1, t, h, n };
    let (_, g) = be.forward_backward_v(
        ver,
        &d,
        &crate::wkv7::Inputs {
            r: x[0],
            w: x[1],
            k: x[2],
            v: x[3],
            a: x[4],
            b: x[5],
            h0: Some(h0),
        },
        &crate::wkv7::GradInputs { dy, dh_t: None },
    )?;
    let [dr, dw, dk, dv, da, db] = grads;
    *dr = g.dr;
    *dw = g.dw;
    *dk = g.dk;
    *dv = g.dv;
    *da = g.da;
    *db = g.db;
    *dh0 = g.dh0;
    Ok(())
}
