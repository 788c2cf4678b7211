//! LoRA adapters of an RWKV-7 model (docs/lora.md): which matrices can
//! carry one ([`LoraTarget`]), the adapter's tensors on the host
//! ([`LoraAdapter`]: seeded initialisation, safetensors files with
//! documented names, validation of a file against a model) and the exact
//! merge into the base weights ([`LoraAdapter::merge_into`]). The forward
//! and backward of an adapted matrix live with the layer
//! ([`super::layer::Layer`]); training lives in `tune::device`.
//!
//! Every adapted matrix is seen as the map `y = x Wᵀ` with `W [out, in]`;
//! the adapter adds `(α/r)·(x Aᵀ) Bᵀ`, with `A [r, in]` and `B [out, r]`.
//! For the projections (receptance, key, value, output, the channel mix's
//! key and value) `W` is the official weight itself, so the merge is
//! `W += (α/r)·B·A`. The low-rank generators `w1 … g2` are stored input-major
//! (`x @ w1`, official `[in, out]`), so their merge is
//! `w1 += (α/r)·(B·A)ᵀ`.
use super::weights::{Config, Weights};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensors::{read_f32, write_f32, F32Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// A matrix of a layer that can carry a LoRA adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    /// Time mix receptance `[C, C]`.
    R,
    /// Time mix key `[C, C]`.
    K,
    /// Time mix value `[C, C]`.
    V,
    /// Time mix output `[C, C]`.
    O,
    /// Channel mix key `[F, C]`.
    FfnKey,
    /// Channel mix value `[C, F]`.
    FfnValue,
    /// Decay generator, first factor (`x @ w1`, `[C, d_w]`).
    W1,
    /// Decay generator, second factor (`[d_w, C]`).
    W2,
    /// In-context learning rate generator, first factor.
    A1,
    /// In-context learning rate generator, second factor.
    A2,
    /// Value-residual generator, first factor (layers ≥ 1).
    V1,
    /// Value-residual generator, second factor (layers ≥ 1).
    V2,
    /// Output gate generator, first factor.
    G1,
    /// Output gate generator, second factor.
    G2,
}

impl LoraTarget {
    /// Every target, in file and parameter order.
    pub const ALL: [LoraTarget; 14] = [
        LoraTarget::R,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::FfnKey,
        LoraTarget::FfnValue,
        LoraTarget::W1,
        LoraTarget::W2,
        LoraTarget::A1,
        LoraTarget::A2,
        LoraTarget::V1,
        LoraTarget::V2,
        LoraTarget::G1,
        LoraTarget::G2,
    ];

    /// The default targets (the paper's advice for state-space models):
    /// the big projections of both mixes, not the low-rank generators.
    pub const DEFAULT: [LoraTarget; 6] = [
        LoraTarget::R,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::FfnKey,
        LoraTarget::FfnValue,
    ];

