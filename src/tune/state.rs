//! The plain data of state tuning, shared by the gradient engines
//! ([`super::grad`], [`super::upscale`], [`super::device`]), DBP
//! ([`super::dbp`]), validation ([`super::eval`]) and the loop
//! ([`super::train`]): the tuned state ([`TunedStateOf`] / [`TunedState`]),
//! one training sequence ([`Example`]), the options of a gradient
//! computation ([`GradOpts`]) and the checks every engine runs on a batch,
//! the DBP statistics a forward gathers ([`DbpStats`]), and the conversions
//! between a tuned state and the model's [`State`] / the ai00 state file.
//!
//! This module depends on no other tuning module, so every one of them can
//! use it without a cycle.
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::{Config, State, StoreDType};
use crate::real::Real;

/// Trainable initial state, generic over the float type (see [`TunedState`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TunedStateOf<R> {
    /// Per layer `[H, N, N]`, value-major (row = value index, column = key index).
    pub wkv: Vec<Vec<R>>,
    /// Per layer `[C]`: the time-mix token-shift state (`ln1` output of the
    /// "previous token"), or `None` for zeros (not trained).
    pub shift_att: Option<Vec<Vec<R>>>,
    /// Per layer `[C]`: the channel-mix token-shift state (`ln2` output).
    pub shift_ffn: Option<Vec<Vec<R>>>,
}

/// The trainable initial state in `f32` (the contract type).
pub type TunedState = TunedStateOf<f32>;

impl<R: Copy + Default> TunedStateOf<R> {
    /// All-zero state for `cfg`; with `with_shift` the token-shift states are
    /// present (trainable) too.
    pub fn zeros(cfg: &Config, with_shift: bool) -> Self {
        let hnn = cfg.n_head * cfg.head_size * cfg.head_size;
        let c = cfg.n_embd;
        let sh = || with_shift.then(|| vec![vec![R::default(); c]; cfg.n_layer]);
        TunedStateOf {
            wkv: vec![vec![R::default(); hnn]; cfg.n_layer],
            shift_att: sh(),
            shift_ffn: sh(),
        }
    }

    /// Zeros with the same layout (which parts are present, lengths).
    pub fn zeros_like(&self) -> Self {
        let z = |v: &Vec<Vec<R>>| {
            v.iter()
                .map(|x| vec![R::default(); x.len()])
                .collect::<Vec<_>>()
        };
        TunedStateOf {
            wkv: z(&self.wkv),
            shift_att: self.shift_att.as_ref().map(z),
            shift_ffn: self.shift_ffn.as_ref().map(z),
        }
    }

    /// The trainable tensors in a fixed order: every layer's WKV state, then
    /// every layer's `shift_att` (if present), then every `shift_ffn`.
    pub fn params(&self) -> Vec<&[R]> {
        let mut out: Vec<&[R]> = self.wkv.iter().map(|v| v.as_slice()).collect();
        for s in [&self.shift_att, &self.shift_ffn].into_iter().flatten() {
            out.extend(s.iter().map(|v| v.as_slice()));
        }
        out
    }

    /// Mutable view of [`params`](Self::params), same order.
    pub fn params_mut(&mut self) -> Vec<&mut [R]> {
        let mut out: Vec<&mut [R]> = self.wkv.iter_mut().map(|v| v.as_mut_slice()).collect();
        for s in [&mut self.shift_att, &mut self.shift_ffn]
            .into_iter()
            .flatten()
        {
            out.extend(s.iter_mut().map(|v| v.as_mut_slice()));
        }
        out
    }

    /// Checks the layout against `cfg` (named [`Error::Shape`] errors).
    pub fn check(&self, cfg: &Config) -> Result<()> {
        let hnn = cfg.n_head * cfg.head_size * cfg.head_size;
        let chk = |name: &str, v: &Vec<Vec<R>>, n: usize| -> Result<()> {
            if v.len() != cfg.n_layer {
                return Err(Error::Shape {
                    name: format!("state.{name}"),
                    expected: vec![cfg.n_layer],
                    got: vec![v.len()],
                });
            }
            for (l, x) in v.iter().enumerate() {
                if x.len() != n {
                    return Err(Error::Shape {
                        name: format!("state.{name}[{l}]"),
                        expected: vec![n],
                        got: vec![x.len()],
                    });
                }
            }
            Ok(())
        };
        chk("wkv", &self.wkv, hnn)?;
        if let Some(s) = &self.shift_att {
            chk("shift_att", s, cfg.n_embd)?;
        }
        if let Some(s) = &self.shift_ffn {
            chk("shift_ffn", s, cfg.n_embd)?;
        }
        Ok(())
    }

