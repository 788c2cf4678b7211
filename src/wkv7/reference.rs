//! CPU reference of the WKV-7 recurrence, forward and backward, generic over
//! f32 and f64 — the plain version every kernel is checked against.
//!
//! Per (b, h), with the state S `[N, N]` value-major (row i = value channel,
//! column j = key channel):
//!
//! ```text
//! sa_t = S_{t-1} a_t
//! S_t  = S_{t-1} diag(w_t) + sa_t b_tᵀ + v_t k_tᵀ
//! y_t  = S_t r_t
//! ```
//!
//! The backward stores every state of a (b, h) sequence (T+1 states of N²
//! values) and walks t = T-1 … 0:
//!
//! ```text
//! dS_t += dy_t r_tᵀ              dr_t = S_tᵀ dy_t
//! dv_t  = dS_t k_t               dk_t = dS_tᵀ v_t
//! dsa   = dS_t b_t               db_t = dS_tᵀ sa_t
//! dw_t  = colsum(dS_t ⊙ S_{t-1}) da_t = S_{t-1}ᵀ dsa
//! dS_{t-1} = dS_t diag(w_t) + dsa a_tᵀ
//! ```
use super::{check_len, Dims};
use crate::error::Result;

/// Runs `f` for every (b, h) index `0..count` and collects the results in
/// order: on rayon's pool with feature `model`, one after the other in the
/// lean build (which has no thread pool dependency).
fn per_head<T: Send>(count: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    #[cfg(feature = "model")]
    {
        use rayon::prelude::*;
        (0..count).into_par_iter().map(f).collect()
    }
    #[cfg(not(feature = "model"))]
    {
        (0..count).map(f).collect()
    }
}

/// The float types the reference runs in.
pub trait Real:
    Copy
    + Default
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
    + 'static
{
    /// Converts from f64 (rounding for f32).
    fn from_f64(x: f64) -> Self;
    /// Widens to f64.
    fn to_f64(self) -> f64;
}
impl Real for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}
impl Real for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
}

/// Reference inputs: r, w, k, v, a, b `[B, T, H, N]`; h0 `[B, H, N, N]`.
#[derive(Clone, Copy)]
pub struct RefInputs<'a, F> {
    /// Receptance `[B, T, H, N]`.
    pub r: &'a [F],
    /// Per-step decay in (0, 1] `[B, T, H, N]`.
    pub w: &'a [F],
    /// Key `[B, T, H, N]`.
    pub k: &'a [F],
    /// Value `[B, T, H, N]`.
    pub v: &'a [F],
    /// In-context learning term `a` (the model passes −κ̂) `[B, T, H, N]`.
    pub a: &'a [F],
    /// In-context learning term `b` (the model passes κ̂ ⊙ α) `[B, T, H, N]`.
    pub b: &'a [F],
    /// Initial state `[B, H, N, N]` (None = zero).
    pub h0: Option<&'a [F]>,
}

/// Reference gradients: dr … db `[B, T, H, N]`, dh0 `[B, H, N, N]`.
#[derive(Clone, Debug, Default)]
pub struct RefGrads<F> {
    /// Gradient of r.
    pub dr: Vec<F>,
    /// Gradient of w.
    pub dw: Vec<F>,
    /// Gradient of k.
    pub dk: Vec<F>,
    /// Gradient of v.
    pub dv: Vec<F>,
    /// Gradient of a.
    pub da: Vec<F>,
    /// Gradient of b.
    pub db: Vec<F>,
    /// Gradient of the initial state `[B, H, N, N]`.
    pub dh0: Vec<F>,
}

/// Index of element (b, t, h, i) in a `[B, T, H, N]` tensor.
#[inline]
fn at(d: &Dims, b: usize, t: usize, h: usize, i: usize) -> usize {
    ((b * d.t + t) * d.h + h) * d.n + i
}

/// Runs the forward of one (b, h) sequence; returns y `[T, N]` and, when
/// `keep` is set, all states `[T+1, N, N]` (else only the final one) and sa `[T, N]`.
fn fwd_one<F: Real>(
    d: &Dims,
    x: &RefInputs<F>,
    b: usize,
    h: usize,
    keep: bool,
) -> (Vec<F>, Vec<F>, Vec<F>) {
    let n = d.n;
    let mut s = vec![F::default(); n * n];
    if let Some(h0) = x.h0 {
        let o = (b * d.h + h) * n * n;
        s.copy_from_slice(&h0[o..o + n * n]);
    }
    let mut states = Vec::with_capacity(if keep { (d.t + 1) * n * n } else { 0 });
    let mut sas = Vec::with_capacity(if keep { d.t * n } else { 0 });
    if keep {
        states.extend_from_slice(&s);
    }
    let mut y = vec![F::default(); d.t * n];
    let mut sa = vec![F::default(); n];
    for t in 0..d.t {
        let o = at(d, b, t, h, 0);
        let (r, w, k, v, a, bb) = (
            &x.r[o..o + n],
            &x.w[o..o + n],
            &x.k[o..o + n],
            &x.v[o..o + n],
            &x.a[o..o + n],
            &x.b[o..o + n],
        );
        for i in 0..n {
            let mut acc = F::default();
            for j in 0..n {
                acc += s[i * n + j] * a[j];
            }
            sa[i] = acc;
        }
        for i in 0..n {
            let mut yi = F::default();
            for j in 0..n {
                let e = s[i * n + j] * w[j] + sa[i] * bb[j] + v[i] * k[j];
                s[i * n + j] = e;
                yi += e * r[j];
            }
            y[t * n + i] = yi;
        }
        if keep {
            states.extend_from_slice(&s);
            sas.extend_from_slice(&sa);
        }
    }
    if !keep {
        states = s;
    }
    (y, states, sas)
}