    /// Position in [`Self::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The official tensor name inside a block (`att.receptance`, …).
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::R => "att.receptance",
            LoraTarget::K => "att.key",
            LoraTarget::V => "att.value",
            LoraTarget::O => "att.output",
            LoraTarget::FfnKey => "ffn.key",
            LoraTarget::FfnValue => "ffn.value",
            LoraTarget::W1 => "att.w1",
            LoraTarget::W2 => "att.w2",
            LoraTarget::A1 => "att.a1",
            LoraTarget::A2 => "att.a2",
            LoraTarget::V1 => "att.v1",
            LoraTarget::V2 => "att.v2",
            LoraTarget::G1 => "att.g1",
            LoraTarget::G2 => "att.g2",
        }
    }

    /// The short name used by `--lora-targets` (`r`, `k`, `v`, `o`,
    /// `ffn.key`, `ffn.value`, `w1` … `g2`).
    pub fn short(self) -> &'static str {
        match self {
            LoraTarget::R => "r",
            LoraTarget::K => "k",
            LoraTarget::V => "v",
            LoraTarget::O => "o",
            LoraTarget::FfnKey => "ffn.key",
            LoraTarget::FfnValue => "ffn.value",
            t => &t.name()[4..],
        }
    }

    /// Whether the official layout is input-major (`x @ W`, the low-rank
    /// generators) rather than `[out, in]`.
    pub fn input_major(self) -> bool {
        Self::ALL[6..].contains(&self)
    }

    /// `(out, in)` of the map `y = x Wᵀ` in a model of `cfg`.
    pub fn dims(self, cfg: &Config) -> (usize, usize) {
        let (c, f) = (cfg.n_embd, cfg.d_ffn);
        match self {
            LoraTarget::R | LoraTarget::K | LoraTarget::V | LoraTarget::O => (c, c),
            LoraTarget::FfnKey => (f, c),
            LoraTarget::FfnValue => (c, f),
            LoraTarget::W1 => (cfg.d_w, c),
            LoraTarget::W2 => (c, cfg.d_w),
            LoraTarget::A1 => (cfg.d_a, c),
            LoraTarget::A2 => (c, cfg.d_a),
            LoraTarget::V1 => (cfg.d_v, c),
            LoraTarget::V2 => (c, cfg.d_v),
            LoraTarget::G1 => (cfg.d_g, c),
            LoraTarget::G2 => (c, cfg.d_g),
        }
    }

    /// Whether layer `l` has this matrix (the value-residual generator
    /// exists from layer 1 on).
    pub fn in_layer(self, l: usize) -> bool {
        !matches!(self, LoraTarget::V1 | LoraTarget::V2) || l > 0
    }

    /// Parses a comma-separated list: short or official names, or the
    /// groups `proj` (the default: r, k, v, o, ffn.key, ffn.value), `att`
    /// (r, k, v, o), `ffn`, `gen` (w1 … g2) and `all`. Sorted, deduplicated.
    pub fn parse_list(s: &str) -> Result<Vec<LoraTarget>> {
        let mut out = Vec::new();
        for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let group: Vec<LoraTarget> = match item {
                "proj" => Self::DEFAULT.to_vec(),
                "att" => Self::ALL[..4].to_vec(),
                "ffn" => Self::ALL[4..6].to_vec(),
                "gen" => Self::ALL[6..].to_vec(),
                "all" => Self::ALL.to_vec(),
                _ => match Self::ALL
                    .iter()
                    .find(|t| t.short() == item || t.name() == item)
                {
                    Some(&t) => vec![t],
                    None => {
                        return Err(Error::Options(format!(
                            "unknown LoRA target '{item}' (known: {}, or the groups proj, \
                             att, ffn, gen, all)",
                            Self::ALL
                                .iter()
                                .map(|t| t.short())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )))
                    }
                },
            };
            out.extend(group);
        }
        if out.is_empty() {
            return Err(Error::Options("--lora-targets names no target".into()));
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// One adapted matrix: layer, target and the factors `A [r, in]`,
/// `B [out, r]` (row-major).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTensor {
    /// Layer index.
    pub layer: usize,
    /// Which matrix.
    pub target: LoraTarget,
    /// `[r, in]`.
    pub a: Vec<f32>,
    /// `[out, r]`.
    pub b: Vec<f32>,
}

/// A LoRA adapter: rank `r`, `alpha` (the update is scaled by `alpha / r`)
/// and one [`LoraTensor`] per adapted matrix, layer-major, targets in
/// [`LoraTarget::ALL`] order.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAdapter {
    /// Rank r ≥ 1.
    pub rank: usize,
    /// The scale numerator (`alpha / rank` multiplies `B·A`).
    pub alpha: f32,
    /// The adapted matrices.
    pub tensors: Vec<LoraTensor>,
}

/// The name of the `alpha` scalar in an adapter file.
pub const ALPHA_NAME: &str = "lora_alpha";

