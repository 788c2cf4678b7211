//! Training-free token reduction of the RWKV-7 prefill (issue 15; after
//! "Rethinking Token Reduction for State Space Models", arXiv 2410.14725;
//! design and measurements in docs/token-reduction.md). Owns the options
//! ([`ReduceConfig`]: anchor layers and their ratios, [`Method`], [`Score`],
//! [`Similarity`]), the host-side plan of one anchor layer ([`plan_layer`]:
//! classification by importance, link selection, prune / merge assignment,
//! the order-preserving [`GatherMap`]s), the FLOP count ([`LayerCost`],
//! [`ReduceReport`]) and the reduced forwards of both models:
//! [`Model::forward_reduced`] (CPU, through the Rust twins) and
//! [`DeviceModel::forward_reduced`] (any [`ReduceOps`] backend: the
//! emulated or CUDA kernels of `kernels/reduce_ops.cu`).
//!
//! At an anchor layer the reduction sits right after the time mix: with
//! `dx` the time mix's output and `x` the residual stream entering the
//! layer, the layer continues with `x' = M_res(x) + M_hid(dx)` on the
//! surviving tokens, `v_first' = M_res(v_first)`, then its channel mix and
//! every later layer run on the shorter sequence (token shift then reads
//! the previous *surviving* token). `M_res` and `M_hid` keep the same
//! tokens (one index map); they differ only in whether a removed token is
//! averaged into its match (merge) or dropped (prune). Protected tokens
//! (the last one always, the `protect_last` final ones, the
//! `protect_first` first ones) are never removed, so their logits and the
//! final recurrent state belong to the real tokens.
use super::device::DeviceModel;
use super::forward::{Logits, Model};
use super::layer::{matmul_mat, FwdWs, Layer, StartRef, Tape};
use super::state::State;
use super::weights::Config;
use crate::error::{Error, ReduceError, Result};
use crate::ops::backward::BackwardOps;
use crate::ops::reduce::{twin, ReduceOps};
pub use crate::ops::reduce::{GatherMap, Metric, Source};

/// Which tokens a reduction removes in the hidden (time-mix output) branch
/// and the residual branch (`x`, `v_first`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Method {
    /// The paper's UTRC: hidden branch prunes the `q` least important of
    /// the selected tokens and merges the rest; the residual branch and
    /// `v_first` merge all of them.
    #[default]
    Hybrid,
    /// Pruning only (EViT-like): every selected token dropped in every branch.
    Prune,
    /// Merging only: every selected token averaged into its match in every branch.
    Merge,
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "hybrid" => Ok(Method::Hybrid),
            "prune" => Ok(Method::Prune),
            "merge" => Ok(Method::Merge),
            _ => Err(ReduceError::UnknownName {
                what: "method",
                got: s.into(),
                expected: "hybrid, prune, merge",
            }
            .into()),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Hybrid => "hybrid",
            Method::Prune => "prune",
            Method::Merge => "merge",
        })
    }
}

/// An importance score: a feature [`Source`] and a [`Metric`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Score {
    /// The feature rows.
    pub source: Source,
    /// How a row becomes a number.
    pub metric: Metric,
}

impl Default for Score {
    fn default() -> Self {
        Score {
            source: Source::Wkv,
            metric: Metric::Clip,
        }
    }
}

const SCORE_NAMES: &str = "wkv, gated, out (each optionally -clip, -l1, -l2, -mean), erase";

