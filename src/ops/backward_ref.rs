//! CPU twins of the backward and optimizer kernels in `kernels/tune_ops.cu`
//! (plain Rust, generic over the float type: f32, and f64 for the
//! finite-difference checks): the reference each emulated / CUDA kernel is checked
//! against (`tests/backward_ops.rs`), and the implementation of
//! [`super::backward::BackwardOps`] for [`super::cpu::CpuOps`].
//!
//! Every function assumes its slices were length-checked by the caller.
//! Layouts: activations row-major `[rows, C]`, `C = H·N`; per-channel
//! vectors `[C]`; matrices `[out, in]` as given to [`super::DeviceOps::matmul`].
use super::reference::NORM_EPS;
use super::{Act, DECAY_SCALE};
use crate::real::Real;

/// `dx[m, k] = dy[m, n] · w[n, k]` (the input gradient of `y = x wᵀ`).
pub fn matmul_t<R: Real>(dy: &[R], m: usize, w: &[R], n: usize, k: usize, dx: &mut [R]) {
    for i in 0..m {
        let out = &mut dx[i * k..(i + 1) * k];
        out.iter_mut().for_each(|v| *v = R::ZERO);
        for q in 0..n {
            let g = dy[i * n + q];
            if g == R::ZERO {
                continue;
            }
            let wr = &w[q * k..(q + 1) * k];
            for j in 0..k {
                out[j] += g * wr[j];
            }
        }
    }
}

/// `dw[n, k] (+)= dy[m, n]ᵀ · x[m, k]` (row `i` of x at `i·ldx`), summed
/// over `i` in order: the weight gradient of `y = x wᵀ`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_tn<R: Real>(
    dy: &[R],
    m: usize,
    n: usize,
    x: &[R],
    ldx: usize,
    k: usize,
    dw: &mut [R],
    accumulate: bool,
) {
    if !accumulate {
        dw[..n * k].iter_mut().for_each(|v| *v = R::ZERO);
    }
    for i in 0..m {
        let xr = &x[i * ldx..i * ldx + k];
        for o in 0..n {
            let g = dy[i * n + o];
            if g == R::ZERO {
                continue;
            }
            for (d, &xv) in dw[o * k..(o + 1) * k].iter_mut().zip(xr) {
                *d += g * xv;
            }
        }
    }
}

/// LayerNorm backward, accumulating: `dx[r] += ∂/∂x` of `y = x̂·weight + b`
/// for rows `r` of x `[rows, C]` given `dy [rows, C]` (statistics recomputed
/// from x). `x` and `dx` start at the same row.
pub fn layer_norm_bwd<R: Real>(
    x: &[R],
    rows: usize,
    c: usize,
    weight: &[R],
    eps: f32,
    dy: &[R],
    dx: &mut [R],
) {
    let (nf, eps) = (R::c(c as f64), R::from_f32(eps));
    for r in 0..rows {
        let xr = &x[r * c..(r + 1) * c];
        let mean = R::sum(xr.iter().copied()) / nf;
        let var = R::sum(xr.iter().map(|&v| (v - mean) * (v - mean))) / nf;
        let rs = R::ONE / (var + eps).sqrt();
        let (mut m1, mut m2) = (R::ZERO, R::ZERO);
        for j in 0..c {
            let g = dy[r * c + j] * weight[j];
            m1 += g;
            m2 += g * (xr[j] - mean) * rs;
        }
        let (m1, m2) = (m1 / nf, m2 / nf);
        for j in 0..c {
            let xh = (xr[j] - mean) * rs;
            dx[r * c + j] += rs * (dy[r * c + j] * weight[j] - m1 - xh * m2);
        }
    }
}