    /// Converts every value (e.g. `f32` → `f64`).
    pub fn map<S>(&self, f: impl Fn(R) -> S + Copy) -> TunedStateOf<S> {
        let m = |v: &Vec<Vec<R>>| {
            v.iter()
                .map(|x| x.iter().map(|&a| f(a)).collect())
                .collect()
        };
        TunedStateOf {
            wkv: m(&self.wkv),
            shift_att: self.shift_att.as_ref().map(m),
            shift_ffn: self.shift_ffn.as_ref().map(m),
        }
    }
}

/// One training sequence.
#[derive(Clone, Debug, Default)]
pub struct Example {
    /// Input tokens, length T.
    pub tokens: Vec<u32>,
    /// Next tokens (targets), length T.
    pub targets: Vec<u32>,
    /// Loss weight per position, length T (0 = prompt / padding), ≥ 0.
    pub mask: Vec<f32>,
    /// Teacher probabilities `[T, V]` for the observer loss, or `None`.
    pub soft: Option<Vec<f32>>,
}

/// Sums of `x xᵀ` per layer and head of the key-space inputs seen by the
/// state, gathered over a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct DbpStats {
    /// Layers.
    pub n_layer: usize,
    /// Heads per layer.
    pub n_head: usize,
    /// Head size N.
    pub head_size: usize,
    /// `[L, H, N, N]`: `Σ_t x_t x_tᵀ` (not divided by the count).
    pub second_moment: Vec<f64>,
    /// Number of vectors summed (per layer and head).
    pub count: f64,
}

impl DbpStats {
    /// Empty statistics.
    pub fn zeros(n_layer: usize, n_head: usize, head_size: usize) -> Self {
        DbpStats {
            n_layer,
            n_head,
            head_size,
            second_moment: vec![0.0; n_layer * n_head * head_size * head_size],
            count: 0.0,
        }
    }

    /// Adds `x` (length N) to layer `l`, head `h`; call [`Self::count`]-wise
    /// consistently (one vector per head per position) or set `count` yourself.
    pub fn add_sample(&mut self, l: usize, h: usize, x: &[f64]) {
        let n = self.head_size;
        let base = (l * self.n_head + h) * n * n;
        for i in 0..n {
            for j in 0..n {
                self.second_moment[base + i * n + j] += x[i] * x[j];
            }
        }
    }

    /// `⟨x xᵀ⟩` of layer `l`, head `h` (`[N, N]`), zeros when empty.
    pub fn mean(&self, l: usize, h: usize) -> Vec<f64> {
        let n = self.head_size;
        let base = (l * self.n_head + h) * n * n;
        let inv = if self.count > 0.0 {
            1.0 / self.count
        } else {
            0.0
        };
        self.second_moment[base..base + n * n]
            .iter()
            .map(|v| v * inv)
            .collect()
    }

    /// Adds another batch's statistics (same layout).
    pub fn merge(&mut self, o: &DbpStats) -> Result<()> {
        if o.second_moment.len() != self.second_moment.len() {
            return Err(Error::Shape {
                name: "DbpStats.second_moment".into(),
                expected: vec![self.second_moment.len()],
                got: vec![o.second_moment.len()],
            });
        }
        for (a, b) in self.second_moment.iter_mut().zip(&o.second_moment) {
            *a += b;
        }
        self.count += o.count;
        Ok(())
    }
}

/// The model state (for inference) that a tuned state describes: its WKV
/// states, and its token-shift states when tuned (zeros otherwise).
pub fn to_model_state(cfg: &Config, s: &TunedState) -> State {
    let mut st = State::zeros(cfg);
    for (l, ls) in st.layers.iter_mut().enumerate() {
        ls.wkv.copy_from_slice(&s.wkv[l]);
        if let Some(a) = &s.shift_att {
            ls.att_x.copy_from_slice(&a[l]);
        }
        if let Some(f) = &s.shift_ffn {
            ls.ffn_x.copy_from_slice(&f[l]);
        }
    }
    st
}

/// A tuned state that starts from a state file's WKV states.
pub fn from_model_state(cfg: &Config, st: &State, with_shift: bool) -> Result<TunedState> {
    st.check(cfg)?;
    let mut s = TunedState::zeros(cfg, with_shift);
    for (l, ls) in st.layers.iter().enumerate() {
        s.wkv[l].copy_from_slice(&ls.wkv);
    }
    Ok(s)
}

