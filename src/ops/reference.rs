//! CPU twins of the kernels in `kernels/model_ops.cu` (plain Rust, generic
//! over the float type: f32, and f64 for the finite-difference checks; the
//! same formulas in the same order as the CPU model in `model::forward`), and
//! the CPU GEMM used by the CPU and emulated op backends.
//!
//! Every function assumes its slices were length-checked by the caller
//! ([`super::DeviceOps`] implementations do it); row-major `[rows, C]`
//! layouts with `C = H * N`.
use super::{Act, DECAY_SCALE};
use crate::real::Real;

/// Floor of the L2 norm in `normalize(k ⊙ k_k)`.
pub const NORM_EPS: f64 = 1e-12;
use half::bf16;
use rayon::prelude::*;

/// LayerNorm of each row of `C`: `y = (x − mean)/√(var + eps) · weight + bias`.
pub fn layer_norm<R: Real>(
    x: &[R],
    rows: usize,
    c: usize,
    weight: &[R],
    bias: &[R],
    eps: f32,
    y: &mut [R],
) {
    let eps = R::from_f32(eps);
    for r in 0..rows {
        let xr = &x[r * c..(r + 1) * c];
        let yr = &mut y[r * c..(r + 1) * c];
        let n = R::c(c as f64);
        let mean = R::sum(xr.iter().copied()) / n;
        let var = R::sum(xr.iter().map(|&v| (v - mean) * (v - mean))) / n;
        let inv = R::ONE / (var + eps).sqrt();
        for j in 0..c {
            yr[j] = (xr[j] - mean) * inv * weight[j] + bias[j];
        }
    }
}

/// The r_k bonus inputs of [`group_norm`]: r, k̃, v `[rows, C]` and r_k `[C]`.
#[derive(Clone, Copy)]
pub struct Bonus<'a, R = f32> {
    pub r: &'a [R],
    pub k: &'a [R],
    pub v: &'a [R],
    pub r_k: &'a [R],
}

/// In place, per (token, head) group of `n`: GroupNorm (eps), affine, plus
/// `(Σ_j r_j k_j r_k[h,j]) · v` when `bonus` is given, times `g` when given.
#[allow(clippy::too_many_arguments)]
pub fn group_norm<R: Real>(
    x: &mut [R],
    rows: usize,
    h: usize,
    n: usize,
    eps: f32,
    weight: &[R],
    bias: &[R],
    bonus: Option<Bonus<'_, R>>,
    g: Option<&[R]>,
) {
    let c = h * n;
    let (eps, nf) = (R::from_f32(eps), R::c(n as f64));
    for t in 0..rows {
        for h0 in (0..c).step_by(n) {
            let base = t * c + h0;
            let yh = &mut x[base..base + n];
            let mean = R::sum(yh.iter().copied()) / nf;
            let var = R::sum(yh.iter().map(|&z| (z - mean) * (z - mean))) / nf;
            let inv = R::ONE / (var + eps).sqrt();
            let bs = bonus.map(|b| {
                let mut s = R::ZERO;
                for j in 0..n {
                    s += b.r[base + j] * b.k[base + j] * b.r_k[h0 + j];
                }
                s
            });
            for j in 0..n {
                let q = h0 + j;
                let mut z = (yh[j] - mean) * inv * weight[q] + bias[q];
                if let (Some(b), Some(s)) = (bonus, bs) {
                    z += s * b.v[base + j];
                }
                if let Some(g) = g {
                    z *= g[base + j];
                }
                yh[j] = z;
            }
        }
    }
}

/// Per (token, head): α = σ(a0 + da), κ̂ = normalize(k ⊙ k_k),
/// `a = −κ̂`, `b = κ̂ ⊙ α`, `k_out = k ⊙ (1 + (α − 1) ⊙ k_a)`.
#[allow(clippy::too_many_arguments)]
pub fn kk_prep<R: Real>(
    rows: usize,
    h: usize,
    n: usize,
    k: &[R],
    da: &[R],
    a0: &[R],
    k_k: &[R],
    k_a: &[R],
    k_out: &mut [R],
    a: &mut [R],
    b: &mut [R],
) {
    let c = h * n;
    for t in 0..rows {
        for h0 in (0..c).step_by(n) {
            let base = t * c + h0;
            let mut ss = R::ZERO;
            for j in 0..n {
                let q = k[base + j] * k_k[h0 + j];
                ss += q * q;
            }
            let inv = R::ONE / ss.sqrt().max(R::c(NORM_EPS));
            for j in 0..n {
                let (i, q) = (base + j, h0 + j);
                let al = (a0[q] + da[i]).sigmoid();
                let kh = k[i] * k_k[q] * inv;
                a[i] = -kh;
                b[i] = kh * al;
                k_out[i] = k[i] * (R::ONE + (al - R::ONE) * k_a[q]);
            }
        }
    }
}

