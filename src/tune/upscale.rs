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
//!
//! [`UpscaleEngine`] trains it in the ordinary loop
//! ([`super::train::train_with`]); [`save_upscaled`] / [`load_upscaled`]
//! write and read it as an ai00 state file plus a sidecar
//! (`<stem>.upscale.safetensors`, see [`save_sidecar`]).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::data::Dataset;
use super::engine::{check_engine_state, host_update, Engine, EngineState, StepOut};
use super::eval::{argmax, log_softmax_at, EvalResult};
use super::grad::{
    self, head_inputs, Example, GradOpts, HeadVector, Real, TunedState, TunedStateOf, UpW,
};
use super::optim::{Adam, AdamConfig};
use super::state::{export_state, from_model_state};
use crate::error::{Error, Result};
use crate::model::load::{
    read_f32_tensors, read_file, read_metadata, write_f32_tensors, F32Tensor,
};
use crate::model::weights::{Config, Weights};
use crate::model::{Model, State, StoreDType};
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
    /// Layers.
    pub n_layer: usize,
    /// Heads per layer.
    pub n_head: usize,
    /// Head size N.
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

    /// FNV-1a over M, the shape and the bits of every centre and width: two
    /// kernels with the same fingerprint are identical (used to tie a
    /// checkpoint to the kernel it was trained with).
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |x: u64| {
            for b in x.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x100_0000_01b3);
            }
        };
        for x in [self.n_layer, self.n_head, self.head_size, self.m] {
            eat(x as u64);
        }
        for x in self.centres.iter().chain(&self.gamma).flatten() {
            eat(x.to_bits());
        }
        format!("{h:016x}")
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

// ---------------------------------------------------------------------------
// Validation with the upscaled read-out
// ---------------------------------------------------------------------------

/// [`super::eval::evaluate`] for the upscaled model: the same definitions
/// (mean masked cross-entropy over the first `max` examples, 0 = all, and
/// the exact match of the teacher-forced greedy response on the first `max`
/// prompt/response tasks), with the logits of [`forward_logits_upscaled`].
pub fn evaluate_upscaled(
    w: &Weights,
    k: &Kernel,
    s: &UpscaledState,
    ds: &Dataset,
    max: usize,
) -> Result<EvalResult> {
    k.check(&w.config)?;
    check_u(k, s)?;
    let v = w.config.vocab;
    let take = |n: usize| if max == 0 { n } else { n.min(max) };
    let sums = ds.examples[..take(ds.examples.len())]
        .par_iter()
        .map(|e| -> Result<(f64, f64)> {
            let logits = forward_logits_upscaled(w, k, s, &e.tokens)?;
            let mut sum = 0.0;
            let mut n = 0.0;
            for (i, (&tgt, &m)) in e.targets.iter().zip(&e.mask).enumerate() {
                if m > 0.0 {
                    sum -= m as f64 * log_softmax_at(&logits[i * v..(i + 1) * v], tgt as usize);
                    n += m as f64;
                }
            }
            Ok((sum, n))
        })
        .collect::<Result<Vec<_>>>()?;
    let (sum, n) = sums.iter().fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    let tasks = &ds.tasks[..take(ds.tasks.len())];
    let exact = if tasks.is_empty() {
        None
    } else {
        let hits = tasks
            .par_iter()
            .map(|t| -> Result<bool> {
                if t.prompt.is_empty() || t.response.is_empty() {
                    return Ok(false);
                }
                let seq: Vec<u32> = t
                    .prompt
                    .iter()
                    .chain(&t.response[..t.response.len() - 1])
                    .copied()
                    .collect();
                let logits = forward_logits_upscaled(w, k, s, &seq)?;
                let p = t.prompt.len();
                Ok(t.response
                    .iter()
                    .enumerate()
                    .all(|(j, &r)| argmax(&logits[(p - 1 + j) * v..(p + j) * v]) == r as usize))
            })
            .collect::<Result<Vec<_>>>()?;
        Some((hits.iter().filter(|&&h| h).count(), tasks.len()))
    };
    Ok(EvalResult {
        loss: if n > 0.0 { sum / n } else { 0.0 },
        n_tokens: n,
        exact,
    })
}

// ---------------------------------------------------------------------------
// The engine
// ---------------------------------------------------------------------------