impl LoraAdapter {
    /// A fresh adapter for `targets` in every layer of `cfg` that has them:
    /// `A` uniform in `±1/√in` (seeded), `B = 0`, so the adapted model starts
    /// equal to the base model.
    pub fn init(
        cfg: &Config,
        rank: usize,
        alpha: f32,
        targets: &[LoraTarget],
        seed: u64,
    ) -> Result<Self> {
        check_rank_alpha(rank, alpha)?;
        let mut rng = Rng::new(seed ^ 0x4c6f_5241);
        let mut targets = targets.to_vec();
        targets.sort();
        targets.dedup();
        let mut tensors = Vec::new();
        for l in 0..cfg.n_layer {
            for &t in targets.iter().filter(|t| t.in_layer(l)) {
                let (out, inp) = t.dims(cfg);
                let bound = 1.0 / (inp as f64).sqrt();
                let a = (0..rank * inp)
                    .map(|_| rng.range(-bound, bound) as f32)
                    .collect();
                tensors.push(LoraTensor {
                    layer: l,
                    target: t,
                    a,
                    b: vec![0.0; out * rank],
                });
            }
        }
        if tensors.is_empty() {
            return Err(Error::Options(
                "the LoRA targets exist in no layer of this model".into(),
            ));
        }
        Ok(LoraAdapter {
            rank,
            alpha,
            tensors,
        })
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// The targets present (sorted, deduplicated).
    pub fn targets(&self) -> Vec<LoraTarget> {
        let mut t: Vec<LoraTarget> = self.tensors.iter().map(|x| x.target).collect();
        t.sort();
        t.dedup();
        t
    }

    /// Trainable parameters (Σ |A| + |B|).
    pub fn n_params(&self) -> usize {
        self.tensors.iter().map(|t| t.a.len() + t.b.len()).sum()
    }

    /// The factors as flat tensors in parameter order (A then B per matrix).
    pub fn params(&self) -> Vec<&[f32]> {
        self.tensors
            .iter()
            .flat_map(|t| [&t.a[..], &t.b[..]])
            .collect()
    }

    /// [`Self::params`], mutable.
    pub fn params_mut(&mut self) -> Vec<&mut [f32]> {
        self.tensors
            .iter_mut()
            .flat_map(|t| [&mut t.a[..], &mut t.b[..]])
            .collect()
    }

    /// Checks ranks, shapes, layers, order and finiteness against `cfg`.
    pub fn check(&self, cfg: &Config) -> Result<()> {
        check_rank_alpha(self.rank, self.alpha)?;
        let r = self.rank;
        let mut last: Option<(usize, LoraTarget)> = None;
        for t in &self.tensors {
            let name = format!("blocks.{}.{}", t.layer, t.target.name());
            if t.layer >= cfg.n_layer || !t.target.in_layer(t.layer) {
                return Err(Error::Tune(format!(
                    "adapter tensor {name}: the model has no such matrix ({} layers)",
                    cfg.n_layer
                )));
            }
            if last.is_some_and(|p| p >= (t.layer, t.target)) {
                return Err(Error::Tune(format!(
                    "adapter tensor {name}: duplicated or out of order"
                )));
            }
            last = Some((t.layer, t.target));
            let (out, inp) = t.target.dims(cfg);
            for (part, v, want) in [("lora_A", &t.a, [r, inp]), ("lora_B", &t.b, [out, r])] {
                if v.len() != want[0] * want[1] {
                    return Err(Error::Shape {
                        name: format!("{name}.{part}"),
                        expected: want.to_vec(),
                        got: vec![v.len()],
                    });
                }
                crate::guard::check_finite(&format!("{name}.{part}"), v)?;
            }
        }
        Ok(())
    }

    /// Writes the adapter as safetensors: `blocks.{l}.{target}.lora_A`
    /// `[r, in]`, `….lora_B` `[out, r]` (the names RWKV-PEFT uses for its
    /// LoRA linears) and the scalar `lora_alpha` `[1]`.
    pub fn save(&self, path: &Path, cfg: &Config) -> Result<()> {
        write_f32(path, &self.tensors_map(cfg)?)
    }

    /// The tensors [`Self::save`] writes.
    pub fn tensors_map(&self, cfg: &Config) -> Result<BTreeMap<String, F32Tensor>> {
        self.check(cfg)?;
        let mut m = BTreeMap::new();
        for t in &self.tensors {
            let (out, inp) = t.target.dims(cfg);
            let base = format!("blocks.{}.{}", t.layer, t.target.name());
            m.insert(
                format!("{base}.lora_A"),
                F32Tensor {
                    shape: vec![self.rank, inp],
                    data: t.a.clone(),
                },
            );
            m.insert(
                format!("{base}.lora_B"),
                F32Tensor {
                    shape: vec![out, self.rank],
                    data: t.b.clone(),
                },
            );
        }
        m.insert(
            ALPHA_NAME.into(),
            F32Tensor {
                shape: vec![1],
                data: vec![self.alpha],
            },
        );
        Ok(m)
    }

    /// Reads an adapter file for a model of `cfg`, refusing unknown names,
    /// a missing half of a pair, ranks that differ between tensors, shapes
    /// that do not fit the model and non-finite values.
    pub fn load(path: &Path, cfg: &Config) -> Result<Self> {
        let m = read_f32(path)
            .map_err(|e| e.context(format!("reading the adapter {}", path.display())))?;
        Self::from_tensors(m, cfg, path)
    }

    /// [`Self::load`] from the tensors of a file (`path` names it in errors).
    pub fn from_tensors(
        mut m: BTreeMap<String, F32Tensor>,
        cfg: &Config,
        path: &Path,
    ) -> Result<Self> {
        let ctx = |e: Error| e.context(format!("reading the adapter {}", path.display()));
        let alpha = match m.remove(ALPHA_NAME) {
            Some(a) if a.data.len() == 1 => a.data[0],
            Some(a) => {
                return Err(ctx(Error::Shape {
                    name: ALPHA_NAME.into(),
                    expected: vec![1],
                    got: a.shape,
                }))
            }
            None => {
                return Err(ctx(Error::MissingTensor(format!(
                    "{ALPHA_NAME} (is this a LoRA adapter file?)"
                ))))
            }
        };
        let mut pairs: BTreeMap<(usize, LoraTarget), (Option<F32Tensor>, Option<F32Tensor>)> =
            BTreeMap::new();
        for (name, t) in m {
            let parsed = split_block_name(&name).and_then(|(l, tname, part)| {
                let tg = LoraTarget::ALL.iter().find(|t| t.name() == tname)?;
                Some((
                    l,
                    *tg,
                    part == "lora_A",
                    part == "lora_A" || part == "lora_B",
                ))
            });
            match parsed {
                Some((l, tg, is_a, true)) => {
                    let e = pairs.entry((l, tg)).or_default();
                    if is_a {
                        e.0 = Some(t);
                    } else {
                        e.1 = Some(t);
                    }
                }
                _ => {
                    return Err(ctx(Error::Tune(format!(
                        "unknown tensor '{name}' in a LoRA adapter (expected \
                         blocks.N.<matrix>.lora_A / lora_B and {ALPHA_NAME})"
                    ))))
                }
            }
        }
        let mut rank = None;
        let mut tensors = Vec::new();
        for ((l, tg), (a, b)) in pairs {
            let base = format!("blocks.{l}.{}", tg.name());
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (a, _) => {
                    let miss = if a.is_none() { "lora_A" } else { "lora_B" };
                    return Err(ctx(Error::MissingTensor(format!("{base}.{miss}"))));
                }
            };
            if a.shape.len() != 2 || b.shape.len() != 2 {
                return Err(ctx(Error::Tune(format!(
                    "{base}: lora_A {:?} and lora_B {:?} must be matrices",
                    a.shape, b.shape
                ))));
            }
            let r = a.shape[0];
            if b.shape[1] != r {
                return Err(ctx(Error::Tune(format!(
                    "{base}: lora_A {:?} has rank {r} but lora_B {:?} has rank {}",
                    a.shape, b.shape, b.shape[1]
                ))));
            }
            if *rank.get_or_insert(r) != r {
                return Err(ctx(Error::Tune(format!(
                    "{base}: rank {r} differs from the adapter's rank {}",
                    rank.unwrap_or(r)
                ))));
            }
            if l < cfg.n_layer && tg.in_layer(l) {
                let (out, inp) = tg.dims(cfg);
                if a.shape[1] != inp || b.shape[0] != out {
                    return Err(ctx(Error::Shape {
                        name: base,
                        expected: vec![out, inp],
                        got: vec![b.shape[0], a.shape[1]],
                    }));
                }
            }
            tensors.push(LoraTensor {
                layer: l,
                target: tg,
                a: a.data,
                b: b.data,
            });
        }
        let ad = LoraAdapter {
            rank: rank.ok_or_else(|| ctx(Error::Tune("the adapter has no LoRA tensor".into())))?,
            alpha,
            tensors,
        };
        ad.check(cfg).map_err(ctx)?;
        Ok(ad)
    }

