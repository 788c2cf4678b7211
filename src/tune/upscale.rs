//! Kernel-upscaled state (arXiv 2504.05097, "dynamic scaling with a kernel
//! method"), in the form documented in `docs/upscale.md`.
//!
//! Each head keeps its ordinary tuned state `S ∈ R^{N×N}` and gains a second,
//! wider memory `U ∈ R^{N×M}` (M > N, value-major like `S`) that is read
//! through a Gaussian-RBF feature map of the receptance:
//!
//! ```text
//!   ℓ_m(r) = −γ ‖r − c_m‖²,   γ = 1/(2σ²)
//!   φ(r)   = softmax_m ℓ_m(r)            ∈ R^M (normalised RBF features)
//!   y_t    = S_t r_t + U φ(r_t)          (then GroupNorm, as usual)
//! ```
//!
//! The support vectors `c_m` (per layer and head) are fixed: k-means centres
//! of the vectors that head produces on the task's training data (its
//! receptances `r_t` by default, or its keys `k̃_t`, see
//! [`UpscaleConfig::source`]); `σ` is set from the
//! k-means distortion. `U` starts at zero, so the upscaled model starts
//! exactly at the plain one. The read is *static* (the same `U` at every
//! token, not decayed by the recurrence): the frozen transition
//! `A_t = diag(w_t) + a_t b_tᵀ` acts on N-dimensional key space and has no
//! counterpart on the M features without inventing feature-space decays the
//! pretrained weights never produced; see the doc for the trade-off.
//!
//! The gradient (`dU = Σ_t dy_t φ(r_t)ᵀ`, and `dr_t` through `φ` into the
//! frozen network, which reaches the earlier layers' states) is computed by
//! the same engine as the plain state ([`super::grad`]), checked against
//! finite differences in f64 by `tests/tune_upscale.rs`.
use super::grad::{
    self, head_inputs, Example, GradOpts, HeadVector, Real, TunedState, TunedStateOf, UpW,
};
use crate::error::{Error, Result};
use crate::model::weights::{Config, Weights};
use crate::rng::Rng;

/// How to build the kernel (support vectors and widths).
#[derive(Clone, Debug, PartialEq)]
pub struct UpscaleConfig {
    /// Support vectors per head (the upscaled width M; M > N).
    pub m: usize,
    /// Which vectors of the head are clustered into support vectors.
    pub source: HeadVector,
    /// Lloyd iterations of k-means.
    pub kmeans_iters: usize,
    /// At most this many vectors per head go into k-means (subsampled).
    pub max_samples: usize,
    /// `σ² = width² · (mean squared distance of a sample to its centre)`.
    pub width: f64,
    /// Seed of the subsampling and the k-means initialisation.
    pub seed: u64,
}

impl UpscaleConfig {
    /// Defaults for head size `n`: `M = 2N` support vectors from the
    /// receptances (better than the keys in `docs/comparison.md`),
    /// 15 k-means iterations over at most 4096 vectors, width 1.
    pub fn new(n: usize) -> UpscaleConfig {
        UpscaleConfig {
            m: 2 * n,
            source: HeadVector::Receptance,
            kmeans_iters: 15,
            max_samples: 4096,
            width: 1.0,
            seed: 0,
        }
    }
}

/// The fixed part of the kernel upscaling: support vectors and RBF widths.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub n_layer: usize,
    pub n_head: usize,
    pub head_size: usize,
    /// Support vectors per head (M).
    pub m: usize,
    /// Per layer `[H, M, N]`.
    pub centres: Vec<Vec<f64>>,
    /// Per layer `[H]`: `γ = 1/(2σ²)`.
    pub gamma: Vec<Vec<f64>>,
}

/// A tuned state plus the upscaled read-out `U` (per layer `[H, N, M]`).
#[derive(Clone, Debug, PartialEq)]
pub struct UpscaledStateOf<R> {
    /// The ordinary per-layer initial states (trained as in plain tuning).
    pub state: TunedStateOf<R>,
    /// Per layer `[H, N, M]`: the upscaled state, value-major.
    pub u: Vec<Vec<R>>,
}