impl std::str::FromStr for Score {
    type Err = Error;
    /// `wkv`, `gated`, `out` (clip score), with `-l1`, `-l2`, `-mean` or
    /// `-clip` for another metric, or `erase` (decay, `mean(1 − w)`).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::from(ReduceError::UnknownName {
                what: "score",
                got: s.into(),
                expected: SCORE_NAMES,
            })
        };
        if s == "erase" {
            return Ok(Score {
                source: Source::Decay,
                metric: Metric::Erase,
            });
        }
        let (src, metric) = s.split_once('-').unwrap_or((s, "clip"));
        let source = match src {
            "wkv" => Source::Wkv,
            "gated" => Source::Gated,
            "out" => Source::Out,
            _ => return Err(bad()),
        };
        let metric = match metric {
            "clip" => Metric::Clip,
            "l1" => Metric::L1,
            "l2" => Metric::L2,
            "mean" => Metric::Mean,
            _ => return Err(bad()),
        };
        Ok(Score { source, metric })
    }
}

impl std::fmt::Display for Score {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.source == Source::Decay {
            return f.write_str("erase");
        }
        let s = match self.source {
            Source::Wkv => "wkv",
            Source::Gated => "gated",
            Source::Out => "out",
            Source::Decay => "decay",
        };
        let m = match self.metric {
            Metric::Clip => "clip",
            Metric::L1 => "l1",
            Metric::L2 => "l2",
            Metric::Mean => "mean",
            Metric::Erase => "erase",
        };
        write!(f, "{s}-{m}")
    }
}

/// The vectors whose cosine links a removed token to its match.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Similarity {
    /// The score's feature rows (the paper's choice).
    #[default]
    Feature,
    /// The time mix's output `dx`.
    Dx,
}

/// One anchor layer and the fraction of its tokens to remove there.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Anchor {
    /// The layer (0-based); the reduction follows its time mix.
    pub layer: usize,
    /// Fraction of the tokens entering the layer to remove, in `[0, 1)`;
    /// at most half of the unprotected tokens can go (the paper's bipartite
    /// split), so larger values are capped there.
    pub ratio: f64,
}

/// A token-reduction setting (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct ReduceConfig {
    /// Anchor layers, ascending, each with its ratio.
    pub anchors: Vec<Anchor>,
    /// Prune / merge / hybrid.
    pub method: Method,
    /// The importance score.
    pub score: Score,
    /// The matching similarity.
    pub sim: Similarity,
    /// The hybrid's prune fraction of the selected links (the paper: 0.5).
    pub q: f64,
    /// Tokens at the start never removed (e.g. a system prompt).
    pub protect_first: usize,
    /// Whether removed tokens may be merged into protected ones (the
    /// paper has no protected tokens; default `false`: protected tokens
    /// stay exactly as the dense model computes them up to the anchor, so
    /// neither removed nor averaged; see docs/token-reduction.md).
    pub merge_into_protected: bool,
}

impl ReduceConfig {
    /// `ratio` at each of `layers` (hybrid, default score, q = 0.5).
    pub fn uniform(layers: &[usize], ratio: f64) -> Result<Self> {
        check_ratio(ratio)?;
        let mut anchors: Vec<Anchor> = layers
            .iter()
            .map(|&layer| Anchor { layer, ratio })
            .collect();
        anchors.sort_by_key(|a| a.layer);
        Ok(ReduceConfig {
            anchors,
            method: Method::Hybrid,
            score: Score::default(),
            sim: Similarity::Feature,
            q: 0.5,
            protect_first: 0,
            merge_into_protected: false,
        })
    }

    /// The same ratio at each of `layers`, chosen so that the counted FLOPs
    /// of the layers of `cfg` fall by `target` (in `[0, 1)`) for a long
    /// sequence with nothing protected ([`expected_saving`]).
    pub fn for_target(cfg: &Config, layers: &[usize], target: f64) -> Result<Self> {
        check_ratio(target)?;
        check_layers(layers, cfg.n_layer)?;
        if target == 0.0 {
            return Self::uniform(layers, 0.0);
        }
        let max = expected_saving(cfg, layers, 0.5);
        if target > max {
            return Err(ReduceError::Unreachable {
                target,
                layers: layers.to_vec(),
                max,
            }
            .into());
        }
        let (mut lo, mut hi) = (0.0f64, 0.5f64);
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if expected_saving(cfg, layers, mid) < target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Self::uniform(layers, hi)
    }