/// Token-shift backward. Forward: `out_m[t] = x_t + (x_{t−1} − x_t) ⊙ mu[m]`,
/// `x_{−1} = state_in`, `state_out = x_{T−1}`. Given `dmix[m]` `[T, C]`
/// (m < n_mix) and `dstate` = ∂L/∂state_out `[C]`: writes `dx [T, C]` and
/// replaces `dstate` with ∂L/∂state_in.
pub fn token_shift_bwd<R: Real>(
    t: usize,
    c: usize,
    dmix: &[&[R]],
    mu: &[R],
    dstate: &mut [R],
    dx: &mut [R],
) {
    if t == 0 {
        return;
    }
    for j in 0..c {
        for tt in 0..t {
            let mut cur = R::ZERO;
            let mut nxt = R::ZERO;
            for (m, d) in dmix.iter().enumerate() {
                let u = mu[m * c + j];
                cur += d[tt * c + j] * (R::ONE - u);
                if tt + 1 < t {
                    nxt += d[(tt + 1) * c + j] * u;
                }
            }
            if tt + 1 == t {
                nxt = dstate[j];
            }
            dx[tt * c + j] = cur + nxt;
        }
        let mut s = R::ZERO;
        for (m, d) in dmix.iter().enumerate() {
            s += d[j] * mu[m * c + j];
        }
        dstate[j] = s;
    }
}

/// Activation backward, in place on `dy` (`n` elements):
/// `dy *= f′(pre + bias)` with f as in [`super::reference::act`].
pub fn act_bwd<R: Real>(
    mode: Act,
    n: usize,
    c: usize,
    pre: &[R],
    bias: Option<&[R]>,
    dy: &mut [R],
) {
    for i in 0..n {
        let v = match bias {
            Some(b) => b[i % c] + pre[i],
            None => pre[i],
        };
        let d = match mode {
            Act::Tanh => {
                let t = v.tanh();
                R::ONE - t * t
            }
            Act::Sigmoid => {
                let s = Real::sigmoid(v);
                s * (R::ONE - s)
            }
            Act::ReluSq => R::c(2.0) * v.max(R::ZERO),
            Act::Decay => {
                let s = Real::sigmoid(v);
                let ds = R::from_f32(DECAY_SCALE);
                let w = (-ds * s).exp();
                -w * ds * s * (R::ONE - s)
            }
        };
        dy[i] *= d;
    }
}

/// Inputs of [`kk_prep_bwd`]: the forward's k, da `[rows, C]` and a0, k_k,
/// k_a `[C]`, and the gradients of its outputs k_out, a, b `[rows, C]`.
#[derive(Clone, Copy)]
pub struct KkBwd<'a, R = f32> {
    pub k: &'a [R],
    pub da: &'a [R],
    pub a0: &'a [R],
    pub k_k: &'a [R],
    pub k_a: &'a [R],
    pub d_kout: &'a [R],
    pub d_a: &'a [R],
    pub d_b: &'a [R],
}

/// The removal key's normalisation in one head of one row (`base` its
/// first element, `h0` its first channel): `inv = 1 / max(|κ|, ε)` with
/// `κ = k·k_k`, and `p = κ̂·dκ̂` with `dκ̂ = d_b·α − d_a` (0 when the norm is
/// clamped). Shared by [`kk_prep_bwd`] and [`sdt_bwd`].
fn kk_norm<R: Real>(x: &KkBwd<'_, R>, base: usize, h0: usize, n: usize) -> (R, R) {
    let mut ss = R::ZERO;
    for j in 0..n {
        let q = x.k[base + j] * x.k_k[h0 + j];
        ss += q * q;
    }
    let nrm = ss.sqrt();
    let inv = R::ONE / nrm.max(R::c(NORM_EPS));
    if nrm <= R::c(NORM_EPS) {
        return (inv, R::ZERO);
    }
    let mut p = R::ZERO;
    for j in 0..n {
        let (i, q) = (base + j, h0 + j);
        let al = Real::sigmoid(x.a0[q] + x.da[i]);
        let kh = x.k[i] * x.k_k[q] * inv;
        p += kh * (x.d_b[i] * al - x.d_a[i]);
    }
    (inv, p)
}