/// [`UpscaledStateOf`] in `f32` (what is trained).
pub type UpscaledState = UpscaledStateOf<f32>;

impl<R: Real> UpscaledStateOf<R> {
    /// `state` with `U = 0` for `kernel`.
    pub fn new(state: TunedStateOf<R>, kernel: &Kernel) -> Self {
        let len = kernel.n_head * kernel.head_size * kernel.m;
        UpscaledStateOf {
            state,
            u: vec![vec![R::ZERO; len]; kernel.n_layer],
        }
    }

    /// Zeros with the same layout.
    pub fn zeros_like(&self) -> Self {
        UpscaledStateOf {
            state: self.state.zeros_like(),
            u: self.u.iter().map(|x| vec![R::ZERO; x.len()]).collect(),
        }
    }

    /// Trainable tensors: the state's [`TunedStateOf::params`], then every
    /// layer's `U`.
    pub fn params(&self) -> Vec<&[R]> {
        let mut p = self.state.params();
        p.extend(self.u.iter().map(|v| v.as_slice()));
        p
    }

    /// Mutable [`params`](Self::params), same order.
    pub fn params_mut(&mut self) -> Vec<&mut [R]> {
        let mut p = self.state.params_mut();
        p.extend(self.u.iter_mut().map(|v| v.as_mut_slice()));
        p
    }

    /// Converts every value.
    pub fn map<S>(&self, f: impl Fn(R) -> S + Copy) -> UpscaledStateOf<S> {
        UpscaledStateOf {
            state: self.state.map(f),
            u: self
                .u
                .iter()
                .map(|x| x.iter().map(|&a| f(a)).collect())
                .collect(),
        }
    }
}

/// Result of [`loss_and_grad_upscaled`].
#[derive(Clone, Debug)]
pub struct UpGradOut {
    /// Σ over masked positions of `mask · (CE + λ·KL)`.
    pub loss: f64,
    /// Σ mask.
    pub n_tokens: f64,
    /// Gradient w.r.t. the state and `U`.
    pub grad: UpscaledState,
    /// Peak bytes of activations held at once.
    pub peak_bytes: usize,
}

impl Kernel {
    /// Builds a kernel from explicit parts (checked).
    pub fn from_parts(
        cfg: &Config,
        m: usize,
        centres: Vec<Vec<f64>>,
        gamma: Vec<Vec<f64>>,
    ) -> Result<Kernel> {
        let k = Kernel {
            n_layer: cfg.n_layer,
            n_head: cfg.n_head,
            head_size: cfg.head_size,
            m,
            centres,
            gamma,
        };
        k.check(cfg)?;
        Ok(k)
    }

    /// Checks the kernel against the model's shape and its values.
    pub fn check(&self, cfg: &Config) -> Result<()> {
        if (self.n_layer, self.n_head, self.head_size) != (cfg.n_layer, cfg.n_head, cfg.head_size) {
            return Err(Error::Shape {
                name: "kernel (layers, heads, head size)".into(),
                expected: vec![cfg.n_layer, cfg.n_head, cfg.head_size],
                got: vec![self.n_layer, self.n_head, self.head_size],
            });
        }
        if self.m == 0 {
            return Err(Error::Tune("kernel: M must be at least 1".into()));
        }
        let (h, n, m) = (self.n_head, self.head_size, self.m);
        for (name, v, len) in [
            ("centres", &self.centres, h * m * n),
            ("gamma", &self.gamma, h),
        ] {
            if v.len() != self.n_layer || v.iter().any(|x| x.len() != len) {
                return Err(Error::Shape {
                    name: format!("kernel.{name}"),
                    expected: vec![self.n_layer, len],
                    got: vec![v.len(), v.first().map_or(0, |x| x.len())],
                });
            }
        }
        if self.centres.iter().flatten().any(|x| !x.is_finite()) {
            return Err(Error::Tune("kernel: non-finite support vector".into()));
        }
        if self
            .gamma
            .iter()
            .flatten()
            .any(|g| !(g.is_finite() && *g > 0.0))
        {
            return Err(Error::Tune("kernel: γ must be finite and > 0".into()));
        }
        Ok(())
    }