    /// Checks the setting against a model of `n_layer` layers.
    pub fn validate(&self, n_layer: usize) -> Result<()> {
        let layers: Vec<usize> = self.anchors.iter().map(|a| a.layer).collect();
        check_layers(&layers, n_layer)?;
        for a in &self.anchors {
            check_ratio(a.ratio)?;
        }
        if !(0.0..=1.0).contains(&self.q) {
            return Err(ReduceError::PruneFraction(self.q).into());
        }
        Ok(())
    }

    /// The ratio at `layer` (`None`: not an anchor, or a zero ratio).
    pub fn ratio_at(&self, layer: usize) -> Option<f64> {
        self.anchors
            .iter()
            .find(|a| a.layer == layer && a.ratio > 0.0)
            .map(|a| a.ratio)
    }
}

fn check_ratio(r: f64) -> Result<()> {
    if !(r.is_finite() && (0.0..1.0).contains(&r)) {
        return Err(ReduceError::Ratio(r).into());
    }
    Ok(())
}

fn check_layers(layers: &[usize], n_layer: usize) -> Result<()> {
    for (i, &l) in layers.iter().enumerate() {
        if l >= n_layer {
            return Err(ReduceError::UnknownLayer { layer: l, n_layer }.into());
        }
        if layers[..i].contains(&l) {
            return Err(ReduceError::DuplicateLayer(l).into());
        }
    }
    Ok(())
}

/// Default anchor layers for a model of `n_layer` layers: the table of
/// other-seeds §A.6 for 12, 24 and 32 layers (first anchor at ~20–25 % of
/// the depth, then every ~12–17 %), and the same rule for other depths.
pub fn default_layers(n_layer: usize) -> Vec<usize> {
    match n_layer {
        12 => vec![3, 5, 7, 9],
        24 => vec![5, 8, 11, 14, 17, 20],
        32 => vec![6, 10, 14, 18, 22, 26],
        0 | 1 => vec![],
        n => {
            let first = ((n as f64 * 0.22).round() as usize).max(1);
            let step = ((n as f64 / 7.0).round() as usize).max(1);
            (first..n.saturating_sub(2).max(first + 1))
                .step_by(step)
                .collect()
        }
    }
}

/// Counted FLOPs per token of one layer: `2 ×` the multiply-adds of its
/// weight GEMMs plus the WKV recurrence (`≈ 8·C·N`); element-wise work
/// and the head are left out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerCost {
    /// The time mix (runs on the tokens entering the layer).
    pub att: f64,
    /// The channel mix (runs on the tokens left after the layer's reduction).
    pub ffn: f64,
}

impl LayerCost {
    /// The cost of layer `l` of `cfg`.
    pub fn of(cfg: &Config, l: usize) -> Self {
        let c = cfg.n_embd as f64;
        let lora = cfg.d_w + cfg.d_a + cfg.d_g + if l > 0 { cfg.d_v } else { 0 };
        let att = 2.0 * (4.0 * c * c + 2.0 * c * lora as f64) + 8.0 * c * cfg.head_size as f64;
        let ffn = 2.0 * (2.0 * c * cfg.d_ffn as f64);
        LayerCost { att, ffn }
    }
}

/// The fraction of the layers' counted FLOPs a uniform per-layer `ratio`
/// at `layers` saves on a long, unprotected sequence.
pub fn expected_saving(cfg: &Config, layers: &[usize], ratio: f64) -> f64 {
    let (mut kept, mut dense, mut cost) = (1.0f64, 0.0, 0.0);
    for l in 0..cfg.n_layer {
        let lc = LayerCost::of(cfg, l);
        dense += lc.att + lc.ffn;
        cost += kept * lc.att;
        if layers.contains(&l) {
            kept *= 1.0 - ratio;
        }
        cost += kept * lc.ffn;
    }
    if dense == 0.0 {
        0.0
    } else {
        1.0 - cost / dense
    }
}