/// Token shift + lerp: `out[t, m, :] = x_t + (x_{t−1} − x_t) ⊙ mu[m]` with
/// `x_{−1} = state`; then `state = x_{T−1}`.
pub fn token_shift<R: Real>(
    t: usize,
    c: usize,
    x: &[R],
    state: &mut [R],
    mu: &[R],
    n_mix: usize,
    out: &mut [R],
) {
    if t == 0 {
        return;
    }
    for tt in 0..t {
        let cur = &x[tt * c..(tt + 1) * c];
        let prev = if tt == 0 {
            &state[..c]
        } else {
            &x[(tt - 1) * c..tt * c]
        };
        for m in 0..n_mix {
            let mu = &mu[m * c..(m + 1) * c];
            let o = &mut out[(tt * n_mix + m) * c..(tt * n_mix + m + 1) * c];
            for j in 0..c {
                o[j] = cur[j] + (prev[j] - cur[j]) * mu[j];
            }
        }
    }
    state[..c].copy_from_slice(&x[(t - 1) * c..t * c]);
}

/// In place: `x = f(bias + x)` (bias `[C]` broadcast over rows, or none).
pub fn act<R: Real>(mode: Act, x: &mut [R], c: usize, bias: Option<&[R]>) {
    let ds = R::from_f32(DECAY_SCALE);
    for (i, z) in x.iter_mut().enumerate() {
        let v = match bias {
            Some(b) => b[i % c] + *z,
            None => *z,
        };
        *z = match mode {
            Act::Tanh => v.tanh(),
            Act::Sigmoid => v.sigmoid(),
            Act::ReluSq => {
                let q = v.max(R::ZERO);
                q * q
            }
            Act::Decay => (-ds * v.sigmoid()).exp(),
        };
    }
}

/// Value residual, in place: `v += (v_first − v) ⊙ σ(v0 + dv)`.
pub fn value_residual<R: Real>(c: usize, v: &mut [R], v_first: &[R], v0: &[R], dv: &[R]) {
    for (i, vv) in v.iter_mut().enumerate() {
        *vv += (v_first[i] - *vv) * (v0[i % c] + dv[i]).sigmoid();
    }
}

/// Residual add, in place: `x += y`.
pub fn add<R: Real>(x: &mut [R], y: &[R]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Embedding gather: `out[t, :] = table[tokens[t], :]`.
pub fn embed<R: Real>(tokens: &[u32], table: &[R], c: usize, out: &mut [R]) {
    for (row, &tok) in out.chunks_mut(c).zip(tokens) {
        let e = tok as usize * c;
        row.copy_from_slice(&table[e..e + c]);
    }
}

/// `y[m, n] = x[m, k] · wᵀ` with `w` stored `[n, k]` (`nn.Linear` layout) and
/// row `i` of x starting at `i * ldx`. Rayon-parallel over output rows.
pub fn matmul(x: &[f32], ldx: usize, m: usize, w: &[f32], n: usize, k: usize, y: &mut [f32]) {
    matmul_impl(x, ldx, m, w, n, k, y)
}

/// [`matmul`] with bf16 weights: each product `x · f32(w)` is formed in f32
/// and accumulated in f32 (exact products when x is bf16-exact, as the bf16
/// operands of a tensor-core GEMM), in the summation order of [`matmul`].
pub fn matmul_bf16(x: &[f32], ldx: usize, m: usize, w: &[bf16], n: usize, k: usize, y: &mut [f32]) {
    matmul_impl(x, ldx, m, w, n, k, y)
}

/// CPU twin of `ops_f32_to_bf16`: `y[r·cols + j] = bf16_rn(x[r·ld + j])`.
pub fn f32_to_bf16(x: &[f32], ld: usize, rows: usize, cols: usize, y: &mut [bf16]) {
    for r in 0..rows {
        for j in 0..cols {
            y[r * cols + j] = bf16::from_f32(x[r * ld + j]);
        }
    }
}

fn matmul_impl<W: Copy + Sync + Into<f32>>(
    x: &[f32],
    ldx: usize,
    m: usize,
    w: &[W],
    n: usize,
    k: usize,
    y: &mut [f32],
) {
    let row = |i: usize, yr: &mut [f32]| {
        let xr = &x[i * ldx..i * ldx + k];
        for (o, yo) in yr.iter_mut().enumerate() {
            *yo = dot(xr, &w[o * k..(o + 1) * k]);
        }
    };
    if m * n * k < 1 << 16 {
        y[..m * n]
            .chunks_mut(n.max(1))
            .enumerate()
            .for_each(|(i, yr)| row(i, yr));
    } else if m >= rayon::current_num_threads() * 2 {
        y[..m * n]
            .par_chunks_mut(n.max(1))
            .enumerate()
            .for_each(|(i, yr)| row(i, yr));
    } else {
        // few rows (one-token mode): split the output columns instead
        for i in 0..m {
            let xr = &x[i * ldx..i * ldx + k];
            y[i * n..(i + 1) * n]
                .par_chunks_mut(64)
                .enumerate()
                .for_each(|(cb, yc)| {
                    for (o, yo) in yc.iter_mut().enumerate() {
                        let o = cb * 64 + o;
                        *yo = dot(xr, &w[o * k..(o + 1) * k]);
                    }
                });
        }
    }
}

/// Dot product with 8 independent partial sums.
fn dot<W: Copy + Into<f32>>(a: &[f32], b: &[W]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l].into();
        }
    }
    let mut s = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        s += x * (*y).into();
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + s
}