    /// `(α/r)·B·A` `[out, in]` of one tensor, accumulated in f64.
    pub fn delta(&self, t: &LoraTensor, cfg: &Config) -> Vec<f64> {
        let (out, inp) = t.target.dims(cfg);
        let (r, s) = (self.rank, self.scale() as f64);
        let mut d = vec![0.0f64; out * inp];
        for o in 0..out {
            for q in 0..r {
                let bq = t.b[o * r + q] as f64 * s;
                if bq == 0.0 {
                    continue;
                }
                let a = &t.a[q * inp..(q + 1) * inp];
                for (x, &av) in d[o * inp..(o + 1) * inp].iter_mut().zip(a) {
                    *x += bq * av as f64;
                }
            }
        }
        d
    }

    /// Merges the adapter into `w`: every adapted matrix gets
    /// `+ (α/r)·B·A` (f64 sum, one rounding per entry), transposed for the
    /// input-major generators. After it, the plain model computes what the
    /// adapted one did, up to that rounding.
    pub fn merge_into(&self, w: &mut Weights) -> Result<()> {
        let cfg = w.config.clone();
        self.check(&cfg)?;
        for t in &self.tensors {
            let d = self.delta(t, &cfg);
            let (out, inp) = t.target.dims(&cfg);
            let m = weight_mut(w, t.layer, t.target).ok_or_else(|| {
                Error::Tune(format!(
                    "blocks.{}.{}: the model has no such matrix",
                    t.layer,
                    t.target.name()
                ))
            })?;
            for o in 0..out {
                for i in 0..inp {
                    let at = if t.target.input_major() {
                        i * out + o
                    } else {
                        o * inp + i
                    };
                    m[at] = (m[at] as f64 + d[o * inp + i]) as f32;
                }
            }
        }
        Ok(())
    }
}

