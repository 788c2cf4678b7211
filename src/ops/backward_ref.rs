//! CPU twins of the backward and optimizer kernels in `kernels/tune_ops.cu`
//! (plain Rust, f32): the reference each emulated / CUDA kernel is checked
//! against (`tests/backward_ops.rs`), and the implementation of
//! [`super::backward::BackwardOps`] for [`super::CpuOps`].
//!
//! Every function assumes its slices were length-checked by the caller.
//! Layouts: activations row-major `[rows, C]`, `C = H·N`; per-channel
//! vectors `[C]`; matrices `[out, in]` as given to [`super::DeviceOps::matmul`].
use super::{Act, DECAY_SCALE};

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `dx[m, k] = dy[m, n] · w[n, k]` (the input gradient of `y = x wᵀ`).
pub fn matmul_t(dy: &[f32], m: usize, w: &[f32], n: usize, k: usize, dx: &mut [f32]) {
    for i in 0..m {
        let out = &mut dx[i * k..(i + 1) * k];
        out.iter_mut().for_each(|v| *v = 0.0);
        for q in 0..n {
            let g = dy[i * n + q];
            if g == 0.0 {
                continue;
            }
            let wr = &w[q * k..(q + 1) * k];
            for j in 0..k {
                out[j] += g * wr[j];
            }
        }
    }
}

/// LayerNorm backward, accumulating: `dx[r] += ∂/∂x` of `y = x̂·weight + b`
/// for rows `r` of x `[rows, C]` given `dy [rows, C]` (statistics recomputed
/// from x). `x` and `dx` start at the same row.
pub fn layer_norm_bwd(
    x: &[f32],
    rows: usize,
    c: usize,
    weight: &[f32],
    eps: f32,
    dy: &[f32],
    dx: &mut [f32],
) {
    let nf = c as f32;
    for r in 0..rows {
        let xr = &x[r * c..(r + 1) * c];
        let mean = xr.iter().sum::<f32>() / nf;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / nf;
        let rs = 1.0 / (var + eps).sqrt();
        let (mut m1, mut m2) = (0.0f32, 0.0f32);
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
pub fn token_shift_bwd(
    t: usize,
    c: usize,
    dmix: &[&[f32]],
    mu: &[f32],
    dstate: &mut [f32],
    dx: &mut [f32],
) {
    if t == 0 {
        return;
    }
    for j in 0..c {
        for tt in 0..t {
            let mut cur = 0.0f32;
            let mut nxt = 0.0f32;
            for (m, d) in dmix.iter().enumerate() {
                let u = mu[m * c + j];
                cur += d[tt * c + j] * (1.0 - u);
                if tt + 1 < t {
                    nxt += d[(tt + 1) * c + j] * u;
                }
            }
            if tt + 1 == t {
                nxt = dstate[j];
            }
            dx[tt * c + j] = cur + nxt;
        }
        let mut s = 0.0f32;
        for (m, d) in dmix.iter().enumerate() {
            s += d[j] * mu[m * c + j];
        }
        dstate[j] = s;
    }
}

/// Activation backward, in place on `dy` (`n` elements):
/// `dy *= f′(pre + bias)` with f as in [`super::reference::act`].
pub fn act_bwd(mode: Act, n: usize, c: usize, pre: &[f32], bias: Option<&[f32]>, dy: &mut [f32]) {
    for i in 0..n {
        let v = match bias {
            Some(b) => b[i % c] + pre[i],
            None => pre[i],
        };
        let d = match mode {
            Act::Tanh => {
                let t = v.tanh();
                1.0 - t * t
            }
            Act::Sigmoid => {
                let s = sigmoid(v);
                s * (1.0 - s)
            }
            Act::ReluSq => 2.0 * v.max(0.0),
            Act::Decay => {
                let s = sigmoid(v);
                let w = (-DECAY_SCALE * s).exp();
                -w * DECAY_SCALE * s * (1.0 - s)
            }
        };
        dy[i] *= d;
    }
}

/// Inputs of [`kk_prep_bwd`]: the forward's k, da `[rows, C]` and a0, k_k,
/// k_a `[C]`, and the gradients of its outputs k_out, a, b `[rows, C]`.
#[derive(Clone, Copy)]
pub struct KkBwd<'a> {
    pub k: &'a [f32],
    pub da: &'a [f32],
    pub a0: &'a [f32],
    pub k_k: &'a [f32],
    pub k_a: &'a [f32],
    pub d_kout: &'a [f32],
    pub d_a: &'a [f32],
    pub d_b: &'a [f32],
}

/// Backward of [`super::reference::kk_prep`]: writes `dk` (∂L/∂k) and `dda`
/// (∂L/∂da, the pre-sigmoid α input), both `[rows, C]`.
pub fn kk_prep_bwd(
    rows: usize,
    h: usize,
    n: usize,
    x: &KkBwd<'_>,
    dk: &mut [f32],
    dda: &mut [f32],
) {
    let c = h * n;
    for t in 0..rows {
        for h0 in (0..c).step_by(n) {
            let base = t * c + h0;
            let mut ss = 0.0f32;
            for j in 0..n {
                let q = x.k[base + j] * x.k_k[h0 + j];
                ss += q * q;
            }
            let nrm = ss.sqrt();
            let clamped = nrm <= 1e-12;
            let inv = 1.0 / nrm.max(1e-12);
            // dκ̂ = db·α − da ; p = κ̂·dκ̂
            let mut p = 0.0f32;
            for j in 0..n {
                let (i, q) = (base + j, h0 + j);
                let al = sigmoid(x.a0[q] + x.da[i]);
                let kh = x.k[i] * x.k_k[q] * inv;
                p += kh * (x.d_b[i] * al - x.d_a[i]);
            }
            if clamped {
                p = 0.0;
            }
            for j in 0..n {
                let (i, q) = (base + j, h0 + j);
                let al = sigmoid(x.a0[q] + x.da[i]);
                let kh = x.k[i] * x.k_k[q] * inv;
                let dkh = x.d_b[i] * al - x.d_a[i];
                let dal = x.d_b[i] * kh + x.d_kout[i] * x.k[i] * x.k_a[q];
                dda[i] = dal * al * (1.0 - al);
                dk[i] =
                    x.d_kout[i] * (1.0 + (al - 1.0) * x.k_a[q]) + (dkh - kh * p) * inv * x.k_k[q];
            }
        }
    }
}

/// Backward of [`super::reference::value_residual`] (`v = vraw + (vf − vraw)·σ(v0 + dvp)`),
/// over `n` elements: on entry `dv` is ∂L/∂v, on exit ∂L/∂vraw;
/// `dvf += ∂L/∂v_first`; `ddv` = ∂L/∂dvp.
#[allow(clippy::too_many_arguments)]
pub fn value_residual_bwd(
    n: usize,
    c: usize,
    vraw: &[f32],
    v_first: &[f32],
    v0: &[f32],
    dvp: &[f32],
    dv: &mut [f32],
    dvf: &mut [f32],
    ddv: &mut [f32],
) {
    for i in 0..n {
        let gv = sigmoid(v0[i % c] + dvp[i]);
        let g = dv[i];
        dvf[i] += g * gv;
        ddv[i] = g * (v_first[i] - vraw[i]) * gv * (1.0 - gv);
        dv[i] = g * (1.0 - gv);
    }
}

/// Inputs of [`group_norm_bwd`]: the forward's pre-norm y, r, k̃, v, g
/// `[rows, C]`, weight, bias, r_k `[C]`, and `dout` = ∂L/∂(z ⊙ g) `[rows, C]`.
#[derive(Clone, Copy)]
pub struct GnBwd<'a> {
    pub y: &'a [f32],
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub r: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub r_k: &'a [f32],
    pub g: &'a [f32],
    pub dout: &'a [f32],
}

