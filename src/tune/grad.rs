//! Autograd-lite for state tuning (CPU): the RWKV-7 forward over a batch of
//! token sequences starting from trainable initial states, recording what the
//! backward needs, and the backward that produces gradients for the initial
//! states only (no compute or memory spent on frozen-weight gradients).
//!
//! INTERFACE CONTRACT (agreed between the engineers writing grad.rs and the
//! tuning loop; keep these names and signatures):
//!
//! ```ignore
//! pub struct TunedState { pub wkv: Vec<Vec<f32>>, pub shift_att: Option<Vec<Vec<f32>>>, pub shift_ffn: Option<Vec<Vec<f32>>> }
//! impl TunedState { pub fn zeros(cfg: &Config, with_shift: bool) -> Self; pub fn zeros_like(&self) -> Self;
//!                   pub fn params(&self) -> Vec<&[f32]>; pub fn params_mut(&mut self) -> Vec<&mut [f32]>; }
//! pub struct Example { pub tokens: Vec<u32>, pub targets: Vec<u32>, pub mask: Vec<f32>, pub soft: Option<Vec<f32>> }
//! pub struct GradOpts { pub observer_weight: f32, pub chunk: usize }
//! pub struct GradOut { pub loss: f64, pub n_tokens: f64, pub grad: TunedState, pub peak_bytes: usize }
//! pub fn loss_and_grad(w: &Weights, s: &TunedState, batch: &[Example], o: &GradOpts) -> Result<GradOut>;
//! pub fn loss_only(w: &Weights, s: &TunedState, batch: &[Example]) -> Result<(f64, f64)>; // (sum loss, n tokens)
//! ```
//!
//! Additions beyond the contract:
//! - `TunedState` and `Example` are defined in [`super::state`] (the plain
//!   data every tuning module shares; re-exported here), so DBP and the
//!   loop need not depend on this module for them.
//! - `GradOpts` implements `Default` (observer 0, chunk 64).
//! - [`loss_and_grad_dbp`] is [`loss_and_grad`] that also collects the DBP
//!   statistics into `GradOut::dbp_stats` (`None` from plain
//!   [`loss_and_grad`]): second moments of the key-space inputs per layer and
//!   head, see [`super::dbp`].
//! - [`TunedState`] is the `f32` instance of the generic [`TunedStateOf`]; the
//!   same engine runs in `f64` through [`loss_and_grad_f64`] (used by the
//!   finite-difference tests).
//! - The kernel-upscaled read-out `y_t += U φ(r_t)` of [`super::upscale`]
//!   (`UpW`, `up_fwd` / `up_bwd`, reached through `run_up` and
//!   `forward_logits_up`), and [`head_inputs`] (per-head `r_t` / `k̃_t` for
//!   placing its support vectors). Without an upscaled read-out nothing
//!   changes.
//!
//! # What is computed
//!
//! Each example starts from the tuned state (WKV state per layer; token-shift
//! vectors `shift_att` / `shift_ffn` when present, else zeros; the shift
//! states are the *normalised* inputs of the previous token, `ln1(x)` and
//! `ln2(x)`, as in the RNN form). For every position `t` with `mask[t] > 0` the
//! loss is `mask[t] · (CE(logits_t, targets[t]) + λ · KL(p_t ‖ softmax(logits_t)))`
//! where `p_t = soft[t]` (when given) and `λ = observer_weight`. Loss and
//! gradients are sums over positions and examples.
//!
//! # How (memory and recomputation)
//!
//! Positions after the last masked one cannot influence the loss and are not
//! run. The sequence is cut into chunks of `chunk` tokens. The forward pass
//! keeps, per example, only the residual stream entering every layer (`L·T·C`),
//! layer 0's values `v_first` (`T·C`), the gradient arriving from the head
//! (`T·C`; logits are formed for masked positions only and never kept) and
//! every layer's recurrent state at each chunk start. The backward walks the
//! chunks from last to first and, inside a chunk, the layers from last to
//! first: it re-runs the layer's forward for that chunk from the stored input
//! and state (this time keeping every intermediate, including the WKV state
//! after every token) and back-propagates through it, carrying the gradient
//! of the layer's recurrent state (WKV, both token shifts) into the previous
//! chunk. Gradients of `v_first` from layers ≥ 1 are accumulated per chunk
//! and enter layer 0 last. Only activation gradients are formed; weights are
//! never differentiated.
// The kernels walk several parallel arrays with one index (clearer than
// zipping six iterators), and the WKV kernels take their operands explicitly.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use std::borrow::Cow;
use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use super::state::DbpStats;
use crate::error::{Error, Result};
use crate::model::weights::{Config, Weights};

/// `e^{-0.5}`: the decay is `w = exp(-e^{-0.5} σ(d))`.
const DECAY_SCALE: f64 = 0.606_530_659_712_633_4;
/// LayerNorm epsilon (ln0, ln1, ln2, ln_out).
const LN_EPS: f64 = 1e-5;
/// Floor of the L2 norm in `normalize(k ⊙ k_k)`.
const NORM_EPS: f64 = 1e-12;

// ---------------------------------------------------------------------------
// Scalars
// ---------------------------------------------------------------------------

pub use crate::real::Real;

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

// The tuned state and the example moved to [`super::state`]; these paths
// keep working.
pub use super::state::{Example, TunedState, TunedStateOf};

/// Options of [`loss_and_grad`].
#[derive(Clone, Debug)]
pub struct GradOpts {
    /// λ: weight of `KL(teacher ‖ student)` on masked positions (needs `soft`).
    pub observer_weight: f32,
    /// Tokens per activation chunk (the recomputation granularity), ≥ 1.
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

/// Result of [`loss_and_grad`].
#[derive(Clone, Debug)]
pub struct GradOut {
    /// Σ over masked positions of `mask · (CE + λ·KL)`, summed over the batch.
    pub loss: f64,
    /// Σ mask over the batch.
    pub n_tokens: f64,
    /// d(loss)/d(state), same layout as the input state.
    pub grad: TunedState,
    /// Peak bytes of activations, tapes and scratch held at once.
    pub peak_bytes: usize,
    /// Key-space input statistics for DBP (from [`loss_and_grad_dbp`] only).
    pub dbp_stats: Option<DbpStats>,
}

/// Loss, token count and gradient of the state, summed over the batch.
pub fn loss_and_grad(
    w: &Weights,
    s: &TunedState,
    batch: &[Example],
    o: &GradOpts,
) -> Result<GradOut> {
    grad_out(w, s, batch, o, false)
}

/// [`loss_and_grad`] that also returns the DBP statistics (`dbp_stats`): the
/// receptances of every head at every position that can affect the loss.
pub fn loss_and_grad_dbp(
    w: &Weights,
    s: &TunedState,
    batch: &[Example],
    o: &GradOpts,
) -> Result<GradOut> {
    grad_out(w, s, batch, o, true)
}

fn grad_out(
    w: &Weights,
    s: &TunedState,
    batch: &[Example],
    o: &GradOpts,
    collect: bool,
) -> Result<GradOut> {
    let r = run::<f32>(w, s, batch, o, true, collect)?;
    Ok(GradOut {
        loss: r.loss,
        n_tokens: r.n_tokens,
        grad: r.grad.unwrap_or_else(|| s.zeros_like()),
        peak_bytes: r.peak_bytes,
        dbp_stats: r.dbp,
    })
}

/// `(Σ loss, Σ mask)` over the batch, without gradients (observer weight 0:
/// plain masked cross-entropy).
pub fn loss_only(w: &Weights, s: &TunedState, batch: &[Example]) -> Result<(f64, f64)> {
    loss_only_with(w, s, batch, &GradOpts::default())
}

/// [`loss_only`] with options (observer weight, chunk).
pub fn loss_only_with(
    w: &Weights,
    s: &TunedState,
    batch: &[Example],
    o: &GradOpts,
) -> Result<(f64, f64)> {
    let r = run::<f32>(w, s, batch, o, false, false)?;
    Ok((r.loss, r.n_tokens))
}

/// The same engine in `f64` (weights converted): `(Σ loss, Σ mask, gradient)`.
/// For finite-difference checks; slow and memory-hungry on big models.
pub fn loss_and_grad_f64(
    w: &Weights,
    s: &TunedStateOf<f64>,
    batch: &[Example],
    o: &GradOpts,
) -> Result<(f64, f64, TunedStateOf<f64>)> {
    let r = run::<f64>(w, s, batch, o, true, false)?;
    Ok((r.loss, r.n_tokens, r.grad.unwrap_or_else(|| s.zeros_like())))
}

/// `(Σ loss, Σ mask)` in `f64` (uses the options' observer weight and chunk).
pub fn loss_only_f64(
    w: &Weights,
    s: &TunedStateOf<f64>,
    batch: &[Example],
    o: &GradOpts,
) -> Result<(f64, f64)> {
    let r = run::<f64>(w, s, batch, o, false, false)?;
    Ok((r.loss, r.n_tokens))
}

/// Logits `[T, V]` after every token of `tokens`, starting from `s` (no
/// state is returned). Same engine as the gradient; for checks.
pub fn forward_logits(w: &Weights, s: &TunedState, tokens: &[u32]) -> Result<Vec<f32>> {
    forward_logits_up::<f32>(w, s, None, tokens)
}

/// [`forward_logits`] in any float type, with an optional kernel-upscaled
/// read-out.
pub(crate) fn forward_logits_up<R: Real>(
    w: &Weights,
    s: &TunedStateOf<R>,
    up: Option<UpW<R>>,
    tokens: &[u32],
) -> Result<Vec<R>> {
    let cfg = &w.config;
    w.check()?;
    s.check(cfg)?;
    check_tokens("tokens", tokens, cfg.vocab)?;
    let mut m = ModelW::<R>::new(w)?;
    if let Some(u) = up {
        check_up(cfg, &u)?;
        m.d.mu = u.m;
        m.up = Some(u);
    }
    let mem = Mem::default();
    let t = tokens.len();
    let c = cfg.n_embd;
    let mut states: Vec<LState<R>> = (0..cfg.n_layer)
        .map(|l| LState::from_tuned(s, l, c))
        .collect();
    let mut x = vec![R::ZERO; t * c];
    let mut vf = vec![R::ZERO; t * c];
    let mut tape = Tape::new(&m.d, t.max(1), false, &mem);
    m.embed(tokens, &mut x);
    for (l, st) in states.iter_mut().enumerate() {
        layer_fwd(&m, l, &mut x, t, st, &mut vf, &mut tape, false);
    }
    let mut logits = vec![R::ZERO; t * cfg.vocab];
    let mut xn = vec![R::ZERO; t * c];
    let (mut xh, mut rs) = (vec![R::ZERO; t * c], vec![R::ZERO; t]);
    ln_rows(
        &x,
        &m.ln_out.0,
        &m.ln_out.1,
        t,
        c,
        &mut xh,
        &mut xn,
        &mut rs,
    );
    xwt(&xn, t, c, &m.head, cfg.vocab, &mut logits);
    Ok(logits)
}

/// Which per-head vectors [`head_inputs`] collects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadVector {
    /// The receptances `r_t` (what the state is read with).
    Receptance,
    /// The keys `k̃_t` written into the state (`v_t k̃_tᵀ`).
    Key,
}

