//! `rwkv-tune tune`: state tuning of a frozen RWKV-7 (train only the
//! per-layer initial WKV states), with the bundled demo.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rwkv_tune::cuda::Gpu;
use rwkv_tune::model::device::DeviceModel;
use rwkv_tune::model::{Model, State, Weights};
use rwkv_tune::ops::backward::BackwardOps;
use rwkv_tune::ops::cuda::CudaOps;
use rwkv_tune::ops::emu::EmuOps;
use rwkv_tune::tokenizer::Tokenizer;
use rwkv_tune::tune::data::{self, ByteTokenizer, Dataset, Tokenize};
use rwkv_tune::tune::demo;
use rwkv_tune::tune::device::DeviceEngine;
use rwkv_tune::tune::grad::TunedState;
use rwkv_tune::tune::optim::{AdamConfig, Decay, Schedule};
use rwkv_tune::tune::train::{
    self, DeviceObserver, EvalResult, Observer, SoftTargets, TrainConfig,
};
use rwkv_tune::tune::upscale::{self, Kernel, UpscaleConfig, UpscaleEngine, UpscaledState};
use rwkv_tune::wkv7::Version;

/// Which demo to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoKind {
    /// A seeded random RWKV-7 (built in code) and a synthetic prompt→response
    /// task; needs nothing outside the repository (~1 minute on 2 cores).
    Synthetic,
    /// The real tiny model (rwkv7-tiny-834k) on tinyshakespeare, from
    /// ../shared; reports validation bits per byte.
    Shakespeare,
}

/// Where the gradient and the optimiser step run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The CPU engine (src/tune/grad.rs, multi-threaded over the batch).
    Cpu,
    /// The device engine on the CPU emulator: the same kernel source as
    /// cuda, run on the CPU (slow; for checking the device path without a GPU).
    Emu,
    /// An NVIDIA GPU: weights, activations, gradients and Adam on the device
    /// (the project's kernels and cuBLAS).
    Cuda,
}

/// Train only the initial recurrent (WKV) state of each layer of a frozen
/// RWKV-7 — "state tuning" — and export it as an ai00 / web-rwkv state file
/// (`blocks.N.att.time_state` [H,N,N] f32) for `rwkv-tune generate --state`.
///
/// Quick start (no files needed): `rwkv-tune tune --demo`.
///
/// Data: JSONL with {"text"} (loss on all tokens) or {"prompt","response"}
/// (loss on the response only; input/output and question/answer also work),
/// or a plain-text file (cut into --ctx windows). Defaults follow the
/// RWKV-PEFT recipe: Adam, lr 1 → 0.01 with 10 warm-up steps, short context.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    rwkv-tune tune --demo\n  \
    rwkv-tune tune --demo shakespeare --steps 300\n  \
    rwkv-tune tune --model m.safetensors --data train.jsonl --valid valid.jsonl \\\n      \
    --out state.safetensors --steps 500 --metrics m.jsonl --plot loss.png\n  \
    rwkv-tune tune ... --checkpoint-every 50     # then, after a crash:  rwkv-tune tune ... --resume\n  \
    rwkv-tune tune --demo --upscale 128 --out s.safetensors   # writes s.safetensors + s.upscale.safetensors")]
