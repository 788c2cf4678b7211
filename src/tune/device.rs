//! State tuning on a device: the gradient of the initial states and the
//! optimiser step run where the weights live, through [`BackwardOps`]
//! (`CudaOps` on a GPU: the project's kernels and cuBLAS; `EmuOps`: the same
//! kernel source on the CPU emulator; `CpuOps`: the Rust twins).
//!
//! - [`DeviceTuner`] keeps the frozen weights on the device (f32) and
//!   computes loss and state gradients for a batch. Per example it runs the
//!   whole sequence layer by layer, keeps only each layer's input `[T, C]`,
//!   and in the backward recomputes one layer's forward at a time (its
//!   activations are freed after that layer's backward); the WKV kernels
//!   keep their own per-chunk state checkpoints. The head runs in blocks of
//!   [`HEAD_ROWS`] rows so `[T, V]` logits never exist at once. No gradient
//!   of a frozen weight is ever formed: every weight GEMM in the backward is
//!   `dx = dy·W` ([`BackwardOps::matmul_t`]).
//! - [`DeviceEngine`] is the [`Engine`] that holds the tuned tensors and
//!   Adam's moments on the device: clipping (a device sum of squares), Adam
//!   ([`BackwardOps::adam`]) and DBP's `S = S′·R`, `g′ = g·Rᵀ` and
//!   `S′ ← S′(I − ηΔ)⁻¹` ([`BackwardOps::batched_matmul`]) run on the device;
//!   DBP's second moments are summed on the device ([`BackwardOps::outer_acc`])
//!   and only the `N×N`-per-head matrix algebra of the update (`Δ` and its
//!   inverse, f64) runs on the host, once per step.
//!
//! - The kernel-upscaled read-out (docs/upscale.md) is optional: a tuner
//!   made by [`DeviceTuner::new_upscaled`] holds the fixed support vectors
//!   and widths of a [`Kernel`]; each layer's `U` travels with its initial
//!   state ([`LStart::u`]). `y += U φ(r)` runs right after the WKV forward
//!   ([`BackwardOps::up_fwd`]) and its backward right after the WKV
//!   backward ([`BackwardOps::up_bwd`]: `dU`, and `dr` into the receptance
//!   gradient). [`DeviceEngine::new_upscaled`] trains `S_0` and `U` (the
//!   parameter order of [`UpscaledStateOf::params`], so checkpoints are
//!   the same on every backend); without DBP.
//!
//! This is the only tuning engine: on the CPU it runs over `CpuOps` (f32
//! for training, f64 for the finite-difference checks of
//! `tests/tune_grad.rs`, through the host entry points of [`super::grad`]);
//! `tests/tune_device.rs` compares the backends with each other and the
//! optimiser step with a host reference.
use super::data::Dataset;
use super::dbp::{Dbp, DbpStats, MAX_STEP_NORM as DBP_MAX_STEP_NORM};
use super::engine::{check_engine_state, Engine, EngineState, StepOut};
use super::eval::{evaluate_with, EvalResult};
use super::optim::AdamConfig;
use super::state::{
    check_batch, effective_len, Example, GradOpts, HeadVector, TunedState, TunedStateOf,
};
use super::state::{refuse_dbp, Kernel, UpscaledState, UpscaledStateOf};
use crate::error::{Error, Result};
use crate::model::device::upload_emb_ln;
pub use crate::model::layer::LStart;
use crate::model::layer::{
    matmul_buf, matmul_t_buf, upload_layers, BwdWs, DevLayer, FwdWs, Layer, LoraPairs, LoraRef,
    LoraWs, SdtTensors, Tape, UpKernel,
};
use crate::model::lora::{sdt_sparse, Adapter, LoraAdapter, LoraTarget, LoraTensor};
use crate::model::{Config, Model, Weights};
use crate::ops::backward::BackwardOps;
use crate::ops::backward_ref::AdamStep;
use crate::ops::{Ids, LN_EPS};
use crate::real::Real;

/// Rows of the head (`ln_out`, logits, loss) processed at once.
pub const HEAD_ROWS: usize = 128;

/// One layer's weights: every matrix f32 (`[out, in]`) in a plain buffer.
type TLayer<B> = DevLayer<B, B>;

/// What the tuner keeps between the forward and the backward of a step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Recompute {
    /// Every layer's activations (its tape, the WKV checkpoints included)
    /// from the forward to its backward: one WKV forward per layer per
    /// step, the most memory.
    #[default]
    KeepAll,
    /// Only every layer's input; each layer's forward runs again right
    /// before its backward: two WKV forwards per layer per step, one
    /// layer's activations at a time.
    PerLayer,
}

impl Recompute {
    /// `keep` or `layer`.
    pub fn name(self) -> &'static str {
        match self {
            Recompute::KeepAll => "keep",
            Recompute::PerLayer => "layer",
        }
    }
}

impl std::str::FromStr for Recompute {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "keep" | "keep-all" | "all" => Ok(Recompute::KeepAll),
            "layer" | "per-layer" => Ok(Recompute::PerLayer),
            _ => Err(Error::Invalid(format!(
                "unknown recompute policy {s:?} (expected keep or layer)"
            ))),
        }
    }
}

/// What [`DeviceTuner::step_ws`] reports besides the device buffers.
#[derive(Clone, Copy, Debug)]
pub struct StepInfo {
    /// Σ mask over the batch.
    pub n_tokens: f64,
    /// Rows the DBP moments summed (Σ effective lengths).
    pub count: f64,
    /// [`DeviceTuner::plan_bytes`] of the workspace.
    pub peak_bytes: usize,
}

/// The head's temporaries for one block of [`HEAD_ROWS`] rows.
pub struct HeadWs<B> {
    xn: B,
    lg: B,
    lrow: B,
    dxn: B,
}

impl<B> HeadWs<B> {
    /// The buffers for blocks of `hr` rows of width `c` and `v` logits;
    /// with `loss` also the per-row losses and `∂L/∂xn` of the backward
    /// (else one element each: the forward leaves them alone).
    fn new<O: crate::ops::DeviceOps<Buf = B>>(
        o: &O,
        hr: usize,
        c: usize,
        v: usize,
        loss: bool,
    ) -> Result<Self> {
        Ok(HeadWs {
            xn: o.zeros(hr * c)?,
            lg: o.zeros(hr * v)?,
            lrow: o.zeros(if loss { hr } else { 1 })?,
            dxn: o.zeros(if loss { hr * c } else { 1 })?,
        })
    }
}

/// Every device buffer a tuning step uses, allocated once for steps of up
/// to `cap_b` sequences of up to `cap_t` tokens ([`DeviceTuner::workspace`],
/// [`DeviceTuner::fit_ws`]) and reused: after the first step of a shape a
/// step allocates nothing.
pub struct StepWs<B> {
    cap_b: usize,
    cap_t: usize,
    policy: Recompute,
    observer: bool,
    ids: Ids<B>,
    tgt: Ids<B>,
    mask: B,
    soft: Option<B>,
    /// per layer, the initial state the step starts from (`[C]`, `[C]`,
    /// `[H, N, N]`, `U`): written by the caller
    st1: Vec<LStart<B>>,
    /// the same repeated per sequence
    stb: Vec<LStart<B>>,
    /// per layer, the state gradients summed over the batch
    grads: Vec<LStart<B>>,
    /// per layer, the LoRA factors' gradients summed over the batch
    lgrads: Option<Vec<LoraPairs<B>>>,
    /// per layer, the gradients of the SDT tensors summed over the batch
    sgrads: Option<Vec<SdtTensors<B>>>,
    acc: Option<Vec<B>>,
    /// `[2]`: the loss sum, the gradient's sum of squares
    stats: B,
    x: B,
    vf: B,
    dx: B,
    dvf: B,
    xin: Vec<B>,
    tapes: Vec<Tape<B>>,
    fw: FwdWs<B>,
    bw: BwdWs<B>,
    head: HeadWs<B>,
    /// per layer `[H, N, N]`: `g·Rᵀ` under DBP
    dbp_tmp: Option<Vec<B>>,
    /// `[H, N, N]` temporaries of the device DBP update
    dbp_ws: Option<[B; 5]>,
    /// the teacher's buffers (an observer on the device)
    teacher: Option<TeacherWs<B>>,
    /// On a host backend with several threads: one workspace per thread,
    /// each running a contiguous part of the batch; this one then holds
    /// only the states, the summed results and one sequence's buffers.
    parts: Vec<StepWs<B>>,
}

impl<B> StepWs<B> {
    /// The largest batch (sequences, tokens) it fits.
    pub fn capacity(&self) -> (usize, usize) {
        (self.cap_b, self.cap_t)
    }
}

/// The memory check before a workspace is allocated: the planned bytes
/// against what the backend has ([`crate::ops::DeviceOps::check_memory`]).
fn check_plan<O: BackwardOps>(
    t: &DeviceTuner<O>,
    b: usize,
    tt: usize,
    policy: Recompute,
) -> Result<()> {
    let what = format!(
        "a tuning step of {b} × {tt} tokens (--recompute {}; try --recompute layer, a smaller \
         --batch or --ctx)",
        policy.name()
    );
    t.ops
        .check_memory(&what, t.plan_bytes(b, tt, policy) as u64)
}

/// Sequences with a masked position and the longest effective length.
fn batch_shape(batch: &[Example]) -> (usize, usize) {
    batch
        .iter()
        .map(effective_len)
        .filter(|&t| t > 0)
        .fold((0, 0), |(b, t), te| (b + 1, t.max(te)))
}

/// Newton–Schulz iterations of the inverse: with `‖I − M‖∞ ≤ 1/2` (DBP's
/// step clip), the residual `I − M·X` squares every iteration from `I − M`,
/// so 6 iterations leave at most `2^-64` of it: f32 rounding decides.
pub const NEWTON_SCHULZ_ITERS: usize = 6;

/// `x = M⁻¹` per `[N, N]` group by [`NEWTON_SCHULZ_ITERS`] iterations of
/// `X ← X(2I − M X)` from `X = I` (`y`, `a` are scratch).
#[allow(clippy::too_many_arguments)]
pub fn inverse_newton_schulz<O: BackwardOps>(
    o: &O,
    groups: usize,
    n: usize,
    m: &O::Buf,
    x: &mut O::Buf,
    y: &mut O::Buf,
    a: &mut O::Buf,
) -> Result<()> {
    o.eye_axpy(groups, n, 1.0, 0.0, m, x)?;
    for _ in 0..NEWTON_SCHULZ_ITERS {
        o.batched_matmul(groups, n, m, x, false, y)?;
        o.eye_axpy_inplace(groups, n, 2.0, -1.0, y)?;
        o.batched_matmul(groups, n, x, y, false, a)?;
        o.copy(a, 0, x, 0, groups * n * n)?;
    }
    Ok(())
}

/// The fixed part of the kernel-upscaled read-out on the device: per layer
/// the support vectors `[H, M, N]` and widths `[H]` (f32).
struct DevUp<B> {
    m: usize,
    /// State-offset tuning (`φ = r`, M = N): no centres or widths (empty).
    linear: bool,
    centres: Vec<B>,
    gamma: Vec<B>,
}

/// LoRA adapters on the device (docs/lora.md): per layer the factor
/// pairs, indexed by [`LoraTarget::index`]; the branch's scale and dropout;
/// the seed of the current step's dropout masks.
struct DevLora<B> {
    rank: usize,
    alpha: f32,
    keep: f32,
    /// the run's seed; each step's seed is derived from it and the step
    seed0: u32,
    /// the current step's seed
    seed: u32,
    layers: Vec<LoraPairs<B>>,
}

/// The buffers of per-layer factor pairs in parameter order (layer-major,
/// targets in [`LoraTarget::ALL`] order, A then B).
fn pairs_flat<B>(p: &[LoraPairs<B>]) -> Vec<&B> {
    p.iter()
        .flat_map(|l| l.iter().flatten())
        .flat_map(|(a, b)| [a, b])
        .collect()
}

/// [`pairs_flat`], mutable.
fn pairs_flat_mut<B>(p: &mut [LoraPairs<B>]) -> Vec<&mut B> {
    p.iter_mut()
        .flat_map(|l| l.iter_mut().flatten())
        .flat_map(|(a, b)| [a, b])
        .collect()
}

/// Sparse dimension tuning on the device (docs/sdt.md): per layer the
/// pretrained values of the trained tensors ([`SdtTensors`]), their deltas
/// (the parameters) and masks (1 where an entry is trained; `None`: dense,
/// the warm-up). The layer's weights hold `base + delta`, rewritten by
/// [`DeviceTuner::apply_sdt`] before every step.
struct DevSdt<B> {
    base: Vec<SdtTensors<B>>,
    delta: Vec<SdtTensors<B>>,
    mask: Option<Vec<SdtTensors<B>>>,
}

