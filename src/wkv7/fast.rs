//! The fast CPU WKV-7 (f32, what the CPU ops backend runs): the forward
//! keeps the state every [`CHUNK`] tokens, the backward recomputes one
//! chunk's states from its checkpoint and walks it backwards — the v1
//! GPU kernels' scheme, on the CPU. Row loops are the AVX2+FMA kernels of
//! `ops::gemm` (dispatched at run time); (sequence, head) pairs run in
//! parallel. The recurrence and its backward are those of
//! [`super::reference`] (which stays the plain version it is checked
//! against, `tests/backward_ops.rs`).
//!
//! Shapes: r, w, k, v, a, b, y and their gradients `[B, T, H, N]`; h0, h_t,
//! dh0 `[B, H, N, N]` value-major; checkpoints `[B, H, ceil(T/16), N, N]`;
//! backward scratch `[B, H, 17, N, N]`.
// The kernels walk several parallel arrays with one index.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]
use rayon::prelude::*;

use crate::ops::gemm::{dot_imp, has_avx2_fma, madd};

/// Tokens between saved states.
pub const CHUNK: usize = 16;

/// Elements of the checkpoints and the backward scratch for `[B, T, H, N]`.
pub fn ws_len(b: usize, t: usize, h: usize, n: usize) -> (usize, usize) {
    (
        b * h * t.div_ceil(CHUNK) * n * n,
        b * h * (CHUNK + 1) * n * n,
    )
}

/// The inputs of one problem `[B, T, H, N]`.
pub struct Inputs<'a> {
    /// Receptance `[B, T, H, N]`.
    pub r: &'a [f32],
    /// Per-step decay in (0, 1] `[B, T, H, N]`.
    pub w: &'a [f32],
    /// Key `[B, T, H, N]`.
    pub k: &'a [f32],
    /// Value `[B, T, H, N]`.
    pub v: &'a [f32],
    /// In-context learning term `a` (the model passes −κ̂) `[B, T, H, N]`.
    pub a: &'a [f32],
    /// In-context learning term `b` (the model passes κ̂ ⊙ α) `[B, T, H, N]`.
    pub b: &'a [f32],
}

/// One token for one (sequence, head), its inputs at `x.*[q..q + n]`:
/// `S ← S diag(w) + (S a) bᵀ + v kᵀ`, `y = S r`; writes `S a` into `sa`
/// when given.
#[inline(always)]
fn step<const F: bool>(
    s: &mut [f32],
    n: usize,
    x: &Inputs<'_>,
    q: usize,
    y: &mut [f32],
    mut sa: Option<&mut [f32]>,
) {
    let (r, w, k, v, a, b) = (
        &x.r[q..q + n],
        &x.w[q..q + n],
        &x.k[q..q + n],
        &x.v[q..q + n],
        &x.a[q..q + n],
        &x.b[q..q + n],
    );
    for i in 0..n {
        let si = &mut s[i * n..(i + 1) * n];
        let sai = dot_imp::<f32, F>(si, a);
        if let Some(sa) = sa.as_deref_mut() {
            sa[i] = sai;
        }
        let vi = v[i];
        for j in 0..n {
            si[j] = madd::<f32, F>(vi, k[j], madd::<f32, F>(sai, b[j], si[j] * w[j]));
        }
        y[i] = dot_imp::<f32, F>(si, r);
    }
}