/// The per-head vectors (`[L][H]`, each a flat list of length-N rows) that
/// the model produces at every position of `batch` that can affect the loss
/// (up to the last masked one), starting from state `s`. Used to place the
/// support vectors of the kernel-upscaled state (`super::upscale`).
pub fn head_inputs(
    w: &Weights,
    s: &TunedState,
    batch: &[Example],
    which: HeadVector,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let cfg = &w.config;
    w.check()?;
    s.check(cfg)?;
    for (i, ex) in batch.iter().enumerate() {
        check_example(i, ex, cfg.vocab)?;
    }
    let m = ModelW::<f32>::new(w)?;
    let (c, hh, n) = (cfg.n_embd, cfg.n_head, cfg.head_size);
    let per: Vec<Vec<Vec<Vec<f32>>>> = batch
        .par_iter()
        .map(|ex| {
            let mem = Mem::default();
            let t = effective_len(ex);
            let mut out = vec![vec![Vec::with_capacity(t * n); hh]; cfg.n_layer];
            if t == 0 {
                return out;
            }
            let mut states: Vec<LState<f32>> = (0..cfg.n_layer)
                .map(|l| LState::from_tuned(s, l, c))
                .collect();
            let mut x = vec![0.0f32; t * c];
            let mut vf = vec![0.0f32; t * c];
            let mut tape = Tape::new(&m.d, t, false, &mem);
            m.embed(&ex.tokens[..t], &mut x);
            for (l, st) in states.iter_mut().enumerate() {
                layer_fwd(&m, l, &mut x, t, st, &mut vf, &mut tape, false);
                let src: &[f32] = match which {
                    HeadVector::Receptance => &tape.r,
                    HeadVector::Key => &tape.kt,
                };
                for tt in 0..t {
                    for h in 0..hh {
                        let o = tt * c + h * n;
                        out[l][h].extend_from_slice(&src[o..o + n]);
                    }
                }
            }
            out
        })
        .collect();
    let mut acc = vec![vec![Vec::new(); hh]; cfg.n_layer];
    for e in per {
        for (l, heads) in e.into_iter().enumerate() {
            for (h, v) in heads.into_iter().enumerate() {
                acc[l][h].extend(v);
            }
        }
    }
    Ok(acc)
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Memory accounting
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Mem {
    cur: AtomicUsize,
    peak: AtomicUsize,
}

impl Mem {
    fn add(&self, bytes: usize) {
        let now = self.cur.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }
    fn sub(&self, bytes: usize) {
        self.cur.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// A tracked buffer: counts its bytes in a [`Mem`] while alive.
struct Buf<'m, R> {
    v: Vec<R>,
    mem: &'m Mem,
}

impl<'m, R: Real> Buf<'m, R> {
    fn new(n: usize, mem: &'m Mem) -> Self {
        mem.add(n * std::mem::size_of::<R>());
        Buf {
            v: vec![R::ZERO; n],
            mem,
        }
    }
}

impl<R> Drop for Buf<'_, R> {
    fn drop(&mut self) {
        self.mem.sub(self.v.len() * std::mem::size_of::<R>());
    }
}

impl<R> std::ops::Deref for Buf<'_, R> {
    type Target = [R];
    fn deref(&self) -> &[R] {
        &self.v
    }
}

impl<R> std::ops::DerefMut for Buf<'_, R> {
    fn deref_mut(&mut self) -> &mut [R] {
        &mut self.v
    }
}

// ---------------------------------------------------------------------------
// Kernels: dot / axpy, two matrix-product shapes, dispatched to AVX2+FMA
// ---------------------------------------------------------------------------

use crate::ops::gemm::{dispatched, dot_imp, madd, xw, xwt};

// ---------------------------------------------------------------------------
// Weights in the engine's float type
// ---------------------------------------------------------------------------

struct Dims {
    c: usize,
    h: usize,
    n: usize,
    dw: usize,
    da: usize,
    dv: usize,
    dg: usize,
    f: usize,
    v: usize,
    nl: usize,
    /// Support vectors per head of the kernel-upscaled read-out (0: none).
    mu: usize,
}

type Ln<'a, R> = (Cow<'a, [R]>, Cow<'a, [R]>);

struct LayerW<'a, R: Real> {
    ln1: Ln<'a, R>,
    ln2: Ln<'a, R>,
    mu: [Cow<'a, [R]>; 6], // x_r, x_w, x_k, x_v, x_a, x_g
    w0: Cow<'a, [R]>,
    w1: Cow<'a, [R]>,
    w2: Cow<'a, [R]>,
    a0: Cow<'a, [R]>,
    a1: Cow<'a, [R]>,
    a2: Cow<'a, [R]>,
    v012: Option<[Cow<'a, [R]>; 3]>,
    g1: Cow<'a, [R]>,
    g2: Cow<'a, [R]>,
    k_k: Cow<'a, [R]>,
    k_a: Cow<'a, [R]>,
    r_k: Cow<'a, [R]>,
    wr: Cow<'a, [R]>,
    wk: Cow<'a, [R]>,
    wv: Cow<'a, [R]>,
    wo: Cow<'a, [R]>,
    lnx: Ln<'a, R>,
    fmu: Cow<'a, [R]>,
    fkey: Cow<'a, [R]>,
    fval: Cow<'a, [R]>,
}

struct ModelW<'a, R: Real> {
    d: Dims,
    emb: Cow<'a, [R]>,
    ln0: Ln<'a, R>,
    layers: Vec<LayerW<'a, R>>,
    ln_out: Ln<'a, R>,
    head: Cow<'a, [R]>,
    /// The kernel-upscaled read-out, when present (see [`UpW`]).
    up: Option<UpW<R>>,
}

