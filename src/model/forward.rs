//! The CPU forward pass: [`Model`] owns the weights plus a packed copy of
//! every matrix, and runs sequence mode (T tokens at once, matrix products
//! over all tokens, multi-threaded) and the one-token RNN step. Both start
//! from and update a [`State`].
//!
//! Sequence mode and step mode run the same code (a step is a sequence of one
//! token), so they agree up to the order of float additions in the
//! multi-threaded GEMM, which does not depend on T either.
#![allow(clippy::needless_range_loop)]
use std::path::Path;

use rayon::prelude::*;

use super::linalg::{matmul, wkv, Packed, WkvIn};
use super::state::State;
use super::weights::{Config, LayerNorm, Weights};
use crate::error::{Error, Result};

/// `e^{-0.5}`: the decay is `w = exp(-e^{-0.5} σ(d))`.
const DECAY_SCALE: f32 = 0.606_530_66;
/// LayerNorm epsilon.
const LN_EPS: f32 = 1e-5;
/// Longest run of tokens processed at once; longer inputs are split (the state
/// carries over, so results do not depend on the split).
const SEQ_CHUNK: usize = 512;
/// Below this many floats an element-wise pass runs on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 14;

/// Which logits a forward pass computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// `[T, V]`: logits after every token.
    All,
    /// `[V]`: logits after the last token only (prefill).
    Last,
    /// No logits (only the state is advanced).
    None,
}

/// Per-layer intermediate values of a sequence-mode forward pass, all
/// row-major over tokens (`[T, ·]`). Recorded by [`Model::forward_traced`].
#[derive(Clone, Debug, Default)]
pub struct LayerTrace {
    /// Residual stream entering the layer, `[T, C]`.
    pub x_in: Vec<f32>,
    /// `ln1` output, `[T, C]`.
    pub x_att: Vec<f32>,
    /// WKV inputs per token, `[T, 6C]`: `r | w | k̃ | v | a | b`, with the
    /// decay `w` in (0.545, 1), `a = -κ̂`, `b = κ̂ ⊙ α`, `v` after the value residual.
    pub rwkvab: Vec<f32>,
    /// Output gate `g`, `[T, C]`.
    pub g: Vec<f32>,
    /// In-context learning rate `α`, `[T, C]`.
    pub alpha: Vec<f32>,
    /// WKV output before the GroupNorm, `[T, C]`.
    pub y_wkv: Vec<f32>,
    /// Residual stream after the time mix, `[T, C]`.
    pub x_mid: Vec<f32>,
    /// `ln2` output, `[T, C]`.
    pub x_ffn: Vec<f32>,
    /// WKV state before the first token of the sequence, `[H, N, N]`.
    pub wkv_state_in: Vec<f32>,
}

struct PackedLayer {
    r: Packed,
    k: Packed,
    v: Packed,
    o: Packed,
    w1: Packed,
    w2: Packed,
    a1: Packed,
    a2: Packed,
    v1: Option<Packed>,
    v2: Option<Packed>,
    g1: Packed,
    g2: Packed,
    fk: Packed,
    fv: Packed,
}

/// An RWKV-7 model ready to run on the CPU.
pub struct Model {
    weights: Weights,
    /// `ln0(emb)`, `[V, C]`.
    emb_ln: Vec<f32>,
    layers: Vec<PackedLayer>,
    head: Packed,
    /// State-offset tuning's `S_off` per layer (`[H, N, N]`, value-major):
    /// `y_t += S_off r_t` after the WKV (docs/state-offset.md).
    offsets: Option<Vec<Vec<f32>>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.weights.config)
            .finish_non_exhaustive()
    }
}

