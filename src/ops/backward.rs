//! The backward-pass and optimizer operations of on-device state tuning
//! ([`BackwardOps`], an extension of [`DeviceOps`]), with the same three
//! implementations:
//!
//! | impl | element-wise / row ops | GEMM `dy·W` | WKV backward |
//! |---|---|---|---|
//! | [`CpuOps`] | [`super::backward_ref`] (Rust twins) | Rust | `wkv7` Cpu (reference) |
//! | [`super::emu::EmuOps`] | `kernels/tune_ops.cu` on the CPU emulator | Rust | emulated `wkv7_v1` |
//! | [`super::cuda::CudaOps`] | `kernels/tune_ops.cu` on the GPU | cuBLAS sgemm | `wkv7_v1` fwd+bwd on device |
//!
//! The tuning engine that uses them is `crate::tune::device`. Layouts follow
//! [`super`]: activations `[rows, C]`, `C = H·N`, per-channel `[C]`,
//! matrices `[out, in]`. Every op checks its sizes ([`BackwardOps`] methods
//! return [`crate::Error::Shape`] naming the argument, never panic).
use super::backward_ref::{self as bref, AdamStep};
use super::{check_heads, fits_i32, need, Act, CpuOps, DeviceOps};
use crate::error::{Error, Result};

/// The forward inputs and output gradients of [`BackwardOps::kk_prep_bwd`].
pub struct KkBwdBufs<'a, B> {
    /// `[rows, C]` the key before normalisation
    pub k: &'a B,
    /// `[rows, C]` the α LoRA output (pre-sigmoid, without a0)
    pub da: &'a B,
    /// `[C]` a0, k_k, k_a
    pub a0: &'a B,
    pub k_k: &'a B,
    pub k_a: &'a B,
    /// `[rows, C]` gradients of k̃ (k_out), a and b
    pub d_kout: &'a B,
    pub d_a: &'a B,
    pub d_b: &'a B,
}

/// The forward inputs and output gradient of [`BackwardOps::group_norm_bwd`].
pub struct GnBwdBufs<'a, B> {
    /// `[rows, C]` the WKV output before GroupNorm
    pub y: &'a B,
    /// `[C]` GroupNorm affine
    pub weight: &'a B,
    pub bias: &'a B,
    /// `[rows, C]` r, k̃, v of the bonus term, and the gate g
    pub r: &'a B,
    pub k: &'a B,
    pub v: &'a B,
    /// `[C]`
    pub r_k: &'a B,
    pub g: &'a B,
    /// `[rows, C]` ∂L/∂(z ⊙ g)
    pub dout: &'a B,
}

/// The outputs of [`BackwardOps::group_norm_bwd`], each `[rows, C]`, overwritten.
pub struct GnBwdGrads<'a, B> {
    pub dy: &'a mut B,
    pub dr: &'a mut B,
    pub dk: &'a mut B,
    pub dv: &'a mut B,
    pub dg: &'a mut B,
}

/// One layer's kernel-upscaled read-out (docs/upscale.md) for
/// [`BackwardOps::up_fwd`] / [`BackwardOps::up_bwd`]: `m` support vectors
/// per head, `centres [H, M, N]`, `gamma [H]` (`γ = 1/(2σ²)`) and the
/// upscaled state `u [H, N, M]` (value-major).
pub struct UpBufs<'a, B> {
    pub m: usize,
    pub centres: &'a B,
    pub gamma: &'a B,
    pub u: &'a B,
}