/// The CPU [`Engine`] of the upscaled state: [`loss_and_grad_upscaled`], the
/// gradient divided by the target-token count, global-norm clipping and one
/// Adam step over [`UpscaledStateOf::params`] (the tuned `S_0`, then every
/// layer's `U`) — the recipe of [`super::engine::HostEngine`]. The kernel is
/// fixed. DBP is not supported with the upscaled state.
pub struct UpscaleEngine<'w> {
    weights: &'w Weights,
    opts: GradOpts,
    /// The fixed support vectors and widths.
    pub kernel: Kernel,
    /// The trained parameters (`S_0` and `U`).
    pub state: UpscaledState,
    /// The optimiser of the upscaled state.
    pub adam: Adam,
}

/// DBP is not defined for the kernel-upscaled state: an [`Error::Tune`]
/// when `dbp` is given.
pub(crate) fn refuse_dbp(dbp: Option<(f64, f64)>) -> Result<()> {
    if dbp.is_some() {
        return Err(Error::Tune(
            "DBP is not supported together with the kernel-upscaled state: train the \
             upscaled state without DBP (dbp = None / --no-dbp)"
                .into(),
        ));
    }
    Ok(())
}

impl<'w> UpscaleEngine<'w> {
    /// Starts from `init` (usually [`UpscaledStateOf::new`] with `U = 0`).
    /// `dbp` must be `None`: DBP on the upscaled state is not supported.
    pub fn new(
        weights: &'w Weights,
        kernel: Kernel,
        init: UpscaledState,
        adam: AdamConfig,
        dbp: Option<(f64, f64)>,
        opts: GradOpts,
    ) -> Result<Self> {
        refuse_dbp(dbp)?;
        kernel.check(&weights.config)?;
        init.state.check(&weights.config)?;
        check_u(&kernel, &init)?;
        let sizes: Vec<usize> = init.params().iter().map(|p| p.len()).collect();
        Ok(UpscaleEngine {
            weights,
            opts,
            kernel,
            state: init,
            adam: Adam::new(adam, &sizes),
        })
    }
}

impl Engine for UpscaleEngine<'_> {
    fn device(&self) -> &'static str {
        "cpu"
    }
    fn sizes(&self) -> Vec<usize> {
        self.state.params().iter().map(|p| p.len()).collect()
    }
    fn step(&mut self, batch: &[Example], lr: f64, clip: f64) -> Result<StepOut> {
        let o = loss_and_grad_upscaled(self.weights, &self.kernel, &self.state, batch, &self.opts)?;
        let mut g = o.grad;
        let grad_norm = host_update(
            &mut self.adam,
            self.state.params_mut(),
            g.params_mut(),
            o.n_tokens,
            clip,
            lr,
        )?;
        Ok(StepOut {
            loss_sum: o.loss,
            n_tokens: o.n_tokens,
            grad_norm,
        })
    }
    fn save(&self) -> Result<EngineState> {
        Ok(EngineState {
            params: self.state.params().iter().map(|p| p.to_vec()).collect(),
            adam_m: self.adam.m.clone(),
            adam_v: self.adam.v.clone(),
            adam_t: self.adam.t,
            dbp_r: None,
        })
    }
    fn load(&mut self, s: EngineState) -> Result<()> {
        check_engine_state(&s, &self.sizes(), "the checkpoint")?;
        if s.dbp_r.is_some() {
            return Err(Error::Tune(
                "the checkpoint holds DBP matrices, but the upscaled state is trained without \
                 DBP"
                .into(),
            ));
        }
        for (dst, src) in self.state.params_mut().into_iter().zip(&s.params) {
            dst.copy_from_slice(src);
        }
        self.adam.m = s.adam_m;
        self.adam.v = s.adam_v;
        self.adam.t = s.adam_t;
        Ok(())
    }
    fn tuned(&self) -> Result<TunedState> {
        Ok(self.state.state.clone())
    }
    fn evaluate(&self, _model: &Model, ds: &Dataset, max: usize) -> Result<EvalResult> {
        evaluate_upscaled(self.weights, &self.kernel, &self.state, ds, max)
    }
}

// ---------------------------------------------------------------------------
// Files: the sidecar next to an ai00 / web-rwkv state file
// ---------------------------------------------------------------------------