pub struct TuneArgs {
    /// Run a bundled demo instead of --model/--data (default: synthetic).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "synthetic")]
    pub demo: Option<DemoKind>,
    /// Model checkpoint (safetensors, official x070 or fla/HF names).
    #[arg(long, required_unless_present = "demo")]
    pub model: Option<PathBuf>,
    /// Training data: .jsonl ({"text"} or {"prompt","response"}) or plain text.
    #[arg(long, required_unless_present = "demo")]
    pub data: Option<PathBuf>,
    /// Validation data (same formats). Without it, --valid-frac of the
    /// training data is held out.
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// Fraction of the training data held out for validation when --valid is
    /// not given (0 = no validation).
    #[arg(long, default_value_t = 0.05)]
    pub valid_frac: f64,
    /// Tokenizer: world:PATH, hf:PATH or bytes (default: bytes for
    /// vocab-256 models).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Output state file (ai00 / web-rwkv layout).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Start from this state file instead of zeros.
    #[arg(long)]
    pub init_state: Option<PathBuf>,
    /// Optimiser steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Examples per step.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Longest example, in tokens (RWKV-PEFT uses 512 or less).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Peak learning rate (after warm-up).
    #[arg(long, default_value_t = 1.0)]
    pub lr: f64,
    /// Learning rate at the last step.
    #[arg(long, default_value_t = 0.01)]
    pub lr_final: f64,
    /// Warm-up steps (lr ramps from 1% to 100%).
    #[arg(long, default_value_t = 10)]
    pub warmup: u64,
    /// Decay after warm-up: exp (RWKV-LM), linear or cosine.
    #[arg(long, default_value = "exp")]
    pub decay: String,
    /// Clip gradients to this global L2 norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// AdamW decoupled weight decay (0 = Adam).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.99)]
    pub beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    /// Seed of the data order (and of the demo task).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every N steps (0 = only at the end). Checkpoints
    /// are written atomically and hold state, Adam moments, step and data
    /// position, so --resume continues exactly.
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Checkpoint file (default: <out>.ckpt).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Continue from the checkpoint if it exists (same arguments required).
    #[arg(long)]
    pub resume: bool,
    /// JSON-lines metrics log (one object per step: step, loss, lr,
    /// grad_norm, tokens_per_s; plus validation lines).
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// PNG loss curve.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Validate every N steps (0 = only before and after).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// At most this many validation examples (0 = all).
    #[arg(long)]
    pub eval_max: Option<usize>,
    /// Tokens per recomputation chunk of the gradient engine.
    #[arg(long, default_value_t = 64)]
    pub chunk: usize,
    /// Decorrelated backpropagation on the tuned state (arXiv 2504.05097;
    /// docs/dbp.md): train S′ with S = S′·R, R decorrelating the key-space
    /// inputs the state reads. ON by default since the measurement in
    /// docs/comparison.md (DBP reached plain tuning's final loss in 40 of 100
    /// steps); this flag is accepted for clarity, `--no-dbp` turns it off.
    /// Not available with --upscale (which turns the default DBP off).
    #[arg(long, conflicts_with_all = ["no_dbp", "upscale"])]
    pub dbp: bool,
    /// Plain state tuning without DBP.
    #[arg(long)]
    pub no_dbp: bool,
    /// DBP learning rate η of the decorrelation rule.
    #[arg(long, default_value_t = 0.05)]
    pub dbp_eta: f64,
    /// DBP whitening weight κ ∈ [0, 1] (0 = decorrelate only).
    #[arg(long, default_value_t = 0.0)]
    pub dbp_kappa: f64,
    /// Kernel-upscaled state (arXiv 2504.05097; docs/upscale.md): besides S₀,
    /// train a memory U [N×M] per head read through M Gaussian-RBF support
    /// vectors (k-means on the training data's receptances, fitted before
    /// training; deterministic from --seed). Trains without DBP (the default
    /// DBP is turned off with a note; --dbp is refused). Writes --out (the
    /// N×N states, ai00 / web-rwkv layout) plus <out stem>.upscale.safetensors
    /// (centres, widths, U), which `generate --state` picks up (CPU only).
    /// Trains on every --device (cpu: `UpscaleEngine`; cuda / emu: the
    /// device engine with the read-out kernels).
    #[arg(long, value_name = "M")]
    pub upscale: Option<usize>,
    /// Observer (teacher) model: add λ·KL(teacher ‖ student) on the response
    /// tokens; the teacher must share the vocabulary.
    #[arg(long, value_name = "BIG.safetensors")]
    pub observer: Option<PathBuf>,
    /// λ, the weight of the observer's KL term.
    #[arg(long, default_value_t = 1.0)]
    pub observer_weight: f32,
    /// Temperature of the observer's distribution.
    #[arg(long, default_value_t = 1.0)]
    pub observer_temp: f32,
    /// Where to run: cpu (default), cuda (GPU 0) or emu (the device engine
    /// on the CPU emulator). cuda/emu keep the tuned state and Adam's moments
    /// on the device; validation runs there too (with --upscale: also U and
    /// the upscaled read-out).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// WKV kernels of the device engines (cuda, emu): v1 (FMA; any head
    /// size) or v2 (tensor cores; head size 32 or 64, other sizes run v1).
    /// Both give the same gradients up to float rounding (v2's f32 states
    /// carry ~1e-5 relative error). Ignored on --device cpu.
    #[arg(long, value_parser = ["v1", "v2"], default_value = "v1")]
    pub wkv: String,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    /// Sleep after every step (testing interrupted runs).
    #[arg(long, default_value_t = 0, hide = true)]
    pub throttle_ms: u64,
}