    /// Fits the support vectors by k-means on the vectors each head produces
    /// on `batch` (from state `s`, usually zeros), and the widths from the
    /// k-means distortion.
    pub fn fit(
        w: &Weights,
        s: &TunedState,
        batch: &[Example],
        uc: &UpscaleConfig,
    ) -> Result<Kernel> {
        let cfg = &w.config;
        if uc.m == 0 || uc.kmeans_iters == 0 || uc.max_samples == 0 {
            return Err(Error::Tune(
                "upscale: m, kmeans_iters and max_samples must be at least 1".into(),
            ));
        }
        if !(uc.width.is_finite() && uc.width > 0.0) {
            return Err(Error::Tune(format!(
                "upscale: width = {} (must be finite and > 0)",
                uc.width
            )));
        }
        let vecs = head_inputs(w, s, batch, uc.source)?;
        let n = cfg.head_size;
        let mut centres = Vec::with_capacity(cfg.n_layer);
        let mut gamma = Vec::with_capacity(cfg.n_layer);
        let mut rng = Rng::new(uc.seed ^ 0x005E_ED0F_4BE7);
        for (l, heads) in vecs.iter().enumerate() {
            let mut cl = Vec::with_capacity(cfg.n_head * uc.m * n);
            let mut gl = Vec::with_capacity(cfg.n_head);
            for (h, x) in heads.iter().enumerate() {
                let count = x.len() / n;
                if count == 0 {
                    return Err(Error::Tune(format!(
                        "upscale: no vectors for layer {l} head {h} (empty or fully masked batch)"
                    )));
                }
                let pts = subsample(x, n, uc.max_samples, &mut rng);
                let (c, distortion) = kmeans(&pts, n, uc.m, uc.kmeans_iters, &mut rng);
                let sigma2 = (uc.width * uc.width * distortion).max(1e-12);
                cl.extend(c);
                gl.push(1.0 / (2.0 * sigma2));
            }
            centres.push(cl);
            gamma.push(gl);
        }
        Kernel::from_parts(cfg, uc.m, centres, gamma)
    }

    fn engine<R: Real>(&self, u: &[Vec<R>]) -> UpW<R> {
        let conv = |v: &Vec<Vec<f64>>| -> Vec<Vec<R>> {
            v.iter()
                .map(|x| x.iter().map(|&a| R::from_f64(a)).collect())
                .collect()
        };
        UpW {
            m: self.m,
            centres: conv(&self.centres),
            gamma: conv(&self.gamma),
            u: u.to_vec(),
        }
    }

    /// The normalised features `φ(x)` (length M) of layer `l`, head `h`.
    pub fn features(&self, l: usize, h: usize, x: &[f64]) -> Result<Vec<f64>> {
        let (n, m) = (self.head_size, self.m);
        if l >= self.n_layer || h >= self.n_head || x.len() != n {
            return Err(Error::Tune(format!(
                "kernel.features: layer {l} head {h} with a vector of length {} (model: {} \
                 layers, {} heads, head size {n})",
                x.len(),
                self.n_layer,
                self.n_head
            )));
        }
        let c = &self.centres[l][h * m * n..(h + 1) * m * n];
        let g = self.gamma[l][h];
        let lg: Vec<f64> = (0..m)
            .map(|q| {
                -g * x
                    .iter()
                    .zip(&c[q * n..(q + 1) * n])
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>()
            })
            .collect();
        let mx = lg.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = lg.iter().map(|v| (v - mx).exp()).collect();
        let s: f64 = e.iter().sum();
        Ok(e.into_iter().map(|v| v / s).collect())
    }
}

