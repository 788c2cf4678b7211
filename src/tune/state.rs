//! The plain data of state tuning, shared by the gradient engines
//! ([`super::grad`], [`super::upscale`], [`super::device`]), DBP
//! ([`super::dbp`]), validation ([`super::eval`]) and the loop
//! ([`super::train`]): the tuned state ([`TunedStateOf`] / [`TunedState`]),
//! one training sequence ([`Example`]), the DBP statistics a forward gathers
//! ([`DbpStats`]), and the conversions between a tuned state and the
//! model's [`State`] / the ai00 state file.
//!
//! This module depends on no other tuning module, so every one of them can
//! use it without a cycle.
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::{Config, State, StoreDType};

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
pub fn export_state(path: &Path, cfg: &Config, s: &TunedState) -> Result<()> {
    let bytes = to_model_state(cfg, s).to_safetensors_bytes(cfg, StoreDType::F32)?;
    crate::tensors::write_atomic(path, &bytes)
}