/// Per layer, the seven [`SdtTensors`] gradients as f64 (the finite-difference
/// checks' view).
pub type SdtGrads64 = Vec<Vec<Vec<f64>>>;

/// The lengths of a layer's [`SdtTensors`] in a model of `c`.
pub fn sdt_lens(c: &Config) -> [usize; 7] {
    let e = c.n_embd;
    [e, e, e, e, e, e * c.d_w, e * c.d_a]
}

/// The buffers of per-layer SDT tensors in parameter order.
fn sdt_flat<B>(p: &[SdtTensors<B>]) -> Vec<&B> {
    p.iter().flat_map(|t| t.iter()).collect()
}

/// [`sdt_flat`], mutable.
fn sdt_flat_mut<B>(p: &mut [SdtTensors<B>]) -> Vec<&mut B> {
    p.iter_mut().flat_map(|t| t.iter_mut()).collect()
}

/// The frozen model on a device, for state-gradient computations.
pub struct DeviceTuner<O: BackwardOps> {
    ops: O,
    cfg: Config,
    /// `ln0(emb)` `[V, C]`
    emb_ln: O::Buf,
    layers: Vec<TLayer<O::Buf>>,
    ln_out: (O::Buf, O::Buf),
    /// `[V, C]`
    head: O::Buf,
    /// The kernel of the upscaled read-out, when there is one.
    up: Option<DevUp<O::Buf>>,
    /// What the backward recomputes.
    recompute: Recompute,
    /// The observer, when the soft targets are made in the step.
    teacher: Option<Teacher<O>>,
    /// LoRA adapters (trained by [`DeviceEngine::new_lora`]).
    lora: Option<DevLora<O::Buf>>,
    /// Sparse dimension tuning's deltas (trained by [`DeviceEngine::new_sdt`]).
    sdt: Option<DevSdt<O::Buf>>,
}

/// The observer (teacher) on the tuner's device: a frozen model of the same
/// vocabulary whose logits, soft-maxed at `temperature` on the device
/// ([`BackwardOps::softmax`]), are the soft targets of the step's KL term —
/// no host round trip (docs/observer.md).
struct Teacher<O: BackwardOps> {
    model: Box<DeviceTuner<O>>,
    temperature: f32,
}

/// The teacher's buffers in a [`StepWs`]: its residual stream and `v_first`
/// `[B·T, C_t]`, one tape and forward workspace reused by every layer, a
/// zero initial state per sequence (shared by every layer, read only) and
/// its head block (the logits become the soft targets in place).
pub struct TeacherWs<B> {
    x: B,
    vf: B,
    tape: Tape<B>,
    fw: FwdWs<B>,
    zero: LStart<B>,
    head: HeadWs<B>,
}

/// Loss sum, mask sum and per-layer state gradients of a batch.
pub struct DevGrad<B> {
    /// `[2]` on the device: the loss sum in slot 0 (slot 1 is left 0 for
    /// the engine's gradient sum of squares); [`DevGrad::loss`] downloads it.
    pub stats: B,
    /// Tokens the loss is averaged over.
    pub n_tokens: f64,
    /// Per layer: d/d(att_x), d/d(ffn_x), d/d(wkv), on the device.
    pub grads: Vec<LStart<B>>,
    /// Per layer `[H, N, N]` `Σ r rᵀ` (when asked for) and the vector count.
    pub dbp: Option<(Vec<B>, f64)>,
    /// Per layer the LoRA factors' gradients (a tuner with LoRA).
    pub lora: Option<Vec<LoraPairs<B>>>,
    /// Per layer the SDT tensors' gradients (unmasked; a tuner with SDT).
    pub sdt: Option<Vec<SdtTensors<B>>>,
    /// Bytes of activations the step planned to hold at once
    /// ([`DeviceTuner::plan_bytes`]: computed from the buffer sizes; weights,
    /// the state and the optimiser's moments not included).
    pub peak_bytes: usize,
}

impl<B> DevGrad<B> {
    /// The loss sum (one download of the device scalars).
    pub fn loss<O: BackwardOps<Buf = B>>(&self, ops: &O) -> Result<f64> {
        Ok(ops.download_f64(&self.stats)?[0])
    }
}

impl<O: BackwardOps> DeviceTuner<O> {
    /// Checks the weights and uploads them (f32) to `ops`' device.
    pub fn new(ops: O, w: &Weights) -> Result<Self> {
        w.check()?;
        let cfg = w.config.clone();
        let up = |v: &[f32]| ops.upload(v);
        let emb_ln = upload_emb_ln(&ops, w)?;
        let layers = upload_layers(w, up, up)?;
        let ln_out = (up(&w.ln_out.weight)?, up(&w.ln_out.bias)?);
        let head = up(&w.head)?;
        ops.sync()?;
        Ok(DeviceTuner {
            ops,
            cfg,
            emb_ln,
            layers,
            ln_out,
            head,
            up: None,
            recompute: Recompute::default(),
            teacher: None,
            lora: None,
            sdt: None,
        })
    }

    /// [`Self::new`] plus the kernel of the upscaled read-out (support
    /// vectors and widths, uploaded as f32): every initial state given to
    /// this tuner must then carry its `U` ([`Self::upload_upscaled`]).
    pub fn new_upscaled(ops: O, w: &Weights, kernel: &Kernel) -> Result<Self> {
        kernel.check(&w.config)?;
        let mut t = Self::new(ops, w)?;
        let centres = kernel
            .centres
            .iter()
            .map(|c| t.ops.upload_f64(c))
            .collect::<Result<Vec<_>>>()?;
        let gamma = kernel
            .gamma
            .iter()
            .map(|g| t.ops.upload_f64(g))
            .collect::<Result<Vec<_>>>()?;
        t.ops.sync()?;
        t.up = Some(DevUp {
            m: kernel.m,
            linear: false,
            centres,
            gamma,
        });
        Ok(t)
    }

    /// [`Self::new`] with the state-offset read-out (docs/state-offset.md):
    /// every layer adds `y_t += S_off r_t` per head right after the WKV
    /// forward, `S_off` `[H, N, N]` (value-major) travelling with each
    /// initial state as its `u` (the upscaled read-out's machinery with
    /// `φ = r`, M = N).
    pub fn new_offset(ops: O, w: &Weights) -> Result<Self> {
        let mut t = Self::new(ops, w)?;
        t.up = Some(DevUp {
            m: t.cfg.head_size,
            linear: true,
            centres: Vec::new(),
            gamma: Vec::new(),
        });
        Ok(t)
    }

    /// Whether the read-out is the state offset ([`Self::new_offset`]).
    pub fn is_offset(&self) -> bool {
        self.up.as_ref().is_some_and(|u| u.linear)
    }

    /// The same tuner with recompute policy `r`.
    pub fn with_recompute(mut self, r: Recompute) -> Self {
        self.recompute = r;
        self
    }

    /// The recompute policy.
    pub fn recompute(&self) -> Recompute {
        self.recompute
    }

