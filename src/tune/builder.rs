//! One builder for a tuning run's engine: where it runs ([`DeviceKind`]: the
//! CPU, the CPU emulator, a GPU) × what it trains (the plain state, with or
//! without DBP, or the kernel-upscaled state) × the observer (a teacher on
//! the same device),
//! all decided from one options struct, [`EngineOptions`].
//!
//! [`EngineBuilder::open`] opens the device first, so a machine without one
//! fails before any other work; [`EngineBuilder::build`] loads the observer
//! and the starting state, fits (or loads) the upscale kernel, settles DBP
//! and builds the engine; the [`Tuning`] it returns runs the loop
//! ([`super::train::train_with`]) and exports the result (the state file, and
//! the upscale sidecar when upscaled). `rwkv-tune tune` is this module behind
//! a command line: progress lines go to the caller's `say`.
use super::device::Recompute;
use crate::ops::counters::Snapshot;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::data::Dataset;
use super::device::{DeviceEngine, DeviceTuner};
use super::engine::Engine;
use super::state::{export_state, from_model_state, TunedState};
use super::train::{train_with, TrainConfig, TrainReport};
use super::upscale::{self, Kernel, UpscaleConfig, UpscaledState};
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::model::lora::{sdt_select, LoraAdapter, LoraTarget};
use crate::model::{Model, State};
use crate::ops::backward::BackwardOps;
use crate::ops::cpu::CpuOps;
use crate::ops::cuda::CudaOps;
use crate::ops::emu::EmuOps;
use crate::wkv7::Version;

/// Where the gradient and the optimiser step run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceKind {
    /// [`DeviceEngine`] on the CPU ([`CpuOps`]: the Rust twins, f32).
    #[default]
    Cpu,
    /// [`DeviceEngine`] on the CPU emulator ([`EmuOps`]): the CUDA kernel
    /// source run on the CPU (slow; for checking the device path).
    Emu,
    /// [`DeviceEngine`] on GPU 0 ([`CudaOps`]).
    Cuda,
}

/// The observer (teacher) of a run: `λ·KL(teacher ‖ student)` on the
/// response tokens: a frozen model on the run's device whose soft-maxed
/// logits are made inside each step ([`DeviceTuner::set_teacher`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ObserverOptions {
    /// The teacher's checkpoint; its vocabulary must equal the model's.
    pub model: PathBuf,
    /// λ, the weight of the KL term.
    pub weight: f32,
    /// Softmax temperature of the teacher's distribution.
    pub temperature: f32,
}

/// LoRA instead of state tuning (docs/lora.md).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraOptions {
    /// Rank r.
    pub rank: usize,
    /// The update is scaled by `alpha / rank`.
    pub alpha: f32,
    /// Dropout on the branch inputs during training.
    pub dropout: f32,
    /// The adapted matrices.
    pub targets: Vec<LoraTarget>,
}

/// Sparse dimension tuning (docs/sdt.md): train the recurrent module's
/// key-indexed tensors (w0, a0, k_k, k_a, r_k and the rows of w2, a2) of
/// selected heads and key dimensions, with LoRA on top when
/// [`EngineOptions::lora`] is set (SDLoRA).
#[derive(Clone, Debug, PartialEq)]
pub struct SdtOptions {
    /// Fraction of heads per layer kept (at least one).
    pub heads: f64,
    /// Fraction of key dimensions per kept head (at least one).
    pub dims: f64,
    /// Steps of the dense warm-up that ranks the entries.
    pub warmup: u64,
    /// Train every entry densely, no warm-up or selection (full tuning of
    /// the recurrent module's tensors: the comparison's baseline).
    pub dense: bool,
}