/// Backward of [`super::reference::kk_prep`]: writes `dk` (∂L/∂k) and `dda`
/// (∂L/∂da, the pre-sigmoid α input), both `[rows, C]`.
pub fn kk_prep_bwd<R: Real>(
    rows: usize,
    h: usize,
    n: usize,
    x: &KkBwd<'_, R>,
    dk: &mut [R],
    dda: &mut [R],
) {
    let c = h * n;
    for t in 0..rows {
        for h0 in (0..c).step_by(n) {
            let base = t * c + h0;
            let (inv, p) = kk_norm(x, base, h0, n);
            for j in 0..n {
                let (i, q) = (base + j, h0 + j);
                let al = Real::sigmoid(x.a0[q] + x.da[i]);
                let kh = x.k[i] * x.k_k[q] * inv;
                let dkh = x.d_b[i] * al - x.d_a[i];
                let dal = x.d_b[i] * kh + x.d_kout[i] * x.k[i] * x.k_a[q];
                dda[i] = dal * al * (R::ONE - al);
                dk[i] = x.d_kout[i] * (R::ONE + (al - R::ONE) * x.k_a[q])
                    + (dkh - kh * p) * inv * x.k_k[q];
            }
        }
    }
}

/// Backward of [`super::reference::value_residual`] (`v = vraw + (vf − vraw)·σ(v0 + dvp)`),
/// over `n` elements: on entry `dv` is ∂L/∂v, on exit ∂L/∂vraw;
/// `dvf += ∂L/∂v_first`; `ddv` = ∂L/∂dvp.
#[allow(clippy::too_many_arguments)]
pub fn value_residual_bwd<R: Real>(
    n: usize,
    c: usize,
    vraw: &[R],
    v_first: &[R],
    v0: &[R],
    dvp: &[R],
    dv: &mut [R],
    dvf: &mut [R],
    ddv: &mut [R],
) {
    for i in 0..n {
        let gv = Real::sigmoid(v0[i % c] + dvp[i]);
        let g = dv[i];
        dvf[i] += g * gv;
        ddv[i] = g * (v_first[i] - vraw[i]) * gv * (R::ONE - gv);
        dv[i] = g * (R::ONE - gv);
    }
}

/// Inputs of [`group_norm_bwd`]: the forward's pre-norm y, r, k̃, v, g
/// `[rows, C]`, weight, bias, r_k `[C]`, and `dout` = ∂L/∂(z ⊙ g) `[rows, C]`.
#[derive(Clone, Copy)]
pub struct GnBwd<'a, R = f32> {
    pub y: &'a [R],
    pub weight: &'a [R],
    pub bias: &'a [R],
    pub r: &'a [R],
    pub k: &'a [R],
    pub v: &'a [R],
    pub r_k: &'a [R],
    pub g: &'a [R],
    pub dout: &'a [R],
}

/// Outputs of [`group_norm_bwd`] (all `[rows, C]`, overwritten).
pub struct GnBwdOut<'a, R = f32> {
    pub dy: &'a mut [R],
    pub dr: &'a mut [R],
    pub dk: &'a mut [R],
    pub dv: &'a mut [R],
    pub dg: &'a mut [R],
}