    /// Makes `teacher` (a plain tuner of the observer model on the same
    /// device) the source of the soft targets: with an observer weight > 0
    /// every step runs the teacher's forward over the batch and soft-maxes
    /// its logits at `temperature` per head block on the device; soft
    /// targets given in the examples are then ignored.
    pub fn set_teacher(&mut self, teacher: DeviceTuner<O>, temperature: f32) -> Result<()> {
        if teacher.cfg.vocab != self.cfg.vocab {
            return Err(Error::Tune(format!(
                "the observer's vocabulary ({}) differs from the model's ({})",
                teacher.cfg.vocab, self.cfg.vocab
            )));
        }
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(Error::Tune(format!(
                "observer temperature {temperature} (must be finite and > 0)"
            )));
        }
        if teacher.up.is_some() || teacher.teacher.is_some() {
            return Err(Error::Tune(
                "the observer must be a plain model (no upscaled read-out, no observer)".into(),
            ));
        }
        self.teacher = Some(Teacher {
            model: Box::new(teacher),
            temperature,
        });
        Ok(())
    }

    /// Attaches the LoRA adapter `ad` (uploaded; its factors become this
    /// tuner's, replacing any earlier adapter): every forward adds the
    /// branches, and a step's backward also returns the factors'
    /// gradients. `dropout` (in [0, 1)) applies to the branch inputs in
    /// training steps only, with masks drawn from `seed` and the step.
    pub fn set_lora(&mut self, ad: &LoraAdapter, dropout: f32, seed: u64) -> Result<()> {
        ad.check(&self.cfg)?;
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::Options(format!(
                "LoRA dropout {dropout} (must be in [0, 1))"
            )));
        }
        if self.up.is_some() {
            return Err(Error::Tune(
                "LoRA on an upscaled tuner is not supported".into(),
            ));
        }
        let mut layers: Vec<LoraPairs<O::Buf>> = (0..self.cfg.n_layer)
            .map(|_| (0..LoraTarget::ALL.len()).map(|_| None).collect())
            .collect();
        for t in &ad.tensors {
            layers[t.layer][t.target.index()] =
                Some((self.ops.upload(&t.a)?, self.ops.upload(&t.b)?));
        }
        let seed0 = (seed ^ (seed >> 32)) as u32;
        self.lora = Some(DevLora {
            rank: ad.rank,
            alpha: ad.alpha,
            keep: 1.0 - dropout,
            seed0,
            seed: seed0,
            layers,
        });
        Ok(())
    }

    /// The attached LoRA adapter, downloaded (`None`: none).
    pub fn lora_adapter(&self) -> Result<Option<LoraAdapter>> {
        let Some(d) = &self.lora else {
            return Ok(None);
        };
        let mut tensors = Vec::new();
        for (l, pairs) in d.layers.iter().enumerate() {
            for (t, p) in LoraTarget::ALL.iter().zip(pairs) {
                if let Some((a, b)) = p {
                    let (out, inp) = t.dims(&self.cfg);
                    let mut a = self.ops.download(a)?;
                    a.truncate(d.rank * inp);
                    let mut b = self.ops.download(b)?;
                    b.truncate(out * d.rank);
                    tensors.push(LoraTensor {
                        layer: l,
                        target: *t,
                        a,
                        b,
                    });
                }
            }
        }
        Ok(Some(LoraAdapter {
            rank: d.rank,
            alpha: d.alpha,
            tensors,
        }))
    }

    /// Starts sparse dimension tuning (docs/sdt.md): the deltas of every
    /// layer's [`SdtTensors`] become trainable, from `init` (per layer, in
    /// [`sdt_lens`] sizes; `None`: zero) and restricted to `masks` (1 =
    /// trained; `None`: dense, as in the warm-up). Entries outside a mask
    /// stay exactly at their pretrained value.
    pub fn set_sdt(
        &mut self,
        init: Option<&[[Vec<f32>; 7]]>,
        masks: Option<&[[Vec<f32>; 7]]>,
    ) -> Result<()> {
        let lens = sdt_lens(&self.cfg);
        let nl = self.cfg.n_layer;
        let check = |what: &str, v: &[[Vec<f32>; 7]]| -> Result<()> {
            if v.len() != nl
                || v.iter()
                    .any(|t| t.iter().zip(&lens).any(|(x, &n)| x.len() != n))
            {
                return Err(Error::Tune(format!(
                    "sparse dimension tuning: {what} of the wrong shape"
                )));
            }
            Ok(())
        };
        if let Some(m) = masks {
            check("masks", m)?;
        }
        if let Some(d) = init {
            check("initial deltas", d)?;
        }
        if self.up.is_some() {
            return Err(Error::Tune(
                "sparse dimension tuning on an upscaled tuner is not supported".into(),
            ));
        }
        let o = &self.ops;
        let mut base = Vec::with_capacity(nl);
        let mut delta = Vec::with_capacity(nl);
        for (l, ly) in self.layers.iter().enumerate() {
            let cp = |b: &O::Buf, n: usize| -> Result<O::Buf> {
                let mut d = o.zeros(n)?;
                o.copy(b, 0, &mut d, 0, n)?;
                Ok(d)
            };
            base.push([
                cp(&ly.w0, lens[0])?,
                cp(&ly.a0, lens[1])?,
                cp(&ly.k_k, lens[2])?,
                cp(&ly.k_a, lens[3])?,
                cp(&ly.r_k, lens[4])?,
                cp(&ly.w2, lens[5])?,
                cp(&ly.a2, lens[6])?,
            ]);
            let z = |i: usize| -> Result<O::Buf> {
                match init {
                    Some(d) => o.upload(&d[l][i]),
                    None => o.zeros(lens[i]),
                }
            };
            delta.push([z(0)?, z(1)?, z(2)?, z(3)?, z(4)?, z(5)?, z(6)?]);
        }
        let mask = match masks {
            Some(m) => Some(
                m.iter()
                    .map(|t| {
                        Ok([
                            o.upload(&t[0])?,
                            o.upload(&t[1])?,
                            o.upload(&t[2])?,
                            o.upload(&t[3])?,
                            o.upload(&t[4])?,
                            o.upload(&t[5])?,
                            o.upload(&t[6])?,
                        ])
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            None => None,
        };
        self.sdt = Some(DevSdt { base, delta, mask });
        self.apply_sdt()
    }

    /// Writes `base + delta` into the layers' weights (sparse dimension
    /// tuning; nothing without it). Outside a mask the delta is exactly 0.
    pub fn apply_sdt(&mut self) -> Result<()> {
        let Some(sd) = &self.sdt else {
            return Ok(());
        };
        let o = &self.ops;
        let lens = sdt_lens(&self.cfg);
        for (l, ly) in self.layers.iter_mut().enumerate() {
            let dst: [&mut O::Buf; 7] = [
                &mut ly.w0,
                &mut ly.a0,
                &mut ly.k_k,
                &mut ly.k_a,
                &mut ly.r_k,
                &mut ly.w2,
                &mut ly.a2,
            ];
            for (i, d) in dst.into_iter().enumerate() {
                o.copy(&sd.base[l][i], 0, d, 0, lens[i])?;
                o.add_n(d, &sd.delta[l][i], lens[i])?;
            }
        }
        Ok(())
    }

    /// The deltas of sparse dimension tuning, downloaded (per layer, in
    /// [`SdtTensors`] order; `None`: not tuning them).
    pub fn sdt_deltas(&self) -> Result<Option<Vec<[Vec<f32>; 7]>>> {
        let Some(sd) = &self.sdt else {
            return Ok(None);
        };
        Ok(Some(self.download_sdt(&sd.delta)?))
    }

    /// Per layer [`SdtTensors`] on the device, downloaded.
    fn download_sdt(&self, t: &[SdtTensors<O::Buf>]) -> Result<Vec<[Vec<f32>; 7]>> {
        let lens = sdt_lens(&self.cfg);
        t.iter()
            .map(|t| {
                let g = |i: usize| -> Result<Vec<f32>> {
                    let mut h = self.ops.download(&t[i])?;
                    h.truncate(lens[i]);
                    Ok(h)
                };
                Ok([g(0)?, g(1)?, g(2)?, g(3)?, g(4)?, g(5)?, g(6)?])
            })
            .collect()
    }

    /// The SDT masks, downloaded (`None`: no SDT, or dense).
    pub fn sdt_masks(&self) -> Result<Option<Vec<[Vec<f32>; 7]>>> {
        let Some(m) = self.sdt.as_ref().and_then(|s| s.mask.as_ref()) else {
            return Ok(None);
        };
        Ok(Some(self.download_sdt(m)?))
    }

    /// Zero gradient buffers for sparse dimension tuning (`None`: off).
    fn sdt_grads(&self) -> Result<Option<Vec<SdtTensors<O::Buf>>>> {
        if self.sdt.is_none() {
            return Ok(None);
        }
        let o = &self.ops;
        let lens = sdt_lens(&self.cfg);
        let g = (0..self.cfg.n_layer)
            .map(|_| {
                Ok([
                    o.zeros(lens[0])?,
                    o.zeros(lens[1])?,
                    o.zeros(lens[2])?,
                    o.zeros(lens[3])?,
                    o.zeros(lens[4])?,
                    o.zeros(lens[5])?,
                    o.zeros(lens[6])?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(g))
    }

    /// Whether a step's backward reads each layer's GEMM inputs from the
    /// forward workspace (LoRA or sparse dimension tuning): then every
    /// layer's forward is recomputed right before its backward.
    fn needs_inputs(&self) -> bool {
        self.lora.is_some() || self.sdt.is_some()
    }

    /// Elements of the LoRA factors (0 without LoRA).
    pub fn lora_params(&self) -> usize {
        self.lora.as_ref().map_or(0, |d| {
            pairs_flat(&d.layers).iter().map(|b| self.ops.len(b)).sum()
        })
    }

    /// The LoRA factors in parameter order, downloaded as f64 (exact on
    /// `CpuOps<f64>`; for the finite-difference checks).
    pub fn lora_params_f64(&self) -> Result<Vec<Vec<f64>>> {
        let Some(d) = &self.lora else {
            return Ok(Vec::new());
        };
        pairs_flat(&d.layers)
            .into_iter()
            .map(|b| self.ops.download_f64(b))
            .collect()
    }

    /// Replaces the LoRA factors (parameter order, f64 uploaded without
    /// rounding on `CpuOps<f64>`).
    pub fn set_lora_params_f64(&mut self, p: &[Vec<f64>]) -> Result<()> {
        let ops = &self.ops;
        let Some(d) = self.lora.as_mut() else {
            return Err(Error::Tune("the tuner has no LoRA adapter".into()));
        };
        let bufs = pairs_flat_mut(&mut d.layers);
        if bufs.len() != p.len() {
            return Err(Error::Tune(format!(
                "{} LoRA tensors given for {}",
                p.len(),
                bufs.len()
            )));
        }
        for (b, h) in bufs.into_iter().zip(p) {
            if ops.len(b) != h.len() {
                return Err(Error::Tune("a LoRA tensor of the wrong size".into()));
            }
            *b = ops.upload_f64(h)?;
        }
        Ok(())
    }

    /// Loss sum, token count and the LoRA factors' gradients (parameter
    /// order, f64) of `batch` from the initial states `st`.
    pub fn loss_and_grad_lora(
        &self,
        st: &[LStart<O::Buf>],
        batch: &[Example],
        o: &GradOpts,
    ) -> Result<(f64, f64, Vec<Vec<f64>>)> {
        let dg = self.grad(st, batch, o, false)?;
        let g = match &dg.lora {
            Some(g) => pairs_flat(g)
                .into_iter()
                .map(|b| self.ops.download_f64(b))
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        Ok((dg.loss(&self.ops)?, dg.n_tokens, g))
    }

    /// Replaces the SDT deltas (per layer in [`SdtTensors`] order, f64
    /// uploaded without rounding on `CpuOps<f64>`) and applies them; for
    /// the finite-difference checks.
    pub fn set_sdt_deltas_f64(&mut self, d: &[Vec<Vec<f64>>]) -> Result<()> {
        let ops = &self.ops;
        let Some(sd) = self.sdt.as_mut() else {
            return Err(Error::Tune("the tuner has no SDT deltas".into()));
        };
        for (dst, src) in sd.delta.iter_mut().zip(d) {
            for (b, h) in dst.iter_mut().zip(src) {
                *b = ops.upload_f64(h)?;
            }
        }
        self.apply_sdt()
    }

    /// Loss sum, token count and the SDT tensors' gradients (per layer, in
    /// [`SdtTensors`] order, f64, unmasked) of `batch` from `st`.
    pub fn loss_and_grad_sdt(
        &self,
        st: &[LStart<O::Buf>],
        batch: &[Example],
        o: &GradOpts,
    ) -> Result<(f64, f64, SdtGrads64)> {
        let dg = self.grad(st, batch, o, false)?;
        let g = match &dg.sdt {
            Some(g) => g
                .iter()
                .map(|t| t.iter().map(|b| self.ops.download_f64(b)).collect())
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        Ok((dg.loss(&self.ops)?, dg.n_tokens, g))
    }

    /// Zero gradient buffers shaped like the LoRA factors (`None`: no LoRA).
    fn lora_grads(&self) -> Result<Option<Vec<LoraPairs<O::Buf>>>> {
        let Some(d) = &self.lora else {
            return Ok(None);
        };
        let o = &self.ops;
        let g = d
            .layers
            .iter()
            .map(|pairs| {
                pairs
                    .iter()
                    .map(|p| match p {
                        Some((a, b)) => Ok(Some((o.zeros(o.len(a))?, o.zeros(o.len(b))?))),
                        None => Ok(None),
                    })
                    .collect::<Result<LoraPairs<O::Buf>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(g))
    }

    /// The forward temporaries for `b × t` (with the LoRA branch's when
    /// adapted).
    fn fwd_ws(&self, b: usize, t: usize) -> Result<FwdWs<O::Buf>> {
        FwdWs::new(&self.ops, &self.cfg, b, t)?.with_lora(
            &self.ops,
            &self.cfg,
            b * t,
            self.lora.as_ref().map(|d| d.rank),
        )
    }

    /// Whether the soft targets come from a teacher on the device.
    pub fn has_teacher(&self) -> bool {
        self.teacher.is_some()
    }

    /// M of the upscaled read-out (`None`: a plain tuner).
    pub fn upscale_m(&self) -> Option<usize> {
        self.up.as_ref().map(|u| u.m)
    }

    /// Elements of one layer's `U` (0 for a plain tuner).
    fn u_len(&self) -> usize {
        self.up
            .as_ref()
            .map_or(0, |u| self.cfg.n_head * self.cfg.head_size * u.m)
    }

    /// The backend.
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// `h` on the device, in the backend's float type (exact for f32 on
    /// every backend and for f64 on `CpuOps<f64>`).
    fn up_real<R: Real>(&self, h: &[R]) -> Result<O::Buf> {
        let h: Vec<f64> = h.iter().map(|v| v.to_f64()).collect();
        self.ops.upload_f64(&h)
    }

    /// The first `n` elements of `b`, downloaded into the host float type.
    fn down_real<R: Real>(&self, b: &O::Buf, dst: &mut [R]) -> Result<()> {
        let h = self.ops.download_f64(b)?;
        for (d, &x) in dst.iter_mut().zip(&h) {
            *d = R::from_f64(x);
        }
        Ok(())
    }

    /// Uploads a tuned state (token-shift states zero when not tuned).
    pub fn upload_state<R: Real>(&self, s: &TunedStateOf<R>) -> Result<Vec<LStart<O::Buf>>> {
        s.check(&self.cfg)?;
        let c = self.cfg.n_embd;
        let zero = vec![R::ZERO; c];
        (0..self.cfg.n_layer)
            .map(|l| {
                Ok(LStart {
                    sa: self.up_real(s.shift_att.as_ref().map_or(&zero, |v| &v[l]))?,
                    sf: self.up_real(s.shift_ffn.as_ref().map_or(&zero, |v| &v[l]))?,
                    wkv: self.up_real(&s.wkv[l])?,
                    u: None,
                })
            })
            .collect()
    }

    /// Uploads an upscaled state (the tuner must have a kernel of the same M).
    pub fn upload_upscaled<R: Real>(&self, s: &UpscaledStateOf<R>) -> Result<Vec<LStart<O::Buf>>> {
        let ul = self.u_len();
        if self.up.is_none() {
            return Err(Error::Tune(
                "an upscaled state given to a device tuner without a kernel \
                 (DeviceTuner::new_upscaled)"
                    .into(),
            ));
        }
        if s.u.len() != self.cfg.n_layer || s.u.iter().any(|x| x.len() != ul) {
            return Err(Error::Shape {
                name: "upscaled.u".into(),
                expected: vec![self.cfg.n_layer, ul],
                got: vec![s.u.len(), s.u.first().map_or(0, |x| x.len())],
            });
        }
        let mut st = self.upload_state(&s.state)?;
        for (l, x) in st.iter_mut().zip(&s.u) {
            l.u = Some(self.up_real(x)?);
        }
        Ok(st)
    }

    /// Layer `l` bound to this tuner's backend, f32 weights and kernel
    /// (LoRA dropout off).
    fn layer(&self, l: usize) -> Layer<'_, O, O::Buf> {
        self.layer_t(l, false, 0)
    }

    /// Layer `l`; `train` turns LoRA dropout on; `seq0` is the batch index
    /// of the first sequence it runs (for the dropout masks).
    fn layer_t(&self, l: usize, train: bool, seq0: usize) -> Layer<'_, O, O::Buf> {
        Layer {
            ops: &self.ops,
            cfg: &self.cfg,
            l,
            ly: &self.layers[l],
            mm: matmul_buf::<O>,
            mt: Some(matmul_t_buf::<O>),
            up: self.up.as_ref().map(|u| UpKernel {
                m: u.m,
                linear: u.linear,
                centres: u.centres.get(l),
                gamma: u.gamma.get(l),
            }),
            lora: self.lora.as_ref().map(|d| LoraRef {
                rank: d.rank,
                scale: d.alpha / d.rank as f32,
                keep: if train { d.keep } else { 1.0 },
                seed: d.seed,
                seq0,
                ab: &d.layers[l],
            }),
        }
    }

    /// Bytes of one layer's tape at `rows` rows (for the memory plan),
    /// the WKV checkpoints of `b` sequences of `t` tokens included.
    fn tape_bytes(&self, b: usize, t: usize) -> usize {
        Tape::<O::Buf>::bytes(&self.ops, &self.cfg, b, t, self.up.as_ref().map(|u| u.m))
    }

    /// Bytes of the forward and backward temporaries of a layer (reused by
    /// every layer): [`FwdWs`] and [`BwdWs`].
    fn work_bytes(&self, b: usize, t: usize) -> usize {
        let c = &self.cfg;
        let rows = b * t;
        let (_, sc) = self.ops.wkv_ws_len(b, t, c.n_head, c.head_size);
        let (cc, f) = (c.n_embd, c.d_ffn);
        let lora = c.d_w + c.d_a + c.d_v + c.d_g;
        let fwd = rows * (15 * cc + f + lora) + 2 * b * cc;
        let bwd =
            rows * (28 * cc + f + lora) + 2 * b * cc + b * c.n_head * c.head_size * c.head_size;
        4 * (fwd + bwd + sc)
    }

    /// The activation memory a step over `b` sequences of `t` tokens holds
    /// under `policy` (bytes: the [`StepWs`] buffers; weights, the tuned
    /// state and the optimiser's moments not included).
    pub fn plan_bytes(&self, b: usize, t: usize, policy: Recompute) -> usize {
        let c = &self.cfg;
        let (nl, rows, v) = (c.n_layer, b * t, c.vocab);
        let hnn = c.n_head * c.head_size * c.head_size;
        // layer inputs, the residual, v_first, dx, dv_first, ids and mask
        let resid = 4 * rows * (c.n_embd * (nl + 4) + 3);
        let states = 4 * (b + 2) * (2 * c.n_embd + hnn + self.u_len()) * nl;
        let head = 4 * HEAD_ROWS.min(rows) * (3 * v + 2 * c.n_embd + 1);
        let tapes = match policy {
            Recompute::KeepAll if !self.needs_inputs() => nl,
            _ => 1,
        } * self.tape_bytes(b, t);
        let lora = self.lora.as_ref().map_or(0, |d| {
            LoraWs::<O::Buf>::bytes(c, rows, d.rank) + 8 * self.lora_params()
        });
        let teacher = self.teacher.as_ref().map_or(0, |tc| {
            let m = &tc.model;
            let ct = m.cfg.n_embd;
            let hnn = m.cfg.n_head * m.cfg.head_size * m.cfg.head_size;
            4 * (2 * rows * ct + b * (2 * ct + hnn) + HEAD_ROWS.min(rows) * (ct + v))
                + m.tape_bytes(b, t)
                + m.work_bytes(b, t)
        });
        resid + states + head + tapes + self.work_bytes(b, t) + teacher + lora
    }

    /// A workspace for steps of up to `b` sequences of up to `t` tokens
    /// (allocated here, once; [`Self::step_ws`] reuses it).
    pub fn workspace(
        &self,
        b: usize,
        t: usize,
        observer: bool,
        dbp: bool,
    ) -> Result<StepWs<O::Buf>> {
        self.workspace_for(b, t, observer, dbp, self.recompute)
    }

    /// [`Self::workspace`] with the tapes of `policy`. On a backend that
    /// runs on host threads ([`crate::ops::DeviceOps::host_parts`] > 1) a
    /// batch of several sequences is split into that many parts, run at
    /// once on the host's threads; their results are summed in part order.
    /// The split depends on the batch only (not on the thread count or the
    /// workspace's capacity), so a step is bit-for-bit the same on any
    /// machine and after a resume.
    fn workspace_for(
        &self,
        b: usize,
        t: usize,
        observer: bool,
        dbp: bool,
        policy: Recompute,
    ) -> Result<StepWs<O::Buf>> {
        let b = b.max(1);
        let g = self.ops.host_parts().min(b);
        if g < 2 {
            return self.alloc_ws(b, t, observer, dbp, policy);
        }
        check_plan(self, b, t.max(1), policy)?;
        let per = b.div_ceil(g);
        let mut ws = self.alloc_ws(1, t, observer, dbp, policy)?;
        ws.cap_b = b;
        ws.parts = (0..g)
            .map(|_| self.alloc_ws(per, t, observer, dbp, policy))
            .collect::<Result<_>>()?;
        Ok(ws)
    }

    /// The buffers of one workspace for `b × t`.
    fn alloc_ws(
        &self,
        b: usize,
        t: usize,
        observer: bool,
        dbp: bool,
        policy: Recompute,
    ) -> Result<StepWs<O::Buf>> {
        let cfg = &self.cfg;
        let (c, h, n, nl, v) = (
            cfg.n_embd,
            cfg.n_head,
            cfg.head_size,
            cfg.n_layer,
            cfg.vocab,
        );
        let (b, t) = (b.max(1), t.max(1));
        check_plan(self, b, t, policy)?;
        let rows = b * t;
        let tc = rows * c;
        let hnn = h * n * n;
        let ul = self.u_len();
        let o = &self.ops;
        let z = |k: usize| o.zeros(k.max(1));
        let has_vres = self.layers.iter().any(|l| l.vres.is_some());
        let m = self.up.as_ref().map(|u| u.m);
        let tape = || Tape::new(o, cfg, b, t, has_vres, m);
        // with LoRA the backward reads each layer's GEMM inputs from the
        // forward workspace, so every layer is recomputed (one tape)
        let n_tapes = match policy {
            Recompute::KeepAll if !self.needs_inputs() => nl,
            _ => 1,
        };
        let lstart = |k: usize| -> Result<LStart<O::Buf>> {
            Ok(LStart {
                sa: z(k * c)?,
                sf: z(k * c)?,
                wkv: z(k * hnn)?,
                u: if ul > 0 { Some(z(ul)?) } else { None },
            })
        };
        let hr = HEAD_ROWS.min(rows);
        Ok(StepWs {
            cap_b: b,
            cap_t: t,
            policy,
            observer,
            ids: o.ids(&vec![0; rows], 1)?,
            tgt: o.ids(&vec![0; rows], 1)?,
            mask: z(rows)?,
            soft: if observer && self.teacher.is_none() {
                Some(z(hr * v)?)
            } else {
                None
            },
            st1: (0..nl).map(|_| lstart(1)).collect::<Result<_>>()?,
            stb: (0..nl).map(|_| lstart(b)).collect::<Result<_>>()?,
            grads: (0..nl).map(|_| lstart(1)).collect::<Result<_>>()?,
            acc: if dbp {
                Some((0..nl).map(|_| z(hnn)).collect::<Result<_>>()?)
            } else {
                None
            },
            stats: z(2)?,
            x: z(tc)?,
            vf: z(tc)?,
            dx: z(tc)?,
            dvf: z(tc)?,
            xin: (0..nl).map(|_| z(tc)).collect::<Result<_>>()?,
            tapes: (0..n_tapes).map(|_| tape()).collect::<Result<_>>()?,
            fw: self.fwd_ws(b, t)?,
            bw: BwdWs::new(o, cfg, b, t)?,
            lgrads: self.lora_grads()?,
            sgrads: self.sdt_grads()?,
            head: HeadWs::new(o, hr, c, v, true)?,
            dbp_tmp: if dbp {
                Some((0..nl).map(|_| z(hnn)).collect::<Result<_>>()?)
            } else {
                None
            },
            dbp_ws: if dbp {
                Some([z(hnn)?, z(hnn)?, z(hnn)?, z(hnn)?, z(hnn)?])
            } else {
                None
            },
            teacher: match (&self.teacher, observer) {
                (Some(tc), true) => Some(tc.model.teacher_ws(b, t)?),
                _ => None,
            },
            parts: Vec::new(),
        })
    }

    /// The buffers of this (teacher) model's forward over `b × t` tokens.
    fn teacher_ws(&self, b: usize, t: usize) -> Result<TeacherWs<O::Buf>> {
        let cfg = &self.cfg;
        let o = &self.ops;
        let (c, v) = (cfg.n_embd, cfg.vocab);
        let hnn = cfg.n_head * cfg.head_size * cfg.head_size;
        let rows = b * t;
        let hr = HEAD_ROWS.min(rows);
        let vres = self.layers.iter().any(|l| l.vres.is_some());
        Ok(TeacherWs {
            x: o.zeros(rows * c)?,
            vf: o.zeros(rows * c)?,
            tape: Tape::new(o, cfg, b, t, vres, None)?,
            fw: FwdWs::new(o, cfg, b, t)?,
            zero: LStart {
                sa: o.zeros(b * c)?,
                sf: o.zeros(b * c)?,
                wkv: o.zeros(b * hnn)?,
                u: None,
            },
            head: HeadWs::new(o, hr, c, v, false)?,
        })
    }

    /// Makes `ws` fit a step of `b` sequences of `t` tokens: kept when it
    /// is large enough and of the same kind, else allocated anew (grown to
    /// the largest shape seen, so a run settles on one workspace).
    pub fn fit_ws(
        &self,
        ws: &mut Option<StepWs<O::Buf>>,
        b: usize,
        t: usize,
        observer: bool,
        dbp: bool,
    ) -> Result<()> {
        let ok = ws.as_ref().is_some_and(|w| {
            w.cap_b >= b
                && w.cap_t >= t
                && w.policy == self.recompute
                && w.observer == observer
                && w.acc.is_some() == dbp
        });
        if !ok {
            let (b0, t0) = ws.as_ref().map_or((0, 0), |w| (w.cap_b, w.cap_t));
            *ws = None; // free before allocating the larger one
            *ws = Some(self.workspace(b.max(b0), t.max(t0), observer, dbp)?);
        }
        Ok(())
    }

    /// Logits `[T, V]` (host) of `tokens` from the initial state `st`:
    /// the forward only, so only a forward's buffers (one tape reused by
    /// every layer, the head's block).
    pub fn logits(&self, st: &[LStart<O::Buf>], tokens: &[u32]) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (c, v) = (cfg.n_embd, cfg.vocab);
        let t = tokens.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        let o = &self.ops;
        let x = self.forward_seq(st, tokens, |_, _| Ok(()))?;
        let mut head = HeadWs::new(o, HEAD_ROWS.min(t), c, v, false)?;
        let mut out = Vec::with_capacity(t * v);
        for r0 in (0..t).step_by(HEAD_ROWS) {
            let rows = HEAD_ROWS.min(t - r0);
            self.head_logits(&x, r0, rows, &mut head)?;
            let hst = o.download(&head.lg)?;
            out.extend_from_slice(&hst[..rows * v]);
        }
        Ok(out)
    }

    /// The forward of one sequence `tokens` (not empty) from the initial
    /// states `st`, with a forward's buffers only (one tape reused by every
    /// layer); `each(l, tape)` sees layer `l`'s tape right after its
    /// forward. Returns the final residual `[T, C]`.
    fn forward_seq(
        &self,
        st: &[LStart<O::Buf>],
        tokens: &[u32],
        mut each: impl FnMut(usize, &Tape<O::Buf>) -> Result<()>,
    ) -> Result<O::Buf> {
        let (cfg, o) = (&self.cfg, &self.ops);
        let (c, t) = (cfg.n_embd, tokens.len());
        let vres = self.layers.iter().any(|l| l.vres.is_some());
        let mut tape = Tape::new(o, cfg, 1, t, vres, self.up.as_ref().map(|u| u.m))?;
        let mut fw = self.fwd_ws(1, t)?;
        let mut x = o.zeros(t * c)?;
        o.embed(tokens, &self.emb_ln, c, &mut x)?;
        let mut vf = o.zeros(t * c)?;
        for (l, s) in st.iter().enumerate() {
            self.layer(l).forward(
                &mut x,
                1,
                t,
                s.view(),
                &mut vf,
                &mut tape,
                &mut fw,
                None,
                None,
            )?;
            each(l, &tape)?;
        }
        Ok(x)
    }

    /// The head on rows `[r0, r0 + rows)` of the final residual `x`:
    /// logits `[rows, V]` into `hw.lg`.
    fn head_logits(
        &self,
        x: &O::Buf,
        r0: usize,
        rows: usize,
        hw: &mut HeadWs<O::Buf>,
    ) -> Result<()> {
        let (c, v) = (self.cfg.n_embd, self.cfg.vocab);
        let o = &self.ops;
        o.layer_norm(
            x,
            r0 * c,
            rows,
            c,
            &self.ln_out.0,
            &self.ln_out.1,
            LN_EPS,
            &mut hw.xn,
        )?;
        o.matmul(&hw.xn, 0, c, rows, &self.head, v, c, &mut hw.lg)
    }

    /// Copies per-layer initial states into `ws.st1` (`U` included).
    fn load_states(&self, ws: &mut StepWs<O::Buf>, st: &[LStart<O::Buf>]) -> Result<()> {
        let c = self.cfg.n_embd;
        let hnn = self.cfg.n_head * self.cfg.head_size * self.cfg.head_size;
        let o = &self.ops;
        for (d, s) in ws.st1.iter_mut().zip(st) {
            o.copy(&s.sa, 0, &mut d.sa, 0, c)?;
            o.copy(&s.sf, 0, &mut d.sf, 0, c)?;
            o.copy(&s.wkv, 0, &mut d.wkv, 0, hnn)?;
            if let (Some(su), Some(du)) = (&s.u, d.u.as_mut()) {
                o.copy(su, 0, du, 0, self.u_len())?;
            }
        }
        Ok(())
    }

    /// `ws.stb` = `ws.st1` repeated for `b` sequences (`U` shared).
    fn broadcast(&self, ws: &mut StepWs<O::Buf>, b: usize) -> Result<()> {
        let c = self.cfg.n_embd;
        let hnn = self.cfg.n_head * self.cfg.head_size * self.cfg.head_size;
        let o = &self.ops;
        for (d, s) in ws.stb.iter_mut().zip(&ws.st1) {
            for i in 0..b {
                o.copy(&s.sa, 0, &mut d.sa, i * c, c)?;
                o.copy(&s.sf, 0, &mut d.sf, i * c, c)?;
                o.copy(&s.wkv, 0, &mut d.wkv, i * hnn, hnn)?;
            }
            if let (Some(su), Some(du)) = (&s.u, d.u.as_mut()) {
                o.copy(su, 0, du, 0, self.u_len())?;
            }
        }
        Ok(())
    }

    /// Loss and state gradients of `batch` from the initial states `st`
    /// (per layer). With `dbp`, also the DBP second moments of r. A
    /// convenience over [`Self::step_ws`] with a fresh workspace.
    pub fn grad(
        &self,
        st: &[LStart<O::Buf>],
        batch: &[Example],
        o: &GradOpts,
        dbp: bool,
    ) -> Result<DevGrad<O::Buf>> {
        self.check_states(st)?;
        check_batch(batch, o, self.cfg.vocab)?;
        let (b, t) = batch_shape(batch);
        let mut ws = self.workspace(b, t, o.observer_weight > 0.0, dbp)?;
        self.load_states(&mut ws, st)?;
        let info = self.step_ws(&mut ws, batch, o)?;
        let StepWs {
            grads,
            lgrads,
            sgrads,
            acc,
            stats,
            ..
        } = ws;
        Ok(DevGrad {
            stats,
            n_tokens: info.n_tokens,
            grads,
            lora: lgrads,
            sdt: sgrads,
            dbp: acc.map(|a| (a, info.count)),
            peak_bytes: info.peak_bytes,
        })
    }

    /// One initial state per layer, each with a `U` exactly when the tuner
    /// has a kernel.
    fn check_states(&self, st: &[LStart<O::Buf>]) -> Result<()> {
        let nl = self.cfg.n_layer;
        if st.len() != nl {
            return Err(Error::Shape {
                name: "initial states".into(),
                expected: vec![nl],
                got: vec![st.len()],
            });
        }
        let ul = self.u_len();
        for (l, s) in st.iter().enumerate() {
            let got = s.u.as_ref().map(|u| self.ops.len(u));
            match (&self.up, got) {
                (None, None) => {}
                (Some(_), Some(len)) if len >= ul => {}
                (None, Some(_)) => {
                    return Err(Error::Tune(format!(
                        "layer {l}: the initial state has a U but the device tuner has no kernel"
                    )))
                }
                (Some(_), got) => {
                    return Err(Error::Shape {
                        name: format!("initial state {l}: u"),
                        expected: vec![ul],
                        got: vec![got.unwrap_or(0)],
                    })
                }
            }
        }
        Ok(())
    }

    /// The step on a workspace: from the states in `ws.st1`, writes the
    /// loss sum into `ws.stats[0]` (slot 1 is zeroed for the caller), the
    /// state gradients into `ws.grads` and, when `ws` has them, the DBP
    /// moments into `ws.acc`. `ws` must fit the batch ([`Self::fit_ws`]).
    ///
    /// The whole batch runs at once: the examples are padded to the longest
    /// effective length `T` (positions after an example's last masked one
    /// cannot change its loss, so they are cut, and padding has mask 0),
    /// every GEMM runs on `[B·T, ·]` rows, the WKV over `B × H` sequences,
    /// the head in blocks of [`HEAD_ROWS`] rows over the batch. The layer
    /// activations are kept for every layer ([`Recompute::KeepAll`]: one
    /// WKV forward per layer) or recomputed one layer at a time in the
    /// backward ([`Recompute::PerLayer`]: two); the WKV backward always
    /// reads the checkpoints of the forward that made its tape. After the
    /// workspace exists nothing is allocated; the host sends the batch
    /// (ids, targets, mask; soft targets per head block) and reads nothing.
    pub fn step_ws(
        &self,
        ws: &mut StepWs<O::Buf>,
        batch: &[Example],
        o: &GradOpts,
    ) -> Result<StepInfo> {
        self.run_ws(ws, batch, o, true, 0)
    }

    /// [`Self::run_ws`] over `ws.parts`: the batch cut into contiguous
    /// pieces of at most a part's capacity in live sequences, each part
    /// started from `ws.st1` and run at once, then the loss, the gradients
    /// and the DBP moments summed into `ws` in part order.
    fn run_parts(
        &self,
        ws: &mut StepWs<O::Buf>,
        batch: &[Example],
        o: &GradOpts,
        backward: bool,
        n_tokens: f64,
    ) -> Result<StepInfo> {
        use rayon::prelude::*;
        let ops = &self.ops;
        // from the batch alone: `g` parts of at most `per` live sequences
        let b = batch.iter().filter(|e| effective_len(e) > 0).count();
        let g = self.ops.host_parts().min(b);
        let per = b.div_ceil(g.max(1));
        if g > ws.parts.len() || per > ws.parts[0].cap_b {
            return Err(Error::Tune(
                "internal: the batch does not fit the parts".into(),
            ));
        }
        // cut the batch where a piece has `per` live sequences
        let mut pieces: Vec<&[Example]> = Vec::new();
        let (mut start, mut live) = (0, 0);
        for (i, e) in batch.iter().enumerate() {
            if effective_len(e) > 0 {
                if live == per {
                    pieces.push(&batch[start..i]);
                    (start, live) = (i, 0);
                }
                live += 1;
            }
        }
        pieces.push(&batch[start..]);
        // each piece's first live sequence in the batch (dropout masks)
        let seq0s: Vec<usize> = pieces
            .iter()
            .scan(0, |n, p| {
                let s0 = *n;
                *n += p.iter().filter(|e| effective_len(e) > 0).count();
                Some(s0)
            })
            .collect();
        if pieces.len() > ws.parts.len() {
            return Err(Error::Tune("internal: more batch pieces than parts".into()));
        }
        let StepWs {
            parts,
            st1,
            stats,
            grads,
            lgrads,
            sgrads,
            acc,
            ..
        } = ws;
        for p in parts.iter_mut() {
            self.load_states(p, st1)?;
        }
        let infos = parts
            .par_iter_mut()
            .zip(pieces.par_iter())
            .zip(seq0s.par_iter())
            .map(|((p, piece), &s0)| self.run_ws(p, piece, o, backward, s0))
            .collect::<Result<Vec<StepInfo>>>()?;
        let used = &parts[..infos.len()];
        // the parts' sums, in part order: the loss (slot 0), the state
        // gradients (and U's), the DBP moments
        let sum = |d: &mut O::Buf, src: &mut dyn Iterator<Item = &O::Buf>, n: usize| {
            ops.zero(d)?;
            for s in src {
                ops.add_n(d, s, n)?;
            }
            Ok::<(), Error>(())
        };
        sum(stats, &mut used.iter().map(|p| &p.stats), 1)?;
        if backward {
            for (l, g) in grads.iter_mut().enumerate() {
                let q: Vec<&LStart<O::Buf>> = used.iter().map(|p| &p.grads[l]).collect();
                let n = ops.len(&g.sa);
                sum(&mut g.sa, &mut q.iter().map(|p| &p.sa), n)?;
                let n = ops.len(&g.sf);
                sum(&mut g.sf, &mut q.iter().map(|p| &p.sf), n)?;
                let n = ops.len(&g.wkv);
                sum(&mut g.wkv, &mut q.iter().map(|p| &p.wkv), n)?;
                if let Some(u) = g.u.as_mut() {
                    let n = ops.len(u);
                    sum(u, &mut q.iter().filter_map(|p| p.u.as_ref()), n)?;
                }
            }
        }
        // the LoRA and SDT gradients: tensor i of every part into tensor i
        let sum_flat = |dst: Vec<&mut O::Buf>, parts: &[Vec<&O::Buf>]| {
            for (i, d) in dst.into_iter().enumerate() {
                let n = ops.len(d);
                sum(d, &mut parts.iter().filter_map(|g| g.get(i).copied()), n)?;
            }
            Ok::<(), Error>(())
        };
        if let (true, Some(lg)) = (backward, lgrads.as_mut()) {
            let parts_g: Vec<Vec<&O::Buf>> = used
                .iter()
                .map(|p| p.lgrads.as_ref().map(|g| pairs_flat(g)).unwrap_or_default())
                .collect();
            sum_flat(pairs_flat_mut(lg), &parts_g)?;
        }
        if let (true, Some(sg)) = (backward, sgrads.as_mut()) {
            let parts_g: Vec<Vec<&O::Buf>> = used
                .iter()
                .map(|p| p.sgrads.as_ref().map(|g| sdt_flat(g)).unwrap_or_default())
                .collect();
            sum_flat(sdt_flat_mut(sg), &parts_g)?;
        }
        if let Some(acc) = acc.as_mut() {
            for (l, a) in acc.iter_mut().enumerate() {
                let n = ops.len(a);
                sum(
                    a,
                    &mut used.iter().filter_map(|p| p.acc.as_ref().map(|x| &x[l])),
                    n,
                )?;
            }
        }
        Ok(StepInfo {
            n_tokens,
            count: infos.iter().map(|i| i.count).sum(),
            peak_bytes: infos.iter().map(|i| i.peak_bytes).sum(),
        })
    }

    /// [`Self::step_ws`], or (`backward` false) only the forward and the
    /// loss: `ws.stats[0]` is written, the gradients are left alone.
    fn run_ws(
        &self,
        ws: &mut StepWs<O::Buf>,
        batch: &[Example],
        o: &GradOpts,
        backward: bool,
        seq0: usize,
    ) -> Result<StepInfo> {
        let cfg = &self.cfg;
        let (c, nl, v) = (cfg.n_embd, cfg.n_layer, cfg.vocab);
        check_batch(batch, o, v)?;
        let ops = &self.ops;
        let n_tokens: f64 = batch
            .iter()
            .flat_map(|e| e.mask.iter())
            .map(|&m| m as f64)
            .sum();
        // the examples that have a masked position, padded to the longest
        let live: Vec<(&Example, usize)> = batch
            .iter()
            .map(|e| (e, effective_len(e)))
            .filter(|&(_, te)| te > 0)
            .collect();
        let (b, t) = (
            live.len(),
            live.iter().map(|&(_, te)| te).max().unwrap_or(0),
        );
        let lam = o.observer_weight;
        let no_soft = ws.soft.is_none() && ws.teacher.is_none();
        if b > ws.cap_b || t > ws.cap_t || (lam > 0.0 && no_soft) {
            return Err(Error::Tune(format!(
                "internal: a workspace for {}×{} used for a batch of {b}×{t}",
                ws.cap_b, ws.cap_t
            )));
        }
        if b >= 2 && !ws.parts.is_empty() {
            return self.run_parts(ws, batch, o, backward, n_tokens);
        }
        ops.zero(&mut ws.stats)?;
        if let Some(acc) = ws.acc.as_mut() {
            for a in acc.iter_mut() {
                ops.zero(a)?;
            }
        }
        for g in ws.grads.iter_mut() {
            if let Some(u) = g.u.as_mut() {
                ops.zero(u)?;
            }
        }
        if let Some(lg) = ws.lgrads.as_mut() {
            for g in pairs_flat_mut(lg) {
                ops.zero(g)?;
            }
        }
        if let Some(sg) = ws.sgrads.as_mut() {
            for g in sdt_flat_mut(sg) {
                ops.zero(g)?;
            }
        }
        if b == 0 {
            for g in ws.grads.iter_mut() {
                ops.zero(&mut g.sa)?;
                ops.zero(&mut g.sf)?;
                ops.zero(&mut g.wkv)?;
            }
            return Ok(StepInfo {
                n_tokens,
                count: 0.0,
                peak_bytes: 0,
            });
        }
        let lens: Vec<usize> = live.iter().map(|&(_, te)| te).collect();
        let count = lens.iter().sum::<usize>() as f64;
        let rows = b * t;
        let tc = rows * c;
        let cap = ws.ids.len();
        let mut tokens = vec![0u32; cap];
        let mut targets = vec![0u32; cap];
        let mut mask = vec![0f32; cap];
        for (i, &(e, te)) in live.iter().enumerate() {
            tokens[i * t..i * t + te].copy_from_slice(&e.tokens[..te]);
            targets[i * t..i * t + te].copy_from_slice(&e.targets[..te]);
            mask[i * t..i * t + te].copy_from_slice(&e.mask[..te]);
        }
        self.broadcast(ws, b)?;
        let peak_bytes = self.plan_bytes(ws.cap_b, ws.cap_t, self.recompute);
        let StepWs {
            ids,
            tgt,
            mask: mask_d,
            soft,
            stb,
            grads,
            lgrads,
            sgrads,
            acc,
            stats,
            x,
            vf,
            dx,
            dvf,
            xin,
            tapes,
            fw,
            bw,
            head,
            teacher: tws,
            ..
        } = ws;
        ops.write_ids(&tokens, v, ids)?;
        ops.write_ids(&targets, v, tgt)?;
        ops.write(&mask, mask_d)?;
        // with LoRA every layer is recomputed before its backward (the
        // backward reads the GEMM inputs from the forward workspace)
        let keep = tapes.len() == nl && !self.needs_inputs();
        // forward: keep every layer's input (and, under KeepAll, its tape)
        ops.embed_ids(ids, &self.emb_ln, c, x)?;
        for (l, s) in stb.iter().enumerate() {
            ops.copy(x, 0, &mut xin[l], 0, tc)?;
            let a = acc.as_mut().map(|a| (&mut a[l], &lens[..]));
            let tp = &mut tapes[if keep { l } else { 0 }];
            self.layer_t(l, backward, seq0)
                .forward(x, b, t, s.view(), vf, tp, fw, a, None)?;
        }
        // the teacher's forward over the same batch, from its zero state
        let teacher = match (&self.teacher, tws.as_mut()) {
            (Some(tc), Some(tw)) if lam > 0.0 => {
                let m = &tc.model;
                let ct = m.cfg.n_embd;
                ops.embed_ids(ids, &m.emb_ln, ct, &mut tw.x)?;
                for l in 0..m.cfg.n_layer {
                    m.layer(l).forward(
                        &mut tw.x,
                        b,
                        t,
                        tw.zero.view(),
                        &mut tw.vf,
                        &mut tw.tape,
                        &mut tw.fw,
                        None,
                        None,
                    )?;
                }
                Some((tc, tw))
            }
            _ => None,
        };
        // head: loss (summed on the device) and ∂L/∂x, in row blocks over
        // the batch
        ops.zero(dx)?;
        let mut soft_h = Vec::new();
        let mut teacher = teacher;
        for r0 in (0..rows).step_by(HEAD_ROWS) {
            let nr = HEAD_ROWS.min(rows - r0);
            self.head_logits(x, r0, nr, head)?;
            let sb = match (lam > 0.0, soft.as_mut(), teacher.as_mut()) {
                (true, _, Some((tc, tw))) => {
                    // the teacher's logits of these rows, soft-maxed in place
                    tc.model.head_logits(&tw.x, r0, nr, &mut tw.head)?;
                    ops.softmax(nr, v, tc.temperature, &mut tw.head.lg)?;
                    Some(&tw.head.lg)
                }
                (true, Some(sb), None) => {
                    soft_h.clear();
                    soft_h.resize(nr * v, 0.0);
                    for (j, row) in soft_h.chunks_mut(v).enumerate() {
                        let (i, p) = ((r0 + j) / t, (r0 + j) % t);
                        if let (Some(s), true) = (&live[i].0.soft, p < lens[i]) {
                            row.copy_from_slice(&s[p * v..(p + 1) * v]);
                        }
                    }
                    ops.write(&soft_h, sb)?;
                    Some(&*sb)
                }
                _ => None,
            };
            ops.xent_ids(
                r0,
                nr,
                v,
                &mut head.lg,
                tgt,
                mask_d,
                sb,
                lam,
                &mut head.lrow,
            )?;
            ops.reduce_acc(false, nr, &head.lrow, stats, 0)?;
            if !backward {
                continue;
            }
            ops.matmul_t(&head.lg, nr, &self.head, v, c, &mut head.dxn)?;
            ops.layer_norm_bwd(x, r0 * c, nr, c, &self.ln_out.0, LN_EPS, &head.dxn, dx)?;
        }
        if !backward {
            return Ok(StepInfo {
                n_tokens,
                count,
                peak_bytes,
            });
        }
        // backward, last layer first (recomputing the layer under PerLayer)
        ops.zero(dvf)?;
        for l in (0..nl).rev() {
            let tp = if keep {
                &mut tapes[l]
            } else {
                let tp = &mut tapes[0];
                // the forward again from the layer's input (x is free now)
                ops.copy(&xin[l], 0, x, 0, tc)?;
                self.layer_t(l, true, seq0).forward(
                    x,
                    b,
                    t,
                    stb[l].view(),
                    vf,
                    tp,
                    fw,
                    None,
                    None,
                )?;
                tp
            };
            self.layer_t(l, true, seq0).backward(
                tp,
                &xin[l],
                stb[l].view(),
                vf,
                dx,
                b,
                t,
                dvf,
                &mut grads[l],
                bw,
                fw,
                lgrads.as_mut().map(|g| &mut g[l]),
                sgrads.as_mut().map(|g| &mut g[l]),
            )?;
        }
        Ok(StepInfo {
            n_tokens,
            count,
            peak_bytes,
        })
    }

    /// Host convenience: loss, token count and the gradient of a host
    /// tuned state (layout of `s`), plus DBP statistics when asked for.
    #[allow(clippy::type_complexity)]
    pub fn loss_and_grad<R: Real>(
        &self,
        s: &TunedStateOf<R>,
        batch: &[Example],
        o: &GradOpts,
        dbp: bool,
    ) -> Result<(f64, f64, TunedStateOf<R>, Option<DbpStats>, usize)> {
        let st = self.upload_state(s)?;
        let dg = self.grad(&st, batch, o, dbp)?;
        let mut g = s.zeros_like();
        self.download_grads(&dg, &mut g, None)?;
        let stats = match &dg.dbp {
            Some((acc, count)) => Some(self.stats(acc, *count)?),
            None => None,
        };
        Ok((dg.loss(&self.ops)?, dg.n_tokens, g, stats, dg.peak_bytes))
    }

    /// Host convenience for the upscaled read-out: loss, token count, the
    /// gradient of `S_0` and `U` (layout of `s`) and the peak activation
    /// bytes. The tuner must have a kernel ([`Self::new_upscaled`]).
    pub fn loss_and_grad_upscaled<R: Real>(
        &self,
        s: &UpscaledStateOf<R>,
        batch: &[Example],
        o: &GradOpts,
    ) -> Result<(f64, f64, UpscaledStateOf<R>, usize)> {
        let st = self.upload_upscaled(s)?;
        let dg = self.grad(&st, batch, o, false)?;
        let mut g = s.zeros_like();
        self.download_grads(&dg, &mut g.state, Some(&mut g.u))?;
        Ok((dg.loss(&self.ops)?, dg.n_tokens, g, dg.peak_bytes))
    }

    /// The state gradients of `dg` into `g` (and the `U` gradients into `u`).
    fn download_grads<R: Real>(
        &self,
        dg: &DevGrad<O::Buf>,
        g: &mut TunedStateOf<R>,
        mut u: Option<&mut Vec<Vec<R>>>,
    ) -> Result<()> {
        for (l, gl) in dg.grads.iter().enumerate() {
            self.down_real(&gl.wkv, &mut g.wkv[l])?;
            if let Some(a) = g.shift_att.as_mut() {
                self.down_real(&gl.sa, &mut a[l])?;
            }
            if let Some(f) = g.shift_ffn.as_mut() {
                self.down_real(&gl.sf, &mut f[l])?;
            }
            if let (Some(du), Some(u)) = (&gl.u, u.as_deref_mut()) {
                self.down_real(du, &mut u[l])?;
            }
        }
        Ok(())
    }

    /// `(Σ loss, Σ mask)` of `batch` from the initial states `st`: the
    /// forward and the head only (no backward, one tape reused by every
    /// layer).
    pub fn loss_only_dev(
        &self,
        st: &[LStart<O::Buf>],
        batch: &[Example],
        o: &GradOpts,
    ) -> Result<(f64, f64)> {
        self.check_states(st)?;
        check_batch(batch, o, self.cfg.vocab)?;
        let (b, t) = batch_shape(batch);
        let mut ws =
            self.workspace_for(b, t, o.observer_weight > 0.0, false, Recompute::PerLayer)?;
        self.load_states(&mut ws, st)?;
        let info = self.run_ws(&mut ws, batch, o, false, 0)?;
        Ok((self.ops.download_f64(&ws.stats)?[0], info.n_tokens))
    }

    /// [`Self::loss_only_dev`] of a host tuned state.
    pub fn loss_only<R: Real>(
        &self,
        s: &TunedStateOf<R>,
        batch: &[Example],
        o: &GradOpts,
    ) -> Result<(f64, f64)> {
        self.loss_only_dev(&self.upload_state(s)?, batch, o)
    }

    /// [`Self::loss_only_dev`] of a host upscaled state.
    pub fn loss_only_upscaled<R: Real>(
        &self,
        s: &UpscaledStateOf<R>,
        batch: &[Example],
        o: &GradOpts,
    ) -> Result<(f64, f64)> {
        self.loss_only_dev(&self.upload_upscaled(s)?, batch, o)
    }

    /// The per-head vectors (`[L][H]`, each a flat list of length-N rows)
    /// the model produces at every position of `batch` that can affect the
    /// loss, starting from `st`: the receptances or the keys written into
    /// the state (see [`HeadVector`]). One example at a time.
    pub fn head_inputs(
        &self,
        st: &[LStart<O::Buf>],
        batch: &[Example],
        which: HeadVector,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        self.check_states(st)?;
        check_batch(batch, &GradOpts::default(), self.cfg.vocab)?;
        let cfg = &self.cfg;
        let (c, hh, n) = (cfg.n_embd, cfg.n_head, cfg.head_size);
        let o = &self.ops;
        let mut out = vec![vec![Vec::new(); hh]; cfg.n_layer];
        for ex in batch {
            let t = effective_len(ex);
            if t == 0 {
                continue;
            }
            self.forward_seq(st, &ex.tokens[..t], |l, tape| {
                let src = o.download(match which {
                    HeadVector::Receptance => &tape.r,
                    HeadVector::Key => &tape.kt,
                })?;
                for tt in 0..t {
                    for (h, dst) in out[l].iter_mut().enumerate() {
                        let off = tt * c + h * n;
                        dst.extend_from_slice(&src[off..off + n]);
                    }
                }
                Ok(())
            })?;
        }
        Ok(out)
    }

    fn stats(&self, acc: &[O::Buf], count: f64) -> Result<DbpStats> {
        let cfg = &self.cfg;
        let hnn = cfg.n_head * cfg.head_size * cfg.head_size;
        let mut s = DbpStats::zeros(cfg.n_layer, cfg.n_head, cfg.head_size);
        for (l, a) in acc.iter().enumerate() {
            self.down_real(a, &mut s.second_moment[l * hnn..(l + 1) * hnn])?;
        }
        s.count = count;
        Ok(s)
    }
}

/// The [`Engine`] on a device: tuned tensors (in [`TunedState::params`]
/// order, then every layer's `U` when upscaled: [`UpscaledStateOf::params`]),
/// Adam's moments and the DBP matrices live on the device.
pub struct DeviceEngine<O: BackwardOps> {
    tuner: DeviceTuner<O>,
    opts: GradOpts,
    adam: AdamConfig,
    with_shift: bool,
    /// Tensors of the plain state at the front of `params` (the `U`s follow).
    n_state: usize,
    params: Vec<O::Buf>,
    m: Vec<O::Buf>,
    v: Vec<O::Buf>,
    t: u64,
    sizes: Vec<usize>,
    /// Host f64 matrices (the master copy) and their f32 device copy per layer.
    dbp: Option<(Dbp, Vec<O::Buf>)>,
    /// Peak activation bytes of the last step.
    pub last_peak_bytes: usize,
    /// The step's device buffers, kept between steps ([`StepWs`]).
    ws: Option<StepWs<O::Buf>>,
}

impl<O: BackwardOps> DeviceEngine<O> {
    /// Uploads the model and the starting state `init` to `ops`' device.
    pub fn new(
        ops: O,
        w: &Weights,
        init: &TunedState,
        adam: AdamConfig,
        dbp: Option<(f64, f64)>,
        opts: GradOpts,
    ) -> Result<Self> {
        let tuner = DeviceTuner::new(ops, w)?;
        init.check(tuner.config())?;
        Self::build(tuner, w, init, &init.params(), adam, dbp, opts)
    }

    /// The engine of the kernel-upscaled state (docs/upscale.md): uploads
    /// the model, `kernel` and the starting `S_0` and `U` of `init`, and
    /// trains both (the recipe of the plain engine, on the
    /// device). `dbp` must be `None`: DBP on the upscaled state is not
    /// supported (an [`Error::Tune`]).
    pub fn new_upscaled(
        ops: O,
        w: &Weights,
        kernel: &Kernel,
        init: &UpscaledState,
        adam: AdamConfig,
        dbp: Option<(f64, f64)>,
        opts: GradOpts,
    ) -> Result<Self> {
        refuse_dbp(dbp)?;
        let tuner = DeviceTuner::new_upscaled(ops, w, kernel)?;
        init.state.check(tuner.config())?;
        let ul = tuner.u_len();
        if init.u.len() != tuner.config().n_layer || init.u.iter().any(|x| x.len() != ul) {
            return Err(Error::Shape {
                name: "upscaled.u".into(),
                expected: vec![tuner.config().n_layer, ul],
                got: vec![init.u.len(), init.u.first().map_or(0, |x| x.len())],
            });
        }
        Self::build(tuner, w, &init.state, &init.params(), adam, None, opts)
    }

    /// The LoRA engine (docs/lora.md): uploads the model and the adapter
    /// `ad` and trains its factors (every other weight frozen, the initial
    /// state zero, no DBP). `dropout` applies to the branch inputs in
    /// training steps, with masks from `seed` and the step number (so a
    /// resumed run draws the same masks).
    #[allow(clippy::too_many_arguments)]
    pub fn new_lora(
        ops: O,
        w: &Weights,
        ad: &LoraAdapter,
        dropout: f32,
        seed: u64,
        adam: AdamConfig,
        opts: GradOpts,
    ) -> Result<Self> {
        let mut tuner = DeviceTuner::new(ops, w)?;
        tuner.set_lora(ad, dropout, seed)?;
        let init = TunedState::zeros(tuner.config(), false);
        let mut e = Self::build(tuner, w, &init, &[], adam, None, opts)?;
        e.n_state = 0;
        let o = &e.tuner.ops;
        for p in ad.params() {
            e.sizes.push(p.len());
            e.m.push(o.zeros(p.len())?);
            e.v.push(o.zeros(p.len())?);
        }
        Ok(e)
    }

    /// The state-offset engine (docs/state-offset.md): trains `S_off`
    /// `[H, N, N]` per layer (from `init`, or zero), the offset added to
    /// every token's read-out `y_t += S_off r_t`; the initial state stays
    /// zero, everything else frozen, no DBP.
    pub fn new_offset(
        ops: O,
        w: &Weights,
        init: Option<&[Vec<f32>]>,
        adam: AdamConfig,
        opts: GradOpts,
    ) -> Result<Self> {
        let tuner = DeviceTuner::new_offset(ops, w)?;
        let cfg = tuner.config().clone();
        let hnn = cfg.n_head * cfg.head_size * cfg.head_size;
        let zeros = vec![vec![0.0f32; hnn]; cfg.n_layer];
        let init = init.unwrap_or(&zeros);
        if init.len() != cfg.n_layer || init.iter().any(|x| x.len() != hnn) {
            return Err(Error::Shape {
                name: "state offset".into(),
                expected: vec![cfg.n_layer, hnn],
                got: vec![init.len(), init.first().map_or(0, |x| x.len())],
            });
        }
        let st = TunedState::zeros(&cfg, false);
        let ps: Vec<&[f32]> = init.iter().map(|v| &v[..]).collect();
        let mut e = Self::build(tuner, w, &st, &ps, adam, None, opts)?;
        e.n_state = 0;
        Ok(e)
    }

    /// The trained state offsets (per layer `[H, N, N]`, value-major) of a
    /// state-offset engine.
    pub fn offsets(&self) -> Result<Option<Vec<Vec<f32>>>> {
        if !self.tuner.is_offset() {
            return Ok(None);
        }
        let o = self.tuner.ops();
        let v = self
            .params
            .iter()
            .zip(&self.sizes)
            .map(|(b, &n)| {
                let mut h = o.download(b)?;
                h.truncate(n);
                Ok(h)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(v))
    }

    /// The sparse-dimension-tuning engine (docs/sdt.md): trains the deltas
    /// of every layer's [`SdtTensors`] inside `masks` (`None`: dense, the
    /// warm-up) and, with `lora`, a LoRA adapter with its dropout (SDLoRA);
    /// every other weight frozen, the initial state zero, no DBP.
    #[allow(clippy::too_many_arguments)]
    pub fn new_sdt(
        ops: O,
        w: &Weights,
        masks: Option<&[[Vec<f32>; 7]]>,
        lora: Option<(&LoraAdapter, f32)>,
        seed: u64,
        adam: AdamConfig,
        opts: GradOpts,
    ) -> Result<Self> {
        let mut tuner = DeviceTuner::new(ops, w)?;
        if let Some((ad, dropout)) = lora {
            tuner.set_lora(ad, dropout, seed)?;
        }
        tuner.set_sdt(None, masks)?;
        let init = TunedState::zeros(tuner.config(), false);
        let mut e = Self::build(tuner, w, &init, &[], adam, None, opts)?;
        e.n_state = 0;
        let mut lens: Vec<usize> = lora.map_or(Vec::new(), |(ad, _)| {
            ad.params().iter().map(|p| p.len()).collect()
        });
        let per = sdt_lens(e.tuner.config());
        for _ in 0..e.tuner.config().n_layer {
            lens.extend(per);
        }
        let o = &e.tuner.ops;
        for n in lens {
            e.sizes.push(n);
            e.m.push(o.zeros(n)?);
            e.v.push(o.zeros(n)?);
        }
        Ok(e)
    }

    /// The SDT deltas (per layer, [`SdtTensors`] order; `None`: not an SDT
    /// engine) and whether they were masked.
    pub fn sdt_deltas(&self) -> Result<Option<Vec<[Vec<f32>; 7]>>> {
        self.tuner.sdt_deltas()
    }

    /// Every trained buffer in parameter order: the state's tensors (and
    /// `U`s), then the LoRA factors, then the SDT deltas.
    fn all_params(&self) -> Vec<&O::Buf> {
        let mut p: Vec<&O::Buf> = self.params.iter().collect();
        if let Some(d) = &self.tuner.lora {
            p.extend(pairs_flat(&d.layers));
        }
        if let Some(d) = &self.tuner.sdt {
            p.extend(sdt_flat(&d.delta));
        }
        p
    }

    /// Uploads `params` (the state's tensors, then any `U`s) and zero moments.
    fn build(
        tuner: DeviceTuner<O>,
        w: &Weights,
        init: &TunedState,
        init_params: &[&[f32]],
        adam: AdamConfig,
        dbp: Option<(f64, f64)>,
        opts: GradOpts,
    ) -> Result<Self> {
        let o = tuner.ops();
        let params = init_params
            .iter()
            .map(|p| o.upload(p))
            .collect::<Result<Vec<_>>>()?;
        let sizes: Vec<usize> = init_params.iter().map(|p| p.len()).collect();
        let m = sizes
            .iter()
            .map(|&n| o.zeros(n))
            .collect::<Result<Vec<_>>>()?;
        let v = sizes
            .iter()
            .map(|&n| o.zeros(n))
            .collect::<Result<Vec<_>>>()?;
        let mut e = DeviceEngine {
            with_shift: init.shift_att.is_some(),
            n_state: init.params().len(),
            tuner,
            opts,
            adam,
            params,
            m,
            v,
            t: 0,
            sizes,
            dbp: None,
            last_peak_bytes: 0,
            ws: None,
        };
        if let Some((eta, kappa)) = dbp {
            let d = Dbp::new(&w.config, eta, kappa)?;
            let r = e.upload_r(&d)?;
            e.dbp = Some((d, r));
        }
        Ok(e)
    }

    /// Sets what the backward recomputes (default [`Recompute::KeepAll`]).
    pub fn set_recompute(&mut self, r: Recompute) {
        self.tuner.recompute = r;
    }

    /// The observer on the device ([`DeviceTuner::set_teacher`]): `teacher`
    /// is a plain tuner of the observer model on the same device.
    pub fn set_teacher(&mut self, teacher: DeviceTuner<O>, temperature: f32) -> Result<()> {
        self.tuner.set_teacher(teacher, temperature)?;
        self.ws = None; // the next step allocates the teacher's buffers
        Ok(())
    }

    /// The gradient engine.
    pub fn tuner(&self) -> &DeviceTuner<O> {
        &self.tuner
    }

    /// The trained `S_0` and `U` of an upscaled engine (downloaded), e.g.
    /// for [`super::upscale::save_upscaled`]; an [`Error::Tune`] for a
    /// plain engine.
    pub fn upscaled(&self) -> Result<UpscaledState> {
        if self.tuner.up.is_none() {
            return Err(Error::Tune(
                "the device engine has no upscaled read-out".into(),
            ));
        }
        let o = self.tuner.ops();
        let state = self.tuned()?;
        let u = (self.n_state..self.params.len())
            .map(|i| {
                let mut h = o.download(&self.params[i])?;
                h.truncate(self.sizes[i]);
                Ok(h)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(UpscaledStateOf { state, u })
    }

    fn nl(&self) -> usize {
        self.tuner.config().n_layer
    }

    fn hnn(&self) -> usize {
        let c = self.tuner.config();
        c.n_head * c.head_size * c.head_size
    }

    /// The device's R matrices `[L, H, N, N]` (f64 for the checkpoint).
    fn download_r(&self, r: &[O::Buf]) -> Result<Vec<f64>> {
        let hnn = self.hnn();
        let mut out = Vec::with_capacity(r.len() * hnn);
        for b in r {
            out.extend(
                self.tuner.ops().download(b)?[..hnn]
                    .iter()
                    .map(|&x| x as f64),
            );
        }
        Ok(out)
    }

    fn upload_r(&self, d: &Dbp) -> Result<Vec<O::Buf>> {
        let hnn = self.hnn();
        (0..self.nl())
            .map(|l| {
                let f: Vec<f32> = d.r[l * hnn..(l + 1) * hnn]
                    .iter()
                    .map(|&x| x as f32)
                    .collect();
                self.tuner.ops().upload(&f)
            })
            .collect()
    }

    /// The effective initial states on the device (`S′·R` under DBP).
    fn states(&self) -> Result<Vec<LStart<O::Buf>>> {
        let cfg = self.tuner.config();
        let (c, hnn) = (cfg.n_embd, self.hnn());
        let o = self.tuner.ops();
        let mut st = (0..cfg.n_layer)
            .map(|l| {
                Ok(LStart {
                    sa: o.zeros(c)?,
                    sf: o.zeros(c)?,
                    wkv: o.zeros(hnn)?,
                    u: match (&self.tuner.up, self.sizes.get(self.n_state + l)) {
                        (Some(_), Some(&len)) => Some(o.zeros(len)?),
                        _ => None,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.write_states(&mut st)?;
        Ok(st)
    }

    /// Writes the effective initial states (`S′·R` under DBP; zero shift
    /// states when they are not tuned; every `U`) into `dst`, per layer.
    fn write_states(&self, dst: &mut [LStart<O::Buf>]) -> Result<()> {
        let cfg = self.tuner.config();
        let (c, h, n, nl) = (cfg.n_embd, cfg.n_head, cfg.head_size, cfg.n_layer);
        let o = self.tuner.ops();
        for (l, d) in dst.iter_mut().enumerate().take(nl) {
            if self.n_state == 0 {
                // the state is not trained: the plain model's zero state
                // (and the state offset, when that is what is trained)
                o.zero(&mut d.wkv)?;
                o.zero(&mut d.sa)?;
                o.zero(&mut d.sf)?;
                if let (Some(p), Some(u)) = (self.params.get(l), d.u.as_mut()) {
                    o.copy(p, 0, u, 0, self.sizes[l])?;
                }
                continue;
            }
            match &self.dbp {
                Some((_, r)) => {
                    o.batched_matmul(h, n, &self.params[l], &r[l], false, &mut d.wkv)?
                }
                None => o.copy(&self.params[l], 0, &mut d.wkv, 0, h * n * n)?,
            }
            if self.with_shift {
                o.copy(&self.params[nl + l], 0, &mut d.sa, 0, c)?;
                o.copy(&self.params[2 * nl + l], 0, &mut d.sf, 0, c)?;
            } else {
                o.zero(&mut d.sa)?;
                o.zero(&mut d.sf)?;
            }
            if let (Some(p), Some(u)) = (self.params.get(self.n_state + l), d.u.as_mut()) {
                o.copy(p, 0, u, 0, self.sizes[self.n_state + l])?;
            }
        }
        Ok(())
    }

    /// One optimiser step on the workspace `ws` (fitted to the batch).
    fn step_in(
        &mut self,
        ws: &mut StepWs<O::Buf>,
        batch: &[Example],
        lr: f64,
        clip: f64,
    ) -> Result<StepOut> {
        let cfg = self.tuner.config().clone();
        let (h, n, nl) = (cfg.n_head, cfg.head_size, cfg.n_layer);
        let hnn = h * n * n;
        self.write_states(&mut ws.st1)?;
        if let Some(d) = self.tuner.lora.as_mut() {
            // this step's dropout masks: from the run's seed and the step
            d.seed = crate::ops::backward_ref::lora_hash(d.seed0, (self.t + 1) as u32);
        }
        let o = &self.tuner.ops;
        let info = self.tuner.step_ws(ws, batch, &self.opts)?;
        self.last_peak_bytes = info.peak_bytes;
        // gradients in params order; g′ = g·Rᵀ under DBP
        if let (Some((_, r)), Some(tmp)) = (&self.dbp, ws.dbp_tmp.as_mut()) {
            for l in 0..nl {
                o.batched_matmul(h, n, &ws.grads[l].wkv, &r[l], true, &mut tmp[l])?;
            }
        }
        let mut grads: Vec<&O::Buf> = Vec::with_capacity(self.params.len());
        for l in (0..nl).filter(|_| self.n_state > 0) {
            grads.push(match (&self.dbp, &ws.dbp_tmp) {
                (Some(_), Some(tmp)) => &tmp[l],
                _ => &ws.grads[l].wkv,
            });
        }
        if self.with_shift {
            grads.extend(ws.grads.iter().map(|g| &g.sa));
            grads.extend(ws.grads.iter().map(|g| &g.sf));
        }
        grads.extend(ws.grads.iter().filter_map(|g| g.u.as_ref()));
        if let Some(lg) = ws.lgrads.as_ref() {
            grads.extend(pairs_flat(lg));
        }
        // SDT: the gradients masked on the device (outside a mask the delta
        // sees 0 and, with zero moments, Adam leaves it exactly 0)
        if let (Some(sg), Some(sd)) = (ws.sgrads.as_mut(), self.tuner.sdt.as_ref()) {
            if let Some(mask) = &sd.mask {
                for (g, m) in sdt_flat_mut(sg).into_iter().zip(sdt_flat(mask)) {
                    let n = o.len(g);
                    o.mask_mul(n, m, g)?;
                }
            }
        }
        if let Some(sg) = ws.sgrads.as_ref() {
            grads.extend(sdt_flat(sg));
        }
        if grads.len() != self.sizes.len() {
            return Err(Error::Tune(format!(
                "internal: {} gradients for {} parameters",
                grads.len(),
                self.sizes.len()
            )));
        }
        // norm, clipping and Adam on the device: Σ g² into the step's
        // scalars, read there by every Adam launch
        let inv = 1.0 / info.n_tokens.max(1.0);
        let stats = &mut ws.stats;
        for (g, &len) in grads.iter().zip(&self.sizes) {
            o.reduce_acc(true, len, g, stats, 1)?;
        }
        let t = self.t + 1;
        let a = self.adam;
        let s = AdamStep {
            lr: lr as f32,
            beta1: a.beta1 as f32,
            beta2: a.beta2 as f32,
            eps: a.eps as f32,
            weight_decay: a.weight_decay as f32,
            bc1: (1.0 - a.beta1.powi(t as i32)) as f32,
            bc2: (1.0 - a.beta2.powi(t as i32)) as f32,
            grad_scale: inv as f32,
        };
        let mut pbufs: Vec<&mut O::Buf> = self.params.iter_mut().collect();
        if let Some(d) = self.tuner.lora.as_mut() {
            pbufs.extend(pairs_flat_mut(&mut d.layers));
        }
        if let Some(d) = self.tuner.sdt.as_mut() {
            pbufs.extend(sdt_flat_mut(&mut d.delta));
        }
        for (i, (g, p)) in grads.iter().zip(pbufs).enumerate() {
            o.adam_clipped(
                self.sizes[i],
                &s,
                clip as f32,
                stats,
                p,
                g,
                &mut self.m[i],
                &mut self.v[i],
            )?;
        }
        // the step's one download: loss and Σ g²
        let host = o.download(stats)?;
        let (loss, ss) = (host[0] as f64, host[1] as f64);
        let grad_norm = ss.sqrt() * inv;
        // a non-finite norm: the kernels left every parameter unchanged
        super::engine::check_grad_norm(grad_norm)?;
        self.t = t;
        // DBP on the device: Z = R Σxxᵀ Rᵀ, M = I − ηΔ, R ← M R,
        // T = M⁻¹ (Newton–Schulz), S′ ← S′ T (S = S′R unchanged)
        if let (Some((d, r)), Some(acc), Some(dw)) =
            (self.dbp.as_mut(), ws.acc.as_ref(), ws.dbp_ws.as_mut())
        {
            if info.count > 0.0 {
                let [a, bz, m, x, y] = dw;
                let scale = (1.0 / info.count) as f32;
                for l in 0..nl {
                    o.batched_matmul(h, n, &r[l], &acc[l], false, a)?;
                    o.batched_matmul(h, n, a, &r[l], true, bz)?;
                    o.dbp_step(
                        h,
                        n,
                        scale,
                        d.eta as f32,
                        d.kappa as f32,
                        DBP_MAX_STEP_NORM as f32,
                        bz,
                        m,
                    )?;
                    o.batched_matmul(h, n, m, &r[l], false, a)?;
                    o.copy(a, 0, &mut r[l], 0, hnn)?;
                    inverse_newton_schulz(o, h, n, m, x, y, a)?;
                    o.batched_matmul(h, n, &self.params[l], x, false, a)?;
                    o.copy(a, 0, &mut self.params[l], 0, hnn)?;
                }
            }
        }
        o.sync()?;
        // the layers' weights = base + the updated deltas
        self.tuner.apply_sdt()?;
        Ok(StepOut {
            loss_sum: loss,
            n_tokens: info.n_tokens,
            grad_norm,
        })
    }
}

impl<O: BackwardOps> Engine for DeviceEngine<O> {
    fn device(&self) -> &'static str {
        self.tuner.ops().name()
    }
    fn has_teacher(&self) -> bool {
        self.tuner.has_teacher()
    }
    fn sizes(&self) -> Vec<usize> {
        self.sizes.clone()
    }
    fn step(&mut self, batch: &[Example], lr: f64, clip: f64) -> Result<StepOut> {
        check_batch(batch, &self.opts, self.tuner.config().vocab)?;
        let (b, t) = batch_shape(batch);
        let observer = self.opts.observer_weight > 0.0;
        self.tuner
            .fit_ws(&mut self.ws, b, t, observer, self.dbp.is_some())?;
        let mut ws = self
            .ws
            .take()
            .ok_or_else(|| Error::Tune("internal: no workspace".into()))?;
        let out = self.step_in(&mut ws, batch, lr, clip);
        self.ws = Some(ws);
        out
    }
    fn save(&self) -> Result<EngineState> {
        let o = self.tuner.ops();
        let dl = |v: &[&O::Buf]| -> Result<Vec<Vec<f32>>> {
            v.iter()
                .zip(&self.sizes)
                .map(|(b, &n)| {
                    let mut h = o.download(b)?;
                    h.truncate(n);
                    Ok(h)
                })
                .collect()
        };
        Ok(EngineState {
            params: dl(&self.all_params())?,
            adam_m: dl(&self.m.iter().collect::<Vec<_>>())?,
            adam_v: dl(&self.v.iter().collect::<Vec<_>>())?,
            adam_t: self.t,
            dbp_r: match &self.dbp {
                Some((_, r)) => Some(self.download_r(r)?),
                None => None,
            },
        })
    }
    fn load(&mut self, s: EngineState) -> Result<()> {
        check_engine_state(&s, &self.sizes, "the checkpoint")?;
        if self.tuner.up.is_some() && s.dbp_r.is_some() {
            return Err(Error::Tune(
                "the checkpoint holds DBP matrices, but the upscaled state is trained without \
                 DBP"
                .into(),
            ));
        }
        let o = self.tuner.ops();
        let up = |v: &[Vec<f32>]| v.iter().map(|x| o.upload(x)).collect::<Result<Vec<_>>>();
        let (p, m, v) = (up(&s.params)?, up(&s.adam_m)?, up(&s.adam_v)?);
        if let Some((d, _)) = &self.dbp {
            match &s.dbp_r {
                Some(r) if r.len() == d.r.len() => {
                    let mut d = d.clone();
                    d.r = r.clone();
                    let rd = self.upload_r(&d)?;
                    self.dbp = Some((d, rd));
                }
                _ => {
                    return Err(Error::Tune(
                        "the checkpoint lacks the DBP matrices of this run".into(),
                    ))
                }
            }
        }
        let mut p = p;
        let mut rest = p.split_off(self.params.len()).into_iter();
        if let Some(d) = self.tuner.lora.as_mut() {
            for (dst, src) in pairs_flat_mut(&mut d.layers).into_iter().zip(&mut rest) {
                *dst = src;
            }
        }
        if let Some(d) = self.tuner.sdt.as_mut() {
            for (dst, src) in sdt_flat_mut(&mut d.delta).into_iter().zip(&mut rest) {
                *dst = src;
            }
        }
        self.params = p;
        self.m = m;
        self.v = v;
        self.t = s.adam_t;
        self.tuner.apply_sdt()
    }
    fn adapter(&self) -> Result<Option<Adapter>> {
        let lora = self.tuner.lora_adapter()?;
        let sparse = match self.tuner.sdt_deltas()? {
            Some(d) => {
                let masks = match self.tuner.sdt_masks()? {
                    Some(m) => m,
                    None => d
                        .iter()
                        .map(|t| t.clone().map(|v| vec![1.0; v.len()]))
                        .collect(),
                };
                sdt_sparse(self.tuner.config(), &d, &masks)
            }
            None => Vec::new(),
        };
        let offset = self.offsets()?;
        if lora.is_none() && sparse.is_empty() && offset.is_none() {
            return Ok(None);
        }
        Ok(Some(Adapter {
            lora,
            sparse,
            offset,
        }))
    }
    fn tuned(&self) -> Result<TunedState> {
        let cfg = self.tuner.config();
        let mut s = TunedState::zeros(cfg, self.with_shift);
        let o = self.tuner.ops();
        for (dst, (b, &n)) in s
            .params_mut()
            .into_iter()
            .zip(self.params.iter().zip(&self.sizes))
        {
            dst.copy_from_slice(&o.download(b)?[..n]);
        }
        match &self.dbp {
            Some((d, r)) => {
                // R lives on the device (updated there every step)
                let mut d = d.clone();
                d.r = self.download_r(r)?;
                d.effective_state(&s)
            }
            None => Ok(s),
        }
    }
    fn evaluate(&self, model: &Model, ds: &Dataset, max: usize) -> Result<EvalResult> {
        let st = self.states()?;
        evaluate_with(model.config().vocab, ds, max, |toks| {
            self.tuner.logits(&st, toks)
        })
    }
}