/// Backward and optimizer operations on a [`DeviceOps`] backend's buffers.
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
    ) -> Result<()>;
    /// `acc[h] += Σ_t r_t,h r_t,hᵀ`; r `[rows, H, N]`, acc `[H, N, N]`.
    fn outer_acc(
        &self,
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
    ) -> Result<()>;
    /// `Σ x²` over the first `n` elements (partial sums on the device,
    /// finished in f64 on the host).
    fn sumsq(&self, n: usize, x: &Self::Buf) -> Result<f64>;
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
        fits_i32("token_shift_bwd", &[t, c])?;
        for (i, &d) in dmix.iter().enumerate() {
            need(&format!("dmix[{i}]"), d, 0, t * c)?;
        }
        need("mu", mu, 0, dmix.len() * c)?;
        need("dstate", dstate, 0, c)?;
        need("dx", dx, 0, t * c)
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
        fits_i32(what, &[rows, h, n])?;
        fits_i32(what, &[rows, h, m])?;
        fits_i32(what, &[h, n, m])?;
        let [centres, gamma, u] = kernel;
        need("centres", centres, 0, h * m * n)?;
        need("gamma", gamma, 0, h)?;
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

/// Host-buffer WKV forward+backward through a `wkv7` backend (Cpu or Emu).
#[allow(clippy::too_many_arguments)]
pub(crate) fn host_wkv_bwd(
    be: &crate::wkv7::Backend,
    t: usize,
    h: usize,
    n: usize,
    x: [&Vec<f32>; 6],
    h0: &[f32],
    dy: &[f32],
    grads: [&mut Vec<f32>; 6],
    dh0: &mut Vec<f32>,
) -> Result<()> {
    let lens: Vec<(&str, usize)> = ["r", "w", "k", "v", "a", "b", "dy"]
        .iter()
        .zip(x.iter().map(|b| b.len()).chain([dy.len()]))
        .map(|(a, b)| (*a, b))
        .chain(
            ["dr", "dw", "dk", "dv", "da", "db"]
                .iter()
                .zip(grads.iter().map(|b| b.len()))
                .map(|(a, b)| (*a, b)),
        )
        .collect();
    check::wkv_bwd(t, h, n, &lens, &[("h0", h0.len()), ("dh0", dh0.len())])?;
    let d = crate::wkv7::Dims { b: 1, t, h, n };
    let (_, g) = be.forward_backward(
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

impl BackwardOps for CpuOps {
    fn matmul_t(
        &self,
        dy: &Vec<f32>,
        m: usize,
        w: &Vec<f32>,
        n: usize,
        k: usize,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        check::matmul_t(dy.len(), m, w.len(), n, k, dx.len())?;
        bref::matmul_t(dy, m, w, n, k, dx);
        Ok(())
    }
    fn layer_norm_bwd(
        &self,
        x: &Vec<f32>,
        off: usize,
        rows: usize,
        c: usize,
        weight: &Vec<f32>,
        eps: f32,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        check::layer_norm_bwd(x.len(), off, rows, c, weight.len(), dy.len(), dx.len())?;
        bref::layer_norm_bwd(&x[off..], rows, c, weight, eps, dy, &mut dx[off..]);
        Ok(())
    }
    fn token_shift_bwd(
        &self,
        t: usize,
        c: usize,
        dmix: &[&Vec<f32>],
        mu: &Vec<f32>,
        dstate: &mut Vec<f32>,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        let lens: Vec<usize> = dmix.iter().map(|d| d.len()).collect();
        check::token_shift_bwd(t, c, &lens, mu.len(), dstate.len(), dx.len())?;
        let dm: Vec<&[f32]> = dmix.iter().map(|d| d.as_slice()).collect();
        bref::token_shift_bwd(t, c, &dm, mu, dstate, dx);
        Ok(())
    }
    fn act_bwd(
        &self,
        mode: Act,
        n: usize,
        c: usize,
        pre: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        dy: &mut Vec<f32>,
    ) -> Result<()> {
        check::act_bwd(n, c, pre.len(), bias.map(|b| b.len()), dy.len())?;
        bref::act_bwd(mode, n, c, pre, bias.map(|b| b.as_slice()), dy);
        Ok(())
    }
    fn kk_prep_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        x: &KkBwdBufs<'_, Vec<f32>>,
        dk: &mut Vec<f32>,
        dda: &mut Vec<f32>,
    ) -> Result<()> {
        check::rows_heads(
            "kk_prep_bwd",
            rows,
            h,
            n,
            &[
                ("k", x.k.len()),
                ("da", x.da.len()),
                ("d_kout", x.d_kout.len()),
                ("d_a", x.d_a.len()),
                ("d_b", x.d_b.len()),
                ("dk", dk.len()),
                ("dda", dda.len()),
            ],
            &[
                ("a0", x.a0.len()),
                ("k_k", x.k_k.len()),
                ("k_a", x.k_a.len()),
            ],
        )?;
        let r = bref::KkBwd {
            k: x.k,
            da: x.da,
            a0: x.a0,
            k_k: x.k_k,
            k_a: x.k_a,
            d_kout: x.d_kout,
            d_a: x.d_a,
            d_b: x.d_b,
        };
        bref::kk_prep_bwd(rows, h, n, &r, dk, dda);
        Ok(())
    }
    fn value_residual_bwd(
        &self,
        n: usize,
        c: usize,
        vraw: &Vec<f32>,
        v_first: &Vec<f32>,
        v0: &Vec<f32>,
        dvp: &Vec<f32>,
        dv: &mut Vec<f32>,
        dvf: &mut Vec<f32>,
        ddv: &mut Vec<f32>,
    ) -> Result<()> {
        check::elems(
            "value_residual_bwd",
            n,
            c,
            &[
                ("vraw", vraw.len()),
                ("v_first", v_first.len()),
                ("dvp", dvp.len()),
                ("dv", dv.len()),
                ("dvf", dvf.len()),
                ("ddv", ddv.len()),
            ],
            &[("v0", v0.len())],
        )?;
        bref::value_residual_bwd(n, c, vraw, v_first, v0, dvp, dv, dvf, ddv);
        Ok(())
    }
    fn group_norm_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        eps: f32,
        x: &GnBwdBufs<'_, Vec<f32>>,
        g: GnBwdGrads<'_, Vec<f32>>,
    ) -> Result<()> {
        check_gn_bwd(rows, h, n, x, &g, |b| b.len())?;
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
        bref::group_norm_bwd(
            rows,
            h,
            n,
            eps,
            &r,
            bref::GnBwdOut {
                dy: g.dy,
                dr: g.dr,
                dk: g.dk,
                dv: g.dv,
                dg: g.dg,
            },
        );
        Ok(())
    }
    fn wkv_bwd(
        &self,
        t: usize,
        h: usize,
        n: usize,
        rwkvab: [&Vec<f32>; 6],
        h0: &Vec<f32>,
        dy: &Vec<f32>,
        grads: [&mut Vec<f32>; 6],
        dh0: &mut Vec<f32>,
    ) -> Result<()> {
        host_wkv_bwd(
            &crate::wkv7::Backend::Cpu,
            t,
            h,
            n,
            rwkvab,
            h0,
            dy,
            grads,
            dh0,
        )
    }
    fn xent(
        &self,
        rows: usize,
        v: usize,
        logits: &mut Vec<f32>,
        targets: &[u32],
        mask: &[f32],
        soft: Option<&Vec<f32>>,
        lam: f32,
        loss: &mut Vec<f32>,
    ) -> Result<()> {
        check::xent(
            rows,
            v,
            logits.len(),
            targets,
            mask,
            soft.map(|s| s.len()),
            loss.len(),
        )?;
        bref::xent(
            rows,
            v,
            logits,
            targets,
            mask,
            soft.map(|s| s.as_slice()),
            lam,
            loss,
        );
        Ok(())
    }
    fn outer_acc(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        r: &Vec<f32>,
        acc: &mut Vec<f32>,
    ) -> Result<()> {
        check::outer_acc(rows, h, n, r.len(), acc.len())?;
        bref::outer_acc(rows, h, n, r, acc);
        Ok(())
    }
    fn up_fwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &UpBufs<'_, Vec<f32>>,
        r: &Vec<f32>,
        phi: &mut Vec<f32>,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        check_up_fwd(rows, h, n, k, r, phi, y, |b| b.len())?;
        bref::up_fwd(rows, h, n, &up_ref(k), r, phi, y);
        Ok(())
    }
    fn up_bwd(
        &self,
        rows: usize,
        h: usize,
        n: usize,
        k: &UpBufs<'_, Vec<f32>>,
        r: &Vec<f32>,
        phi: &Vec<f32>,
        dy: &Vec<f32>,
        du: &mut Vec<f32>,
        dr: &mut Vec<f32>,
    ) -> Result<()> {
        check_up_bwd(rows, h, n, k, [r, phi, dy, &*du, &*dr], |b| b.len())?;
        bref::up_bwd(rows, h, n, &up_ref(k), r, phi, dy, du, dr);
        Ok(())
    }
    fn batched_matmul(
        &self,
        groups: usize,
        n: usize,
        a: &Vec<f32>,
        b: &Vec<f32>,
        trans_b: bool,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        check::batched_matmul(groups, n, a.len(), b.len(), out.len())?;
        bref::batched_matmul(groups, n, a, b, trans_b, out);
        Ok(())
    }
    fn adam(
        &self,
        n: usize,
        s: &AdamStep,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<()> {
        check::adam(n, p.len(), g.len(), m.len(), v.len())?;
        bref::adam(n, s, p, g, m, v);
        Ok(())
    }
    fn sumsq(&self, n: usize, x: &Vec<f32>) -> Result<f64> {
        need("x", x.len(), 0, n)?;
        Ok(bref::sumsq(n, x))
    }
}