/// Forward of one (sequence, head): the input slices are this sequence's
/// rows (stride `c` between tokens, offset `o` of the head); `s` the state
/// (in: h0, out: h_T), `ck` its `ceil(T/16)` checkpoints, `y` the pair's
/// outputs `[T, N]` (compact).
#[inline(always)]
fn fwd_pair_imp<const F: bool>(
    x: &Inputs<'_>,
    t_len: usize,
    c: usize,
    o: usize,
    n: usize,
    s: &mut [f32],
    ck: &mut [f32],
    y: &mut [f32],
) {
    let nn = n * n;
    let mut yv = vec![0f32; n];
    for t in 0..t_len {
        if t % CHUNK == 0 {
            ck[(t / CHUNK) * nn..(t / CHUNK + 1) * nn].copy_from_slice(s);
        }
        let q = t * c + o;
        step::<F>(s, n, x, q, &mut yv, None);
        y[t * n..(t + 1) * n].copy_from_slice(&yv);
    }
}
/// [`fwd_pair_imp`] compiled for AVX2+FMA when the CPU has them.
fn fwd_pair(
    x: &Inputs<'_>,
    t_len: usize,
    c: usize,
    o: usize,
    n: usize,
    s: &mut [f32],
    ck: &mut [f32],
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fast(
            x: &Inputs<'_>,
            t_len: usize,
            c: usize,
            o: usize,
            n: usize,
            s: &mut [f32],
            ck: &mut [f32],
            y: &mut [f32],
        ) {
            fwd_pair_imp::<true>(x, t_len, c, o, n, s, ck, y)
        }
        if has_avx2_fma() {
            // SAFETY: the CPU reports avx2 and fma (checked just above).
            return unsafe { fast(x, t_len, c, o, n, s, ck, y) };
        }
    }
    fwd_pair_imp::<false>(x, t_len, c, o, n, s, ck, y)
}

/// Forward over `B × H` pairs in parallel: y, the checkpoints and (when
/// given) the final states. The caller checked every length.
pub fn forward(
    bsz: usize,
    t: usize,
    h: usize,
    n: usize,
    x: &Inputs<'_>,
    h0: &[f32],
    y: &mut [f32],
    ckpt: &mut [f32],
    h_t: Option<&mut [f32]>,
) {
    let (c, nn, nc) = (h * n, n * n, t.div_ceil(CHUNK));
    // each pair's outputs: its checkpoints, its final state, its y rows
    // (interleaved with other heads, so y is gathered after)
    let mut finals = vec![0f32; bsz * h * nn];
    let mut ys: Vec<Vec<f32>> = (0..bsz * h).map(|_| Vec::new()).collect();
    finals
        .par_chunks_mut(nn)
        .zip(ckpt[..bsz * h * nc * nn].par_chunks_mut(nc * nn))
        .zip(ys.par_iter_mut())
        .enumerate()
        .for_each(|(p, ((s, ck), yp))| {
            let (bb, hh) = (p / h, p % h);
            s.copy_from_slice(&h0[p * nn..(p + 1) * nn]);
            let base = bb * t * c;
            let xs = Inputs {
                r: &x.r[base..base + t * c],
                w: &x.w[base..base + t * c],
                k: &x.k[base..base + t * c],
                v: &x.v[base..base + t * c],
                a: &x.a[base..base + t * c],
                b: &x.b[base..base + t * c],
            };
            let mut yl = vec![0f32; t * n];
            fwd_pair(&xs, t, c, hh * n, n, s, ck, &mut yl);
            *yp = yl;
        });
    for (p, yl) in ys.iter().enumerate() {
        let (bb, hh) = (p / h, p % h);
        for tt in 0..t {
            let q = tt * c + hh * n;
            y[bb * t * c + q..bb * t * c + q + n].copy_from_slice(&yl[tt * n..(tt + 1) * n]);
        }
    }
    if let Some(ht) = h_t {
        ht[..bsz * h * nn].copy_from_slice(&finals);
    }
}

/// The gradients of one pair, `[T, N]` each (compact).
struct PairGrads {
    dr: Vec<f32>,
    dw: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    da: Vec<f32>,
    db: Vec<f32>,
}