fn tokenizer_for(spec: Option<&str>, vocab: usize) -> Result<Box<dyn Tokenize>> {
    let tok = match spec {
        Some(s) => Tokenizer::from_spec(s)?,
        None if vocab == 256 => Tokenizer::Bytes(rwkv_tune::tokenizer::ByteTokenizer),
        None => bail!(
            "the model has a vocabulary of {vocab}: pass --tokenizer world:rwkv_vocab_v20230424.txt \
             (RWKV world models) or --tokenizer hf:tokenizer.json"
        ),
    };
    if tok.vocab_size() > vocab {
        bail!(
            "the tokenizer produces ids up to {} but the model's vocabulary is {vocab}",
            tok.vocab_size() - 1
        );
    }
    Ok(Box::new(tok))
}

/// What a tuning run needs besides the engine.
struct Job<'a> {
    model: &'a Model,
    tc: &'a TrainConfig,
    train: &'a Dataset,
    valid: Option<&'a Dataset>,
    obs: Option<&'a dyn SoftTargets>,
}

impl Job<'_> {
    /// Runs the loop on `eng` and reports the device's activation peak.
    fn run_device<O: BackwardOps>(&self, eng: &mut DeviceEngine<O>) -> Result<train::TrainReport> {
        let rep = train::train_with(self.model, eng, self.train, self.valid, self.tc, self.obs)?;
        print_peak(eng.last_peak_bytes);
        Ok(rep)
    }

    /// Plain (or DBP) state tuning with the device engine on `ops`.
    fn device<O: BackwardOps>(&self, ops: O, start: &TunedState) -> Result<train::TrainReport> {
        let tc = self.tc;
        let w = self.model.weights();
        let mut eng = DeviceEngine::new(ops, w, start, tc.adam, tc.dbp, tc.grad.clone())?;
        self.run_device(&mut eng)
    }

    /// The kernel-upscaled state with the device engine on `ops`; returns
    /// the trained S₀ and U for the sidecar.
    fn device_upscaled<O: BackwardOps>(
        &self,
        ops: O,
        kernel: &Kernel,
        start: &UpscaledState,
    ) -> Result<(train::TrainReport, UpscaledState)> {
        let tc = self.tc;
        let w = self.model.weights();
        let mut eng =
            DeviceEngine::new_upscaled(ops, w, kernel, start, tc.adam, tc.dbp, tc.grad.clone())?;
        let rep = self.run_device(&mut eng)?;
        Ok((rep, eng.upscaled()?))
    }
}

fn print_peak(bytes: usize) {
    println!(
        "device activations: {:.1} MiB at most per example (from the buffer sizes; weights and \
         states not included)",
        bytes as f64 / (1u64 << 20) as f64
    );
}