/// Everything that decides which engine a run gets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineOptions {
    /// Where the step runs.
    pub device: DeviceKind,
    /// WKV kernels of the device engines (a note on the CPU, which has its
    /// own recurrence).
    pub wkv: Version,
    /// DBP `(eta, kappa)` when wanted. The upscaled state trains without DBP
    /// (with a note).
    pub dbp: Option<(f64, f64)>,
    /// The kernel-upscaled state with M ≥ 1 support vectors per head.
    pub upscale: Option<usize>,
    /// Soft targets from a stronger model, if any.
    pub observer: Option<ObserverOptions>,
    /// Start from this state file instead of zeros (with `upscale`: also
    /// from its upscale sidecar when it has one, M must match).
    pub init_state: Option<PathBuf>,
    /// Seed of the upscale kernel's k-means fit.
    pub seed: u64,
    /// What the engine keeps between forward and backward.
    pub recompute: Recompute,
    /// Train LoRA adapters instead of the state (then no DBP, no upscale,
    /// no initial state).
    pub lora: Option<LoraOptions>,
    /// Sparse dimension tuning instead of the state (with `lora`: SDLoRA).
    pub sdt: Option<SdtOptions>,
    /// State-offset tuning instead of the state (docs/state-offset.md).
    pub offset: bool,
}

/// The engine builder: the options and the opened device.
pub struct EngineBuilder {
    opts: EngineOptions,
    gpu: Option<Arc<Gpu>>,
}

impl EngineBuilder {
    /// Opens the device (GPU 0 for [`DeviceKind::Cuda`]; `say` gets its
    /// description) and checks the options.
    pub fn open(opts: EngineOptions, say: &mut dyn FnMut(&str)) -> Result<Self> {
        let gpu = match opts.device {
            DeviceKind::Cuda => {
                let g = Arc::new(Gpu::new(0)?);
                say(&format!("device: {}", g.describe()));
                Some(g)
            }
            DeviceKind::Emu | DeviceKind::Cpu => None,
        };
        if opts.upscale == Some(0) {
            return Err(Error::Options(
                "--upscale M needs M ≥ 1 support vectors per head".into(),
            ));
        }
        Ok(EngineBuilder { opts, gpu })
    }

    /// The options this engine was built from.
    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    /// The GPU opened for [`DeviceKind::Cuda`].
    pub fn gpu(&self) -> Option<&Arc<Gpu>> {
        self.gpu.as_ref()
    }