/// Backward of one pair from its checkpoints: `ds` in: zero (no gradient
/// on the final state), out: dh0. `st` scratch of `(CHUNK + 1)·N²`.
#[inline(always)]
fn bwd_pair_imp<const F: bool>(
    x: &Inputs<'_>,
    dy: &[f32],
    t_len: usize,
    c: usize,
    o: usize,
    n: usize,
    ck: &[f32],
    ds: &mut [f32],
    st: &mut [f32],
    g: &mut PairGrads,
) {
    let nn = n * n;
    let mut yv = vec![0f32; n];
    let mut sa = vec![0f32; (CHUNK) * n];
    let mut dsa = vec![0f32; n];
    let nc = t_len.div_ceil(CHUNK);
    for ci in (0..nc).rev() {
        let t0 = ci * CHUNK;
        let len = CHUNK.min(t_len - t0);
        // the chunk's states: st[0] = checkpoint, st[u + 1] after token t0 + u
        st[..nn].copy_from_slice(&ck[ci * nn..(ci + 1) * nn]);
        for u in 0..len {
            let q = (t0 + u) * c + o;
            let (prev, next) = st.split_at_mut((u + 1) * nn);
            let s = &mut next[..nn];
            s.copy_from_slice(&prev[u * nn..(u + 1) * nn]);
            step::<F>(s, n, x, q, &mut yv, Some(&mut sa[u * n..(u + 1) * n]));
        }
        for u in (0..len).rev() {
            let q = (t0 + u) * c + o;
            let (r, w, k, v, a, b) = (
                &x.r[q..q + n],
                &x.w[q..q + n],
                &x.k[q..q + n],
                &x.v[q..q + n],
                &x.a[q..q + n],
                &x.b[q..q + n],
            );
            let dyv = &dy[q..q + n];
            let qo = (t0 + u) * n;
            let s_new = &st[(u + 1) * nn..(u + 2) * nn];
            let s_old = &st[u * nn..(u + 1) * nn];
            let sav = &sa[u * n..(u + 1) * n];
            let (dr, dw, dk, dv, da, db) = (
                &mut g.dr[qo..qo + n],
                &mut g.dw[qo..qo + n],
                &mut g.dk[qo..qo + n],
                &mut g.dv[qo..qo + n],
                &mut g.da[qo..qo + n],
                &mut g.db[qo..qo + n],
            );
            dr.fill(0.0);
            dw.fill(0.0);
            dk.fill(0.0);
            da.fill(0.0);
            db.fill(0.0);
            for i in 0..n {
                let dsi = &mut ds[i * n..(i + 1) * n];
                let sni = &s_new[i * n..(i + 1) * n];
                let dyi = dyv[i];
                // y_i = S_t,i · r: dr += dy_i S_t,i ; dS_t,i += dy_i r
                for j in 0..n {
                    dr[j] = madd::<f32, F>(dyi, sni[j], dr[j]);
                    dsi[j] = madd::<f32, F>(dyi, r[j], dsi[j]);
                }
                dv[i] = dot_imp::<f32, F>(dsi, k);
                dsa[i] = dot_imp::<f32, F>(dsi, b);
                let (vi, sai) = (v[i], sav[i]);
                for j in 0..n {
                    dk[j] = madd::<f32, F>(dsi[j], vi, dk[j]);
                    db[j] = madd::<f32, F>(dsi[j], sai, db[j]);
                }
            }
            for i in 0..n {
                let dsi = &mut ds[i * n..(i + 1) * n];
                let soi = &s_old[i * n..(i + 1) * n];
                let dsai = dsa[i];
                for j in 0..n {
                    dw[j] = madd::<f32, F>(dsi[j], soi[j], dw[j]);
                    da[j] = madd::<f32, F>(dsai, soi[j], da[j]);
                    dsi[j] = madd::<f32, F>(dsai, a[j], dsi[j] * w[j]);
                }
            }
        }
    }
}
/// [`bwd_pair_imp`] compiled for AVX2+FMA when the CPU has them.
fn bwd_pair(
    x: &Inputs<'_>,
    dy: &[f32],
    t_len: usize,
    c: usize,
    o: usize,
    n: usize,
    ck: &[f32],
    ds: &mut [f32],
    st: &mut [f32],
    g: &mut PairGrads,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn fast(
            x: &Inputs<'_>,
            dy: &[f32],
            t_len: usize,
            c: usize,
            o: usize,
            n: usize,
            ck: &[f32],
            ds: &mut [f32],
            st: &mut [f32],
            g: &mut PairGrads,
        ) {
            bwd_pair_imp::<true>(x, dy, t_len, c, o, n, ck, ds, st, g)
        }
        if has_avx2_fma() {
            // SAFETY: the CPU reports avx2 and fma (checked just above).
            return unsafe { fast(x, dy, t_len, c, o, n, ck, ds, st, g) };
        }
    }
    bwd_pair_imp::<false>(x, dy, t_len, c, o, n, ck, ds, st, g)
}