fn layer_norm_row(x: &[f32], ln: &LayerNorm, eps: f32, out: &mut [f32]) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(&ln.weight).zip(&ln.bias) {
        *o = (v - mean) * inv * w + b;
    }
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Runs `f(row_index, row)` over the rows of `out` (`width` floats each),
/// in parallel when there is enough work.
fn par_rows<F>(out: &mut [f32], width: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if width == 0 {
        return;
    }
    let rows = out.len() / width;
    if out.len() < PAR_MIN_ELEMS || rayon::current_num_threads() == 1 {
        for (t, row) in out.chunks_mut(width).enumerate() {
            f(t, row);
        }
        return;
    }
    let per = rows.div_ceil(rayon::current_num_threads() * 4).max(1);
    out.par_chunks_mut(per * width)
        .enumerate()
        .for_each(|(i, chunk)| {
            for (j, row) in chunk.chunks_mut(width).enumerate() {
                f(i * per + j, row);
            }
        });
}

fn layer_norm_rows(x: &[f32], c: usize, ln: &LayerNorm) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    par_rows(&mut out, c, |t, o| {
        layer_norm_row(&x[t * c..(t + 1) * c], ln, LN_EPS, o)
    });
    out
}

fn mm(x: &[f32], ldx: usize, m: usize, w: &Packed) -> Vec<f32> {
    let mut y = vec![0.0; m * w.n];
    matmul(x, ldx, m, w, &mut y);
    y
}

impl Model {
    /// Checks the weights and packs the matrices for the CPU kernels.
    pub fn new(weights: Weights) -> Result<Model> {
        weights.check()?;
        let cfg = weights.config.clone();
        let c = cfg.n_embd;
        let ln0 = weights.blocks[0]
            .ln0
            .as_ref()
            .ok_or_else(|| Error::MissingTensor("blocks.0.ln0.weight".into()))?;
        let mut emb_ln = vec![0.0; cfg.vocab * c];
        for (row, out) in weights.emb.chunks(c).zip(emb_ln.chunks_mut(c)) {
            layer_norm_row(row, ln0, LN_EPS, out);
        }
        let layers = weights
            .blocks
            .iter()
            .enumerate()
            .map(|(l, b)| {
                let a = &b.att;
                let (v1, v2) = match (l, &a.v1, &a.v2) {
                    (0, _, _) => (None, None),
                    (_, Some(v1), Some(v2)) => (
                        Some(Packed::from_in_out(v1, c, cfg.d_v)),
                        Some(Packed::from_in_out(v2, cfg.d_v, c)),
                    ),
                    _ => (None, None),
                };
                PackedLayer {
                    r: Packed::from_out_in(&a.receptance, c, c),
                    k: Packed::from_out_in(&a.key, c, c),
                    v: Packed::from_out_in(&a.value, c, c),
                    o: Packed::from_out_in(&a.output, c, c),
                    w1: Packed::from_in_out(&a.w1, c, cfg.d_w),
                    w2: Packed::from_in_out(&a.w2, cfg.d_w, c),
                    a1: Packed::from_in_out(&a.a1, c, cfg.d_a),
                    a2: Packed::from_in_out(&a.a2, cfg.d_a, c),
                    v1,
                    v2,
                    g1: Packed::from_in_out(&a.g1, c, cfg.d_g),
                    g2: Packed::from_in_out(&a.g2, cfg.d_g, c),
                    fk: Packed::from_out_in(&b.ffn.key, cfg.d_ffn, c),
                    fv: Packed::from_out_in(&b.ffn.value, c, cfg.d_ffn),
                }
            })
            .collect();
        let head = Packed::from_out_in(&weights.head, cfg.vocab, c);
        Ok(Model {
            weights,
            emb_ln,
            layers,
            head,
            offsets: None,
        })
    }

    /// Adds state-offset tuning's read-out offsets (per layer `[H, N, N]`,
    /// value-major; `None` removes them): every layer's WKV output gets
    /// `S_off r_t` per head and token (docs/state-offset.md).
    pub fn set_state_offsets(&mut self, off: Option<Vec<Vec<f32>>>) -> Result<()> {
        let cfg = &self.weights.config;
        let hnn = cfg.n_head * cfg.head_size * cfg.head_size;
        if let Some(o) = &off {
            if o.len() != cfg.n_layer || o.iter().any(|x| x.len() != hnn) {
                return Err(Error::Shape {
                    name: "state offsets".into(),
                    expected: vec![cfg.n_layer, hnn],
                    got: vec![o.len(), o.first().map_or(0, |x| x.len())],
                });
            }
        }
        self.offsets = off;
        Ok(())
    }