    /// Everything for one run of `model` on `train` (validation on
    /// `valid`): the observer, the starting state, the upscale kernel and
    /// the engine. Sets `tc.dbp` and `tc.grad.observer_weight` from the
    /// options and adds the starting state and the kernel to `tc.tag` (so a
    /// checkpoint resumes only the same run). `say` gets progress lines and
    /// notes, in order, ending with what will be trained.
    pub fn build<'a>(
        &self,
        model: &'a Model,
        train: &'a Dataset,
        valid: Option<&'a Dataset>,
        mut tc: TrainConfig,
        say: &mut dyn FnMut(&str),
    ) -> Result<Tuning<'a>> {
        let o = &self.opts;
        if train.examples.is_empty() {
            return Err(Error::Options("the training data gave no examples".into()));
        }
        let cfg = model.config().clone();
        let observer = self.observer(model)?;
        tc.grad.observer_weight = match (&observer, &o.observer) {
            (Some(_), Some(ob)) => ob.weight,
            _ => 0.0,
        };
        tc.dbp = None;
        if o.lora.is_some() || o.sdt.is_some() || o.offset {
            return self.build_peft(model, train, valid, tc, observer, say);
        }
        if o.upscale.is_some() {
            if o.dbp.is_some() {
                say(
                    "note: --upscale trains without DBP (DBP on the upscaled state is not \
                     supported); the default --dbp is off for this run",
                );
            }
        } else {
            tc.dbp = o.dbp;
        }
        let init = match &o.init_state {
            Some(p) => {
                let st = State::load(p, &cfg)
                    .map_err(|e| e.context(format!("loading initial state {}", p.display())))?;
                Some(from_model_state(&cfg, &st, false)?)
            }
            None => None,
        };
        if init.is_some() {
            tc.tag += &format!("; init={:?}", o.init_state);
        }
        if let (Some(p), None) = (&o.init_state, o.upscale) {
            let side = upscale::sidecar_path(p);
            if side.is_file() {
                say(&format!(
                    "note: {} (the upscaled part of the initial state) is ignored without \
                     --upscale",
                    side.display()
                ));
            }
        }
        let up = match o.upscale {
            Some(m) => Some(self.prepare_upscale(m, model, train, init.clone(), &mut tc, say)?),
            None => None,
        };
        let hnn = cfg.n_layer * cfg.n_head * cfg.head_size * cfg.head_size;
        let n_params = hnn
            + o.upscale
                .map_or(0, |m| cfg.n_layer * cfg.n_head * cfg.head_size * m);
        let s = &tc.schedule;
        say(&format!(
            "tuning {} state parameters over {} layers: {} train examples ({} target tokens), \
             {} steps × batch {}, lr {} → {} (warm-up {}, {:?})",
            n_params,
            cfg.n_layer,
            train.examples.len(),
            train.n_target_tokens,
            tc.steps,
            tc.batch,
            s.lr,
            s.lr_final,
            s.warmup,
            s.decay
        ));
        if o.device == DeviceKind::Cpu && o.wkv != Version::V1 {
            say("note: --wkv applies to --device cuda|emu; the cpu engine has its own recurrence");
        }

        let w = model.weights();
        let (adam, dbp, grad) = (tc.adam, tc.dbp, tc.grad.clone());
        let tch = observer.as_ref();
        let engine: Box<dyn Built + 'a> = match up {
            Some((kernel, start)) => match o.device {
                DeviceKind::Cpu => {
                    let eng = DeviceEngine::new_upscaled(
                        CpuOps::new(),
                        w,
                        &kernel,
                        &start,
                        adam,
                        dbp,
                        grad,
                    )?;
                    Box::new(on_device(eng, Some(kernel), o.recompute, tch, || {
                        Ok(CpuOps::new())
                    })?)
                }
                DeviceKind::Emu => {
                    let ops = EmuOps::default().with_wkv(o.wkv);
                    let eng = DeviceEngine::new_upscaled(ops, w, &kernel, &start, adam, dbp, grad)?;
                    Box::new(on_device(eng, Some(kernel), o.recompute, tch, || {
                        Ok(EmuOps::default().with_wkv(o.wkv))
                    })?)
                }
                DeviceKind::Cuda => {
                    let eng = DeviceEngine::new_upscaled(
                        self.cuda()?,
                        w,
                        &kernel,
                        &start,
                        adam,
                        dbp,
                        grad,
                    )?;
                    Box::new(on_device(eng, Some(kernel), o.recompute, tch, || {
                        self.cuda()
                    })?)
                }
            },
            None => {
                let start = init.unwrap_or_else(|| TunedState::zeros(&cfg, tc.with_shift));
                match o.device {
                    DeviceKind::Cpu => {
                        let eng = DeviceEngine::new(CpuOps::new(), w, &start, adam, dbp, grad)?;
                        Box::new(on_device(
                            eng,
                            None,
                            o.recompute,
                            tch,
                            || Ok(CpuOps::new()),
                        )?)
                    }
                    DeviceKind::Emu => {
                        let ops = EmuOps::default().with_wkv(o.wkv);
                        let eng = DeviceEngine::new(ops, w, &start, adam, dbp, grad)?;
                        Box::new(on_device(eng, None, o.recompute, tch, || {
                            Ok(EmuOps::default().with_wkv(o.wkv))
                        })?)
                    }
                    DeviceKind::Cuda => {
                        let eng = DeviceEngine::new(self.cuda()?, w, &start, adam, dbp, grad)?;
                        Box::new(on_device(eng, None, o.recompute, tch, || self.cuda())?)
                    }
                }
            }
        };
        Ok(Tuning {
            model,
            train,
            valid,
            engine,
            config: tc,
            n_params,
            upscale: o.upscale,
        })
    }

    /// [`Self::build`] for LoRA, SDT, SDLoRA and the dense recurrent
    /// module: a fresh adapter (seeded by the run's seed) and, for SDT, the
    /// warm-up and selection ([`sdt_engine`]); the state stays zero.
    fn build_peft<'a>(
        &self,
        model: &'a Model,
        train: &'a Dataset,
        valid: Option<&'a Dataset>,
        mut tc: TrainConfig,
        observer: Option<(Model, f32)>,
        say: &mut dyn FnMut(&str),
    ) -> Result<Tuning<'a>> {
        let o = &self.opts;
        if o.upscale.is_some() || o.init_state.is_some() {
            return Err(Error::Options(
                "--upscale and --init-state apply to state tuning, not to --method \
                 lora|sdt|sdlora|recurrent"
                    .into(),
            ));
        }
        if o.dbp.is_some() {
            say("note: DBP applies to state tuning; this method trains without it");
        }
        let cfg = model.config();
        if o.offset && (o.lora.is_some() || o.sdt.is_some()) {
            return Err(Error::Options(
                "state-offset tuning does not combine with LoRA or SDT here".into(),
            ));
        }
        let ad = match &o.lora {
            Some(lo) => Some(LoraAdapter::init(
                cfg,
                lo.rank,
                lo.alpha,
                &lo.targets,
                o.seed,
            )?),
            None => None,
        };
        let dropout = o.lora.as_ref().map_or(0.0, |lo| lo.dropout);
        let mut what = Vec::new();
        if o.offset {
            tc.tag += "; state-offset";
            what.push("the state offset S_off per layer and head (y_t += S_off r_t)".to_string());
        }
        if let (Some(lo), Some(ad)) = (&o.lora, &ad) {
            let names: Vec<&str> = ad.targets().iter().map(|t| t.short()).collect();
            tc.tag += &format!(
                "; lora r={} alpha={} dropout={} targets={}",
                lo.rank,
                lo.alpha,
                lo.dropout,
                names.join(",")
            );
            what.push(format!(
                "LoRA rank {}, alpha {}, dropout {} on {}",
                lo.rank,
                lo.alpha,
                lo.dropout,
                names.join(", ")
            ));
        }
        if let Some(so) = &o.sdt {
            tc.tag += &format!(
                "; sdt heads={} dims={} warmup={} dense={}",
                so.heads, so.dims, so.warmup, so.dense
            );
            what.push(if so.dense {
                "every entry of w0, a0, k_k, k_a, r_k, w2, a2 (dense)".to_string()
            } else {
                format!(
                    "w0, a0, k_k, k_a, r_k, w2, a2 of the top {:.0}% heads × {:.0}% key \
                     dimensions per layer (selected after a {}-step dense warm-up)",
                    100.0 * so.heads,
                    100.0 * so.dims,
                    so.warmup
                )
            });
        }
        let lens = crate::tune::device::sdt_lens(cfg);
        let sdt_dense: usize = lens.iter().sum::<usize>() * cfg.n_layer;
        let s = &tc.schedule;
        let mut counts = Vec::new();
        if o.offset {
            counts.push(format!(
                "{} offset parameters",
                cfg.n_layer * cfg.n_head * cfg.head_size * cfg.head_size
            ));
        }
        if let Some(a) = &ad {
            counts.push(format!("{} LoRA parameters", a.n_params()));
        }
        if o.sdt.is_some() {
            counts.push(format!("up to {sdt_dense} recurrent-module entries"));
        }
        say(&format!(
            "tuning {} (base weights frozen; {}) over {} layers: {} train examples ({} target \
             tokens), {} steps × batch {}, lr {} → {} (warm-up {}, {:?})",
            what.join(" + "),
            counts.join(" + "),
            cfg.n_layer,
            train.examples.len(),
            train.n_target_tokens,
            tc.steps,
            tc.batch,
            s.lr,
            s.lr_final,
            s.warmup,
            s.decay
        ));
        let lora = ad.as_ref().map(|a| (a, dropout));
        let tch = observer.as_ref();
        let rc = o.recompute;
        let (engine, n_params): (Box<dyn Built + 'a>, usize) = match o.device {
            DeviceKind::Cpu => {
                let (e, n) =
                    peft_engine(&|| Ok(CpuOps::new()), model, train, &mut tc, o, lora, say)?;
                (
                    Box::new(on_device(e, None, rc, tch, || Ok(CpuOps::new()))?),
                    n,
                )
            }
            DeviceKind::Emu => {
                let mk = || Ok(EmuOps::default().with_wkv(o.wkv));
                let (e, n) = peft_engine(&mk, model, train, &mut tc, o, lora, say)?;
                (Box::new(on_device(e, None, rc, tch, mk)?), n)
            }
            DeviceKind::Cuda => {
                let mk = || self.cuda();
                let (e, n) = peft_engine(&mk, model, train, &mut tc, o, lora, say)?;
                (Box::new(on_device(e, None, rc, tch, mk)?), n)
            }
        };
        Ok(Tuning {
            model,
            train,
            valid,
            engine,
            config: tc,
            n_params,
            upscale: None,
        })
    }

    /// The device ops of [`DeviceKind::Cuda`] with the chosen WKV kernels.
    fn cuda(&self) -> Result<CudaOps> {
        let gpu = self
            .gpu
            .clone()
            .ok_or_else(|| Error::Tune("internal: no GPU handle".into()))?;
        Ok(CudaOps::new(gpu)?.with_wkv(self.opts.wkv))
    }

    /// The observer model and its temperature, when the options name one
    /// (its vocabulary checked against the model's).
    fn observer(&self, model: &Model) -> Result<Option<(Model, f32)>> {
        let Some(ob) = &self.opts.observer else {
            return Ok(None);
        };
        let p = &ob.model;
        let om =
            Model::load(p).map_err(|e| e.context(format!("loading observer {}", p.display())))?;
        if om.config().vocab != model.config().vocab {
            return Err(Error::Options(format!(
                "the observer's vocabulary ({}) differs from the model's ({})",
                om.config().vocab,
                model.config().vocab
            )));
        }
        Ok(Some((om, ob.temperature)))
    }

    /// The kernel and the starting upscaled state for `upscale = m`: from
    /// the sidecar of the initial state when it has one (its M must be
    /// `m`), else fitted by k-means on the training data (deterministic from
    /// the seed). Adds M and the kernel's fingerprint to the run's tag, so a
    /// checkpoint is only resumed with the very same kernel.
    fn prepare_upscale(
        &self,
        m: usize,
        model: &Model,
        train: &Dataset,
        init: Option<TunedState>,
        tc: &mut TrainConfig,
        say: &mut dyn FnMut(&str),
    ) -> Result<(Kernel, UpscaledState)> {
        let w = model.weights();
        let cfg = &w.config;
        let init_path = self.opts.init_state.as_deref();
        let from_file = match init_path {
            Some(p) => upscale::load_upscaled(p, cfg).map_err(|e| {
                e.context(format!("loading the upscale sidecar of {}", p.display()))
            })?,
            None => None,
        };
        let (kernel, start) = match from_file {
            Some((k, s)) => {
                let p = init_path.unwrap_or(Path::new(""));
                if k.m != m {
                    return Err(Error::Options(format!(
                        "--init-state {} has an upscale sidecar with M = {}, but --upscale {m} \
                         was given",
                        p.display(),
                        k.m
                    )));
                }
                say(&format!(
                    "upscale: kernel and U from {} (M = {m}), not refitted",
                    upscale::sidecar_path(p).display()
                ));
                (k, s)
            }
            None => {
                // At most 1024 examples, evenly strided, go into the fit.
                let stride = train.examples.len().div_ceil(1024).max(1);
                let sample: Vec<_> = train.examples.iter().step_by(stride).cloned().collect();
                let uc = UpscaleConfig {
                    m,
                    seed: self.opts.seed,
                    ..UpscaleConfig::new(cfg.head_size)
                };
                say(&format!(
                    "upscale: fitting M = {m} Gaussian-RBF support vectors per head (k-means++, \
                     {} Lloyd iterations on at most {} receptances per head from {} training \
                     examples, seed {}; widths from the k-means distortion) ...",
                    uc.kmeans_iters,
                    uc.max_samples,
                    sample.len(),
                    uc.seed
                ));
                let t = Instant::now();
                let zero = TunedState::zeros(cfg, false);
                let k = Kernel::fit(w, &zero, &sample, &uc)?;
                let (lo, hi) = k
                    .gamma
                    .iter()
                    .flatten()
                    .fold((f64::INFINITY, 0.0f64), |(lo, hi), &g| {
                        (lo.min(g), hi.max(g))
                    });
                say(&format!(
                    "upscale: kernel fitted in {:.1} s (γ = 1/(2σ²) from {lo:.3e} to {hi:.3e}); \
                     U starts at 0, so tuning starts at the plain model",
                    t.elapsed().as_secs_f64()
                ));
                let s0 = init.unwrap_or_else(|| TunedState::zeros(cfg, false));
                let s = UpscaledState::new(s0, &k);
                (k, s)
            }
        };
        tc.tag += &format!("; upscale m={m} kernel={}", kernel.fingerprint());
        Ok((kernel, start))
    }
}