/// Backward of the fused GroupNorm + bonus + gate of the time mix:
/// `z = GN(y)·weight + bias + (Σ_j r_j k̃_j r_k[j])·v`, `out = z ⊙ g`.
pub fn group_norm_bwd<R: Real>(
    rows: usize,
    h: usize,
    n: usize,
    eps: f32,
    x: &GnBwd<'_, R>,
    o: GnBwdOut<'_, R>,
) {
    let c = h * n;
    let (nf, eps) = (R::c(n as f64), R::from_f32(eps));
    for t in 0..rows {
        for h0 in (0..c).step_by(n) {
            let base = t * c + h0;
            let yh = &x.y[base..base + n];
            let mean = R::sum(yh.iter().copied()) / nf;
            let var = R::sum(yh.iter().map(|&z| (z - mean) * (z - mean))) / nf;
            let rs = R::ONE / (var + eps).sqrt();
            let mut bonus = R::ZERO;
            for j in 0..n {
                bonus += x.r[base + j] * x.k[base + j] * x.r_k[h0 + j];
            }
            let mut dbonus = R::ZERO;
            let (mut m1, mut m2) = (R::ZERO, R::ZERO);
            for j in 0..n {
                let (i, q) = (base + j, h0 + j);
                let yhat = (x.y[i] - mean) * rs;
                let z = yhat * x.weight[q] + x.bias[q] + bonus * x.v[i];
                o.dg[i] = x.dout[i] * z;
                let dz = x.dout[i] * x.g[i];
                o.dv[i] = bonus * dz;
                dbonus += dz * x.v[i];
                let gq = dz * x.weight[q];
                m1 += gq;
                m2 += gq * yhat;
            }
            let (m1, m2) = (m1 / nf, m2 / nf);
            for j in 0..n {
                let (i, q) = (base + j, h0 + j);
                let yhat = (x.y[i] - mean) * rs;
                let dz = x.dout[i] * x.g[i];
                o.dy[i] = rs * (dz * x.weight[q] - m1 - yhat * m2);
                o.dr[i] = dbonus * x.k[i] * x.r_k[q];
                o.dk[i] = dbonus * x.r[i] * x.r_k[q];
            }
        }
    }
}

/// Softmax cross-entropy (plus `lam`·KL(p ‖ softmax) with soft targets `p`),
/// per row of logits `[rows, V]`, weighted by `mask[row]`. In place: the
/// logits become ∂L/∂logits; `loss[row]` = `mask·(CE + lam·KL)` (0 where the
/// mask is 0). Soft-target entries ≤ 0 are skipped in the KL value.
#[allow(clippy::too_many_arguments)]
pub fn xent<R: Real>(
    rows: usize,
    v: usize,
    logits: &mut [R],
    targets: &[u32],
    mask: &[R],
    soft: Option<&[R]>,
    lam: f32,
    loss: &mut [R],
) {
    let lr = R::from_f32(lam);
    for r in 0..rows {
        let row = &mut logits[r * v..(r + 1) * v];
        let mk = mask[r];
        if mk == R::ZERO {
            row.iter_mut().for_each(|z| *z = R::ZERO);
            loss[r] = R::ZERO;
            continue;
        }
        let mx = row.iter().fold(R::NEG_INFINITY, |a, &b| a.max(b));
        let se = R::sum(row.iter().map(|&z| (z - mx).exp()));
        let lse = mx + se.ln();
        let tgt = targets[r] as usize;
        let mut l = lse - row[tgt];
        match soft.filter(|_| lam != 0.0) {
            Some(p) => {
                let p = &p[r * v..(r + 1) * v];
                let (mut kl, mut psum) = (R::ZERO, R::ZERO);
                for j in 0..v {
                    if p[j] > R::ZERO {
                        kl += p[j] * (p[j].ln() - (row[j] - lse));
                        psum += p[j];
                    }
                }
                l += lr * kl;
                for j in 0..v {
                    let q = (row[j] - lse).exp();
                    let oh = if j == tgt { R::ONE } else { R::ZERO };
                    row[j] = mk * ((q - oh) + lr * (psum * q - p[j]));
                }
            }
            None => {
                for (j, z) in row.iter_mut().enumerate() {
                    let q = (*z - lse).exp();
                    let oh = if j == tgt { R::ONE } else { R::ZERO };
                    *z = mk * (q - oh);
                }
            }
        }
        loss[r] = mk * l;
    }
}