/// Version of the sidecar layout written by [`save_sidecar`].
pub const SIDECAR_VERSION: u32 = 1;
/// `rwkv_tune.kind` of a sidecar file.
pub const SIDECAR_KIND: &str = "rwkv7_upscaled_state";

/// The sidecar of the state file `state`: `<dir>/<stem>.upscale.safetensors`
/// (`tuned.safetensors` → `tuned.upscale.safetensors`).
pub fn sidecar_path(state: &Path) -> PathBuf {
    let stem = state
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    state.with_file_name(format!("{stem}.upscale.safetensors"))
}

/// FNV-1a over the bits of the WKV states: ties a sidecar to its state file.
fn state_hash(s: &TunedState) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in s.wkv.iter().flatten() {
        for b in x.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn sidecar_names(l: usize) -> [String; 3] {
    [
        format!("blocks.{l}.att.upscale_centres"),
        format!("blocks.{l}.att.upscale_gamma"),
        format!("blocks.{l}.att.upscale_u"),
    ]
}

/// Serialises the kernel and `U` (f32) as a sidecar (see [`save_sidecar`]).
pub fn sidecar_to_bytes(cfg: &Config, k: &Kernel, s: &UpscaledState) -> Result<Vec<u8>> {
    k.check(cfg)?;
    s.state.check(cfg)?;
    check_u(k, s)?;
    let (h, n, m) = (k.n_head, k.head_size, k.m);
    let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let mut tensors = Vec::with_capacity(3 * k.n_layer);
    for l in 0..k.n_layer {
        let [c, g, u] = sidecar_names(l);
        tensors.push(F32Tensor {
            name: c,
            shape: vec![h, m, n],
            data: f(&k.centres[l]),
        });
        tensors.push(F32Tensor {
            name: g,
            shape: vec![h],
            data: f(&k.gamma[l]),
        });
        tensors.push(F32Tensor {
            name: u,
            shape: vec![h, n, m],
            data: s.u[l].clone(),
        });
    }
    let meta: HashMap<String, String> = [
        ("format", "pt".to_string()),
        ("rwkv_tune.kind", SIDECAR_KIND.to_string()),
        ("rwkv_tune.upscale_version", SIDECAR_VERSION.to_string()),
        ("upscale_m", m.to_string()),
        ("n_layer", k.n_layer.to_string()),
        ("n_head", h.to_string()),
        ("head_size", n.to_string()),
        ("state_fnv1a", state_hash(&s.state)),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b))
    .collect();
    write_f32_tensors(&tensors, StoreDType::F32, Some(meta))
}

/// Writes the sidecar of an upscaled state atomically: per layer
/// `blocks.{l}.att.upscale_centres` `[H, M, N]`, `blocks.{l}.att.upscale_gamma`
/// `[H]` and `blocks.{l}.att.upscale_u` `[H, N, M]` (f32), metadata
/// `rwkv_tune.kind`, `rwkv_tune.upscale_version`, `upscale_m`, the model
/// shape and a hash of the WKV states it belongs to. The N×N states
/// themselves go into the ordinary state file ([`export_state`]); use
/// [`save_upscaled`] to write both.
///
/// Centres and widths are stored as f32: the f32 engine converts them to
/// f32 anyway, so the loaded kernel gives bit-identical f32 logits.
pub fn save_sidecar(path: &Path, cfg: &Config, k: &Kernel, s: &UpscaledState) -> Result<()> {
    let bytes = sidecar_to_bytes(cfg, k, s)?;
    crate::tensors::write_atomic(path, &bytes)
}