/// What a run needs from its engine beyond [`Engine`].
trait Built {
    fn engine(&self) -> &dyn Engine;
    fn engine_mut(&mut self) -> &mut dyn Engine;
    /// Activation bytes per example at most (device engines).
    fn peak_bytes(&self) -> Option<usize> {
        None
    }
    /// The kernel and the trained `S₀` and `U` (upscaled engines).
    fn upscaled(&self) -> Result<Option<(&Kernel, UpscaledState)>> {
        Ok(None)
    }
    /// Activation bytes a step of `b` sequences of `t` tokens will hold
    /// (device engines).
    fn plan_bytes(&self, _b: usize, _t: usize) -> Option<usize> {
        None
    }
    /// The ops counters so far (device engines).
    fn counters(&self) -> Option<Snapshot> {
        None
    }
}

/// `eng` with the recompute policy and, when there is an observer, its
/// teacher on the same device (a plain tuner of the observer model on the
/// ops `teacher_ops` makes).
fn on_device<O: BackwardOps>(
    mut eng: DeviceEngine<O>,
    kernel: Option<Kernel>,
    recompute: Recompute,
    teacher: Option<&(Model, f32)>,
    teacher_ops: impl FnOnce() -> Result<O>,
) -> Result<OnDevice<O>> {
    eng.set_recompute(recompute);
    if let Some((om, temperature)) = teacher {
        eng.set_teacher(
            DeviceTuner::new(teacher_ops()?, om.weights())?,
            *temperature,
        )?;
    }
    Ok(OnDevice { eng, kernel })
}