/// What a reduced forward did: tokens per layer and the counted FLOPs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReduceReport {
    /// Tokens fed.
    pub tokens: usize,
    /// Per layer: tokens its time mix ran on (summed over chunks).
    pub rows_att: Vec<usize>,
    /// Per layer: tokens its channel mix ran on (summed over chunks).
    pub rows_ffn: Vec<usize>,
    /// Counted FLOPs of the layers without reduction.
    pub flops_dense: f64,
    /// Counted FLOPs of the layers as run (the matching's `O(T²·C)` included).
    pub flops: f64,
}

impl ReduceReport {
    fn new(cfg: &Config) -> Self {
        ReduceReport {
            rows_att: vec![0; cfg.n_layer],
            rows_ffn: vec![0; cfg.n_layer],
            ..Default::default()
        }
    }

    /// The fraction of counted FLOPs saved.
    pub fn saved(&self) -> f64 {
        if self.flops_dense == 0.0 {
            0.0
        } else {
            1.0 - self.flops / self.flops_dense
        }
    }

    /// Adds another report (e.g. of a later chunk or document).
    pub fn add(&mut self, o: &ReduceReport) {
        self.tokens += o.tokens;
        if self.rows_att.len() < o.rows_att.len() {
            self.rows_att.resize(o.rows_att.len(), 0);
            self.rows_ffn.resize(o.rows_ffn.len(), 0);
        }
        for (a, b) in self.rows_att.iter_mut().zip(&o.rows_att) {
            *a += b;
        }
        for (a, b) in self.rows_ffn.iter_mut().zip(&o.rows_ffn) {
            *a += b;
        }
        self.flops_dense += o.flops_dense;
        self.flops += o.flops;
    }
}

/// The plan of one anchor layer over its `T` rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Surviving rows, ascending (the order is preserved).
    pub keep: Vec<u32>,
    /// The residual stream's and `v_first`'s map.
    pub res: GatherMap,
    /// The hidden branch's (time-mix output) map: the same output rows.
    pub hid: GatherMap,
    /// Tokens each surviving row stands for after the reduction.
    pub sizes: Vec<f32>,
    /// Rows removed by merging (residual branch) and by pruning (hidden).
    pub merged: usize,
    /// Rows pruned in the hidden branch.
    pub pruned: usize,
}