/// Size checks of [`BackwardOps::group_norm_bwd`], for any buffer type.
pub(crate) fn check_gn_bwd<B>(
    rows: usize,
    h: usize,
    n: usize,
    x: &GnBwdBufs<'_, B>,
    g: &GnBwdGrads<'_, B>,
    len: impl Fn(&B) -> usize,
) -> Result<()> {
    check::rows_heads(
        "group_norm_bwd",
        rows,
        h,
        n,
        &[
            ("y", len(x.y)),
            ("r", len(x.r)),
            ("k", len(x.k)),
            ("v", len(x.v)),
            ("g", len(x.g)),
            ("dout", len(x.dout)),
            ("dy", len(g.dy)),
            ("dr", len(g.dr)),
            ("dk", len(g.dk)),
            ("dv", len(g.dv)),
            ("dg", len(g.dg)),
        ],
        &[
            ("weight", len(x.weight)),
            ("bias", len(x.bias)),
            ("r_k", len(x.r_k)),
        ],
    )
}

fn up_ref<'a>(k: &'a UpBufs<'_, Vec<f32>>) -> bref::Up<'a> {
    bref::Up {
        m: k.m,
        centres: k.centres,
        gamma: k.gamma,
        u: k.u,
    }
}

/// Size checks of [`BackwardOps::up_fwd`], for any buffer type.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_up_fwd<B>(
    rows: usize,
    h: usize,
    n: usize,
    k: &UpBufs<'_, B>,
    r: &B,
    phi: &B,
    y: &B,
    len: impl Fn(&B) -> usize,
) -> Result<()> {
    check::up(
        "up_fwd",
        rows,
        h,
        n,
        k.m,
        [len(k.centres), len(k.gamma), len(k.u)],
        &[("r", len(r)), ("y", len(y))],
        &[("phi", len(phi))],
        &[],
    )
}

/// Size checks of [`BackwardOps::up_bwd`] (`bufs`: r, phi, dy, du, dr), for
/// any buffer type.
pub(crate) fn check_up_bwd<B>(
    rows: usize,
    h: usize,
    n: usize,
    k: &UpBufs<'_, B>,
    bufs: [&B; 5],
    len: impl Fn(&B) -> usize,
) -> Result<()> {
    let [r, phi, dy, du, dr] = bufs;
    check::up(
        "up_bwd",
        rows,
        h,
        n,
        k.m,
        [len(k.centres), len(k.gamma), len(k.u)],
        &[("r", len(r)), ("dy", len(dy)), ("dr", len(dr))],
        &[("phi", len(phi))],
        &[("du", len(du))],
    )
}