impl<'a, R: Real> ModelW<'a, R> {
    fn new(w: &'a Weights) -> Result<Self> {
        let cfg = &w.config;
        let c = R::cow;
        let ln = |l: &'a crate::model::weights::LayerNorm| (c(&l.weight), c(&l.bias));
        let ln0 = w
            .blocks
            .first()
            .and_then(|b| b.ln0.as_ref())
            .ok_or_else(|| Error::MissingTensor("blocks.0.ln0.weight".into()))?;
        let mut layers = Vec::with_capacity(w.blocks.len());
        for (l, b) in w.blocks.iter().enumerate() {
            let a = &b.att;
            let v012 = if l == 0 {
                None
            } else {
                match (&a.v0, &a.v1, &a.v2) {
                    (Some(v0), Some(v1), Some(v2)) => Some([c(v0), c(v1), c(v2)]),
                    _ => return Err(Error::MissingTensor(format!("blocks.{l}.att.v0 / v1 / v2"))),
                }
            };
            layers.push(LayerW {
                ln1: ln(&b.ln1),
                ln2: ln(&b.ln2),
                mu: [
                    c(&a.x_r),
                    c(&a.x_w),
                    c(&a.x_k),
                    c(&a.x_v),
                    c(&a.x_a),
                    c(&a.x_g),
                ],
                w0: c(&a.w0),
                w1: c(&a.w1),
                w2: c(&a.w2),
                a0: c(&a.a0),
                a1: c(&a.a1),
                a2: c(&a.a2),
                v012,
                g1: c(&a.g1),
                g2: c(&a.g2),
                k_k: c(&a.k_k),
                k_a: c(&a.k_a),
                r_k: c(&a.r_k),
                wr: c(&a.receptance),
                wk: c(&a.key),
                wv: c(&a.value),
                wo: c(&a.output),
                lnx: ln(&a.ln_x),
                fmu: c(&b.ffn.x_k),
                fkey: c(&b.ffn.key),
                fval: c(&b.ffn.value),
            });
        }
        Ok(ModelW {
            d: Dims {
                c: cfg.n_embd,
                h: cfg.n_head,
                n: cfg.head_size,
                dw: cfg.d_w,
                da: cfg.d_a,
                dv: cfg.d_v,
                dg: cfg.d_g,
                f: cfg.d_ffn,
                v: cfg.vocab,
                nl: cfg.n_layer,
                mu: 0,
            },
            emb: c(&w.emb),
            ln0: ln(ln0),
            layers,
            ln_out: ln(&w.ln_out),
            head: c(&w.head),
            up: None,
        })
    }