/// Softmax with temperature per row of `x` `[rows, V]`, in place:
/// `x = exp((x − max)·inv_temp) / Σ exp((x − max)·inv_temp)` (the CPU twin
/// of `tune_softmax_f32`).
pub fn softmax<R: Real>(rows: usize, v: usize, inv_temp: f32, x: &mut [R]) {
    let it = R::from_f32(inv_temp);
    for row in x[..rows * v].chunks_mut(v) {
        let mx = row.iter().fold(R::NEG_INFINITY, |a, &b| a.max(b));
        let mut s = R::ZERO;
        for z in row.iter_mut() {
            *z = ((*z - mx) * it).exp();
            s += *z;
        }
        row.iter_mut().for_each(|z| *z = *z / s);
    }
}

/// `acc[h, i, j] += Σ_t r[t, h, i] · r[t, h, j]` (DBP second moments),
/// r `[rows, H, N]`, acc `[H, N, N]`.
pub fn outer_acc<R: Real>(rows: usize, h: usize, n: usize, r: &[R], acc: &mut [R]) {
    let c = h * n;
    for hh in 0..h {
        for i in 0..n {
            for j in 0..n {
                let mut s = R::ZERO;
                for t in 0..rows {
                    s += r[t * c + hh * n + i] * r[t * c + hh * n + j];
                }
                acc[(hh * n + i) * n + j] += s;
            }
        }
    }
}

/// The fixed part and `U` of the kernel-upscaled read-out (docs/upscale.md)
/// of one layer: `centres [H, M, N]`, `gamma [H]`, `u [H, N, M]`.
pub struct Up<'a, R = f32> {
    /// Support vectors per head.
    pub m: usize,
    /// State-offset tuning: `φ = r` (M = N; centres and widths unread).
    pub linear: bool,
    pub centres: &'a [R],
    pub gamma: &'a [R],
    pub u: &'a [R],
}

/// Kernel-upscaled read-out: per row and head,
/// `φ = softmax_m(−γ_h ‖r − c_{h,m}‖²)` into `phi [rows, H, M]`
/// (overwritten) and `y += U_h φ` (`r`, `y` `[rows, H·N]`).
pub fn up_fwd<R: Real>(
    rows: usize,
    h: usize,
    n: usize,
    k: &Up<'_, R>,
    r: &[R],
    phi: &mut [R],
    y: &mut [R],
) {
    let (m, c) = (k.m, h * n);
    for t in 0..rows {
        for hh in 0..h {
            let o = t * c + hh * n;
            let rv = &r[o..o + n];
            let ph = &mut phi[(t * h + hh) * m..(t * h + hh + 1) * m];
            let mut mx = R::NEG_INFINITY;
            for (q, p) in ph.iter_mut().enumerate() {
                if k.linear {
                    *p = rv[q];
                    continue;
                }
                let cq = &k.centres[(hh * m + q) * n..(hh * m + q + 1) * n];
                let mut d2 = R::ZERO;
                for (a, b) in rv.iter().zip(cq) {
                    let d = *a - *b;
                    d2 += d * d;
                }
                *p = -(k.gamma[hh] * d2);
                mx = mx.max(*p);
            }
            if !k.linear {
                let mut se = R::ZERO;
                for p in ph.iter_mut() {
                    *p = (*p - mx).exp();
                    se += *p;
                }
                let inv = R::ONE / se;
                ph.iter_mut().for_each(|p| *p *= inv);
            }
            let uh = &k.u[hh * n * m..(hh + 1) * n * m];
            for i in 0..n {
                let s = R::sum(
                    uh[i * m..(i + 1) * m]
                        .iter()
                        .zip(ph.iter())
                        .map(|(&a, &b)| a * b),
                );
                y[o + i] += s;
            }
        }
    }
}