impl<F> RefInputs<'_, F> {
    /// Checks every length against `d`, naming the first tensor that is wrong.
    pub fn check(&self, d: &Dims) -> Result<()> {
        super::Inputs {
            r: self.r,
            w: self.w,
            k: self.k,
            v: self.v,
            a: self.a,
            b: self.b,
            h0: None,
        }
        .check(d)?;
        if let Some(h0) = self.h0 {
            check_len("h0", h0, &d.state_shape())?;
        }
        Ok(())
    }
}

/// Forward: returns y `[B, T, H, N]` and the final state h_t `[B, H, N, N]`.
pub fn forward<F: Real>(d: &Dims, x: &RefInputs<F>) -> Result<(Vec<F>, Vec<F>)> {
    x.check(d)?;
    let n = d.n;
    let per: Vec<(Vec<F>, Vec<F>)> = per_head(d.b * d.h, |bh| {
        let (y, s, _) = fwd_one(d, x, bh / d.h, bh % d.h, false);
        (y, s)
    });
    let mut y = vec![F::default(); d.seq_len()];
    let mut h_t = vec![F::default(); d.state_len()];
    for (bh, (yy, s)) in per.into_iter().enumerate() {
        let (b, h) = (bh / d.h, bh % d.h);
        for t in 0..d.t {
            let o = at(d, b, t, h, 0);
            y[o..o + n].copy_from_slice(&yy[t * n..(t + 1) * n]);
        }
        h_t[bh * n * n..(bh + 1) * n * n].copy_from_slice(&s);
    }
    Ok((y, h_t))
}

/// Backward: gradients of `Σ dy⊙y + Σ dh_t⊙h_t` with respect to every input
/// and the initial state. dy `[B, T, H, N]`, dh_t `[B, H, N, N]` (None = 0).
pub fn backward<F: Real>(
    d: &Dims,
    x: &RefInputs<F>,
    dy: &[F],
    dh_t: Option<&[F]>,
) -> Result<RefGrads<F>> {
    x.check(d)?;
    check_len("dy", dy, &d.seq_shape())?;
    if let Some(g) = dh_t {
        check_len("dh_t", g, &d.state_shape())?;
    }
    let n = d.n;
    type One<F> = (Vec<[F; 6]>, Vec<F>);
    let per: Vec<One<F>> = per_head(d.b * d.h, |bh| {
        let (b, h) = (bh / d.h, bh % d.h);
        let (_, states, sas) = fwd_one(d, x, b, h, true);
        let mut ds = vec![F::default(); n * n];
        if let Some(g) = dh_t {
            ds.copy_from_slice(&g[bh * n * n..(bh + 1) * n * n]);
        }
        // per (t, i): [dr, dw, dk, dv, da, db]
        let mut g = vec![[F::default(); 6]; d.t * n];
        let mut dsa = vec![F::default(); n];
        for t in (0..d.t).rev() {
            let o = at(d, b, t, h, 0);
            let (r, w, k, v, a, bb) = (
                &x.r[o..o + n],
                &x.w[o..o + n],
                &x.k[o..o + n],
                &x.v[o..o + n],
                &x.a[o..o + n],
                &x.b[o..o + n],
            );
            let dyt = &dy[o..o + n];
            let s_prev = &states[t * n * n..(t + 1) * n * n];
            let s_cur = &states[(t + 1) * n * n..(t + 2) * n * n];
            let sa = &sas[t * n..(t + 1) * n];
            for i in 0..n {
                for j in 0..n {
                    ds[i * n + j] += dyt[i] * r[j];
                }
            }
            for i in 0..n {
                let (mut dv, mut dsai) = (F::default(), F::default());
                for j in 0..n {
                    dv += ds[i * n + j] * k[j];
                    dsai += ds[i * n + j] * bb[j];
                }
                g[t * n + i][3] = dv;
                dsa[i] = dsai;
            }
            for j in 0..n {
                let (mut dr, mut dk, mut db, mut dw, mut da) = (
                    F::default(),
                    F::default(),
                    F::default(),
                    F::default(),
                    F::default(),
                );
                for i in 0..n {
                    dr += dyt[i] * s_cur[i * n + j];
                    dk += ds[i * n + j] * v[i];
                    db += ds[i * n + j] * sa[i];
                    dw += ds[i * n + j] * s_prev[i * n + j];
                    da += dsa[i] * s_prev[i * n + j];
                }
                let e = &mut g[t * n + j];
                e[0] = dr;
                e[1] = dw;
                e[2] = dk;
                e[4] = da;
                e[5] = db;
            }
            for i in 0..n {
                for j in 0..n {
                    ds[i * n + j] = ds[i * n + j] * w[j] + dsa[i] * a[j];
                }
            }
        }
        (g, ds)
    });
    let z = || vec![F::default(); d.seq_len()];
    let mut out = RefGrads {
        dr: z(),
        dw: z(),
        dk: z(),
        dv: z(),
        da: z(),
        db: z(),
        dh0: vec![F::default(); d.state_len()],
    };
    for (bh, (g, ds)) in per.into_iter().enumerate() {
        let (b, h) = (bh / d.h, bh % d.h);
        for t in 0..d.t {
            for i in 0..n {
                let o = at(d, b, t, h, i);
                let e = g[t * n + i];
                out.dr[o] = e[0];
                out.dw[o] = e[1];
                out.dk[o] = e[2];
                out.dv[o] = e[3];
                out.da[o] = e[4];
                out.db[o] = e[5];
            }
        }
        out.dh0[bh * n * n..(bh + 1) * n * n].copy_from_slice(&ds);
    }
    Ok(out)
}