fn print_eval(label: &str, r: &EvalResult, unit: &str) {
    println!("  {label:<7} {}", r.summary(unit));
}

pub fn run(a: TuneArgs) -> Result<()> {
    // Open the GPU first, so a machine without one fails before any work.
    let gpu = match a.device {
        Device::Cuda => {
            let g = std::sync::Arc::new(Gpu::new(0)?);
            println!("device: {}", g.describe());
            Some(g)
        }
        Device::Emu => {
            eprintln!(
                "note: --device emu runs the CUDA kernel source on the CPU emulator (one OS \
                 thread per CUDA thread): correct but slow; keep --steps and --eval-max small"
            );
            None
        }
        Device::Cpu => None,
    };
    if a.upscale == Some(0) {
        bail!("--upscale M needs M ≥ 1 support vectors per head");
    }
    if let Some(t) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t.max(1))
            .build_global()
            .context("setting the thread count")?;
    }
    let t0 = Instant::now();
    let decay: Decay = a.decay.parse()?;

    // Model, tokenizer, data.
    let (weights, train_ds, valid_ds, defaults, unit) = match a.demo {
        Some(DemoKind::Synthetic) => {
            let w = demo::demo_weights(demo::DEMO_MODEL_SEED)?;
            let (tr, va) =
                demo::synthetic_datasets(512, 128, a.seed.wrapping_add(1), &ByteTokenizer)?;
            println!(
                "demo: seeded random RWKV-7 ({} layers, width {}, {} heads × {}, byte vocab; {} \
                 params, built in code) on a synthetic task: prompts `Q: <words>?|!|.` must be \
                 answered ` Yes.` / ` Wow!` / ` Ok.` by the punctuation",
                w.config.n_layer,
                w.config.n_embd,
                w.config.n_head,
                w.config.head_size,
                w.config.n_params(),
            );
            (w, tr, Some(va), (300u64, 16usize, 64usize, 0usize), "byte")
        }
        Some(DemoKind::Shakespeare) => {
            let Some((m, t)) = demo::shakespeare_paths() else {
                bail!(
                    "--demo shakespeare needs ../shared/fixtures/rwkv7-tiny-834k and \
                     ../shared/datasets/tinyshakespeare.txt next to the crate"
                )
            };
            let w = Weights::load(&m).with_context(|| format!("loading {}", m.display()))?;
            let ctx = a.ctx.unwrap_or(128);
            let recs = data::read_records(&t, &ByteTokenizer)?;
            let (tr, va) = data::split_records(recs, 0.05, 0);
            println!(
                "demo: {} on {} (last 5% held out)",
                m.display(),
                t.display()
            );
            (
                w,
                Dataset::from_records(&tr, ctx)?,
                Some(Dataset::from_records(&va, ctx)?),
                (200, 8, ctx, 64),
                "byte",
            )
        }
        None => {
            let m = a.model.clone().context("--model is required")?;
            let d = a.data.clone().context("--data is required")?;
            let w = Weights::load(&m).with_context(|| format!("loading {}", m.display()))?;
            let tok = tokenizer_for(a.tokenizer.as_deref(), w.config.vocab)?;
            let ctx = a.ctx.unwrap_or(256);
            let (tr, va) = if let Some(v) = &a.valid {
                (
                    data::load_dataset(&d, tok.as_ref(), ctx)?,
                    Some(data::load_dataset(v, tok.as_ref(), ctx)?),
                )
            } else {
                let recs = data::read_records(&d, tok.as_ref())?;
                if a.valid_frac > 0.0 {
                    let (tr, va) = data::split_records(recs, a.valid_frac, a.seed);
                    (
                        Dataset::from_records(&tr, ctx)?,
                        Some(Dataset::from_records(&va, ctx)?),
                    )
                } else {
                    (Dataset::from_records(&recs, ctx)?, None)
                }
            };
            let unit = if w.config.vocab == 256 {
                "byte"
            } else {
                "token"
            };
            (w, tr, va, (200, 4, ctx, 0), unit)
        }
    };
    let (def_steps, def_batch, _, def_eval_max) = defaults;
    if train_ds.examples.is_empty() {
        bail!("the training data gave no examples");
    }
    let cfg_m = weights.config.clone();
    let model = Model::new(weights)?;

    let observer: Option<Box<dyn SoftTargets>> = match &a.observer {
        Some(p) => {
            let om = Model::load(p).with_context(|| format!("loading observer {}", p.display()))?;
            if om.config().vocab != cfg_m.vocab {
                bail!(
                    "the observer's vocabulary ({}) differs from the model's ({})",
                    om.config().vocab,
                    cfg_m.vocab
                );
            }
            let temperature = a.observer_temp;
            Some(match (a.device, &gpu) {
                (Device::Cuda, Some(g)) => Box::new(DeviceObserver {
                    model: DeviceModel::new(CudaOps::new(g.clone())?, om.weights())?,
                    temperature,
                }),
                (Device::Emu, _) => Box::new(DeviceObserver {
                    model: DeviceModel::new(EmuOps::default(), om.weights())?,
                    temperature,
                }),
                _ => Box::new(Observer {
                    model: om,
                    temperature,
                }),
            })
        }
        None => None,
    };

    let steps = a.steps.unwrap_or(def_steps);
    let mut tc = TrainConfig::new(steps);
    tc.batch = a.batch.unwrap_or(def_batch);
    tc.schedule = Schedule {
        lr: a.lr,
        lr_final: a.lr_final,
        warmup: a.warmup,
        total: steps,
        decay,
    };
    tc.adam = AdamConfig {
        beta1: a.beta1,
        beta2: a.beta2,
        eps: a.adam_eps,
        weight_decay: a.weight_decay,
    };
    tc.clip = a.clip;
    tc.seed = a.seed;
    tc.checkpoint_every = a.checkpoint_every;
    tc.checkpoint = match (&a.checkpoint, &a.out) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(o)) => Some(append_ext(o, "ckpt")),
        (None, None) => None,
    };
    if (a.resume || a.checkpoint_every > 0) && tc.checkpoint.is_none() {
        bail!("--resume and --checkpoint-every need --out or --checkpoint");
    }
    tc.resume = a.resume;
    tc.metrics = a.metrics.clone();
    tc.plot = a.plot.clone();
    tc.eval_every = a.eval_every;
    tc.eval_max = a.eval_max.unwrap_or(def_eval_max);
    tc.grad.chunk = a.chunk.max(1);
    tc.grad.observer_weight = if observer.is_some() {
        a.observer_weight
    } else {
        0.0
    };
    tc.verbose = !a.quiet;
    tc.throttle_ms = a.throttle_ms;
    tc.tag = format!("demo={:?}", a.demo);
    if a.upscale.is_some() {
        if !a.no_dbp {
            println!(
                "note: --upscale trains without DBP (DBP on the upscaled state is not supported); \
                 the default --dbp is off for this run"
            );
        }
    } else if !a.no_dbp {
        tc.dbp = Some((a.dbp_eta, a.dbp_kappa));
    }
    let init = match &a.init_state {
        Some(p) => {
            let st = State::load(p, &cfg_m)
                .with_context(|| format!("loading initial state {}", p.display()))?;
            Some(train::from_model_state(&cfg_m, &st, false)?)
        }
        None => None,
    };
    if init.is_some() {
        tc.tag += &format!("; init={:?}", a.init_state);
    }
    if let (Some(p), None) = (&a.init_state, a.upscale) {
        let side = upscale::sidecar_path(p);
        if side.is_file() {
            println!(
                "note: {} (the upscaled part of the initial state) is ignored without --upscale",
                side.display()
            );
        }
    }

    // Kernel-upscaled state: the kernel (fitted, or from --init-state's
    // sidecar) and the starting S₀ and U.
    let up_init = match a.upscale {
        Some(m) => Some(prepare_upscale(
            &a,
            m,
            model.weights(),
            &train_ds,
            init.clone(),
            &mut tc,
        )?),
        None => None,
    };
    let n_params = cfg_m.n_layer * cfg_m.n_head * cfg_m.head_size * cfg_m.head_size
        + a.upscale
            .map_or(0, |m| cfg_m.n_layer * cfg_m.n_head * cfg_m.head_size * m);

    println!(
        "tuning {} state parameters over {} layers: {} train examples ({} target tokens), {} \
         steps × batch {}, lr {} → {} (warm-up {}, {:?})",
        n_params,
        cfg_m.n_layer,
        train_ds.examples.len(),
        train_ds.n_target_tokens,
        steps,
        tc.batch,
        a.lr,
        a.lr_final,
        a.warmup,
        decay
    );
    let job = Job {
        model: &model,
        tc: &tc,
        train: &train_ds,
        valid: valid_ds.as_ref(),
        obs: observer.as_deref(),
    };
    let wkv = match a.wkv.as_str() {
        "v2" => Version::V2,
        _ => Version::V1,
    };
    if a.device == Device::Cpu && wkv == Version::V2 {
        println!("note: --wkv applies to --device cuda|emu; the cpu engine has its own recurrence");
    }
    let cuda = || -> Result<CudaOps> {
        Ok(CudaOps::new(gpu.clone().context("internal: no GPU handle")?)?.with_wkv(wkv))
    };
    let (rep, upscaled) = match up_init {
        Some((kernel, start)) => match a.device {
            Device::Cpu => {
                let mut eng = UpscaleEngine::new(
                    model.weights(),
                    kernel,
                    start,
                    tc.adam,
                    tc.dbp,
                    tc.grad.clone(),
                )?;
                let rep = train::train_with(&model, &mut eng, job.train, job.valid, &tc, job.obs)?;
                (rep, Some((eng.kernel, eng.state)))
            }
            Device::Emu => {
                let (rep, s) =
                    job.device_upscaled(EmuOps::default().with_wkv(wkv), &kernel, &start)?;
                (rep, Some((kernel, s)))
            }
            Device::Cuda => {
                let (rep, s) = job.device_upscaled(cuda()?, &kernel, &start)?;
                (rep, Some((kernel, s)))
            }
        },
        None => {
            let start = init.unwrap_or_else(|| TunedState::zeros(&cfg_m, tc.with_shift));
            let rep = match a.device {
                Device::Cpu => {
                    train::train_from(&model, job.train, job.valid, &tc, job.obs, Some(start))?
                }
                Device::Emu => job.device(EmuOps::default().with_wkv(wkv), &start)?,
                Device::Cuda => job.device(cuda()?, &start)?,
            };
            (rep, None)
        }
    };
    if let Some(s) = rep.resumed_from {
        println!("resumed from step {s}");
    }
    println!(
        "trained {} steps in {:.1} s ({:.0} tokens/s); final train loss {:.4}",
        rep.steps,
        rep.seconds,
        rep.tokens_per_sec,
        rep.history.last().copied().unwrap_or(f32::NAN)
    );
    if let (Some(b), Some(f)) = (&rep.before, &rep.after) {
        println!(
            "validation ({} tokens{}):",
            b.n_tokens,
            if upscaled.is_some() {
                ", upscaled read-out"
            } else {
                ""
            }
        );
        print_eval("before", b, unit);
        print_eval("after", f, unit);
    }
    if let Some(o) = &a.out {
        match &upscaled {
            Some((k, s)) => {
                let side = upscale::save_upscaled(o, &cfg_m, k, s)?;
                println!(
                    "wrote {} (the N×N states, ai00 / web-rwkv layout) and {} (kernel and U, M = \
                     {}); use: rwkv-tune generate --state {} (picks up the sidecar; cpu only)",
                    o.display(),
                    side.display(),
                    k.m,
                    o.display()
                );
            }
            None => {
                train::export_state(o, &cfg_m, &rep.state)?;
                let side = upscale::sidecar_path(o);
                if side.is_file() {
                    std::fs::remove_file(&side)
                        .with_context(|| format!("removing the stale {}", side.display()))?;
                    println!(
                        "removed {} (an upscale sidecar of an earlier run; this state is plain)",
                        side.display()
                    );
                }
                println!(
                    "wrote {} (use: rwkv-tune generate --state {})",
                    o.display(),
                    o.display()
                );
            }
        }
    }
    if let Some(p) = &a.plot {
        println!("wrote {}", p.display());
    }
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