    /// `x[t] = ln0(emb[tokens[t]])`.
    fn embed(&self, tokens: &[u32], x: &mut [R]) {
        let c = self.d.c;
        let mut xh = vec![R::ZERO; c];
        let mut rs = R::ZERO;
        for (t, &tok) in tokens.iter().enumerate() {
            let e = &self.emb[tok as usize * c..(tok as usize + 1) * c];
            ln_row(
                e,
                &self.ln0.0,
                &self.ln0.1,
                LN_EPS,
                &mut xh,
                &mut x[t * c..(t + 1) * c],
                &mut rs,
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Small row helpers
// ---------------------------------------------------------------------------

/// `(t·c + j, j)` for every row `t < rows` and column `j < c`.
#[inline(always)]
fn rows_cols(rows: usize, c: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows).flat_map(move |t| (0..c).map(move |j| (t * c + j, j)))
}

/// [`ln_row`] over `rows` contiguous rows of width `c` (eps [`LN_EPS`]):
/// x, xhat, out `[rows, c]`, rs `[rows]`.
#[allow(clippy::too_many_arguments)]
fn ln_rows<R: Real>(
    x: &[R],
    w: &[R],
    b: &[R],
    rows: usize,
    c: usize,
    xhat: &mut [R],
    out: &mut [R],
    rs: &mut [R],
) {
    for t in 0..rows {
        let s = t * c..(t + 1) * c;
        ln_row(
            &x[s.clone()],
            w,
            b,
            LN_EPS,
            &mut xhat[s.clone()],
            &mut out[s],
            &mut rs[t],
        );
    }
}

/// LayerNorm of one row: `xhat = (x-μ)·rs`, `out = xhat·w + b`.
fn ln_row<R: Real>(x: &[R], w: &[R], b: &[R], eps: f64, xhat: &mut [R], out: &mut [R], rs: &mut R) {
    let n = R::from_f64(x.len() as f64);
    let mut mean = R::ZERO;
    for &v in x {
        mean += v;
    }
    let mean = mean / n;
    let mut var = R::ZERO;
    for &v in x {
        var += (v - mean) * (v - mean);
    }
    let r = R::ONE / (var / n + R::from_f64(eps)).sqrt();
    *rs = r;
    for j in 0..x.len() {
        let h = (x[j] - mean) * r;
        xhat[j] = h;
        out[j] = h * w[j] + b[j];
    }
}

/// LayerNorm backward of one row, *adding* into `dx`: given `dout`, the
/// stored `xhat`, `rs` and the weight.
fn ln_back_row<R: Real>(dout: &[R], xhat: &[R], rs: R, w: &[R], dx: &mut [R]) {
    let n = R::from_f64(dout.len() as f64);
    let mut m1 = R::ZERO;
    let mut m2 = R::ZERO;
    for j in 0..dout.len() {
        let g = dout[j] * w[j];
        m1 += g;
        m2 += g * xhat[j];
    }
    let (m1, m2) = (m1 / n, m2 / n);
    for j in 0..dout.len() {
        dx[j] += rs * (dout[j] * w[j] - m1 - xhat[j] * m2);
    }
}

// ---------------------------------------------------------------------------
// Recurrent state of one layer and the per-chunk tape
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct LState<R> {
    wkv: Vec<R>,
    sa: Vec<R>,
    sf: Vec<R>,
    /// Gradient of the upscaled read-out `U` (`[H, N, M]`) in the backward's
    /// per-layer accumulator; empty otherwise.
    up: Vec<R>,
}

impl<R: Real> LState<R> {
    fn from_tuned(s: &TunedStateOf<R>, l: usize, c: usize) -> Self {
        let sh = |v: &Option<Vec<Vec<R>>>| {
            v.as_ref()
                .map(|v| v[l].clone())
                .unwrap_or_else(|| vec![R::ZERO; c])
        };
        LState {
            wkv: s.wkv[l].clone(),
            sa: sh(&s.shift_att),
            sf: sh(&s.shift_ffn),
            up: Vec::new(),
        }
    }
    fn zeros(hnn: usize, c: usize) -> Self {
        LState {
            wkv: vec![R::ZERO; hnn],
            sa: vec![R::ZERO; c],
            sf: vec![R::ZERO; c],
            up: Vec::new(),
        }
    }
    fn bytes(&self) -> usize {
        (self.wkv.len() + self.sa.len() + self.sf.len() + self.up.len()) * std::mem::size_of::<R>()
    }
}

/// Everything one layer's forward over one chunk produces (rows ≤ capacity).
struct Tape<'m, R: Real> {
    xhat1: Buf<'m, R>,
    rs1: Buf<'m, R>,
    xa: Buf<'m, R>,
    mix: [Buf<'m, R>; 6],
    r: Buf<'m, R>,
    k: Buf<'m, R>,
    vraw: Buf<'m, R>,
    v: Buf<'m, R>,
    hw: Buf<'m, R>,
    sig: Buf<'m, R>,
    wdec: Buf<'m, R>,
    alpha: Buf<'m, R>,
    gv: Buf<'m, R>,
    hg: Buf<'m, R>,
    g: Buf<'m, R>,
    knorm: Buf<'m, R>,
    khat: Buf<'m, R>,
    kt: Buf<'m, R>,
    sa: Buf<'m, R>,
    y: Buf<'m, R>,
    gn_rs: Buf<'m, R>,
    yhat: Buf<'m, R>,
    bonus: Buf<'m, R>,
    z: Buf<'m, R>,
    xhat2: Buf<'m, R>,
    rs2: Buf<'m, R>,
    xf: Buf<'m, R>,
    hpre: Buf<'m, R>,
    /// WKV state before every token and after the last, `[rows+1, H, N, N]`.
    states: Buf<'m, R>,
    /// Kernel features `φ(r_t)` of the upscaled read-out, `[rows, H, M]`.
    phi: Buf<'m, R>,
    // scratch
    tc: Buf<'m, R>,
    tc2: Buf<'m, R>,
    td: Buf<'m, R>,
    tf: Buf<'m, R>,
}

impl<'m, R: Real> Tape<'m, R> {
    fn new(d: &Dims, rows: usize, keep_states: bool, mem: &'m Mem) -> Self {
        let rc = rows * d.c;
        let rh = rows * d.h;
        let b = |n: usize| Buf::new(n, mem);
        let dmax = d.dw.max(d.da).max(d.dv).max(d.dg);
        Tape {
            xhat1: b(rc),
            rs1: b(rows),
            xa: b(rc),
            mix: [b(rc), b(rc), b(rc), b(rc), b(rc), b(rc)],
            r: b(rc),
            k: b(rc),
            vraw: b(rc),
            v: b(rc),
            hw: b(rows * d.dw),
            sig: b(rc),
            wdec: b(rc),
            alpha: b(rc),
            gv: b(rc),
            hg: b(rows * d.dg),
            g: b(rc),
            knorm: b(rh),
            khat: b(rc),
            kt: b(rc),
            sa: b(rc),
            y: b(rc),
            gn_rs: b(rh),
            yhat: b(rc),
            bonus: b(rh),
            z: b(rc),
            xhat2: b(rc),
            rs2: b(rows),
            xf: b(rc),
            hpre: b(rows * d.f),
            states: b(if keep_states {
                (rows + 1) * d.h * d.n * d.n
            } else {
                0
            }),
            phi: b(rh * d.mu),
            tc: b(rc),
            tc2: b(rc),
            td: b(rows * dmax),
            tf: b(rows * d.f),
        }
    }
}

/// Backward scratch for one chunk.
struct Grads<'m, R: Real> {
    dr: Buf<'m, R>,
    dk: Buf<'m, R>,
    dkt: Buf<'m, R>,
    dv: Buf<'m, R>,
    dw: Buf<'m, R>,
    da: Buf<'m, R>,
    db: Buf<'m, R>,
    dy: Buf<'m, R>,
    dmix: [Buf<'m, R>; 6],
    dxa: Buf<'m, R>,
    tc: Buf<'m, R>,
    tc2: Buf<'m, R>,
    td: Buf<'m, R>,
    tf: Buf<'m, R>,
}

impl<'m, R: Real> Grads<'m, R> {
    fn new(d: &Dims, rows: usize, mem: &'m Mem) -> Self {
        let rc = rows * d.c;
        let b = |n: usize| Buf::new(n, mem);
        let dmax = d.dw.max(d.da).max(d.dv).max(d.dg);
        Grads {
            dr: b(rc),
            dk: b(rc),
            dkt: b(rc),
            dv: b(rc),
            dw: b(rc),
            da: b(rc),
            db: b(rc),
            dy: b(rc),
            dmix: [b(rc), b(rc), b(rc), b(rc), b(rc), b(rc)],
            dxa: b(rc),
            tc: b(rc),
            tc2: b(rc),
            td: b(rows * dmax),
            tf: b(rows * d.f),
        }
    }
}

// ---------------------------------------------------------------------------
// WKV recurrence, forward and backward, one chunk
// ---------------------------------------------------------------------------

/// Inputs of the WKV recurrence for one chunk (rows × C each).
struct WkvRefs<'a, R> {
    r: &'a [R],
    w: &'a [R],
    khat: &'a [R],
    alpha: &'a [R],
    kt: &'a [R],
    v: &'a [R],
}

#[inline(always)]
fn wkv_fwd_imp<R: Real, const F: bool>(
    inp: &WkvRefs<'_, R>,
    rows: usize,
    hh: usize,
    n: usize,
    s: &mut [R],
    sa_out: &mut [R],
    y: &mut [R],
    states: &mut [R],
) {
    let c = hh * n;
    let nn = n * n;
    let keep = !states.is_empty();
    let mut a = vec![R::ZERO; n];
    let mut b = vec![R::ZERO; n];
    for h in 0..hh {
        let sh = &mut s[h * nn..(h + 1) * nn];
        if keep {
            states[h * nn..(h + 1) * nn].copy_from_slice(sh);
        }
        for t in 0..rows {
            let o = t * c + h * n;
            let r = &inp.r[o..o + n];
            let w = &inp.w[o..o + n];
            let kt = &inp.kt[o..o + n];
            let v = &inp.v[o..o + n];
            for j in 0..n {
                let kh = inp.khat[o + j];
                a[j] = -kh;
                b[j] = kh * inp.alpha[o + j];
            }
            for i in 0..n {
                let si = &mut sh[i * n..(i + 1) * n];
                let sai = dot_imp::<R, F>(si, &a);
                sa_out[o + i] = sai;
                let vi = v[i];
                for j in 0..n {
                    si[j] = madd::<R, F>(vi, kt[j], madd::<R, F>(sai, b[j], si[j] * w[j]));
                }
                y[o + i] = dot_imp::<R, F>(si, r);
            }
            if keep {
                let base = ((t + 1) * hh + h) * nn;
                states[base..base + nn].copy_from_slice(sh);
            }
        }
    }
}
dispatched!(wkv_fwd(inp: &WkvRefs<'_, R>, rows: usize, hh: usize, n: usize, s: &mut [R], sa_out: &mut [R], y: &mut [R], states: &mut [R]) => wkv_fwd_imp);

/// Gradients written (overwritten) by the WKV backward, rows × C each.
struct WkvGrads<'a, R> {
    dr: &'a mut [R],
    dw: &'a mut [R],
    dkt: &'a mut [R],
    dv: &'a mut [R],
    da: &'a mut [R],
    db: &'a mut [R],
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn wkv_bwd_imp<R: Real, const F: bool>(
    inp: &WkvRefs<'_, R>,
    sa: &[R],
    dy: &[R],
    states: &[R],
    rows: usize,
    hh: usize,
    n: usize,
    ds: &mut [R],
    g: &mut WkvGrads<'_, R>,
) {
    let c = hh * n;
    let nn = n * n;
    let mut a = vec![R::ZERO; n];
    let mut b = vec![R::ZERO; n];
    for h in 0..hh {
        let dsh = &mut ds[h * nn..(h + 1) * nn];
        for t in (0..rows).rev() {
            let o = t * c + h * n;
            let r = &inp.r[o..o + n];
            let w = &inp.w[o..o + n];
            let kt = &inp.kt[o..o + n];
            let v = &inp.v[o..o + n];
            let sav = &sa[o..o + n];
            let dyv = &dy[o..o + n];
            for j in 0..n {
                let kh = inp.khat[o + j];
                a[j] = -kh;
                b[j] = kh * inp.alpha[o + j];
            }
            let s_new = &states[((t + 1) * hh + h) * nn..((t + 1) * hh + h + 1) * nn];
            let s_old = &states[(t * hh + h) * nn..(t * hh + h + 1) * nn];
            let dr = &mut g.dr[o..o + n];
            let dw = &mut g.dw[o..o + n];
            let dk = &mut g.dkt[o..o + n];
            let da = &mut g.da[o..o + n];
            let db = &mut g.db[o..o + n];
            for j in 0..n {
                dr[j] = R::ZERO;
                dw[j] = R::ZERO;
                dk[j] = R::ZERO;
                da[j] = R::ZERO;
                db[j] = R::ZERO;
            }
            for i in 0..n {
                let dsi = &mut dsh[i * n..(i + 1) * n];
                let sni = &s_new[i * n..(i + 1) * n];
                let soi = &s_old[i * n..(i + 1) * n];
                let dyi = dyv[i];
                for j in 0..n {
                    dsi[j] = madd::<R, F>(dyi, r[j], dsi[j]);
                    dr[j] = madd::<R, F>(dyi, sni[j], dr[j]);
                }
                g.dv[o + i] = dot_imp::<R, F>(dsi, kt);
                let dsa = dot_imp::<R, F>(dsi, &b);
                let (vi, sai) = (v[i], sav[i]);
                for j in 0..n {
                    let d = dsi[j];
                    dk[j] = madd::<R, F>(vi, d, dk[j]);
                    db[j] = madd::<R, F>(sai, d, db[j]);
                    dw[j] = madd::<R, F>(d, soi[j], dw[j]);
                    da[j] = madd::<R, F>(dsa, soi[j], da[j]);
                    dsi[j] = madd::<R, F>(dsa, a[j], d * w[j]);
                }
            }
        }
    }
}
dispatched!(wkv_bwd(inp: &WkvRefs<'_, R>, sa: &[R], dy: &[R], states: &[R], rows: usize, hh: usize, n: usize, ds: &mut [R], g: &mut WkvGrads<'_, R>) => wkv_bwd_imp);

// ---------------------------------------------------------------------------
// One layer over one chunk: forward (filling the tape) and backward
// ---------------------------------------------------------------------------

/// Runs layer `l` over `rows` tokens: `x` (residual stream, `[rows, C]`) is
/// updated in place, `st` advanced to the chunk end, `vf` (v_first rows)
/// written by layer 0 and read by the others. With `keep_states` the tape
/// also holds the WKV state before/after every token.
#[allow(clippy::too_many_arguments)]
fn layer_fwd<R: Real>(
    m: &ModelW<'_, R>,
    l: usize,
    x: &mut [R],
    rows: usize,
    st: &mut LState<R>,
    vf: &mut [R],
    tp: &mut Tape<'_, R>,
    keep_states: bool,
) {
    let d = &m.d;
    let lw = &m.layers[l];
    let (c, hh, n) = (d.c, d.h, d.n);
    let rc = rows * c;
    let one = R::ONE;
    // ln1 and the token-shift mixes
    ln_rows(
        x,
        &lw.ln1.0,
        &lw.ln1.1,
        rows,
        c,
        &mut tp.xhat1,
        &mut tp.xa,
        &mut tp.rs1,
    );
    for t in 0..rows {
        for j in 0..c {
            let cur = tp.xa[t * c + j];
            let prev = if t == 0 {
                st.sa[j]
            } else {
                tp.xa[(t - 1) * c + j]
            };
            let dd = prev - cur;
            for q in 0..6 {
                tp.mix[q][t * c + j] = cur + dd * lw.mu[q][j];
            }
        }
    }
    xwt(&tp.mix[0], rows, c, &lw.wr, c, &mut tp.r);
    xwt(&tp.mix[2], rows, c, &lw.wk, c, &mut tp.k);
    xwt(&tp.mix[3], rows, c, &lw.wv, c, &mut tp.vraw);
    // decay
    xw(&tp.mix[1], rows, c, &lw.w1, d.dw, &mut tp.hw);
    tp.hw[..rows * d.dw].iter_mut().for_each(|v| *v = v.tanh());
    xw(&tp.hw, rows, d.dw, &lw.w2, c, &mut tp.tc);
    let ds = R::from_f64(DECAY_SCALE);
    for (i, j) in rows_cols(rows, c) {
        let s = (lw.w0[j] + tp.tc[i]).sigmoid();
        tp.sig[i] = s;
        tp.wdec[i] = (-(ds * s)).exp();
    }
    // in-context learning rate
    xw(&tp.mix[4], rows, c, &lw.a1, d.da, &mut tp.td);
    xw(&tp.td, rows, d.da, &lw.a2, c, &mut tp.tc);
    for (i, j) in rows_cols(rows, c) {
        tp.alpha[i] = (lw.a0[j] + tp.tc[i]).sigmoid();
    }
    // value residual
    match &lw.v012 {
        Some([v0, v1, v2]) => {
            xw(&tp.mix[3], rows, c, v1, d.dv, &mut tp.td);
            xw(&tp.td, rows, d.dv, v2, c, &mut tp.tc);
            for (i, j) in rows_cols(rows, c) {
                let gv = (v0[j] + tp.tc[i]).sigmoid();
                tp.gv[i] = gv;
                let vr = tp.vraw[i];
                tp.v[i] = vr + (vf[i] - vr) * gv;
            }
        }
        None => {
            tp.v[..rc].copy_from_slice(&tp.vraw[..rc]);
            vf[..rc].copy_from_slice(&tp.vraw[..rc]);
        }
    }
    // gate
    xw(&tp.mix[5], rows, c, &lw.g1, d.dg, &mut tp.hg);
    tp.hg[..rows * d.dg]
        .iter_mut()
        .for_each(|v| *v = v.sigmoid());
    xw(&tp.hg, rows, d.dg, &lw.g2, c, &mut tp.g);
    // κ̂ and k̃
    let neps = R::from_f64(NORM_EPS);
    for t in 0..rows {
        for h in 0..hh {
            let o = t * c + h * n;
            let mut ss = R::ZERO;
            for j in o..o + n {
                let q = tp.k[j] * lw.k_k[j - t * c];
                tp.khat[j] = q;
                ss += q * q;
            }
            let nrm = ss.sqrt();
            tp.knorm[t * hh + h] = nrm;
            let inv = one / nrm.max(neps);
            for j in o..o + n {
                tp.khat[j] *= inv;
            }
        }
    }
    for (i, j) in rows_cols(rows, c) {
        tp.kt[i] = tp.k[i] * (one + (tp.alpha[i] - one) * lw.k_a[j]);
    }
    // WKV
    {
        let inp = WkvRefs {
            r: &tp.r,
            w: &tp.wdec,
            khat: &tp.khat,
            alpha: &tp.alpha,
            kt: &tp.kt,
            v: &tp.v,
        };
        let states: &mut [R] = if keep_states {
            &mut tp.states[..(rows + 1) * hh * n * n]
        } else {
            &mut []
        };
        wkv_fwd(
            &inp,
            rows,
            hh,
            n,
            &mut st.wkv,
            &mut tp.sa,
            &mut tp.y,
            states,
        );
    }
    // kernel-upscaled read-out: y_t += U φ(r_t)
    if let Some(up) = &m.up {
        up_fwd(up, l, &tp.r, rows, hh, n, &mut tp.phi, &mut tp.y);
    }
    // GroupNorm, bonus, gate, output
    let geps = R::from_f64(LN_EPS * n as f64);
    let nr = R::from_f64(n as f64);
    for t in 0..rows {
        for h in 0..hh {
            let o = t * c + h * n;
            let yh = &tp.y[o..o + n];
            let mut mean = R::ZERO;
            for &v in yh {
                mean += v;
            }
            let mean = mean / nr;
            let mut var = R::ZERO;
            for &v in yh {
                var += (v - mean) * (v - mean);
            }
            let rs = one / (var / nr + geps).sqrt();
            tp.gn_rs[t * hh + h] = rs;
            let mut bonus = R::ZERO;
            for j in o..o + n {
                bonus += tp.r[j] * tp.kt[j] * lw.r_k[j - t * c];
            }
            tp.bonus[t * hh + h] = bonus;
            for j in o..o + n {
                let yh = (tp.y[j] - mean) * rs;
                tp.yhat[j] = yh;
                let z = yh * lw.lnx.0[j - t * c] + lw.lnx.1[j - t * c] + bonus * tp.v[j];
                tp.z[j] = z;
                tp.tc[j] = z * tp.g[j];
            }
        }
    }
    xwt(&tp.tc, rows, c, &lw.wo, c, &mut tp.tc2);
    for i in 0..rc {
        x[i] += tp.tc2[i];
    }
    // channel mix
    ln_rows(
        x,
        &lw.ln2.0,
        &lw.ln2.1,
        rows,
        c,
        &mut tp.xhat2,
        &mut tp.xf,
        &mut tp.rs2,
    );
    for t in 0..rows {
        for j in 0..c {
            let cur = tp.xf[t * c + j];
            let prev = if t == 0 {
                st.sf[j]
            } else {
                tp.xf[(t - 1) * c + j]
            };
            tp.tc[t * c + j] = cur + (prev - cur) * lw.fmu[j];
        }
    }
    xwt(&tp.tc, rows, c, &lw.fkey, d.f, &mut tp.hpre);
    for i in 0..rows * d.f {
        let p = tp.hpre[i].max(R::ZERO);
        tp.tf[i] = p * p;
    }
    xwt(&tp.tf, rows, d.f, &lw.fval, c, &mut tp.tc2);
    for i in 0..rc {
        x[i] += tp.tc2[i];
    }
    if rows > 0 {
        st.sa.copy_from_slice(&tp.xa[(rows - 1) * c..rows * c]);
        st.sf.copy_from_slice(&tp.xf[(rows - 1) * c..rows * c]);
    }
}

/// Backward of [`layer_fwd`] (run with `keep_states`): `dx` holds d(loss)/d(layer
/// output) and becomes d(loss)/d(layer input); `dst` holds d(loss)/d(state at
/// chunk end) and becomes d(loss)/d(state at chunk start); `dvf` accumulates
/// d(loss)/d(v_first) (layers ≥ 1) and is consumed by layer 0.
#[allow(clippy::too_many_arguments)]
fn layer_bwd<R: Real>(
    m: &ModelW<'_, R>,
    l: usize,
    tp: &Tape<'_, R>,
    vf: &[R],
    dx: &mut [R],
    rows: usize,
    dst: &mut LState<R>,
    dvf: &mut [R],
    gr: &mut Grads<'_, R>,
) {
    let d = &m.d;
    let lw = &m.layers[l];
    let (c, hh, n) = (d.c, d.h, d.n);
    let rc = rows * c;
    let one = R::ONE;
    let two = one + one;
    if rows == 0 {
        return;
    }
    // ---- channel mix ----
    xw(dx, rows, c, &lw.fval, d.f, &mut gr.tf); // dh
    for i in 0..rows * d.f {
        let p = tp.hpre[i];
        gr.tf[i] = if p > R::ZERO {
            gr.tf[i] * two * p
        } else {
            R::ZERO
        };
    }
    xw(&gr.tf, rows, d.f, &lw.fkey, c, &mut gr.tc); // d kf
    for t in 0..rows {
        for j in 0..c {
            let mu = lw.fmu[j];
            let next = if t + 1 < rows {
                gr.tc[(t + 1) * c + j] * mu
            } else {
                dst.sf[j]
            };
            gr.tc2[t * c + j] = gr.tc[t * c + j] * (one - mu) + next;
        }
    }
    for j in 0..c {
        dst.sf[j] = gr.tc[j] * lw.fmu[j];
    }
    for t in 0..rows {
        let s = t * c..(t + 1) * c;
        ln_back_row(
            &gr.tc2[s.clone()],
            &tp.xhat2[s.clone()],
            tp.rs2[t],
            &lw.ln2.0,
            &mut dx[s],
        );
    }
    // ---- time mix: output projection and gate ----
    xw(dx, rows, c, &lw.wo, c, &mut gr.tc); // d(z ⊙ g)
    for i in 0..rc {
        let dzg = gr.tc[i];
        gr.tc2[i] = dzg * tp.z[i]; // dg
        gr.tc[i] = dzg * tp.g[i]; // dz
    }
    xwt(&gr.tc2, rows, c, &lw.g2, d.dg, &mut gr.td); // d hg
    for i in 0..rows * d.dg {
        let s = tp.hg[i];
        gr.td[i] *= s * (one - s);
    }
    xwt(&gr.td, rows, d.dg, &lw.g1, c, &mut gr.dmix[5]);
    // ---- bonus and GroupNorm ----
    let nr = R::from_f64(n as f64);
    for t in 0..rows {
        for h in 0..hh {
            let o = t * c + h * n;
            let bonus = tp.bonus[t * hh + h];
            let mut dbonus = R::ZERO;
            for j in o..o + n {
                gr.dv[j] = bonus * gr.tc[j];
                dbonus += gr.tc[j] * tp.v[j];
            }
            for j in o..o + n {
                let rk = lw.r_k[j - t * c];
                gr.dr[j] = dbonus * tp.kt[j] * rk;
                gr.dkt[j] = dbonus * tp.r[j] * rk;
            }
            let rs = tp.gn_rs[t * hh + h];
            let mut m1 = R::ZERO;
            let mut m2 = R::ZERO;
            for j in o..o + n {
                let g = gr.tc[j] * lw.lnx.0[j - t * c];
                m1 += g;
                m2 += g * tp.yhat[j];
            }
            let (m1, m2) = (m1 / nr, m2 / nr);
            for j in o..o + n {
                gr.dy[j] = rs * (gr.tc[j] * lw.lnx.0[j - t * c] - m1 - tp.yhat[j] * m2);
            }
        }
    }
    // ---- WKV ----
    {
        let inp = WkvRefs {
            r: &tp.r,
            w: &tp.wdec,
            khat: &tp.khat,
            alpha: &tp.alpha,
            kt: &tp.kt,
            v: &tp.v,
        };
        let mut wg = WkvGrads {
            dr: &mut gr.tc[..rc],
            dw: &mut gr.dw[..rc],
            dkt: &mut gr.tc2[..rc],
            dv: &mut gr.dk[..rc],
            da: &mut gr.da[..rc],
            db: &mut gr.db[..rc],
        };
        wkv_bwd(
            &inp,
            &tp.sa,
            &gr.dy,
            &tp.states[..(rows + 1) * hh * n * n],
            rows,
            hh,
            n,
            &mut dst.wkv,
            &mut wg,
        );
    }
    if let Some(up) = &m.up {
        up_bwd(
            up,
            l,
            &tp.r,
            &tp.phi,
            &gr.dy,
            rows,
            hh,
            n,
            &mut dst.up,
            &mut gr.tc,
        );
    }
    for i in 0..rc {
        gr.dr[i] += gr.tc[i];
        gr.dkt[i] += gr.tc2[i];
        gr.dv[i] += gr.dk[i];
    }
    // ---- a, b, k̃ → κ̂, α, k ----
    let neps = R::from_f64(NORM_EPS);
    for (i, j) in rows_cols(rows, c) {
        let al = tp.alpha[i];
        let kh = tp.khat[i];
        let ka = lw.k_a[j];
        // dκ̂ (into tc), dα (into tc2), dk (into dk)
        gr.tc[i] = gr.db[i] * al - gr.da[i];
        gr.tc2[i] = gr.db[i] * kh + gr.dkt[i] * tp.k[i] * ka;
        gr.dk[i] = gr.dkt[i] * (one + (al - one) * ka);
    }
    for t in 0..rows {
        for h in 0..hh {
            let o = t * c + h * n;
            let nrm = tp.knorm[t * hh + h];
            if nrm > neps {
                let mut p = R::ZERO;
                for j in o..o + n {
                    p += tp.khat[j] * gr.tc[j];
                }
                let inv = one / nrm;
                for j in o..o + n {
                    gr.dk[j] += (gr.tc[j] - tp.khat[j] * p) * inv * lw.k_k[j - t * c];
                }
            } else {
                let inv = one / neps;
                for j in o..o + n {
                    gr.dk[j] += gr.tc[j] * inv * lw.k_k[j - t * c];
                }
            }
        }
    }
    // α LoRA
    for i in 0..rc {
        let a = tp.alpha[i];
        gr.tc2[i] *= a * (one - a);
    }
    xwt(&gr.tc2, rows, c, &lw.a2, d.da, &mut gr.td);
    xwt(&gr.td, rows, d.da, &lw.a1, c, &mut gr.dmix[4]);
    // decay LoRA
    let ds = R::from_f64(DECAY_SCALE);
    for i in 0..rc {
        let s = tp.sig[i];
        gr.tc[i] = -(gr.dw[i] * tp.wdec[i] * ds * s * (one - s));
    }
    xwt(&gr.tc, rows, c, &lw.w2, d.dw, &mut gr.td);
    for i in 0..rows * d.dw {
        let th = tp.hw[i];
        gr.td[i] *= one - th * th;
    }
    xwt(&gr.td, rows, d.dw, &lw.w1, c, &mut gr.dmix[1]);
    // value residual
    match &lw.v012 {
        Some([_, v1, v2]) => {
            for i in 0..rc {
                let gv = tp.gv[i];
                let dv = gr.dv[i];
                dvf[i] += dv * gv;
                gr.tc[i] = dv * (vf[i] - tp.vraw[i]) * gv * (one - gv);
                gr.dv[i] = dv * (one - gv);
            }
            xwt(&gr.tc, rows, c, v2, d.dv, &mut gr.td);
            xwt(&gr.td, rows, d.dv, v1, c, &mut gr.dmix[3]);
        }
        None => {
            for i in 0..rc {
                gr.dv[i] += dvf[i];
            }
            gr.dmix[3][..rc].iter_mut().for_each(|v| *v = R::ZERO);
        }
    }
    // projections
    xw(&gr.dr, rows, c, &lw.wr, c, &mut gr.dmix[0]);
    xw(&gr.dk, rows, c, &lw.wk, c, &mut gr.dmix[2]);
    xw(&gr.dv, rows, c, &lw.wv, c, &mut gr.tc);
    for i in 0..rc {
        gr.dmix[3][i] += gr.tc[i];
    }
    // token-shift mixes → d ln1 output
    for t in 0..rows {
        for j in 0..c {
            let mut cur = R::ZERO;
            let mut nxt = R::ZERO;
            for q in 0..6 {
                let mu = lw.mu[q][j];
                cur += gr.dmix[q][t * c + j] * (one - mu);
                if t + 1 < rows {
                    nxt += gr.dmix[q][(t + 1) * c + j] * mu;
                }
            }
            if t + 1 == rows {
                nxt = dst.sa[j];
            }
            gr.dxa[t * c + j] = cur + nxt;
        }
    }
    for j in 0..c {
        let mut s = R::ZERO;
        for q in 0..6 {
            s += gr.dmix[q][j] * lw.mu[q][j];
        }
        dst.sa[j] = s;
    }
    for t in 0..rows {
        let s = t * c..(t + 1) * c;
        ln_back_row(
            &gr.dxa[s.clone()],
            &tp.xhat1[s.clone()],
            tp.rs1[t],
            &lw.ln1.0,
            &mut dx[s],
        );
    }
}

// ---------------------------------------------------------------------------
// Kernel-upscaled read-out (see `super::upscale` and docs/upscale.md)
// ---------------------------------------------------------------------------

/// The kernel-upscaled read-out in the engine's float type: per layer, the
/// support vectors `[H, M, N]`, the RBF widths `γ_h = 1/(2σ_h²)` `[H]` and
/// the trainable upscaled state `U` `[H, N, M]` (value-major, like `S`).
#[derive(Clone)]
pub(crate) struct UpW<R> {
    pub m: usize,
    pub centres: Vec<Vec<R>>,
    pub gamma: Vec<Vec<R>>,
    pub u: Vec<Vec<R>>,
}

/// `φ_h(r) = softmax_m(−γ_h ‖r − c_{h,m}‖²)` for every row and head
/// (written to `phi`, `[rows, H, M]`) and `y += U_h φ_h(r)`.
fn up_fwd<R: Real>(
    up: &UpW<R>,
    l: usize,
    r: &[R],
    rows: usize,
    hh: usize,
    n: usize,
    phi: &mut [R],
    y: &mut [R],
) {
    let mm = up.m;
    let c = hh * n;
    let (cen, gam, u) = (&up.centres[l], &up.gamma[l], &up.u[l]);
    for t in 0..rows {
        for h in 0..hh {
            let o = t * c + h * n;
            let rv = &r[o..o + n];
            let ph = &mut phi[(t * hh + h) * mm..(t * hh + h + 1) * mm];
            let mut mx = R::from_f64(f64::NEG_INFINITY);
            for q in 0..mm {
                let cv = &cen[(h * mm + q) * n..(h * mm + q + 1) * n];
                let mut d2 = R::ZERO;
                for j in 0..n {
                    let d = rv[j] - cv[j];
                    d2 += d * d;
                }
                let lg = -(gam[h] * d2);
                ph[q] = lg;
                mx = mx.max(lg);
            }
            let mut se = R::ZERO;
            for v in ph.iter_mut() {
                *v = (*v - mx).exp();
                se += *v;
            }
            let inv = R::ONE / se;
            ph.iter_mut().for_each(|v| *v *= inv);
            let uh = &u[h * n * mm..(h + 1) * n * mm];
            for i in 0..n {
                y[o + i] += dot_imp::<R, false>(&uh[i * mm..(i + 1) * mm], ph);
            }
        }
    }
}

/// Backward of [`up_fwd`]: `dU_h += dy φᵀ` (into `du`, `[H, N, M]`) and
/// `dr += J_φ(r)ᵀ U_hᵀ dy` (into `dr`).
fn up_bwd<R: Real>(
    up: &UpW<R>,
    l: usize,
    r: &[R],
    phi: &[R],
    dy: &[R],
    rows: usize,
    hh: usize,
    n: usize,
    du: &mut [R],
    dr: &mut [R],
) {
    let mm = up.m;
    let c = hh * n;
    let (cen, gam, u) = (&up.centres[l], &up.gamma[l], &up.u[l]);
    let mut g = vec![R::ZERO; mm];
    for t in 0..rows {
        for h in 0..hh {
            let o = t * c + h * n;
            let ph = &phi[(t * hh + h) * mm..(t * hh + h + 1) * mm];
            let uh = &u[h * n * mm..(h + 1) * n * mm];
            let duh = &mut du[h * n * mm..(h + 1) * n * mm];
            g.iter_mut().for_each(|v| *v = R::ZERO);
            for i in 0..n {
                let dyi = dy[o + i];
                let ur = &uh[i * mm..(i + 1) * mm];
                let dur = &mut duh[i * mm..(i + 1) * mm];
                for q in 0..mm {
                    g[q] += ur[q] * dyi;
                    dur[q] += dyi * ph[q];
                }
            }
            // dℓ_m = φ_m (g_m − Σ φ g);  ℓ_m = −γ‖r − c_m‖²
            let mut pg = R::ZERO;
            for q in 0..mm {
                pg += ph[q] * g[q];
            }
            let two_g = (R::ONE + R::ONE) * gam[h];
            let mut sdl = R::ZERO;
            for q in 0..mm {
                let dl = ph[q] * (g[q] - pg);
                g[q] = dl;
                sdl += dl;
            }
            // dr_j = −2γ Σ_m dℓ_m (r_j − c_mj)
            for j in 0..n {
                dr[o + j] -= two_g * sdl * r[o + j];
            }
            for q in 0..mm {
                let f = two_g * g[q];
                if f != R::ZERO {
                    let cv = &cen[(h * mm + q) * n..(h * mm + q + 1) * n];
                    for j in 0..n {
                        dr[o + j] += f * cv[j];
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Head and loss
// ---------------------------------------------------------------------------

/// Loss of the masked rows of one chunk (positions `t0..t0+rows`) and, with
/// `dx`, d(loss)/d(final residual) for those rows (others zero).
#[allow(clippy::too_many_arguments)]
fn head_loss<R: Real>(
    m: &ModelW<'_, R>,
    x: &[R],
    rows: usize,
    t0: usize,
    ex: &Example,
    lam: f64,
    mut dx: Option<&mut [R]>,
    mem: &Mem,
) -> f64 {
    let (c, v) = (m.d.c, m.d.v);
    let idx: Vec<usize> = (0..rows).filter(|&t| ex.mask[t0 + t] > 0.0).collect();
    let tm = idx.len();
    if let Some(dx) = dx.as_deref_mut() {
        dx[..rows * c].iter_mut().for_each(|q| *q = R::ZERO);
    }
    if tm == 0 {
        return 0.0;
    }
    let mut xhat = Buf::<R>::new(tm * c, mem);
    let mut xn = Buf::<R>::new(tm * c, mem);
    let mut rs = vec![R::ZERO; tm];
    for (q, &t) in idx.iter().enumerate() {
        let s = q * c..(q + 1) * c;
        ln_row(
            &x[t * c..(t + 1) * c],
            &m.ln_out.0,
            &m.ln_out.1,
            LN_EPS,
            &mut xhat[s.clone()],
            &mut xn[s],
            &mut rs[q],
        );
    }
    let mut lg = Buf::<R>::new(tm * v, mem);
    xwt(&xn, tm, c, &m.head, v, &mut lg);
    let mut loss = 0.0f64;
    for (q, &t) in idx.iter().enumerate() {
        let pos = t0 + t;
        let mk = ex.mask[pos] as f64;
        let row = &mut lg[q * v..(q + 1) * v];
        let mut mx = row[0];
        for &z in row.iter() {
            mx = mx.max(z);
        }
        let mut se = R::ZERO;
        for &z in row.iter() {
            se += (z - mx).exp();
        }
        let lse = mx + se.ln();
        let tgt = ex.targets[pos] as usize;
        let mut l = (lse - row[tgt]).to_f64();
        let soft = ex
            .soft
            .as_ref()
            .filter(|_| lam != 0.0)
            .map(|p| &p[pos * v..(pos + 1) * v]);
        if let Some(p) = soft {
            let mut kl = 0.0f64;
            let mut psum = 0.0f64;
            for (j, &pj) in p.iter().enumerate() {
                if pj > 0.0 {
                    let pj = pj as f64;
                    kl += pj * (pj.ln() - (row[j] - lse).to_f64());
                    psum += pj;
                }
            }
            l += lam * kl;
            // d/dz: mk·[(q − onehot) + λ(Σp·q − p)]
            let (mr, lr, pr) = (R::from_f64(mk), R::from_f64(lam), R::from_f64(psum));
            for (j, z) in row.iter_mut().enumerate() {
                let qj = (*z - lse).exp();
                let oh = if j == tgt { R::ONE } else { R::ZERO };
                *z = mr * ((qj - oh) + lr * (pr * qj - R::from_f32(p[j])));
            }
        } else {
            let mr = R::from_f64(mk);
            for (j, z) in row.iter_mut().enumerate() {
                let qj = (*z - lse).exp();
                let oh = if j == tgt { R::ONE } else { R::ZERO };
                *z = mr * (qj - oh);
            }
        }
        loss += mk * l;
    }
    if let Some(dx) = dx {
        // reuse xn as d(normalised)
        xw(&lg, tm, v, &m.head, c, &mut xn);
        for (q, &t) in idx.iter().enumerate() {
            let s = q * c..(q + 1) * c;
            ln_back_row(
                &xn[s.clone()],
                &xhat[s],
                rs[q],
                &m.ln_out.0,
                &mut dx[t * c..(t + 1) * c],
            );
        }
    }
    loss
}

// ---------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------

pub(crate) struct RunOut<R> {
    pub loss: f64,
    pub n_tokens: f64,
    pub grad: Option<TunedStateOf<R>>,
    pub peak_bytes: usize,
    pub dbp: Option<DbpStats>,
    /// Per layer `[H, N, M]`: gradient of the upscaled read-out's `U`.
    pub up_grad: Option<Vec<Vec<R>>>,
}

struct ExOut<R> {
    loss: f64,
    grad: Option<Vec<LState<R>>>,
    dbp: Option<Vec<f64>>,
}

fn run<R: Real>(
    w: &Weights,
    s: &TunedStateOf<R>,
    batch: &[Example],
    o: &GradOpts,
    want_grad: bool,
    collect_dbp: bool,
) -> Result<RunOut<R>> {
    run_up(w, s, None, batch, o, want_grad, collect_dbp)
}

/// Checks an upscaled read-out against the model's shape.
fn check_up<R>(cfg: &Config, up: &UpW<R>) -> Result<()> {
    let (l, h, n, m) = (cfg.n_layer, cfg.n_head, cfg.head_size, up.m);
    if m == 0 {
        return Err(Error::Tune("upscaled state: M must be at least 1".into()));
    }
    for (name, v, len) in [
        ("centres", &up.centres, h * m * n),
        ("gamma", &up.gamma, h),
        ("u", &up.u, h * n * m),
    ] {
        if v.len() != l || v.iter().any(|x| x.len() != len) {
            return Err(Error::Shape {
                name: format!("upscale.{name}"),
                expected: vec![l, len],
                got: vec![v.len(), v.first().map_or(0, |x| x.len())],
            });
        }
    }
    Ok(())
}

/// `a += b` element-wise (same layout).
fn add_assign<R: Real>(a: &mut TunedStateOf<R>, b: &TunedStateOf<R>) {
    for (x, y) in a.params_mut().into_iter().zip(b.params()) {
        for (p, q) in x.iter_mut().zip(y) {
            *p += *q;
        }
    }
}

/// [`run`] with an optional kernel-upscaled read-out; with gradients, the
/// gradient of its `U` is in `RunOut::up_grad`.
pub(crate) fn run_up<R: Real>(
    w: &Weights,
    s: &TunedStateOf<R>,
    up: Option<UpW<R>>,
    batch: &[Example],
    o: &GradOpts,
    want_grad: bool,
    collect_dbp: bool,
) -> Result<RunOut<R>> {
    let cfg = &w.config;
    if let Some(u) = &up {
        check_up(cfg, u)?;
    }
    w.check()?;
    s.check(cfg)?;
    if o.chunk == 0 {
        return Err(Error::Tune("GradOpts.chunk must be at least 1".into()));
    }
    check_batch(batch, o, cfg.vocab)?;
    let mut m = ModelW::<R>::new(w)?;
    if let Some(u) = up {
        m.d.mu = u.m;
        m.up = Some(u);
    }
    let mem = Mem::default();
    let collect = want_grad && collect_dbp;
    let outs: Vec<ExOut<R>> = batch
        .par_iter()
        .map(|ex| run_example(&m, s, ex, o, want_grad, collect, &mem))
        .collect();
    let n_tokens: f64 = batch
        .iter()
        .flat_map(|e| e.mask.iter())
        .map(|&v| v as f64)
        .sum();
    let mut loss = 0.0;
    let mut grad = want_grad.then(|| s.zeros_like());
    let (hh, n) = (cfg.n_head, cfg.head_size);
    let mut dbp = collect.then(|| DbpStats::zeros(cfg.n_layer, hh, n));
    let mut up_grad =
        (want_grad && m.up.is_some()).then(|| vec![vec![R::ZERO; hh * n * m.d.mu]; cfg.n_layer]);
    for out in outs {
        loss += out.loss;
        if let (Some(g), Some(eg)) = (grad.as_mut(), out.grad) {
            let mut one = g.zeros_like();
            for (l, st) in eg.into_iter().enumerate() {
                if let Some(ug) = up_grad.as_mut() {
                    for (a, b) in ug[l].iter_mut().zip(&st.up) {
                        *a += *b;
                    }
                }
                one.wkv[l] = st.wkv;
                if let Some(sa) = one.shift_att.as_mut() {
                    sa[l] = st.sa;
                }
                if let Some(sf) = one.shift_ffn.as_mut() {
                    sf[l] = st.sf;
                }
            }
            add_assign(g, &one);
        }
        if let (Some(acc), Some(e)) = (dbp.as_mut(), out.dbp) {
            for (a, b) in acc.second_moment.iter_mut().zip(&e) {
                *a += b;
            }
        }
    }
    if let Some(d) = dbp.as_mut() {
        d.count = batch.iter().map(|e| effective_len(e) as f64).sum();
    }
    Ok(RunOut {
        loss,
        n_tokens,
        grad,
        peak_bytes: mem.peak.load(Ordering::Relaxed),
        dbp,
        up_grad,
    })
}

/// Positions that can affect the loss: up to and including the last masked one.
pub(crate) fn effective_len(ex: &Example) -> usize {
    ex.mask.iter().rposition(|&m| m > 0.0).map_or(0, |p| p + 1)
}

fn run_example<R: Real>(
    m: &ModelW<'_, R>,
    s: &TunedStateOf<R>,
    ex: &Example,
    o: &GradOpts,
    want_grad: bool,
    collect: bool,
    mem: &Mem,
) -> ExOut<R> {
    let d = &m.d;
    let (c, nl) = (d.c, d.nl);
    let hnn = d.h * d.n * d.n;
    let te = effective_len(ex);
    let lam = o.observer_weight as f64;
    if te == 0 {
        let grad = want_grad.then(|| (0..nl).map(|_| LState::zeros(hnn, c)).collect());
        return ExOut {
            loss: 0.0,
            grad,
            dbp: collect.then(|| vec![0.0; nl * hnn]),
        };
    }
    let ch = o.chunk.min(te);
    let nchunks = te.div_ceil(ch);
    let mut cur: Vec<LState<R>> = (0..nl).map(|l| LState::from_tuned(s, l, c)).collect();
    let state_bytes: usize = cur.iter().map(|st| st.bytes()).sum();
    mem.add(state_bytes);
    let mut tape = Tape::new(d, ch, want_grad, mem);
    let mut x = Buf::<R>::new(ch * c, mem);
    let mut loss = 0.0;
    let mut dbp = collect.then(|| vec![0.0f64; nl * hnn]);

    if !want_grad {
        let mut vf = Buf::<R>::new(ch * c, mem);
        for ci in 0..nchunks {
            let t0 = ci * ch;
            let rows = ch.min(te - t0);
            m.embed(&ex.tokens[t0..t0 + rows], &mut x);
            for (l, st) in cur.iter_mut().enumerate() {
                layer_fwd(m, l, &mut x, rows, st, &mut vf, &mut tape, false);
            }
            loss += head_loss(m, &x, rows, t0, ex, lam, None, mem);
        }
        mem.sub(state_bytes);
        return ExOut {
            loss,
            grad: None,
            dbp: None,
        };
    }

    // Forward: keep layer inputs, v_first, head gradients, chunk-start states.
    let mut xin = Buf::<R>::new(nl * te * c, mem);
    let mut vf_all = Buf::<R>::new(te * c, mem);
    let mut dxf = Buf::<R>::new(te * c, mem);
    let mut starts: Vec<Vec<LState<R>>> = Vec::with_capacity(nchunks);
    for ci in 0..nchunks {
        let t0 = ci * ch;
        let rows = ch.min(te - t0);
        mem.add(state_bytes);
        starts.push(cur.clone());
        m.embed(&ex.tokens[t0..t0 + rows], &mut x);
        for (l, st) in cur.iter_mut().enumerate() {
            xin[(l * te + t0) * c..(l * te + t0 + rows) * c].copy_from_slice(&x[..rows * c]);
            layer_fwd(
                m,
                l,
                &mut x,
                rows,
                st,
                &mut vf_all[t0 * c..(t0 + rows) * c],
                &mut tape,
                false,
            );
            if let Some(acc) = dbp.as_mut() {
                accumulate_dbp(&tape.r, rows, d, &mut acc[l * hnn..(l + 1) * hnn]);
            }
        }
        loss += head_loss(
            m,
            &x,
            rows,
            t0,
            ex,
            lam,
            Some(&mut dxf[t0 * c..(t0 + rows) * c]),
            mem,
        );
    }
    mem.sub(state_bytes);
    drop(cur);

    // Backward over chunks (last first), layers (last first).
    let mut gr = Grads::new(d, ch, mem);
    let mut dst: Vec<LState<R>> = (0..nl).map(|_| LState::zeros(hnn, c)).collect();
    for st in dst.iter_mut() {
        st.up = vec![R::ZERO; hnn / d.n * d.mu];
    }
    mem.add(state_bytes);
    let mut dvf = Buf::<R>::new(ch * c, mem);
    for ci in (0..nchunks).rev() {
        let t0 = ci * ch;
        let rows = ch.min(te - t0);
        let mut dx = Buf::<R>::new(rows * c, mem);
        dx.copy_from_slice(&dxf[t0 * c..(t0 + rows) * c]);
        dvf[..rows * c].iter_mut().for_each(|v| *v = R::ZERO);
        let chunk_states = std::mem::take(&mut starts[ci]);
        mem.sub(state_bytes);
        for (l, st0) in chunk_states.into_iter().enumerate().rev() {
            let mut st = st0;
            x[..rows * c].copy_from_slice(&xin[(l * te + t0) * c..(l * te + t0 + rows) * c]);
            let vf = &mut vf_all[t0 * c..(t0 + rows) * c];
            layer_fwd(m, l, &mut x, rows, &mut st, vf, &mut tape, true);
            layer_bwd(
                m,
                l,
                &tape,
                vf,
                &mut dx,
                rows,
                &mut dst[l],
                &mut dvf,
                &mut gr,
            );
        }
    }
    mem.sub(state_bytes);
    ExOut {
        loss,
        grad: Some(dst),
        dbp,
    }
}

/// `acc[h] += Σ_t r_{t,h} r_{t,h}ᵀ` (per head `[N, N]`).
fn accumulate_dbp<R: Real>(r: &[R], rows: usize, d: &Dims, acc: &mut [f64]) {
    let (c, n) = (d.c, d.n);
    for t in 0..rows {
        for h in 0..d.h {
            let x = &r[t * c + h * n..t * c + (h + 1) * n];
            let a = &mut acc[h * n * n..(h + 1) * n * n];
            for i in 0..n {
                let xi = x[i].to_f64();
                for j in 0..n {
                    a[i * n + j] += xi * x[j].to_f64();
                }
            }
        }
    }
}