/// Plans the reduction of one anchor layer (the paper's §4, with the
/// RWKV-7 choices of docs/token-reduction.md):
///
/// 1. the unprotected rows, by ascending `scores` (lower index first on
///    ties), give set A: with `into_protected`, the `min(#unprotected,
///    T/2)` least important, every other row (the protected ones included)
///    a candidate in B; without, half of the unprotected rows (rounded
///    down) in A, the other unprotected rows in B;
/// 2. `matcher(A, B)` links each row of A to its most similar row of B
///    (position in B, cosine);
/// 3. the `round(ratio·T)` links of highest cosine (lower index first)
///    are selected (at most |A|);
/// 4. [`Method`] decides per branch whether a selected row is dropped or
///    averaged into its match, weighted by `sizes` (the tokens each row
///    already stands for); the hybrid prunes the `round(q·r)` selected
///    rows of lowest score in the hidden branch;
/// 5. the survivors keep their order.
///
/// `None` when nothing is removed.
#[allow(clippy::too_many_arguments)]
pub fn plan_layer(
    scores: &[f32],
    protected: &[bool],
    sizes: &[f32],
    ratio: f64,
    method: Method,
    q: f64,
    into_protected: bool,
    matcher: impl FnOnce(&[u32], &[u32]) -> Result<(Vec<u32>, Vec<f32>)>,
) -> Result<Option<Plan>> {
    let t = scores.len();
    if protected.len() != t || sizes.len() != t {
        return Err(Error::Shape {
            name: "plan_layer: protected / sizes".into(),
            expected: vec![t],
            got: vec![protected.len(), sizes.len()],
        });
    }
    check_ratio(ratio)?;
    let want = (ratio * t as f64).round() as usize;
    let mut cand: Vec<u32> = (0..t as u32).filter(|&i| !protected[i as usize]).collect();
    let na = if into_protected {
        cand.len().min(t / 2)
    } else {
        cand.len() / 2
    };
    if want == 0 || na == 0 {
        return Ok(None);
    }
    let by_score = |a: &u32, b: &u32| {
        scores[*a as usize]
            .total_cmp(&scores[*b as usize])
            .then(a.cmp(b))
    };
    cand.sort_by(by_score);
    let mut set_a: Vec<u32> = cand[..na].to_vec();
    set_a.sort_unstable();
    let mut in_a = vec![false; t];
    for &i in &set_a {
        in_a[i as usize] = true;
    }
    let set_b: Vec<u32> = (0..t as u32)
        .filter(|&i| !in_a[i as usize] && (into_protected || !protected[i as usize]))
        .collect();
    let (best, sim) = matcher(&set_a, &set_b)?;
    if best.len() != na || sim.len() != na || best.iter().any(|&j| j as usize >= set_b.len()) {
        return Err(ReduceError::Map("the matcher returned a bad link list".into()).into());
    }
    // links: (row of A, destination row, cosine), best cosine first
    let mut links: Vec<(u32, u32, f32)> = set_a
        .iter()
        .zip(&best)
        .zip(&sim)
        .map(|((&a, &j), &g)| (a, set_b[j as usize], g))
        .collect();
    links.sort_by(|x, y| y.2.total_cmp(&x.2).then(x.0.cmp(&y.0)));
    links.truncate(want.min(na));
    let r = links.len();
    // which selected links the hidden branch prunes
    let n_prune = match method {
        Method::Prune => r,
        Method::Merge => 0,
        Method::Hybrid => ((q * r as f64).round() as usize).min(r),
    };
    let mut order: Vec<usize> = (0..r).collect();
    order.sort_by(|&i, &j| by_score(&links[i].0, &links[j].0));
    let mut hid_prune = vec![false; r];
    for &i in &order[..n_prune] {
        hid_prune[i] = true;
    }
    let res_prune = method == Method::Prune;
    let mut removed = vec![false; t];
    let mut into_res: Vec<Vec<u32>> = vec![Vec::new(); t];
    let mut into_hid: Vec<Vec<u32>> = vec![Vec::new(); t];
    for (i, &(a, dst, _)) in links.iter().enumerate() {
        removed[a as usize] = true;
        if !res_prune {
            into_res[dst as usize].push(a);
        }
        if !hid_prune[i] {
            into_hid[dst as usize].push(a);
        }
    }
    let keep: Vec<u32> = (0..t as u32).filter(|&i| !removed[i as usize]).collect();
    let build = |into: &mut [Vec<u32>]| {
        let mut m = GatherMap {
            rows_in: t,
            ptr: vec![0],
            src: Vec::new(),
            w: Vec::new(),
        };
        for &k in &keep {
            let extra = &mut into[k as usize];
            extra.sort_unstable();
            m.src.push(k);
            m.w.push(sizes[k as usize]);
            for &a in extra.iter() {
                m.src.push(a);
                m.w.push(sizes[a as usize]);
            }
            m.ptr.push(m.src.len() as u32);
        }
        m
    };
    let res = build(&mut into_res);
    let hid = build(&mut into_hid);
    let new_sizes = keep
        .iter()
        .map(|&k| {
            into_res[k as usize]
                .iter()
                .fold(sizes[k as usize], |s, &a| s + sizes[a as usize])
        })
        .collect();
    Ok(Some(Plan {
        keep,
        res,
        hid,
        sizes: new_sizes,
        merged: if res_prune { 0 } else { r },
        pruned: n_prune,
    }))
}