/// The engine of a LoRA / SDT / SDLoRA / dense-recurrent run on the ops
/// `mk` makes, and its trainable parameter count. For SDT (not dense) a
/// dense warm-up of `sdt.warmup` steps (the run's batch, lr schedule cut to
/// the warm-up, no validation or checkpoint) ranks the entries, the
/// selection ([`sdt_select`]) becomes the masks, and the run restarts from
/// the pretrained weights (a fresh adapter of the same seed); the selection
/// is added to the run's tag. The warm-up is deterministic, so `--resume`
/// repeats it and finds the same masks.
fn peft_engine<O: BackwardOps>(
    mk: &dyn Fn() -> Result<O>,
    model: &Model,
    train: &Dataset,
    tc: &mut TrainConfig,
    o: &EngineOptions,
    lora: Option<(&LoraAdapter, f32)>,
    say: &mut dyn FnMut(&str),
) -> Result<(DeviceEngine<O>, usize)> {
    let w = model.weights();
    let cfg = model.config();
    let lora_n = lora.map_or(0, |(a, _)| a.n_params());
    if o.offset {
        let e = DeviceEngine::new_offset(mk()?, w, None, tc.adam, tc.grad.clone())?;
        let n = cfg.n_layer * cfg.n_head * cfg.head_size * cfg.head_size;
        return Ok((e, n));
    }
    let Some(so) = &o.sdt else {
        let (ad, dropout) =
            lora.ok_or_else(|| Error::Tune("internal: no method to build".into()))?;
        let e = DeviceEngine::new_lora(mk()?, w, ad, dropout, o.seed, tc.adam, tc.grad.clone())?;
        return Ok((e, lora_n));
    };
    let lens = crate::tune::device::sdt_lens(cfg);
    if so.dense {
        let e = DeviceEngine::new_sdt(mk()?, w, None, lora, o.seed, tc.adam, tc.grad.clone())?;
        return Ok((e, lora_n + lens.iter().sum::<usize>() * cfg.n_layer));
    }
    if so.warmup == 0 {
        return Err(Error::Options(
            "--sdt-warmup 0: the selection needs at least one warm-up step".into(),
        ));
    }
    let t0 = Instant::now();
    let mut warm = DeviceEngine::new_sdt(mk()?, w, None, lora, o.seed, tc.adam, tc.grad.clone())?;
    let mut wc = TrainConfig::new(so.warmup);
    wc.batch = tc.batch;
    wc.schedule = tc.schedule;
    wc.schedule.total = so.warmup;
    wc.schedule.warmup = wc.schedule.warmup.min(so.warmup / 2);
    wc.adam = tc.adam;
    wc.clip = tc.clip;
    wc.seed = tc.seed;
    wc.grad = tc.grad.clone();
    wc.grad.observer_weight = 0.0;
    wc.verbose = tc.verbose;
    wc.eval_max = 0;
    let rep = train_with(model, &mut warm, train, None, &wc, None)?;
    let d = warm
        .sdt_deltas()?
        .ok_or_else(|| Error::Tune("internal: the warm-up has no deltas".into()))?;
    drop(warm);
    let (masks, chosen) = sdt_select(cfg, &d, so.heads, so.dims)?;
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (l, ch) in chosen.iter().enumerate() {
        for &c in ch {
            h = (h ^ (l as u64 * 1_000_003 + c as u64)).wrapping_mul(0x100_0000_01b3);
        }
    }
    tc.tag += &format!("; sdt selection {h:016x}");
    let n_sel: usize = chosen.iter().map(|c| c.len()).sum();
    let per_ch = 5 + cfg.d_w + cfg.d_a;
    say(&format!(
        "SDT warm-up: {} dense steps in {:.1} s (final loss {:.4}); selected {} key channels \
         ({} per layer: {} heads × {} dims) → {} trainable recurrent-module entries; \
         restarting from the pretrained weights",
        so.warmup,
        t0.elapsed().as_secs_f64(),
        rep.history.last().copied().unwrap_or(f32::NAN),
        n_sel,
        chosen.first().map_or(0, |c| c.len()),
        ((so.heads * cfg.n_head as f64).ceil() as usize).clamp(1, cfg.n_head),
        ((so.dims * cfg.head_size as f64).ceil() as usize).clamp(1, cfg.head_size),
        n_sel * per_ch
    ));
    let e = DeviceEngine::new_sdt(
        mk()?,
        w,
        Some(&masks),
        lora,
        o.seed,
        tc.adam,
        tc.grad.clone(),
    )?;
    Ok((e, lora_n + n_sel * per_ch))
}