/// Backward of [`up_fwd`] given its `phi` and `dy [rows, H·N]`:
/// `du [H, N, M] += Σ_t dy_t φ_tᵀ` and, with `g = U_hᵀ dy`,
/// `dℓ_m = φ_m (g_m − φ·g)`, `dr += −2γ_h Σ_m dℓ_m (r − c_m)`.
#[allow(clippy::too_many_arguments)]
pub fn up_bwd<R: Real>(
    rows: usize,
    h: usize,
    n: usize,
    k: &Up<'_, R>,
    r: &[R],
    phi: &[R],
    dy: &[R],
    du: &mut [R],
    dr: &mut [R],
) {
    let (m, c) = (k.m, h * n);
    let mut g = vec![R::ZERO; m];
    for t in 0..rows {
        for hh in 0..h {
            let o = t * c + hh * n;
            let ph = &phi[(t * h + hh) * m..(t * h + hh + 1) * m];
            let uh = &k.u[hh * n * m..(hh + 1) * n * m];
            let duh = &mut du[hh * n * m..(hh + 1) * n * m];
            g.iter_mut().for_each(|v| *v = R::ZERO);
            for i in 0..n {
                let dyi = dy[o + i];
                for q in 0..m {
                    g[q] += uh[i * m + q] * dyi;
                    duh[i * m + q] += dyi * ph[q];
                }
            }
            if k.linear {
                // state offset: dr_j += Σ_i u[i, j] dy_i = g_j
                for j in 0..n {
                    dr[o + j] += g[j];
                }
                continue;
            }
            let pg = R::sum(ph.iter().zip(&g).map(|(&a, &b)| a * b));
            let tg = R::c(2.0) * k.gamma[hh];
            let mut sdl = R::ZERO;
            for q in 0..m {
                let dl = ph[q] * (g[q] - pg);
                sdl += dl;
                let cq = &k.centres[(hh * m + q) * n..(hh * m + q + 1) * n];
                for j in 0..n {
                    dr[o + j] += tg * dl * cq[j];
                }
            }
            for j in 0..n {
                dr[o + j] -= tg * sdl * r[o + j];
            }
        }
    }
}

/// `out[g] = a[g] · b[g]` (`trans_b`: `a[g] · b[g]ᵀ`) for `groups` square
/// `[N, N]` matrices.
pub fn batched_matmul<R: Real>(
    groups: usize,
    n: usize,
    a: &[R],
    b: &[R],
    trans_b: bool,
    out: &mut [R],
) {
    let nn = n * n;
    for g in 0..groups {
        let (a, b) = (&a[g * nn..(g + 1) * nn], &b[g * nn..(g + 1) * nn]);
        for i in 0..n {
            for j in 0..n {
                let mut s = R::ZERO;
                for q in 0..n {
                    let bq = if trans_b { b[j * n + q] } else { b[q * n + j] };
                    s += a[i * n + q] * bq;
                }
                out[g * nn + i * n + j] = s;
            }
        }
    }
}

/// One Adam / AdamW step's scalars (see [`adam`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// `1 − β1^t`, `1 − β2^t`
    pub bc1: f32,
    pub bc2: f32,
    /// The raw gradient is multiplied by this first (1/tokens × clipping).
    pub grad_scale: f32,
}

/// Adam / AdamW over `n` elements, in place on p, m, v:
/// `g' = g·grad_scale; m = β1 m + (1−β1) g'; v = β2 v + (1−β2) g'²;`
/// `p = p − lr·wd·p − lr·(m/bc1)/(√(v/bc2) + ε)`.
pub fn adam<R: Real>(n: usize, s: &AdamStep, p: &mut [R], g: &[R], m: &mut [R], v: &mut [R]) {
    let f = R::from_f32;
    let (b1, b2, lr, eps) = (f(s.beta1), f(s.beta2), f(s.lr), f(s.eps));
    let (bc1, bc2, gs, wd) = (f(s.bc1), f(s.bc2), f(s.grad_scale), f(s.weight_decay));
    // 1 − β in f32, as the kernel forms it
    let (ob1, ob2) = (f(1.0 - s.beta1), f(1.0 - s.beta2));
    for i in 0..n {
        let gi = g[i] * gs;
        let mi = b1 * m[i] + ob1 * gi;
        let vi = b2 * v[i] + ob2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        let upd = (mi / bc1) / ((vi / bc2).sqrt() + eps);
        let mut pi = p[i];
        if s.weight_decay > 0.0 {
            pi -= lr * wd * pi;
        }
        p[i] = pi - lr * upd;
    }
}