/// Backward over `B × H` pairs in parallel from the checkpoints of
/// [`forward`] with the same inputs (zero gradient on the final state):
/// overwrites dr … db (their first `B·T·H·N`) and dh0. The caller checked
/// every length.
pub fn backward(
    bsz: usize,
    t: usize,
    h: usize,
    n: usize,
    x: &Inputs<'_>,
    ckpt: &[f32],
    dy: &[f32],
    grads: [&mut [f32]; 6],
    dh0: &mut [f32],
    scratch: &mut [f32],
) {
    let (c, nn, nc) = (h * n, n * n, t.div_ceil(CHUNK));
    let sw = (CHUNK + 1) * nn;
    let tc = t * c;
    let mut pgs: Vec<PairGrads> = (0..bsz * h)
        .map(|_| PairGrads {
            dr: Vec::new(),
            dw: Vec::new(),
            dk: Vec::new(),
            dv: Vec::new(),
            da: Vec::new(),
            db: Vec::new(),
        })
        .collect();
    dh0[..bsz * h * nn]
        .par_chunks_mut(nn)
        .zip(scratch[..bsz * h * sw].par_chunks_mut(sw))
        .zip(pgs.par_iter_mut())
        .enumerate()
        .for_each(|(p, ((ds, st), pg))| {
            let (bb, hh) = (p / h, p % h);
            let base = bb * tc;
            let xs = Inputs {
                r: &x.r[base..base + tc],
                w: &x.w[base..base + tc],
                k: &x.k[base..base + tc],
                v: &x.v[base..base + tc],
                a: &x.a[base..base + tc],
                b: &x.b[base..base + tc],
            };
            let z = || vec![0f32; t * n];
            *pg = PairGrads {
                dr: z(),
                dw: z(),
                dk: z(),
                dv: z(),
                da: z(),
                db: z(),
            };
            ds.fill(0.0);
            bwd_pair(
                &xs,
                &dy[base..base + tc],
                t,
                c,
                hh * n,
                n,
                &ckpt[p * nc * nn..(p + 1) * nc * nn],
                ds,
                st,
                pg,
            );
        });
    let [dr, dw, dk, dv, da, db] = grads;
    for (p, pg) in pgs.iter().enumerate() {
        let (bb, hh) = (p / h, p % h);
        for tt in 0..t {
            let q = tt * c + hh * n;
            let dst = bb * tc + q;
            let src = tt * n..(tt + 1) * n;
            dr[dst..dst + n].copy_from_slice(&pg.dr[src.clone()]);
            dw[dst..dst + n].copy_from_slice(&pg.dw[src.clone()]);
            dk[dst..dst + n].copy_from_slice(&pg.dk[src.clone()]);
            dv[dst..dst + n].copy_from_slice(&pg.dv[src.clone()]);
            da[dst..dst + n].copy_from_slice(&pg.da[src.clone()]);
            db[dst..dst + n].copy_from_slice(&pg.db[src]);
        }
    }
}