    /// Loads a safetensors checkpoint (see [`Weights::load`]) and packs it.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        Model::new(Weights::load(path)?)
    }

    /// The weights (official layouts).
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.weights.config
    }

    /// A zero state for this model.
    pub fn new_state(&self) -> State {
        State::zeros(&self.weights.config)
    }

    /// Sequence mode: runs `tokens` from `state` (updated in place) and returns
    /// the logits after every token, `[T, V]` row-major.
    pub fn forward_seq(&self, tokens: &[u32], state: &mut State) -> Result<Vec<f32>> {
        self.forward(tokens, state, Logits::All)
    }

    /// One-token (RNN) mode: runs one token and returns its logits `[V]`.
    pub fn step(&self, token: u32, state: &mut State) -> Result<Vec<f32>> {
        self.forward(&[token], state, Logits::All)
    }

    /// Runs `tokens` from `state` (updated in place), computing the logits
    /// `which` asks for: `[T, V]`, `[V]` (last token; empty if `tokens` is
    /// empty) or nothing.
    pub fn forward(&self, tokens: &[u32], state: &mut State, which: Logits) -> Result<Vec<f32>> {
        self.check_inputs(tokens, state)?;
        let v = self.weights.config.vocab;
        let mut out = Vec::new();
        if which == Logits::All {
            out.reserve(tokens.len() * v);
        }
        let n_chunks = tokens.len().div_ceil(SEQ_CHUNK);
        for (i, chunk) in tokens.chunks(SEQ_CHUNK).enumerate() {
            let x = self.run(chunk, state, None);
            match which {
                Logits::All => out.extend(self.logits(&x, chunk.len())),
                Logits::Last if i + 1 == n_chunks => {
                    let c = self.weights.config.n_embd;
                    out = self.logits(&x[(chunk.len() - 1) * c..], 1);
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Sequence mode that also records every layer's intermediate values (for
    /// a backward pass written against [`Weights`]). Returns the logits
    /// `[T, V]` and one [`LayerTrace`] per layer. Processes `tokens` in one
    /// piece (memory grows with T).
    pub fn forward_traced(
        &self,
        tokens: &[u32],
        state: &mut State,
    ) -> Result<(Vec<f32>, Vec<LayerTrace>)> {
        self.check_inputs(tokens, state)?;
        let mut traces = Vec::with_capacity(self.layers.len());
        let x = self.run(tokens, state, Some(&mut traces));
        Ok((self.logits(&x, tokens.len()), traces))
    }

    fn check_inputs(&self, tokens: &[u32], state: &State) -> Result<()> {
        let cfg = &self.weights.config;
        state.check(cfg)?;
        if let Some((i, &t)) = tokens
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= cfg.vocab)
        {
            return Err(Error::Invalid(format!(
                "token {t} at position {i} is out of range (vocab {})",
                cfg.vocab
            )));
        }
        Ok(())
    }

    /// `ln0(emb)` rows of `tokens`, `[T, C]` (the residual stream entering layer 0).
    pub(crate) fn embed_rows(&self, tokens: &[u32]) -> Vec<f32> {
        let c = self.weights.config.n_embd;
        let mut x = vec![0.0; tokens.len() * c];
        for (row, &tok) in x.chunks_mut(c).zip(tokens) {
            let e = tok as usize * c;
            row.copy_from_slice(&self.emb_ln[e..e + c]);
        }
        x
    }

    /// Checks `tokens` (in the vocabulary) and `state` (this model's shape).
    pub(crate) fn check_run(&self, tokens: &[u32], state: &State) -> Result<()> {
        self.check_inputs(tokens, state)
    }

    /// Final LayerNorm and head on `m` rows of the residual stream.
    pub(crate) fn logits(&self, x: &[f32], m: usize) -> Vec<f32> {
        let c = self.weights.config.n_embd;
        let xn = layer_norm_rows(&x[..m * c], c, &self.weights.ln_out);
        mm(&xn, c, m, &self.head)
    }

    /// All layers over one chunk; returns the residual stream `[T, C]`.
    fn run(
        &self,
        tokens: &[u32],
        state: &mut State,
        mut traces: Option<&mut Vec<LayerTrace>>,
    ) -> Vec<f32> {
        let t = tokens.len();
        let mut x = self.embed_rows(tokens);
        if t == 0 {
            return x;
        }
        let mut v_first = Vec::new();
        for l in 0..self.layers.len() {
            let tr = traces.as_mut().map(|_| LayerTrace::default());
            let tr = self.layer(l, &mut x, t, state, &mut v_first, tr);
            if let (Some(ts), Some(tr)) = (traces.as_mut(), tr) {
                ts.push(tr);
            }
        }
        x
    }

    fn layer(
        &self,
        l: usize,
        x: &mut [f32],
        t: usize,
        state: &mut State,
        v_first: &mut Vec<f32>,
        trace: Option<LayerTrace>,
    ) -> Option<LayerTrace> {
        let c = self.weights.config.n_embd;
        let (out, _, mut trace) = self.layer_att(l, x, t, state, v_first, trace, None);
        par_rows(x, c, |tt, xr| {
            for (a, b) in xr.iter_mut().zip(&out[tt * c..(tt + 1) * c]) {
                *a += b;
            }
        });
        if let Some(tr) = trace.as_mut() {
            tr.x_mid = x.to_vec();
        }
        self.layer_ffn(l, x, t, state, trace)
    }

    /// The time mix of layer `l` over `x [T, C]` (not modified): returns its
    /// output `dx [T, C]` (what the layer adds to x) and, when `feat` asks,
    /// the token-reduction feature rows `[T, C]` it names.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layer_att(
        &self,
        l: usize,
        x: &[f32],
        t: usize,
        state: &mut State,
        v_first: &mut Vec<f32>,
        mut trace: Option<LayerTrace>,
        feat: Option<crate::ops::reduce::Source>,
    ) -> (Vec<f32>, Option<Vec<f32>>, Option<LayerTrace>) {
        use crate::ops::reduce::Source;
        let mut feature = None;
        let cfg = &self.weights.config;
        let (c, n) = (cfg.n_embd, cfg.head_size);
        let blk = &self.weights.blocks[l];
        let att = &blk.att;
        let pk = &self.layers[l];
        let st = &mut state.layers[l];
        if let Some(tr) = trace.as_mut() {
            tr.x_in = x.to_vec();
            tr.wkv_state_in = st.wkv.clone();
        }

        // ---- time mix ----
        let xa = layer_norm_rows(x, c, &blk.ln1);
        // Six token-shift mixes per token: [T, 6C] = xr | xw | xk | xv | xa | xg.
        let mut mix = vec![0.0; t * 6 * c];
        {
            let prev0 = &st.att_x;
            let mus = [&att.x_r, &att.x_w, &att.x_k, &att.x_v, &att.x_a, &att.x_g];
            par_rows(&mut mix, 6 * c, |tt, row| {
                let cur = &xa[tt * c..(tt + 1) * c];
                let prev = if tt == 0 {
                    &prev0[..]
                } else {
                    &xa[(tt - 1) * c..tt * c]
                };
                for (m, mu) in mus.iter().enumerate() {
                    let o = &mut row[m * c..(m + 1) * c];
                    for j in 0..c {
                        o[j] = cur[j] + (prev[j] - cur[j]) * mu[j];
                    }
                }
            });
        }
        st.att_x.copy_from_slice(&xa[(t - 1) * c..t * c]);
        let ld = 6 * c;
        let r = mm(&mix, ld, t, &pk.r);
        let mut k = mm(&mix[2 * c..], ld, t, &pk.k);
        let v = mm(&mix[3 * c..], ld, t, &pk.v);
        let mut hw = mm(&mix[c..], ld, t, &pk.w1);
        hw.iter_mut().for_each(|z| *z = z.tanh());
        let dw = mm(&hw, cfg.d_w, t, &pk.w2);
        let ha = mm(&mix[4 * c..], ld, t, &pk.a1);
        let da = mm(&ha, cfg.d_a, t, &pk.a2);
        let dv = match (&pk.v1, &pk.v2) {
            (Some(v1), Some(v2)) => {
                let hv = mm(&mix[3 * c..], ld, t, v1);
                Some(mm(&hv, cfg.d_v, t, v2))
            }
            _ => None,
        };
        let mut hg = mm(&mix[5 * c..], ld, t, &pk.g1);
        hg.iter_mut().for_each(|z| *z = sigmoid(*z));
        let g = mm(&hg, cfg.d_g, t, &pk.g2);
        drop(mix);

        // α, then the WKV inputs r | w | k̃ | v | a | b per token.
        let mut alpha = vec![0.0; t * c];
        par_rows(&mut alpha, c, |tt, o| {
            let d = &da[tt * c..(tt + 1) * c];
            for j in 0..c {
                o[j] = sigmoid(att.a0[j] + d[j]);
            }
        });
        if l == 0 {
            *v_first = v.clone();
        }
        let mut rwkvab = vec![0.0; t * 6 * c];
        {
            let vf = &v_first[..];
            let alpha = &alpha;
            let v0 = att.v0.as_deref();
            par_rows(&mut rwkvab, 6 * c, |tt, row| {
                let s = tt * c..(tt + 1) * c;
                let (rr, rest) = row.split_at_mut(c);
                let (ww, rest) = rest.split_at_mut(c);
                let (kk_out, rest) = rest.split_at_mut(c);
                let (vv, rest) = rest.split_at_mut(c);
                let (aa, bb) = rest.split_at_mut(c);
                rr.copy_from_slice(&r[s.clone()]);
                let d = &dw[s.clone()];
                for j in 0..c {
                    ww[j] = (-DECAY_SCALE * sigmoid(att.w0[j] + d[j])).exp();
                }
                vv.copy_from_slice(&v[s.clone()]);
                if let (Some(dv), Some(v0)) = (&dv, v0) {
                    let dv = &dv[s.clone()];
                    let vf = &vf[s.clone()];
                    for j in 0..c {
                        vv[j] += (vf[j] - vv[j]) * sigmoid(v0[j] + dv[j]);
                    }
                }
                let kt = &k[s.clone()];
                let al = &alpha[s.clone()];
                for h0 in (0..c).step_by(n) {
                    let mut ss = 0.0f32;
                    for j in h0..h0 + n {
                        let q = kt[j] * att.k_k[j];
                        aa[j] = q;
                        ss += q * q;
                    }
                    let inv = 1.0 / ss.sqrt().max(1e-12);
                    for j in h0..h0 + n {
                        let kh = aa[j] * inv;
                        aa[j] = -kh;
                        bb[j] = kh * al[j];
                    }
                }
                for j in 0..c {
                    kk_out[j] = kt[j] * (1.0 + (al[j] - 1.0) * att.k_a[j]);
                }
            });
        }
        drop(dw);
        drop(da);
        drop(dv);
        k.clear();

        let mut y = vec![0.0; t * c];
        wkv(&WkvIn { buf: &rwkvab }, t, c, n, &mut st.wkv, &mut y);
        if let Some(off) = self.offsets.as_ref().map(|o| &o[l]) {
            // state offset: y_t += S_off r_t per head
            for (yr, row) in y.chunks_mut(c).zip(rwkvab.chunks(6 * c)) {
                let rr = &row[..c];
                for h0 in (0..c).step_by(n) {
                    let sh = &off[h0 * n..(h0 + n) * n];
                    for j in 0..n {
                        let srow = &sh[j * n..(j + 1) * n];
                        let mut a = 0.0f32;
                        for i in 0..n {
                            a += srow[i] * rr[h0 + i];
                        }
                        yr[h0 + j] += a;
                    }
                }
            }
        }
        if let Some(tr) = trace.as_mut() {
            tr.y_wkv = y.clone();
        }
        match feat {
            Some(Source::Wkv) => feature = Some(y.clone()),
            Some(Source::Decay) => {
                feature = Some(
                    rwkvab
                        .chunks(6 * c)
                        .flat_map(|r| r[c..2 * c].iter().copied())
                        .collect(),
                )
            }
            _ => {}
        }

        // GroupNorm per head, r_k bonus, gate.
        {
            let eps = LN_EPS * n as f32;
            let rw = &rwkvab;
            let g = &g;
            par_rows(&mut y, c, |tt, yr| {
                let row = &rw[tt * 6 * c..(tt + 1) * 6 * c];
                let (rr, kk, vv) = (&row[..c], &row[2 * c..3 * c], &row[3 * c..4 * c]);
                let gg = &g[tt * c..(tt + 1) * c];
                for h0 in (0..c).step_by(n) {
                    let yh = &mut yr[h0..h0 + n];
                    let mean = yh.iter().sum::<f32>() / n as f32;
                    let var = yh.iter().map(|z| (z - mean) * (z - mean)).sum::<f32>() / n as f32;
                    let inv = 1.0 / (var + eps).sqrt();
                    let mut bonus = 0.0f32;
                    for j in 0..n {
                        bonus += rr[h0 + j] * kk[h0 + j] * att.r_k[h0 + j];
                    }
                    for j in 0..n {
                        let q = h0 + j;
                        let z = (yh[j] - mean) * inv * att.ln_x.weight[q] + att.ln_x.bias[q];
                        yh[j] = (z + bonus * vv[q]) * gg[q];
                    }
                }
            });
        }
        let out = mm(&y, c, t, &pk.o);
        match feat {
            Some(Source::Gated) => feature = Some(y),
            Some(Source::Out) => feature = Some(out.clone()),
            _ => {}
        }
        if let Some(tr) = trace.as_mut() {
            tr.x_att = xa;
            tr.rwkvab = rwkvab;
            tr.g = g;
            tr.alpha = alpha;
        }
        (out, feature, trace)
    }

    /// The channel mix of layer `l` on `x [T, C]` (in place).
    pub(crate) fn layer_ffn(
        &self,
        l: usize,
        x: &mut [f32],
        t: usize,
        state: &mut State,
        mut trace: Option<LayerTrace>,
    ) -> Option<LayerTrace> {
        let cfg = &self.weights.config;
        let c = cfg.n_embd;
        let blk = &self.weights.blocks[l];
        let pk = &self.layers[l];
        let st = &mut state.layers[l];
        // ---- channel mix ----
        let xf = layer_norm_rows(x, c, &blk.ln2);
        let mut kx = vec![0.0; t * c];
        {
            let prev0 = &st.ffn_x;
            let mu = &blk.ffn.x_k;
            par_rows(&mut kx, c, |tt, o| {
                let cur = &xf[tt * c..(tt + 1) * c];
                let prev = if tt == 0 {
                    &prev0[..]
                } else {
                    &xf[(tt - 1) * c..tt * c]
                };
                for j in 0..c {
                    o[j] = cur[j] + (prev[j] - cur[j]) * mu[j];
                }
            });
        }
        st.ffn_x.copy_from_slice(&xf[(t - 1) * c..t * c]);
        let mut hdn = mm(&kx, c, t, &pk.fk);
        par_rows(&mut hdn, cfg.d_ffn, |_, o| {
            for z in o.iter_mut() {
                let q = z.max(0.0);
                *z = q * q;
            }
        });
        let out = mm(&hdn, cfg.d_ffn, t, &pk.fv);
        par_rows(x, c, |tt, xr| {
            for (a, b) in xr.iter_mut().zip(&out[tt * c..(tt + 1) * c]) {
                *a += b;
            }
        });
        if let Some(tr) = trace.as_mut() {
            tr.x_ffn = xf;
        }
        trace
    }
}