/// Writes the WKV part of a tuned state as an ai00 / web-rwkv state file
/// (`blocks.N.att.time_state` `[H, N, N]` f32), atomically.
///
/// A NaN or infinite value is refused ([`Error::NonFinite`]: a diverged run
/// must not leave a state file that evaluates to NaN) unless
/// [`crate::guard::set_allow_nonfinite`] is on.
pub fn export_state(path: &Path, cfg: &Config, s: &TunedState) -> Result<()> {
    s.check(cfg)?;
    for (l, w) in s.wkv.iter().enumerate() {
        crate::guard::check_finite(&format!("the tuned state of layer {l}"), w)?;
    }
    let bytes = to_model_state(cfg, s).to_safetensors_bytes(cfg, StoreDType::F32)?;
    crate::tensors::write_atomic(path, &bytes)
}

// ---------------------------------------------------------------------------
// Options and the checks every engine runs on its batch
// ---------------------------------------------------------------------------

/// Options of a loss / gradient computation (`super::grad::loss_and_grad`,
/// [`super::device::DeviceTuner`]).
#[derive(Clone, Debug)]
pub struct GradOpts {
    /// λ: weight of `KL(teacher ‖ student)` on masked positions (needs `soft`).
    pub observer_weight: f32,
    /// Tokens per activation chunk, ≥ 1 (kept for option and checkpoint
    /// compatibility; the engine recomputes per layer, see
    /// [`super::device::Recompute`]).
    pub chunk: usize,
}

impl Default for GradOpts {
    fn default() -> Self {
        GradOpts {
            observer_weight: 0.0,
            chunk: 64,
        }
    }
}

/// Which per-head vectors `head_inputs` collects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadVector {
    /// The receptances `r_t` (what the state is read with).
    Receptance,
    /// The keys `k̃_t` written into the state (`v_t k̃_tᵀ`).
    Key,
}

fn check_tokens(name: &str, toks: &[u32], vocab: usize) -> Result<()> {
    if let Some((i, &t)) = toks.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
        return Err(Error::Tune(format!(
            "{name}[{i}] = {t} is not below the vocabulary size {vocab}"
        )));
    }
    Ok(())
}

/// The checks every gradient engine runs on its inputs: the observer weight
/// and each example (lengths, token ranges, mask values, soft-target shape).
pub(crate) fn check_batch(batch: &[Example], o: &GradOpts, vocab: usize) -> Result<()> {
    if o.chunk == 0 {
        return Err(Error::Tune("chunk = 0 (must be at least 1)".into()));
    }
    if !o.observer_weight.is_finite() || o.observer_weight < 0.0 {
        return Err(Error::Tune(format!(
            "observer_weight = {} (must be finite and ≥ 0)",
            o.observer_weight
        )));
    }
    for (i, ex) in batch.iter().enumerate() {
        check_example(i, ex, vocab)?;
    }
    Ok(())
}

fn check_example(i: usize, ex: &Example, vocab: usize) -> Result<()> {
    let t = ex.tokens.len();
    for (name, n) in [("targets", ex.targets.len()), ("mask", ex.mask.len())] {
        if n != t {
            return Err(Error::Shape {
                name: format!("batch[{i}].{name}"),
                expected: vec![t],
                got: vec![n],
            });
        }
    }
    check_tokens(&format!("batch[{i}].tokens"), &ex.tokens, vocab)?;
    check_tokens(&format!("batch[{i}].targets"), &ex.targets, vocab)?;
    if let Some((j, m)) = ex
        .mask
        .iter()
        .enumerate()
        .find(|(_, m)| !(m.is_finite() && **m >= 0.0))
    {
        return Err(Error::Tune(format!(
            "batch[{i}].mask[{j}] = {m} (must be finite and ≥ 0)"
        )));
    }
    if let Some(p) = &ex.soft {
        if p.len() != t * vocab {
            return Err(Error::Shape {
                name: format!("batch[{i}].soft"),
                expected: vec![t, vocab],
                got: vec![p.len()],
            });
        }
        if let Some((j, v)) = p
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            return Err(Error::Tune(format!(
                "batch[{i}].soft[{}][{}] = {v} (probabilities must be finite and ≥ 0)",
                j / vocab,
                j % vocab
            )));
        }
    }
    Ok(())
}

/// Positions that can affect the loss: up to and including the last masked one.
pub(crate) fn effective_len(ex: &Example) -> usize {
    ex.mask.iter().rposition(|&m| m > 0.0).map_or(0, |p| p + 1)
}

// ---------------------------------------------------------------------------
// The kernel-upscaled state's data (its fitting, files and docs: `super::upscale`)
// ---------------------------------------------------------------------------

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