/// The kernel and the starting upscaled state for `--upscale m`: from the
/// sidecar of `--init-state` when it has one (its M must be `m`), else
/// fitted by k-means on the training data (deterministic from `--seed`).
/// Adds M and the kernel's fingerprint to the run's tag, so a checkpoint
/// is only resumed with the very same kernel.
fn prepare_upscale(
    a: &TuneArgs,
    m: usize,
    w: &Weights,
    train_ds: &Dataset,
    init: Option<rwkv_tune::tune::grad::TunedState>,
    tc: &mut TrainConfig,
) -> Result<(Kernel, UpscaledState)> {
    let cfg = &w.config;
    let from_file = match &a.init_state {
        Some(p) => upscale::load_upscaled(p, cfg)
            .with_context(|| format!("loading the upscale sidecar of {}", p.display()))?,
        None => None,
    };
    let (kernel, start) = match from_file {
        Some((k, s)) => {
            if k.m != m {
                bail!(
                    "--init-state {} has an upscale sidecar with M = {}, but --upscale {m} was \
                     given",
                    a.init_state.as_deref().unwrap_or(Path::new("")).display(),
                    k.m
                );
            }
            println!(
                "upscale: kernel and U from {} (M = {m}), not refitted",
                upscale::sidecar_path(a.init_state.as_deref().unwrap_or(Path::new(""))).display()
            );
            (k, s)
        }
        None => {
            // At most 1024 examples, evenly strided, go into the fit.
            let stride = train_ds.examples.len().div_ceil(1024).max(1);
            let sample: Vec<_> = train_ds.examples.iter().step_by(stride).cloned().collect();
            let uc = UpscaleConfig {
                m,
                seed: a.seed,
                ..UpscaleConfig::new(cfg.head_size)
            };
            println!(
                "upscale: fitting M = {m} Gaussian-RBF support vectors per head (k-means++, {} \
                 Lloyd iterations on at most {} receptances per head from {} training examples, \
                 seed {}; widths from the k-means distortion) ...",
                uc.kmeans_iters,
                uc.max_samples,
                sample.len(),
                uc.seed
            );
            let t = Instant::now();
            let zero = rwkv_tune::tune::grad::TunedState::zeros(cfg, false);
            let k = Kernel::fit(w, &zero, &sample, &uc)?;
            let (lo, hi) = k
                .gamma
                .iter()
                .flatten()
                .fold((f64::INFINITY, 0.0f64), |(lo, hi), &g| {
                    (lo.min(g), hi.max(g))
                });
            println!(
                "upscale: kernel fitted in {:.1} s (γ = 1/(2σ²) from {lo:.3e} to {hi:.3e}); U \
                 starts at 0, so tuning starts at the plain model",
                t.elapsed().as_secs_f64()
            );
            let s0 = init.unwrap_or_else(|| rwkv_tune::tune::grad::TunedState::zeros(cfg, false));
            let s = UpscaledState::new(s0, &k);
            (k, s)
        }
    };
    tc.tag += &format!("; upscale m={m} kernel={}", kernel.fingerprint());
    Ok((kernel, start))
}

fn append_ext(p: &Path, ext: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}