/// The rows of a reduced forward that are still alive, with their
/// original positions (within the chunk) and sizes.
struct Rows {
    pos: Vec<usize>,
    sizes: Vec<f32>,
}

impl Rows {
    fn new(t: usize) -> Self {
        Rows {
            pos: (0..t).collect(),
            sizes: vec![1.0; t],
        }
    }
    /// Protected rows: position `< first` or `≥ from`, and the last row.
    fn protected(&self, first: usize, from: usize) -> Vec<bool> {
        let n = self.pos.len();
        self.pos
            .iter()
            .enumerate()
            .map(|(i, &p)| p < first || p >= from || i + 1 == n)
            .collect()
    }
    fn apply(&mut self, plan: &Plan) {
        self.pos = plan.keep.iter().map(|&k| self.pos[k as usize]).collect();
        self.sizes = plan.sizes.clone();
    }
}

/// The output of a reduced forward.
#[derive(Clone, Debug, Default)]
pub struct Reduced {
    /// Logits as asked: `[K, V]` for the surviving positions
    /// ([`Logits::All`]), `[V]` for the last token, or empty.
    pub logits: Vec<f32>,
    /// With [`Logits::All`]: the original position (in the tokens fed) of
    /// each logits row, ascending.
    pub positions: Vec<usize>,
    /// Tokens per layer and counted FLOPs.
    pub report: ReduceReport,
}

/// Longest run of tokens one reduced forward processes at once (the state
/// carries over; each chunk is reduced on its own).
pub const REDUCE_CHUNK: usize = 1024;

fn chunk_bounds(total: usize) -> Vec<(usize, usize)> {
    (0..total)
        .step_by(REDUCE_CHUNK)
        .map(|s| (s, (s + REDUCE_CHUNK).min(total)))
        .collect()
}

fn match_cost(na: usize, nb: usize, c: usize) -> f64 {
    4.0 * na as f64 * nb as f64 * c as f64
}