fn check_u<R>(k: &Kernel, s: &UpscaledStateOf<R>) -> Result<()> {
    let len = k.n_head * k.head_size * k.m;
    if s.u.len() != k.n_layer || s.u.iter().any(|x| x.len() != len) {
        return Err(Error::Shape {
            name: "upscaled.u".into(),
            expected: vec![k.n_layer, len],
            got: vec![s.u.len(), s.u.first().map_or(0, |x| x.len())],
        });
    }
    Ok(())
}

fn run<R: Real>(
    w: &Weights,
    k: &Kernel,
    s: &UpscaledStateOf<R>,
    batch: &[Example],
    o: &GradOpts,
    want_grad: bool,
) -> Result<grad::RunOut<R>> {
    k.check(&w.config)?;
    check_u(k, s)?;
    grad::run_up(
        w,
        &s.state,
        Some(k.engine(&s.u)),
        batch,
        o,
        want_grad,
        false,
    )
}

/// Loss, token count and gradient (state and `U`) of the upscaled model.
pub fn loss_and_grad_upscaled(
    w: &Weights,
    k: &Kernel,
    s: &UpscaledState,
    batch: &[Example],
    o: &GradOpts,
) -> Result<UpGradOut> {
    let r = run::<f32>(w, k, s, batch, o, true)?;
    Ok(UpGradOut {
        loss: r.loss,
        n_tokens: r.n_tokens,
        grad: UpscaledStateOf {
            state: r.grad.unwrap_or_else(|| s.state.zeros_like()),
            u: r.up_grad.unwrap_or_else(|| s.zeros_like().u),
        },
        peak_bytes: r.peak_bytes,
    })
}

/// `(Σ loss, Σ mask)` of the upscaled model.
pub fn loss_only_upscaled(
    w: &Weights,
    k: &Kernel,
    s: &UpscaledState,
    batch: &[Example],
    o: &GradOpts,
) -> Result<(f64, f64)> {
    let r = run::<f32>(w, k, s, batch, o, false)?;
    Ok((r.loss, r.n_tokens))
}

/// [`loss_and_grad_upscaled`] in `f64` (for finite-difference checks).
pub fn loss_and_grad_upscaled_f64(
    w: &Weights,
    k: &Kernel,
    s: &UpscaledStateOf<f64>,
    batch: &[Example],
    o: &GradOpts,
) -> Result<(f64, f64, UpscaledStateOf<f64>)> {
    let r = run::<f64>(w, k, s, batch, o, true)?;
    let g = UpscaledStateOf {
        state: r.grad.unwrap_or_else(|| s.state.zeros_like()),
        u: r.up_grad.unwrap_or_else(|| s.zeros_like().u),
    };
    Ok((r.loss, r.n_tokens, g))
}

/// `(Σ loss, Σ mask)` in `f64`.
pub fn loss_only_upscaled_f64(
    w: &Weights,
    k: &Kernel,
    s: &UpscaledStateOf<f64>,
    batch: &[Example],
    o: &GradOpts,
) -> Result<(f64, f64)> {
    let r = run::<f64>(w, k, s, batch, o, false)?;
    Ok((r.loss, r.n_tokens))
}

/// Logits `[T, V]` of the upscaled model after every token.
pub fn forward_logits_upscaled(
    w: &Weights,
    k: &Kernel,
    s: &UpscaledState,
    tokens: &[u32],
) -> Result<Vec<f32>> {
    k.check(&w.config)?;
    check_u(k, s)?;
    grad::forward_logits_up::<f32>(w, &s.state, Some(k.engine(&s.u)), tokens)
}

/// At most `max` rows of `x` (`[count, n]`), chosen without replacement.
fn subsample(x: &[f32], n: usize, max: usize, rng: &mut Rng) -> Vec<f64> {
    let count = x.len() / n;
    let mut idx: Vec<usize> = (0..count).collect();
    if count > max {
        for i in 0..max {
            let j = i + rng.below((count - i) as u64) as usize;
            idx.swap(i, j);
        }
        idx.truncate(max);
    }
    idx.iter()
        .flat_map(|&i| x[i * n..(i + 1) * n].iter().map(|&v| v as f64))
        .collect()
}

fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// k-means (k-means++ seeding, Lloyd iterations) of `pts` (`[count, n]`)
/// into `k` centres; returns the centres `[k, n]` and the mean squared
/// distance of a point to its centre. With fewer distinct points than `k`,
/// the surplus centres are jittered copies.
#[allow(clippy::needless_range_loop)] // parallel arrays indexed by point
fn kmeans(pts: &[f64], n: usize, k: usize, iters: usize, rng: &mut Rng) -> (Vec<f64>, f64) {
    let count = pts.len() / n;
    let p = |i: usize| &pts[i * n..(i + 1) * n];
    let mut cen: Vec<f64> = Vec::with_capacity(k * n);
    // k-means++ seeding
    let first = rng.below(count as u64) as usize;
    cen.extend_from_slice(p(first));
    let mut d2: Vec<f64> = (0..count).map(|i| dist2(p(i), p(first))).collect();
    let scale = (d2.iter().sum::<f64>() / count as f64).sqrt().max(1e-6);
    while cen.len() < k * n {
        let total: f64 = d2.iter().sum();
        if total > 0.0 {
            let mut u = rng.uniform() * total;
            let mut j = count - 1;
            for (i, &v) in d2.iter().enumerate() {
                if u < v {
                    j = i;
                    break;
                }
                u -= v;
            }
            cen.extend_from_slice(p(j));
        } else {
            let j = rng.below(count as u64) as usize;
            cen.extend(p(j).iter().map(|&v| v + 1e-3 * scale * rng.normal()));
        }
        let c = &cen[cen.len() - n..];
        for i in 0..count {
            d2[i] = d2[i].min(dist2(p(i), c));
        }
    }
    let mut assign = vec![0usize; count];
    for _ in 0..iters {
        for i in 0..count {
            let mut best = (f64::INFINITY, 0);
            for q in 0..k {
                let d = dist2(p(i), &cen[q * n..(q + 1) * n]);
                if d < best.0 {
                    best = (d, q);
                }
            }
            assign[i] = best.1;
        }
        let mut sum = vec![0.0; k * n];
        let mut cnt = vec![0usize; k];
        for i in 0..count {
            let q = assign[i];
            cnt[q] += 1;
            for j in 0..n {
                sum[q * n + j] += pts[i * n + j];
            }
        }
        for q in 0..k {
            if cnt[q] > 0 {
                for j in 0..n {
                    cen[q * n + j] = sum[q * n + j] / cnt[q] as f64;
                }
            }
        }
    }
    let mut dist = 0.0;
    for i in 0..count {
        let d = (0..k)
            .map(|q| dist2(p(i), &cen[q * n..(q + 1) * n]))
            .fold(f64::INFINITY, f64::min);
        dist += d;
    }
    let mean = dist / count as f64;
    // all points identical: fall back to the spread of the centres (or 1)
    let mean = if mean > 0.0 { mean } else { scale * scale };
    (cen, mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmeans_finds_separated_clusters() {
        let mut rng = Rng::new(3);
        let mut pts = Vec::new();
        for i in 0..300 {
            let c = (i % 3) as f64 * 10.0;
            pts.push(c + 0.1 * rng.normal());
            pts.push(-c + 0.1 * rng.normal());
        }
        let (cen, d) = kmeans(&pts, 2, 3, 10, &mut rng);
        assert!(d < 0.1, "distortion {d}");
        let mut xs: Vec<f64> = (0..3).map(|q| cen[q * 2]).collect();
        xs.sort_by(f64::total_cmp);
        for (x, want) in xs.iter().zip([0.0, 10.0, 20.0]) {
            assert!((x - want).abs() < 0.2, "{xs:?}");
        }
    }
}