/// `blocks.{l}.{tensor}.{part}` → `(l, tensor, part)` (`tensor` may hold
/// dots, `part` may not).
fn split_block_name(name: &str) -> Option<(usize, &str, &str)> {
    let rest = name.strip_prefix("blocks.")?;
    let (l, rest) = rest.split_once('.')?;
    let (tensor, part) = rest.rsplit_once('.')?;
    Some((l.parse().ok()?, tensor, part))
}

fn check_rank_alpha(rank: usize, alpha: f32) -> Result<()> {
    if rank == 0 || rank > 4096 {
        return Err(Error::Options(format!(
            "LoRA rank {rank} (must be 1 … 4096)"
        )));
    }
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(Error::Options(format!(
            "LoRA alpha {alpha} (must be finite and > 0)"
        )));
    }
    Ok(())
}

/// The official tensor of `target` in layer `l` (`None`: absent).
pub fn weight_mut(w: &mut Weights, l: usize, target: LoraTarget) -> Option<&mut Vec<f32>> {
    let b = w.blocks.get_mut(l)?;
    let a = &mut b.att;
    Some(match target {
        LoraTarget::R => &mut a.receptance,
        LoraTarget::K => &mut a.key,
        LoraTarget::V => &mut a.value,
        LoraTarget::O => &mut a.output,
        LoraTarget::FfnKey => &mut b.ffn.key,
        LoraTarget::FfnValue => &mut b.ffn.value,
        LoraTarget::W1 => &mut a.w1,
        LoraTarget::W2 => &mut a.w2,
        LoraTarget::A1 => &mut a.a1,
        LoraTarget::A2 => &mut a.a2,
        LoraTarget::V1 => a.v1.as_mut()?,
        LoraTarget::V2 => a.v2.as_mut()?,
        LoraTarget::G1 => &mut a.g1,
        LoraTarget::G2 => &mut a.g2,
    })
}

/// The tensors sparse dimension tuning trains in a layer (docs/sdt.md), as
/// official names inside the block, in the device's order
/// ([`SdtTensors`](crate::model::layer::SdtTensors)).
pub const SDT_NAMES: [&str; 7] = [
    "att.w0", "att.a0", "att.k_k", "att.k_a", "att.r_k", "att.w2", "att.a2",
];

/// The trained entries of one tensor: official flat indices (row-major in
/// the official layout: `w2`, `a2` are `[d, C]`) and their deltas.
#[derive(Clone, Debug, PartialEq)]
pub struct SparseDelta {
    /// Layer index.
    pub layer: usize,
    /// Which tensor: an index into [`SDT_NAMES`].
    pub param: usize,
    /// Official flat indices, ascending.
    pub index: Vec<u32>,
    /// The deltas, one per index.
    pub value: Vec<f32>,
}

/// The official length of [`SDT_NAMES`]`[k]` in a model of `cfg`.
pub fn sdt_official_len(cfg: &Config, k: usize) -> usize {
    match k {
        5 => cfg.d_w * cfg.n_embd,
        6 => cfg.d_a * cfg.n_embd,
        _ => cfg.n_embd,
    }
}

/// The official flat index of entry `e` of device tensor `k` (`w2` and `a2`
/// are `[C, d]` on the device and `[d, C]` officially).
pub fn sdt_official_index(cfg: &Config, k: usize, e: usize) -> usize {
    let c = cfg.n_embd;
    match k {
        5 => (e % cfg.d_w) * c + e / cfg.d_w,
        6 => (e % cfg.d_a) * c + e / cfg.d_a,
        _ => e,
    }
}

fn sdt_weight_mut(w: &mut Weights, l: usize, k: usize) -> Option<&mut Vec<f32>> {
    let a = &mut w.blocks.get_mut(l)?.att;
    Some(match k {
        0 => &mut a.w0,
        1 => &mut a.a0,
        2 => &mut a.k_k,
        3 => &mut a.k_a,
        4 => &mut a.r_k,
        5 => &mut a.w2,
        6 => &mut a.a2,
        _ => return None,
    })
}