/// The factor device-side clipping applies on top of `grad_scale` (as
/// `tune_adam_f32` computes it): `None` when the norm `√ss · grad_scale` is
/// not finite (no update), else `clip / norm` when `clip > 0` and the norm
/// exceeds it, else 1.
pub fn clip_scale<R: Real>(ss: R, grad_scale: R, clip: R) -> Option<R> {
    let norm = ss.sqrt() * grad_scale;
    if !norm.is_finite() {
        return None;
    }
    Some(if clip > R::ZERO && norm > clip {
        clip / norm
    } else {
        R::ONE
    })
}

/// `Σ x` or `Σ x²` in order (the kernel's order differs; equal to rounding).
pub fn reduce<R: Real>(squares: bool, x: &[R]) -> R {
    if squares {
        R::sum(x.iter().map(|&v| v * v))
    } else {
        R::sum(x.iter().copied())
    }
}

/// DBP's step per group, as `tune_dbp_step_f32` computes it: with
/// `Z = scale·z`, `step = η((1−κ) offdiag Z + κ(diag Z − I))` scaled down
/// to a row-sum norm ≤ `max_norm`; `m = I − step`.
#[allow(clippy::too_many_arguments)]
pub fn dbp_step<R: Real>(
    groups: usize,
    n: usize,
    scale: f32,
    eta: f32,
    kappa: f32,
    max_norm: f32,
    z: &[R],
    m: &mut [R],
) {
    let f = R::from_f32;
    let (scale, eta, kappa, max_norm) = (f(scale), f(eta), f(kappa), f(max_norm));
    let nn = n * n;
    for g in 0..groups {
        let (z, m) = (&z[g * nn..(g + 1) * nn], &mut m[g * nn..(g + 1) * nn]);
        for i in 0..n {
            for j in 0..n {
                let zij = scale * z[i * n + j];
                m[i * n + j] = if i == j {
                    eta * kappa * (zij - R::ONE)
                } else {
                    eta * (R::ONE - kappa) * zij
                };
            }
        }
        let norm = (0..n)
            .map(|i| R::sum(m[i * n..(i + 1) * n].iter().map(|v| v.abs())))
            .fold(R::ZERO, R::max);
        let f = if norm > max_norm {
            max_norm / norm
        } else {
            R::ONE
        };
        for i in 0..n {
            for j in 0..n {
                m[i * n + j] = if i == j { R::ONE } else { R::ZERO } - f * m[i * n + j];
            }
        }
    }
}

/// `out = α·I + β·x` per `[N, N]` group.
pub fn eye_axpy<R: Real>(groups: usize, n: usize, alpha: f32, beta: f32, x: &[R], out: &mut [R]) {
    let (alpha, beta) = (R::from_f32(alpha), R::from_f32(beta));
    let nn = n * n;
    for e in 0..groups * nn {
        let k = e % nn;
        out[e] = if k / n == k % n { alpha } else { R::ZERO } + beta * x[e];
    }
}

/// `dst[i] = (accumulate ? dst[i] : 0) + Σ_b src[b·n + i]`, summed in batch
/// order (as the kernel does).
pub fn sum_batch<R: Real>(b: usize, n: usize, src: &[R], dst: &mut [R], accumulate: bool) {
    for i in 0..n {
        let mut s = if accumulate { dst[i] } else { R::ZERO };
        for bb in 0..b {
            s += src[bb * n + i];
        }
        dst[i] = s;
    }
}

/// `Σ x²` over the first `n` elements, in f64.
pub fn sumsq<R: Real>(n: usize, x: &[R]) -> f64 {
    x[..n].iter().map(|&v| v.to_f64() * v.to_f64()).sum()
}