/// Reads a sidecar written by [`save_sidecar`] for the tuned state `state`
/// (normally the state file's WKV states): checks its kind, version, M, the
/// model shape and that it belongs to `state`; every tensor must be present
/// with its shape ([`Error::MissingTensor`], [`Error::Shape`] naming it).
pub fn sidecar_from_bytes(
    bytes: &[u8],
    path: &Path,
    cfg: &Config,
    state: TunedState,
) -> Result<(Kernel, UpscaledState)> {
    state.check(cfg)?;
    let meta = read_metadata(bytes, path)?;
    let bad = |what: String| Error::Tune(format!("upscale sidecar {}: {what}", path.display()));
    match meta.get("rwkv_tune.kind") {
        Some(k) if k == SIDECAR_KIND => {}
        other => {
            return Err(bad(format!(
                "metadata rwkv_tune.kind is {other:?}, expected {SIDECAR_KIND:?} (not an upscale \
                 sidecar)"
            )))
        }
    }
    match meta.get("rwkv_tune.upscale_version") {
        Some(v) if *v == SIDECAR_VERSION.to_string() => {}
        other => {
            return Err(bad(format!(
                "format version {other:?} is not supported (this build reads version \
                 {SIDECAR_VERSION})"
            )))
        }
    }
    let num = |key: &str| -> Result<usize> {
        meta.get(key)
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(|| bad(format!("metadata `{key}` missing or not a number")))
    };
    let m = num("upscale_m")?;
    if m == 0 {
        return Err(bad("upscale_m is 0".into()));
    }
    let shape = [num("n_layer")?, num("n_head")?, num("head_size")?];
    if shape != [cfg.n_layer, cfg.n_head, cfg.head_size] {
        return Err(Error::Shape {
            name: format!("{} (layers, heads, head size)", path.display()),
            expected: vec![cfg.n_layer, cfg.n_head, cfg.head_size],
            got: shape.to_vec(),
        });
    }
    if let Some(hash) = meta.get("state_fnv1a") {
        if *hash != state_hash(&state) {
            return Err(bad(
                "it belongs to a different state file (the WKV states' hash differs); the \
                 state file was rewritten without it"
                    .into(),
            ));
        }
    }
    let mut tensors: HashMap<String, F32Tensor> = read_f32_tensors(bytes, path)?
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let (h, n) = (cfg.n_head, cfg.head_size);
    let mut take = |name: String, expected: Vec<usize>| -> Result<Vec<f32>> {
        let t = tensors
            .remove(&name)
            .ok_or_else(|| Error::MissingTensor(name.clone()))?;
        if t.shape != expected {
            return Err(Error::Shape {
                name,
                expected,
                got: t.shape,
            });
        }
        Ok(t.data)
    };
    let (mut centres, mut gamma, mut u) = (Vec::new(), Vec::new(), Vec::new());
    for l in 0..cfg.n_layer {
        let [c, g, uu] = sidecar_names(l);
        let to64 = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
        centres.push(to64(take(c, vec![h, m, n])?));
        gamma.push(to64(take(g, vec![h])?));
        u.push(take(uu, vec![h, n, m])?);
    }
    if let Some(name) = tensors.keys().min() {
        return Err(bad(format!("unexpected tensor `{name}`")));
    }
    let k = Kernel::from_parts(cfg, m, centres, gamma)?;
    Ok((k, UpscaledStateOf { state, u }))
}

/// [`sidecar_from_bytes`] from a file.
pub fn load_sidecar(
    path: &Path,
    cfg: &Config,
    state: TunedState,
) -> Result<(Kernel, UpscaledState)> {
    let bytes = read_file(path)?;
    sidecar_from_bytes(&bytes, path, cfg, state)
}

/// Writes an upscaled state as two files: the ai00 / web-rwkv state file
/// `state_path` (the N×N states, what other tools load) and its sidecar
/// [`sidecar_path`] (kernel and `U`). The sidecar is written first; a crash
/// between the two leaves a pair whose hashes differ, which
/// [`load_upscaled`] refuses. Returns the sidecar's path.
pub fn save_upscaled(
    state_path: &Path,
    cfg: &Config,
    k: &Kernel,
    s: &UpscaledState,
) -> Result<PathBuf> {
    let side = sidecar_path(state_path);
    save_sidecar(&side, cfg, k, s)?;
    export_state(state_path, cfg, &s.state)?;
    Ok(side)
}

/// Reads the state file `state_path` and, when its sidecar exists, the kernel
/// and `U` (`None` without a sidecar: a plain state file).
pub fn load_upscaled(state_path: &Path, cfg: &Config) -> Result<Option<(Kernel, UpscaledState)>> {
    let side = sidecar_path(state_path);
    if !side.is_file() {
        return Ok(None);
    }
    let st = State::load(state_path, cfg)?;
    let tuned = from_model_state(cfg, &st, false)?;
    load_sidecar(&side, cfg, tuned).map(Some)
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