/// What `tune --method lora|sdt|sdlora` writes: LoRA factors and/or sparse
/// deltas of the recurrent module's tensors, in one safetensors file
/// (LoRA names as [`LoraAdapter::save`]; sparse deltas as
/// `blocks.{l}.att.w0.sdt_index` (f32 holding exact integers below 2²⁴)
/// and `….sdt_delta`). Merges exactly: LoRA as [`LoraAdapter::merge_into`],
/// each sparse entry as `w[index] += delta` in f32, the same addition the
/// training applied, so the merged tensor equals the trained one bit for
/// bit.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Adapter {
    /// The LoRA part, if any.
    pub lora: Option<LoraAdapter>,
    /// The sparse deltas, layer-major, tensors in [`SDT_NAMES`] order.
    pub sparse: Vec<SparseDelta>,
    /// State-offset tuning's `S_off` per layer (`[H, N, N]`, value-major;
    /// `blocks.{l}.att.state_offset`, docs/state-offset.md). Not mergeable
    /// into weights.
    pub offset: Option<Vec<Vec<f32>>>,
}

/// The name of layer `l`'s state offset in an adapter file.
pub fn offset_name(l: usize) -> String {
    format!("blocks.{l}.att.state_offset")
}

impl Adapter {
    /// Trainable entries (LoRA factors plus sparse entries).
    pub fn n_params(&self) -> usize {
        self.lora.as_ref().map_or(0, |l| l.n_params())
            + self.sparse.iter().map(|d| d.index.len()).sum::<usize>()
            + self
                .offset
                .as_ref()
                .map_or(0, |o| o.iter().map(|x| x.len()).sum())
    }

    /// Checks every part against `cfg` (indices in range and ascending,
    /// finite values).
    pub fn check(&self, cfg: &Config) -> Result<()> {
        if let Some(l) = &self.lora {
            l.check(cfg)?;
        }
        if let Some(off) = &self.offset {
            let hnn = cfg.n_head * cfg.head_size * cfg.head_size;
            if off.len() != cfg.n_layer || off.iter().any(|x| x.len() != hnn) {
                return Err(Error::Shape {
                    name: "blocks.N.att.state_offset".into(),
                    expected: vec![cfg.n_layer, cfg.n_head, cfg.head_size, cfg.head_size],
                    got: vec![off.len(), off.first().map_or(0, |x| x.len())],
                });
            }
            for (l, x) in off.iter().enumerate() {
                crate::guard::check_finite(&offset_name(l), x)?;
            }
        }
        for d in &self.sparse {
            let name = format!(
                "blocks.{}.{}",
                d.layer,
                SDT_NAMES.get(d.param).copied().unwrap_or("?")
            );
            if d.layer >= cfg.n_layer || d.param >= SDT_NAMES.len() {
                return Err(Error::Tune(format!(
                    "sparse delta {name}: the model has no such tensor"
                )));
            }
            if d.index.len() != d.value.len() {
                return Err(Error::Tune(format!(
                    "sparse delta {name}: {} indices for {} values",
                    d.index.len(),
                    d.value.len()
                )));
            }
            let n = sdt_official_len(cfg, d.param);
            if d.index.windows(2).any(|p| p[0] >= p[1])
                || d.index.last().is_some_and(|&i| i as usize >= n)
            {
                return Err(Error::Tune(format!(
                    "sparse delta {name}: indices must ascend and stay below {n}"
                )));
            }
            crate::guard::check_finite(&format!("{name}.sdt_delta"), &d.value)?;
        }
        Ok(())
    }

    /// Writes the adapter (see [`Adapter`] for the names).
    pub fn save(&self, path: &Path, cfg: &Config) -> Result<()> {
        self.check(cfg)?;
        let mut m = match &self.lora {
            Some(l) => l.tensors_map(cfg)?,
            None => BTreeMap::new(),
        };
        for d in &self.sparse {
            let base = format!("blocks.{}.{}", d.layer, SDT_NAMES[d.param]);
            m.insert(
                format!("{base}.sdt_index"),
                F32Tensor {
                    shape: vec![d.index.len()],
                    data: d.index.iter().map(|&i| i as f32).collect(),
                },
            );
            m.insert(
                format!("{base}.sdt_delta"),
                F32Tensor {
                    shape: vec![d.value.len()],
                    data: d.value.clone(),
                },
            );
        }
        if let Some(off) = &self.offset {
            for (l, x) in off.iter().enumerate() {
                m.insert(
                    offset_name(l),
                    F32Tensor {
                        shape: vec![cfg.n_head, cfg.head_size, cfg.head_size],
                        data: x.clone(),
                    },
                );
            }
        }
        if m.is_empty() {
            return Err(Error::Tune("an empty adapter".into()));
        }
        write_f32(path, &m)
    }