/// The 32-bit hash of `tune_lora_in_f32` (`tn_hash`): the same bits on
/// every backend.
pub fn lora_hash(seed: u32, i: u32) -> u32 {
    let mut h = i.wrapping_mul(0x9E37_79B9) ^ seed;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7FEB_352D);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846C_A68B);
    h ^= h >> 16;
    h
}

/// Whether column `j` at position `pos` of sequence `seq` (of width `k`)
/// survives LoRA dropout with seed `seed` and keep probability `keep`
/// (always when `keep` ≥ 1): the top 24 bits of the hash as a uniform in
/// `[0, 1)`, below `keep`.
pub fn lora_keep(seed: u32, seq: usize, pos: usize, k: usize, j: usize, keep: f32) -> bool {
    if keep >= 1.0 {
        return true;
    }
    let s = lora_hash(seed, seq as u32);
    ((lora_hash(s, (pos * k + j) as u32) >> 8) as f32 * (1.0 / 16_777_216.0)) < keep
}

/// The CPU twin of `tune_lora_in_f32`: `out [rows, k]` = `x` (rows at
/// `i·ldx`) times `scale` where kept, else 0; the rows are sequences of `t`
/// rows, `row0` is the launch row of `out`'s first row (for row-split
/// callers) and `seq0` the batch index of the launch's first sequence.
#[allow(clippy::too_many_arguments)]
pub fn lora_in<R: Real>(
    rows: usize,
    k: usize,
    x: &[R],
    ldx: usize,
    (t, seq0, row0): (usize, usize, usize),
    seed: u32,
    keep: f32,
    scale: f32,
    out: &mut [R],
) {
    let s = R::from_f32(scale);
    let t = t.max(1);
    for i in 0..rows {
        let row = row0 + i;
        for j in 0..k {
            let e = i * k + j;
            out[e] = if lora_keep(seed, seq0 + row / t, row % t, k, j, keep) {
                x[i * ldx + j] * s
            } else {
                R::ZERO
            };
        }
    }
}

/// The inputs of [`sdt_bwd`]: the kk_prep backward's ([`KkBwd`]; `k_a`
/// unused) and the GroupNorm bonus's (`r`, `kt`, `v`, `g`, `dout`).
pub struct SdtBwd<'a, R = f32> {
    pub kk: KkBwd<'a, R>,
    pub r: &'a [R],
    pub kt: &'a [R],
    pub v: &'a [R],
    pub g: &'a [R],
    pub dout: &'a [R],
}

/// The CPU twin of `tune_sdt_bwd_f32`: per element the gradients of
/// `k_k`, `k_a` and `r_k` (`dkk`, `dka`, `drk` `[rows, C]`, overwritten;
/// summed over rows by the caller).
pub fn sdt_bwd<R: Real>(
    rows: usize,
    h: usize,
    n: usize,
    x: &SdtBwd<'_, R>,
    dkk: &mut [R],
    dka: &mut [R],
    drk: &mut [R],
) {
    let c = h * n;
    let y = &x.kk;
    for t in 0..rows {
        for h0 in (0..c).step_by(n) {
            let base = t * c + h0;
            let (inv, p) = kk_norm(y, base, h0, n);
            let mut db = R::ZERO;
            for j in 0..n {
                db += x.dout[base + j] * x.g[base + j] * x.v[base + j];
            }
            for j in 0..n {
                let (i, q) = (base + j, h0 + j);
                let al = Real::sigmoid(y.a0[q] + y.da[i]);
                let kh = y.k[i] * y.k_k[q] * inv;
                let dkh = y.d_b[i] * al - y.d_a[i];
                dkk[i] = (dkh - kh * p) * inv * y.k[i];
                dka[i] = y.d_kout[i] * y.k[i] * (al - R::ONE);
                drk[i] = db * x.r[i] * x.kt[i];
            }
        }
    }
}