impl Model {
    /// Prefill with token reduction: runs `tokens` from `state` (updated:
    /// the final state belongs to the real last token), removing tokens at
    /// the anchor layers of `red`; the last `protect_last` tokens (at least
    /// the last one) are never removed. `red` with no anchor, or only zero
    /// ratios, gives exactly [`Model::forward`]'s logits.
    pub fn forward_reduced(
        &self,
        tokens: &[u32],
        state: &mut State,
        red: &ReduceConfig,
        protect_last: usize,
        which: Logits,
    ) -> Result<Reduced> {
        let cfg = self.config().clone();
        red.validate(cfg.n_layer)?;
        self.check_run(tokens, state)?;
        let (c, v) = (cfg.n_embd, cfg.vocab);
        let total = tokens.len();
        let from = total.saturating_sub(protect_last);
        let mut out = Reduced {
            report: ReduceReport::new(&cfg),
            ..Default::default()
        };
        let chunks = chunk_bounds(total);
        for (ci, &(s, e)) in chunks.iter().enumerate() {
            let chunk = &tokens[s..e];
            let t = chunk.len();
            let mut x = self.embed_rows(chunk);
            let mut rows = Rows::new(t);
            let mut v_first = Vec::new();
            let mut rep = ReduceReport::new(&cfg);
            rep.tokens = t;
            let first = red.protect_first.saturating_sub(s);
            let from_local = from.saturating_sub(s);
            for l in 0..cfg.n_layer {
                let n = rows.pos.len();
                let lc = LayerCost::of(&cfg, l);
                rep.flops_dense += t as f64 * (lc.att + lc.ffn);
                rep.flops += n as f64 * lc.att;
                rep.rows_att[l] += n;
                let ratio = red.ratio_at(l);
                let src = ratio.map(|_| red.score.source);
                let (dx, feat, _) = self.layer_att(l, &x, n, state, &mut v_first, None, src);
                let mut plan = None;
                if let (Some(ratio), Some(feat)) = (ratio, feat.as_ref()) {
                    let scores = twin::score(feat, n, c, red.score.metric);
                    let simv = match red.sim {
                        Similarity::Feature => feat,
                        Similarity::Dx => &dx,
                    };
                    let prot = rows.protected(first, from_local);
                    plan = plan_layer(
                        &scores,
                        &prot,
                        &rows.sizes,
                        ratio,
                        red.method,
                        red.q,
                        red.merge_into_protected,
                        |a, b| {
                            rep.flops += match_cost(a.len(), b.len(), c);
                            Ok(twin::matching(simv, c, a, b))
                        },
                    )?;
                }
                match plan {
                    Some(p) => {
                        let xr = twin::gather(&x, c, &p.res);
                        let dr = twin::gather(&dx, c, &p.hid);
                        x = xr.iter().zip(&dr).map(|(a, b)| a + b).collect();
                        v_first = twin::gather(&v_first, c, &p.res);
                        rows.apply(&p);
                    }
                    None => {
                        for (a, b) in x.iter_mut().zip(&dx) {
                            *a += b;
                        }
                    }
                }
                let n = rows.pos.len();
                rep.flops += n as f64 * lc.ffn;
                rep.rows_ffn[l] += n;
                self.layer_ffn(l, &mut x, n, state, None);
            }
            let k = rows.pos.len();
            match which {
                Logits::All => {
                    out.logits.extend(self.logits(&x, k));
                    out.positions.extend(rows.pos.iter().map(|p| p + s));
                }
                Logits::Last if ci + 1 == chunks.len() => {
                    out.logits = self.logits(&x[(k - 1) * c..], 1);
                    debug_assert_eq!(out.logits.len(), v);
                }
                _ => {}
            }
            out.report.add(&rep);
        }
        Ok(out)
    }
}