    /// Reads an adapter file for a model of `cfg` (LoRA part, sparse part or
    /// both), refusing what [`LoraAdapter::load`] refuses, unpaired or
    /// out-of-range sparse entries and non-integer indices.
    pub fn load(path: &Path, cfg: &Config) -> Result<Self> {
        let ctx = |e: Error| e.context(format!("reading the adapter {}", path.display()));
        let mut m = read_f32(path).map_err(ctx)?;
        let names: Vec<String> = m
            .keys()
            .filter(|k| k.ends_with(".sdt_index") || k.ends_with(".sdt_delta"))
            .cloned()
            .collect();
        let mut pairs: BTreeMap<(usize, usize), (Option<F32Tensor>, Option<F32Tensor>)> =
            BTreeMap::new();
        for name in names {
            let t = m
                .remove(&name)
                .ok_or_else(|| ctx(Error::Tune("internal".into())))?;
            let parsed = split_block_name(&name).and_then(|(l, tname, part)| {
                let k = SDT_NAMES.iter().position(|n| *n == tname)?;
                Some((l, k, part == "sdt_index"))
            });
            let Some((l, k, is_index)) = parsed else {
                return Err(ctx(Error::Tune(format!(
                    "unknown tensor '{name}' in an adapter (sparse deltas are \
                     blocks.N.att.{{w0,a0,k_k,k_a,r_k,w2,a2}}.sdt_index / sdt_delta)"
                ))));
            };
            let e = pairs.entry((l, k)).or_default();
            if is_index {
                e.0 = Some(t);
            } else {
                e.1 = Some(t);
            }
        }
        let has_offset = (0..cfg.n_layer).any(|l| m.contains_key(&offset_name(l)));
        let offset = if has_offset {
            let mut v = Vec::new();
            for l in 0..cfg.n_layer {
                let t = m.remove(&offset_name(l)).ok_or_else(|| {
                    ctx(Error::MissingTensor(format!(
                        "{} (the adapter has state offsets for some layers only)",
                        offset_name(l)
                    )))
                })?;
                v.push(t.data);
            }
            Some(v)
        } else {
            None
        };
        let mut sparse = Vec::new();
        for ((l, k), (i, v)) in pairs {
            let base = format!("blocks.{l}.{}", SDT_NAMES[k]);
            let (Some(i), Some(v)) = (i, v) else {
                return Err(ctx(Error::MissingTensor(format!(
                    "{base}.sdt_index and {base}.sdt_delta (one of the pair is missing)"
                ))));
            };
            let mut index = Vec::with_capacity(i.data.len());
            for &x in &i.data {
                if !((0.0..16_777_216.0).contains(&x) && x.fract() == 0.0) {
                    return Err(ctx(Error::Tune(format!(
                        "{base}.sdt_index holds {x}, not an index"
                    ))));
                }
                index.push(x as u32);
            }
            sparse.push(SparseDelta {
                layer: l,
                param: k,
                index,
                value: v.data,
            });
        }
        let lora = if m.is_empty() {
            None
        } else {
            Some(LoraAdapter::from_tensors(m, cfg, path)?)
        };
        let ad = Adapter {
            lora,
            sparse,
            offset,
        };
        ad.check(cfg).map_err(ctx)?;
        if ad.lora.is_none() && ad.sparse.is_empty() && ad.offset.is_none() {
            return Err(ctx(Error::Tune("the adapter holds no tensor".into())));
        }
        Ok(ad)
    }

    /// Merges the adapter into `w` (see [`Adapter`]).
    pub fn merge_into(&self, w: &mut Weights) -> Result<()> {
        let cfg = w.config.clone();
        self.check(&cfg)?;
        if self.offset.is_some() {
            return Err(Error::Tune(
                "this adapter holds state offsets (tune --method state-offset): they add \
                 S_off·r_t at every token and cannot be merged into the weights; generate / \
                 eval --adapter run them (docs/state-offset.md)"
                    .into(),
            ));
        }
        if let Some(l) = &self.lora {
            l.merge_into(w)?;
        }
        for d in &self.sparse {
            let t = sdt_weight_mut(w, d.layer, d.param)
                .ok_or_else(|| Error::Tune("sparse delta: no such tensor".into()))?;
            for (&i, &v) in d.index.iter().zip(&d.value) {
                t[i as usize] += v;
            }
        }
        Ok(())
    }
}