/// A device engine and, when upscaled, its kernel.
struct OnDevice<O: BackwardOps> {
    eng: DeviceEngine<O>,
    kernel: Option<Kernel>,
}

impl<O: BackwardOps> Built for OnDevice<O> {
    fn engine(&self) -> &dyn Engine {
        &self.eng
    }
    fn engine_mut(&mut self) -> &mut dyn Engine {
        &mut self.eng
    }
    fn peak_bytes(&self) -> Option<usize> {
        Some(self.eng.last_peak_bytes)
    }
    fn plan_bytes(&self, b: usize, t: usize) -> Option<usize> {
        let tu = self.eng.tuner();
        Some(tu.plan_bytes(b, t, tu.recompute()))
    }
    fn counters(&self) -> Option<Snapshot> {
        Some(self.eng.tuner().ops().counters().snapshot())
    }
    fn upscaled(&self) -> Result<Option<(&Kernel, UpscaledState)>> {
        match &self.kernel {
            Some(k) => Ok(Some((k, self.eng.upscaled()?))),
            None => Ok(None),
        }
    }
}

/// A built run: the engine with its observer, data and loop configuration.
pub struct Tuning<'a> {
    model: &'a Model,
    train: &'a Dataset,
    valid: Option<&'a Dataset>,
    engine: Box<dyn Built + 'a>,
    /// The loop's configuration (DBP, the observer weight and the run tag
    /// set from the options).
    pub config: TrainConfig,
    /// Trained parameters: the N×N states, plus every `U` when upscaled.
    pub n_params: usize,
    upscale: Option<usize>,
}