/// Outputs of [`group_norm_bwd`] (all `[rows, C]`, overwritten).
pub struct GnBwdOut<'a> {
    pub dy: &'a mut [f32],
    pub dr: &'a mut [f32],
    pub dk: &'a mut [f32],
    pub dv: &'a mut [f32],
    pub dg: &'a mut [f32],
}

/// Backward of the fused GroupNorm + bonus + gate of the time mix:
/// `z = GN(y)·weight + bias + (Σ_j r_j k̃_j r_k[j])·v`, `out = z ⊙ g`.
pub fn group_norm_bwd(rows: usize, h: usize, n: usize, eps: f32, x: &GnBwd<'_>, o: GnBwdOut<'_>) {
    let c = h * n;
    let nf = n as f32;
    for t in 0..rows {
        for h0 in (0..c).step_by(n) {
            let base = t * c + h0;
            let yh = &x.y[base..base + n];
            let mean = yh.iter().sum::<f32>() / nf;
            let var = yh.iter().map(|z| (z - mean) * (z - mean)).sum::<f32>() / nf;
            let rs = 1.0 / (var + eps).sqrt();
            let mut bonus = 0.0f32;
            for j in 0..n {
                bonus += x.r[base + j] * x.k[base + j] * x.r_k[h0 + j];
            }
            let mut dbonus = 0.0f32;
            let (mut m1, mut m2) = (0.0f32, 0.0f32);
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
pub fn xent(
    rows: usize,
    v: usize,
    logits: &mut [f32],
    targets: &[u32],
    mask: &[f32],
    soft: Option<&[f32]>,
    lam: f32,
    loss: &mut [f32],
) {
    for r in 0..rows {
        let row = &mut logits[r * v..(r + 1) * v];
        let mk = mask[r];
        if mk == 0.0 {
            row.iter_mut().for_each(|z| *z = 0.0);
            loss[r] = 0.0;
            continue;
        }
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let se: f32 = row.iter().map(|&z| (z - mx).exp()).sum();
        let lse = mx + se.ln();
        let tgt = targets[r] as usize;
        let mut l = lse - row[tgt];
        match soft.filter(|_| lam != 0.0) {
            Some(p) => {
                let p = &p[r * v..(r + 1) * v];
                let (mut kl, mut psum) = (0.0f32, 0.0f32);
                for j in 0..v {
                    if p[j] > 0.0 {
                        kl += p[j] * (p[j].ln() - (row[j] - lse));
                        psum += p[j];
                    }
                }
                l += lam * kl;
                for j in 0..v {
                    let q = (row[j] - lse).exp();
                    let oh = if j == tgt { 1.0 } else { 0.0 };
                    row[j] = mk * ((q - oh) + lam * (psum * q - p[j]));
                }
            }
            None => {
                for (j, z) in row.iter_mut().enumerate() {
                    let q = (*z - lse).exp();
                    let oh = if j == tgt { 1.0 } else { 0.0 };
                    *z = mk * (q - oh);
                }
            }
        }
        loss[r] = mk * l;
    }
}

/// `acc[h, i, j] += Σ_t r[t, h, i] · r[t, h, j]` (DBP second moments),
/// r `[rows, H, N]`, acc `[H, N, N]`.
pub fn outer_acc(rows: usize, h: usize, n: usize, r: &[f32], acc: &mut [f32]) {
    let c = h * n;
    for hh in 0..h {
        for i in 0..n {
            for j in 0..n {
                let mut s = 0.0f32;
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
pub struct Up<'a> {
    /// Support vectors per head.
    pub m: usize,
    pub centres: &'a [f32],
    pub gamma: &'a [f32],
    pub u: &'a [f32],
}

/// Kernel-upscaled read-out: per row and head,
/// `φ = softmax_m(−γ_h ‖r − c_{h,m}‖²)` into `phi [rows, H, M]`
/// (overwritten) and `y += U_h φ` (`r`, `y` `[rows, H·N]`).
pub fn up_fwd(
    rows: usize,
    h: usize,
    n: usize,
    k: &Up<'_>,
    r: &[f32],
    phi: &mut [f32],
    y: &mut [f32],
) {
    let (m, c) = (k.m, h * n);
    for t in 0..rows {
        for hh in 0..h {
            let o = t * c + hh * n;
            let rv = &r[o..o + n];
            let ph = &mut phi[(t * h + hh) * m..(t * h + hh + 1) * m];
            let mut mx = f32::NEG_INFINITY;
            for (q, p) in ph.iter_mut().enumerate() {
                let cq = &k.centres[(hh * m + q) * n..(hh * m + q + 1) * n];
                let mut d2 = 0.0f32;
                for (a, b) in rv.iter().zip(cq) {
                    let d = a - b;
                    d2 += d * d;
                }
                *p = -(k.gamma[hh] * d2);
                mx = mx.max(*p);
            }
            let mut se = 0.0f32;
            for p in ph.iter_mut() {
                *p = (*p - mx).exp();
                se += *p;
            }
            let inv = 1.0 / se;
            ph.iter_mut().for_each(|p| *p *= inv);
            let uh = &k.u[hh * n * m..(hh + 1) * n * m];
            for i in 0..n {
                let s: f32 = uh[i * m..(i + 1) * m]
                    .iter()
                    .zip(ph.iter())
                    .map(|(a, b)| a * b)
                    .sum();
                y[o + i] += s;
            }
        }
    }
}

/// Backward of [`up_fwd`] given its `phi` and `dy [rows, H·N]`:
/// `du [H, N, M] += Σ_t dy_t φ_tᵀ` and, with `g = U_hᵀ dy`,
/// `dℓ_m = φ_m (g_m − φ·g)`, `dr += −2γ_h Σ_m dℓ_m (r − c_m)`.
#[allow(clippy::too_many_arguments)]
pub fn up_bwd(
    rows: usize,
    h: usize,
    n: usize,
    k: &Up<'_>,
    r: &[f32],
    phi: &[f32],
    dy: &[f32],
    du: &mut [f32],
    dr: &mut [f32],
) {
    let (m, c) = (k.m, h * n);
    let mut g = vec![0.0f32; m];
    for t in 0..rows {
        for hh in 0..h {
            let o = t * c + hh * n;
            let ph = &phi[(t * h + hh) * m..(t * h + hh + 1) * m];
            let uh = &k.u[hh * n * m..(hh + 1) * n * m];
            let duh = &mut du[hh * n * m..(hh + 1) * n * m];
            g.iter_mut().for_each(|v| *v = 0.0);
            for i in 0..n {
                let dyi = dy[o + i];
                for q in 0..m {
                    g[q] += uh[i * m + q] * dyi;
                    duh[i * m + q] += dyi * ph[q];
                }
            }
            let pg: f32 = ph.iter().zip(&g).map(|(a, b)| a * b).sum();
            let tg = 2.0 * k.gamma[hh];
            let mut sdl = 0.0f32;
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
pub fn batched_matmul(
    groups: usize,
    n: usize,
    a: &[f32],
    b: &[f32],
    trans_b: bool,
    out: &mut [f32],
) {
    let nn = n * n;
    for g in 0..groups {
        let (a, b) = (&a[g * nn..(g + 1) * nn], &b[g * nn..(g + 1) * nn]);
        for i in 0..n {
            for j in 0..n {
                let mut s = 0.0f32;
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
pub fn adam(n: usize, s: &AdamStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    for i in 0..n {
        let gi = g[i] * s.grad_scale;
        let mi = s.beta1 * m[i] + (1.0 - s.beta1) * gi;
        let vi = s.beta2 * v[i] + (1.0 - s.beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        let upd = (mi / s.bc1) / ((vi / s.bc2).sqrt() + s.eps);
        let mut pi = p[i];
        if s.weight_decay > 0.0 {
            pi -= s.lr * s.weight_decay * pi;
        }
        p[i] = pi - s.lr * upd;
    }
}

/// The factor device-side clipping applies on top of `grad_scale` (as
/// `tune_adam_f32` computes it): `None` when the norm `√ss · grad_scale` is
/// not finite (no update), else `clip / norm` when `clip > 0` and the norm
/// exceeds it, else 1.
pub fn clip_scale(ss: f32, grad_scale: f32, clip: f32) -> Option<f32> {
    let norm = ss.sqrt() * grad_scale;
    if !norm.is_finite() {
        return None;
    }
    Some(if clip > 0.0 && norm > clip {
        clip / norm
    } else {
        1.0
    })
}

/// `Σ x` or `Σ x²` in f32 (the kernel's order differs; equal to rounding).
pub fn reduce(squares: bool, x: &[f32]) -> f32 {
    if squares {
        x.iter().map(|&v| v * v).sum()
    } else {
        x.iter().sum()
    }
}

/// DBP's step per group, as `tune_dbp_step_f32` computes it (f32): with
/// `Z = scale·z`, `step = η((1−κ) offdiag Z + κ(diag Z − I))` scaled down
/// to a row-sum norm ≤ `max_norm`; `m = I − step`.
#[allow(clippy::too_many_arguments)]
pub fn dbp_step(
    groups: usize,
    n: usize,
    scale: f32,
    eta: f32,
    kappa: f32,
    max_norm: f32,
    z: &[f32],
    m: &mut [f32],
) {
    let nn = n * n;
    for g in 0..groups {
        let (z, m) = (&z[g * nn..(g + 1) * nn], &mut m[g * nn..(g + 1) * nn]);
        for i in 0..n {
            for j in 0..n {
                let zij = scale * z[i * n + j];
                m[i * n + j] = if i == j {
                    eta * kappa * (zij - 1.0)
                } else {
                    eta * (1.0 - kappa) * zij
                };
            }
        }
        let norm = (0..n)
            .map(|i| m[i * n..(i + 1) * n].iter().map(|v| v.abs()).sum::<f32>())
            .fold(0.0f32, f32::max);
        let f = if norm > max_norm {
            max_norm / norm
        } else {
            1.0
        };
        for i in 0..n {
            for j in 0..n {
                m[i * n + j] = if i == j { 1.0 } else { 0.0 } - f * m[i * n + j];
            }
        }
    }
}

/// `out = α·I + β·x` per `[N, N]` group.
pub fn eye_axpy(groups: usize, n: usize, alpha: f32, beta: f32, x: &[f32], out: &mut [f32]) {
    let nn = n * n;
    for e in 0..groups * nn {
        let k = e % nn;
        out[e] = if k / n == k % n { alpha } else { 0.0 } + beta * x[e];
    }
}

/// `dst[i] = (accumulate ? dst[i] : 0) + Σ_b src[b·n + i]`, summed in f32
/// in batch order (as the kernel does).
pub fn sum_batch(b: usize, n: usize, src: &[f32], dst: &mut [f32], accumulate: bool) {
    for i in 0..n {
        let mut s = if accumulate { dst[i] } else { 0.0 };
        for bb in 0..b {
            s += src[bb * n + i];
        }
        dst[i] = s;
    }
}

/// `Σ x²` over the first `n` elements, in f64.
pub fn sumsq(n: usize, x: &[f32]) -> f64 {
    x[..n].iter().map(|&v| v as f64 * v as f64).sum()
}