/// What [`sdt_select`] returns: the masks per layer (device layout) and
/// the selected key channels per layer.
pub type SdtSelection = (Vec<[Vec<f32>; 7]>, Vec<Vec<usize>>);

/// Sparse dimension tuning's selection (docs/sdt.md): from the warm-up's
/// dense deltas per layer (device order, [`SDT_NAMES`]), the importance of
/// key channel `c` is the sum of squares of every delta entry tied to it
/// (the five vectors at `c`, row `c` of `w2` and `a2`). Per layer, the
/// `heads` fraction of heads with the largest summed importance (at least
/// one) is kept, and in each kept head the `dims` fraction of key
/// dimensions (at least one). Returns the masks (1 = trained), in the
/// device layout of the deltas, and the selected channels per layer.
pub fn sdt_select(
    cfg: &Config,
    deltas: &[[Vec<f32>; 7]],
    heads: f64,
    dims: f64,
) -> Result<SdtSelection> {
    if !(heads > 0.0 && heads <= 1.0 && dims > 0.0 && dims <= 1.0) {
        return Err(Error::Options(format!(
            "SDT fractions: heads {heads}, dims {dims} (each must be in (0, 1])"
        )));
    }
    let (c, h, n) = (cfg.n_embd, cfg.n_head, cfg.head_size);
    let (dw, da) = (cfg.d_w, cfg.d_a);
    let nh = ((heads * h as f64).ceil() as usize).clamp(1, h);
    let nd = ((dims * n as f64).ceil() as usize).clamp(1, n);
    let mut masks = Vec::new();
    let mut chosen = Vec::new();
    for d in deltas {
        let imp: Vec<f64> = (0..c)
            .map(|ch| {
                let sq = |x: f32| (x as f64) * (x as f64);
                (0..5).map(|k| sq(d[k][ch])).sum::<f64>()
                    + d[5][ch * dw..(ch + 1) * dw]
                        .iter()
                        .map(|&x| sq(x))
                        .sum::<f64>()
                    + d[6][ch * da..(ch + 1) * da]
                        .iter()
                        .map(|&x| sq(x))
                        .sum::<f64>()
            })
            .collect();
        let mut order: Vec<usize> = (0..h).collect();
        let score = |hh: usize| imp[hh * n..(hh + 1) * n].iter().sum::<f64>();
        // largest first; ties by index (deterministic)
        order.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
        let mut sel = Vec::new();
        for &hh in &order[..nh] {
            let mut dims_o: Vec<usize> = (0..n).collect();
            dims_o.sort_by(|&a, &b| imp[hh * n + b].total_cmp(&imp[hh * n + a]).then(a.cmp(&b)));
            sel.extend(dims_o[..nd].iter().map(|&i| hh * n + i));
        }
        sel.sort_unstable();
        let mut m: [Vec<f32>; 7] = [
            vec![0.0; c],
            vec![0.0; c],
            vec![0.0; c],
            vec![0.0; c],
            vec![0.0; c],
            vec![0.0; c * dw],
            vec![0.0; c * da],
        ];
        for &ch in &sel {
            for v in m.iter_mut().take(5) {
                v[ch] = 1.0;
            }
            m[5][ch * dw..(ch + 1) * dw].fill(1.0);
            m[6][ch * da..(ch + 1) * da].fill(1.0);
        }
        masks.push(m);
        chosen.push(sel);
    }
    Ok((masks, chosen))
}

/// The sparse deltas of trained `deltas` inside `masks` (device layout),
/// as official indices, for [`Adapter::sparse`].
pub fn sdt_sparse(
    cfg: &Config,
    deltas: &[[Vec<f32>; 7]],
    masks: &[[Vec<f32>; 7]],
) -> Vec<SparseDelta> {
    let mut out = Vec::new();
    for (l, (d, m)) in deltas.iter().zip(masks).enumerate() {
        for k in 0..7 {
            let mut e: Vec<(u32, f32)> = d[k]
                .iter()
                .zip(&m[k])
                .enumerate()
                .filter(|(_, (_, &mk))| mk != 0.0)
                .map(|(i, (&v, _))| (sdt_official_index(cfg, k, i) as u32, v))
                .collect();
            if e.is_empty() {
                continue;
            }
            e.sort_by_key(|p| p.0);
            out.push(SparseDelta {
                layer: l,
                param: k,
                index: e.iter().map(|p| p.0).collect(),
                value: e.iter().map(|p| p.1).collect(),
            });
        }
    }
    out
}