impl Tuning<'_> {
    /// The engine (for its [`Engine::tuned`] state, a checkpoint, …).
    pub fn engine(&self) -> &dyn Engine {
        self.engine.engine()
    }

    /// The engine, to run steps on.
    pub fn engine_mut(&mut self) -> &mut dyn Engine {
        self.engine.engine_mut()
    }

    /// M of the kernel-upscaled state, when upscaled (validation then uses
    /// the upscaled read-out).
    pub fn upscale(&self) -> Option<usize> {
        self.upscale
    }

    /// The device's activation peak per example over the last step, from
    /// the buffer sizes (device engines only; weights and states not
    /// included).
    pub fn peak_bytes(&self) -> Option<usize> {
        self.engine.peak_bytes()
    }

    /// The activation memory a step of `b` sequences of `t` tokens plans to
    /// hold on the device (device engines only; [`DeviceTuner::plan_bytes`]).
    ///
    /// [`DeviceTuner::plan_bytes`]: super::device::DeviceTuner::plan_bytes
    pub fn plan_bytes(&self, b: usize, t: usize) -> Option<usize> {
        self.engine.plan_bytes(b, t)
    }

    /// The device's ops counters so far (device engines only).
    pub fn counters(&self) -> Option<Snapshot> {
        self.engine.counters()
    }

    /// The loop's configuration (steps, checkpoint path, …).
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The tuning loop ([`train_with`]) on this run's engine.
    pub fn run(&mut self) -> Result<TrainReport> {
        train_with(
            self.model,
            self.engine.engine_mut(),
            self.train,
            self.valid,
            &self.config,
            None,
        )
    }

    /// Writes the trained state to `out` (ai00 / web-rwkv layout; `state` is
    /// the report's [`TrainReport::state`]): with the upscale sidecar
    /// ([`upscale::save_upscaled`]) when upscaled; otherwise a sidecar of an
    /// earlier upscaled run next to `out` is removed (it would no longer
    /// match the state).
    pub fn export(&self, out: &Path, state: &TunedState) -> Result<Exported> {
        let cfg = self.model.config();
        if let Some(ad) = self.engine().adapter()? {
            ad.save(out, cfg)?;
            return Ok(Exported::Adapter {
                params: ad.n_params(),
            });
        }
        match self.engine.upscaled()? {
            Some((k, s)) => {
                let sidecar = upscale::save_upscaled(out, cfg, k, &s)?;
                Ok(Exported::Upscaled { sidecar, m: k.m })
            }
            None => {
                export_state(out, cfg, state)?;
                let side = upscale::sidecar_path(out);
                let removed_sidecar = if side.is_file() {
                    std::fs::remove_file(&side).map_err(|e| {
                        Error::io(&side, e)
                            .context(format!("removing the stale {}", side.display()))
                    })?;
                    Some(side)
                } else {
                    None
                };
                Ok(Exported::Plain { removed_sidecar })
            }
        }
    }
}

/// What [`Tuning::export`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub enum Exported {
    /// The N×N states, and the sidecar with the kernel and `U`.
    Upscaled {
        /// Path of the sidecar written.
        sidecar: PathBuf,
        /// Support vectors per head.
        m: usize,
    },
    /// A LoRA adapter (safetensors, docs/lora.md).
    Adapter {
        /// Its parameter count.
        params: usize,
    },
    /// The N×N states; `removed_sidecar` is the stale sidecar of an earlier
    /// upscaled run that was deleted.
    Plain {
        /// The stale sidecar deleted, if there was one.
        removed_sidecar: Option<PathBuf>,
    },
}