impl<D: BackwardOps + ReduceOps> DeviceModel<D> {
    /// [`Model::forward_reduced`] on the device: the scores, the matching
    /// and the gathers run as `kernels/reduce_ops.cu` (through
    /// [`ReduceOps`]), the per-layer plan on the host. The state is
    /// uploaded, run and downloaded.
    pub fn forward_reduced(
        &self,
        tokens: &[u32],
        state: &mut State,
        red: &ReduceConfig,
        protect_last: usize,
        which: Logits,
    ) -> Result<Reduced> {
        let (o, emb_ln, layers) = (self.ops(), self.emb_ln(), self.dev_layers());
        let cfg = self.config().clone();
        red.validate(cfg.n_layer)?;
        let mut ds = self.upload_state(state)?;
        self.check_dev_state(&ds)?;
        if self.has_state_offsets() {
            return Err(Error::Tune(
                "token reduction with state offsets (tune --method state-offset) is not \
                 supported"
                    .into(),
            ));
        }
        let (c, h, n, v) = (cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab);
        if let Some((i, &t)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= v) {
            return Err(Error::Invalid(format!(
                "token {t} at position {i} is out of range (vocab {v})"
            )));
        }
        let total = tokens.len();
        let from = total.saturating_sub(protect_last);
        let mut out = Reduced {
            report: ReduceReport::new(&cfg),
            ..Default::default()
        };
        let chunks = chunk_bounds(total);
        for (ci, &(s, e)) in chunks.iter().enumerate() {
            let chunk = &tokens[s..e];
            let t = chunk.len();
            let tc = t * c;
            let mut x = o.zeros(tc)?;
            o.embed(chunk, emb_ln, c, &mut x)?;
            let mut vf = o.zeros(tc)?;
            let vres = layers.iter().any(|l| l.vres.is_some());
            let mut tape = Tape::new(o, &cfg, 1, t, vres, None)?;
            let mut fw = FwdWs::new(o, &cfg, 1, t)?;
            let mut h_t = o.zeros(h * n * n)?;
            let (mut s1, mut s2) = (o.zeros(tc)?, o.zeros(tc)?);
            let mut rows = Rows::new(t);
            let mut rep = ReduceReport::new(&cfg);
            rep.tokens = t;
            let first = red.protect_first.saturating_sub(s);
            let from_local = from.saturating_sub(s);
            for (l, ly) in layers.iter().enumerate() {
                let layer = Layer {
                    ops: o,
                    cfg: &cfg,
                    l,
                    ly,
                    mm: matmul_mat::<D>,
                    mt: None,
                    up: None,
                    lora: None,
                };
                let nr = rows.pos.len();
                let lc = LayerCost::of(&cfg, l);
                rep.flops_dense += t as f64 * (lc.att + lc.ffn);
                rep.flops += nr as f64 * lc.att;
                rep.rows_att[l] += nr;
                let (att_x, ffn_x, wkv) = &mut ds.layers[l];
                let st = StartRef {
                    sa: &*att_x,
                    sf: &*ffn_x,
                    wkv: &*wkv,
                    u: None,
                };
                layer.forward_att(
                    &x,
                    1,
                    nr,
                    st,
                    &mut vf,
                    &mut tape,
                    &mut fw,
                    None,
                    Some(&mut h_t),
                )?;
                let mut plan = None;
                if let Some(ratio) = red.ratio_at(l) {
                    let feat = match red.score.source {
                        Source::Wkv => &tape.y,
                        Source::Gated => &fw.out,
                        Source::Out => &fw.att,
                        Source::Decay => &tape.wdec,
                    };
                    let scores = o.tok_score(nr, c, red.score.metric, feat)?;
                    let simv = match red.sim {
                        Similarity::Feature => feat,
                        Similarity::Dx => &fw.att,
                    };
                    let prot = rows.protected(first, from_local);
                    let mut mc = 0.0;
                    plan = plan_layer(
                        &scores,
                        &prot,
                        &rows.sizes,
                        ratio,
                        red.method,
                        red.q,
                        red.merge_into_protected,
                        |a, b| {
                            mc = match_cost(a.len(), b.len(), c);
                            o.tok_match(nr, c, simv, a, b)
                        },
                    )?;
                    rep.flops += mc;
                }
                match &plan {
                    Some(p) => {
                        let k = p.keep.len();
                        o.tok_gather(c, &x, &p.res, &mut s1)?;
                        o.tok_gather(c, &fw.att, &p.hid, &mut s2)?;
                        o.add_n(&mut s1, &s2, k * c)?;
                        o.copy(&s1, 0, &mut x, 0, k * c)?;
                        o.tok_gather(c, &vf, &p.res, &mut s1)?;
                        o.copy(&s1, 0, &mut vf, 0, k * c)?;
                        rows.apply(p);
                    }
                    None => o.add_n(&mut x, &fw.att, nr * c)?,
                }
                let nr = rows.pos.len();
                rep.flops += nr as f64 * lc.ffn;
                rep.rows_ffn[l] += nr;
                layer.forward_ffn(&mut x, 1, nr, st, &mut tape, &mut fw)?;
                o.copy(&fw.sa, 0, att_x, 0, c)?;
                o.copy(&fw.sf, 0, ffn_x, 0, c)?;
                o.copy(&h_t, 0, wkv, 0, h * n * n)?;
            }
            let k = rows.pos.len();
            match which {
                Logits::All => {
                    out.logits.extend(self.logits(&x, 0, k)?);
                    out.positions.extend(rows.pos.iter().map(|p| p + s));
                }
                Logits::Last if ci + 1 == chunks.len() => {
                    out.logits = self.logits(&x, (k - 1) * c, 1)?;
                }
                _ => {}
            }
            out.report.add(&rep);
        }
        *state = self.download_state(&ds)?;
        Ok(out)
    }
}
