//! `rwkv-tune tune`: state tuning of a frozen RWKV-7 (train only the
//! per-layer initial WKV states), with the bundled demo. This file owns the
//! flags, loading the model and data, and the printing; the engine (device
//! × upscale × DBP × observer) comes from `rwkv_tune::tune::builder`.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rwkv_tune::model::lora::LoraTarget;
use rwkv_tune::model::{Model, Weights};
use rwkv_tune::tokenizer::Tokenizer;
use rwkv_tune::tune::builder::{
    DeviceKind, EngineBuilder, EngineOptions, Exported, LoraOptions, ObserverOptions, SdtOptions,
};
use rwkv_tune::tune::data::{self, ByteTokenizer, Dataset, Tokenize};
use rwkv_tune::tune::demo;
use rwkv_tune::tune::device::Recompute;
use rwkv_tune::tune::eval::EvalResult;
use rwkv_tune::tune::optim::{AdamConfig, Decay, Schedule};
use rwkv_tune::tune::train::TrainConfig;
use rwkv_tune::wkv7::Version;

/// What is trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Method {
    /// The initial state of every layer (arXiv 2504.05097; DBP on by
    /// default, --upscale optional). Writes a state file.
    #[default]
    State,
    /// LoRA adapters on the chosen matrices (docs/lora.md; --lora-*); base
    /// weights frozen. Writes an adapter file (use with `merge`, or
    /// `generate` / `eval --adapter`).
    Lora,
    /// Sparse dimension tuning (docs/sdt.md; --sdt-*): a dense warm-up
    /// ranks the recurrent module's key channels, then only the selected
    /// heads × key dimensions of w0, a0, k_k, k_a, r_k, w2, a2 are trained,
    /// from the pretrained weights. Writes an adapter (sparse deltas).
    Sdt,
    /// SDT plus LoRA on the projections (--lora-*): the paper's SDLoRA.
    Sdlora,
    /// Every entry of the recurrent module's tensors (w0, a0, k_k, k_a, r_k,
    /// w2, a2), dense: the baseline SDT is measured against.
    Recurrent,
    /// State-offset tuning (docs/state-offset.md): a learned S_off per
    /// layer and head added to every token's read-out, y_t += S_off r_t,
    /// instead of an initial state. Writes an adapter file of offsets (not
    /// mergeable; generate / eval --adapter run it).
    StateOffset,
}

impl Method {
    /// Default (peak lr, final lr): state tuning's RWKV-PEFT recipe; for
    /// LoRA the values docs/lora.md measured on the demo.
    fn lr_defaults(self) -> (f64, f64) {
        match self {
            Method::State | Method::StateOffset => (1.0, 0.01),
            _ => (LORA_LR, LORA_LR / 10.0),
        }
    }
}

/// LoRA's default peak learning rate (docs/lora.md).
const LORA_LR: f64 = 1e-2;

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

impl From<Device> for DeviceKind {
    fn from(d: Device) -> DeviceKind {
        match d {
            Device::Cpu => DeviceKind::Cpu,
            Device::Emu => DeviceKind::Emu,
            Device::Cuda => DeviceKind::Cuda,
        }
    }
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
    /// What to train: `state` (default), `lora`, `sdt`, `sdlora` or
    /// `recurrent` (see the values below; docs/lora.md, docs/sdt.md).
    #[arg(long, value_enum, default_value = "state")]
    pub method: Method,
    /// SDT: fraction of heads per layer trained (at least one head).
    #[arg(long, default_value_t = 0.25, value_name = "FRAC")]
    pub sdt_heads: f64,
    /// SDT: fraction of key dimensions per trained head (at least one).
    #[arg(long, default_value_t = 0.25, value_name = "FRAC")]
    pub sdt_dims: f64,
    /// SDT: steps of the dense warm-up that ranks the channels (default:
    /// a fifth of --steps, at least 1). Counted on top of --steps.
    #[arg(long, value_name = "STEPS")]
    pub sdt_warmup: Option<u64>,
    /// LoRA rank r (--method lora).
    #[arg(long, default_value_t = 8, value_name = "R")]
    pub lora_rank: usize,
    /// LoRA alpha: the update is scaled by alpha / r (default: r, scale 1).
    #[arg(long, value_name = "A")]
    pub lora_alpha: Option<f32>,
    /// Dropout on the LoRA branch inputs during training (0 … <1).
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f32,
    /// Matrices that get adapters, comma-separated: r, k, v, o, ffn.key,
    /// ffn.value, w1, w2, a1, a2, v1, v2, g1, g2, or the groups proj (r, k,
    /// v, o, ffn.key, ffn.value), att, ffn, gen (w1 … g2), all.
    #[arg(long, default_value = "proj", value_name = "LIST")]
    pub lora_targets: String,
    /// Peak learning rate (after warm-up). Default: 1 for --method state
    /// and state-offset (the RWKV-PEFT recipe), 0.01 for the others.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning rate at the last step. Default: 0.01 (state, state-offset),
    /// lr / 10 (the others).
    #[arg(long)]
    pub lr_final: Option<f64>,
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
    /// Accepted for old command lines; no effect (the engine's memory is
    /// set by --recompute).
    #[arg(long, default_value_t = 64, hide = true)]
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
    /// Trains on every --device (the read-out has its kernels and Rust
    /// twins).
    #[arg(long, value_name = "M")]
    pub upscale: Option<usize>,
    /// Observer (teacher) model: add λ·KL(teacher ‖ student) on the response
    /// tokens; the teacher must share the vocabulary.
    #[arg(long, value_name = "BIG.safetensors")]
    pub observer: Option<PathBuf>,
    /// λ, the weight of the observer's KL term.
    #[arg(long, default_value_t = 1.0)]
    pub observer_weight: f32,
    /// Temperature of the observer's distribution. Default 0.25: at 1 a
    /// task-tuned observer's targets are too flat and the KL pulls the
    /// student towards noise (docs/observer.md measures 1, 0.5, 0.25, 2).
    #[arg(long, default_value_t = 0.25)]
    pub observer_temp: f32,
    /// Where to run: cpu (default), cuda (GPU 0) or emu (the device engine
    /// on the CPU emulator). cuda/emu keep the tuned state and Adam's moments
    /// on the device; validation runs there too (with --upscale: also U and
    /// the upscaled read-out).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    /// WKV kernels of the device engines (cuda, emu): v1 (FMA; any head
    /// size), v2 (tensor cores; head size 32 or 64, other sizes run v1), v3
    /// (the v3 kernels, mixed precision) or v3x (v3, exact precision; v3 and
    /// v3x: head sizes as v2). All give the same gradients up to float
    /// rounding (v2's f32 states carry ~1e-5 relative error). Ignored on
    /// --device cpu.
    #[arg(long, value_parser = ["v1", "v2", "v3", "v3x"], default_value = "v1")]
    pub wkv: String,
    /// What a step keeps between its forward and backward: `keep` every
    /// layer's activations (one WKV forward per layer; the most memory) or
    /// `layer` only the layer inputs, recomputing one layer's forward right
    /// before its backward (two WKV forwards per layer; one layer's
    /// activations at a time). The planned memory is printed before
    /// training.
    #[arg(long, value_parser = ["keep", "layer"], default_value = "keep")]
    pub recompute: String,
    /// Print the device's ops counters (launches per op, allocations,
    /// transfers) after training (cuda, emu).
    #[arg(long, short)]
    pub verbose: bool,
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

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn print_eval(label: &str, r: &EvalResult, unit: &str) {
    println!("  {label:<7} {}", r.summary(unit));
}

/// The most worker threads `--threads` accepts: 4 per core, at least 64
/// (more only thrash; 100000 threads stall the machine).
fn max_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (4 * cores).max(64)
}

/// Checks the flags that the library's [`TrainConfig::validate`] does not
/// see (the data split, the observer's temperature, sizes) before anything
/// is loaded.
fn check_flags(a: &TuneArgs) -> Result<()> {
    if a.method != Method::State {
        LoraTarget::parse_list(&a.lora_targets)?;
        for (flag, f) in [("--sdt-heads", a.sdt_heads), ("--sdt-dims", a.sdt_dims)] {
            if !(f > 0.0 && f <= 1.0) {
                bail!("{flag} {f}: give a fraction in (0, 1]");
            }
        }
        if a.sdt_warmup == Some(0) {
            bail!("--sdt-warmup 0: the selection needs at least one warm-up step");
        }
        if a.lora_rank == 0 || a.lora_rank > 4096 {
            bail!("--lora-rank {}: give 1 to 4096", a.lora_rank);
        }
        if let Some(al) = a.lora_alpha {
            if !(al.is_finite() && al > 0.0) {
                bail!("--lora-alpha {al}: must be finite and > 0");
            }
        }
        if !(0.0..1.0).contains(&a.lora_dropout) {
            bail!("--lora-dropout {}: must be in [0, 1)", a.lora_dropout);
        }
        if a.dbp || a.upscale.is_some() || a.init_state.is_some() {
            bail!("--dbp, --upscale and --init-state apply to --method state only");
        }
    }
    let f = a.valid_frac;
    if !f.is_finite() || !(0.0..1.0).contains(&f) {
        bail!("--valid-frac is {f}; it must be in [0, 1) (0 = no validation)");
    }
    let t = a.observer_temp;
    if !t.is_finite() || t <= 0.0 {
        bail!("--observer-temp is {t}; it must be a finite number > 0");
    }
    let w = a.observer_weight;
    if !w.is_finite() || w < 0.0 {
        bail!("--observer-weight is {w}; it must be finite and >= 0");
    }
    if let Some(t) = a.threads {
        let max = max_threads();
        if t == 0 || t > max {
            bail!("--threads {t}: give 1 to {max} (4 per core on this machine, at least 64)");
        }
    }
    const MAX_CTX: usize = 1 << 20;
    if let Some(c) = a.ctx {
        if c == 0 || c > MAX_CTX {
            bail!("--ctx {c}: give 1 to {MAX_CTX} tokens");
        }
    }
    if a.chunk == 0 || a.chunk > MAX_CTX {
        bail!("--chunk {}: give 1 to {MAX_CTX} tokens", a.chunk);
    }
    if let Some(b) = a.batch {
        if b == 0 || b > 1 << 16 {
            bail!("--batch {b}: give 1 to 65536 examples per step");
        }
    }
    if let Some(m) = a.upscale {
        if m == 0 || m > 1 << 16 {
            bail!("--upscale {m}: give 1 to 65536 support vectors per head");
        }
    }
    Ok(())
}

/// Inputs and outputs of the run, by flag: no output may be an input or
/// another output, and every output's directory must accept a file, before
/// any work starts.
fn check_paths(a: &TuneArgs, tc: &TrainConfig) -> Result<()> {
    let mut inputs: Vec<(&str, PathBuf)> = Vec::new();
    for (flag, p) in [
        ("--model", &a.model),
        ("--data", &a.data),
        ("--valid", &a.valid),
        ("--init-state", &a.init_state),
        ("--observer", &a.observer),
    ] {
        if let Some(p) = p {
            inputs.push((flag, p.clone()));
        }
    }
    if let Some(p) = &a.init_state {
        let side = rwkv_tune::tune::upscale::sidecar_path(p);
        if side.exists() {
            inputs.push(("the sidecar of --init-state", side));
        }
    }
    if let Some(spec) = &a.tokenizer {
        if let Some(p) = spec
            .strip_prefix("world:")
            .or_else(|| spec.strip_prefix("hf:"))
        {
            inputs.push(("--tokenizer", PathBuf::from(p)));
        }
    }
    let mut outputs: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(o) = &a.out {
        outputs.push(("--out", o.clone()));
        outputs.push((
            "the upscale sidecar of --out",
            rwkv_tune::tune::upscale::sidecar_path(o),
        ));
    }
    if let Some(c) = &tc.checkpoint {
        outputs.push(("--checkpoint", c.clone()));
    }
    if let Some(m) = &a.metrics {
        outputs.push(("--metrics", m.clone()));
    }
    if let Some(p) = &a.plot {
        outputs.push(("--plot", p.clone()));
    }
    let ins: Vec<(&str, &Path)> = inputs.iter().map(|(f, p)| (*f, p.as_path())).collect();
    let outs: Vec<(&str, &Path)> = outputs.iter().map(|(f, p)| (*f, p.as_path())).collect();
    rwkv_tune::guard::check_outputs(&ins, &outs)?;
    Ok(())
}

/// Free space for what the run will write (estimated from the model's
/// shape), checked before training.
fn check_space(a: &TuneArgs, tc: &TrainConfig, cfg: &rwkv_tune::model::Config) -> Result<()> {
    let state = (cfg.n_layer * cfg.n_head * cfg.head_size * cfg.head_size * 4) as u64;
    let slack = 1 << 16;
    if let Some(o) = &a.out {
        let side = a.upscale.map_or(0, |m| {
            (cfg.n_layer * cfg.n_head * (2 * m * cfg.head_size + 1) * 4) as u64
        });
        rwkv_tune::guard::check_free_space("--out", o, state + side + slack)?;
    }
    if let Some(c) = &tc.checkpoint {
        // parameters, two Adam moments, DBP's f64 matrices, the loss history
        let bytes = 5 * state + 4 * tc.steps + slack;
        rwkv_tune::guard::check_free_space("--checkpoint", c, bytes)?;
    }
    Ok(())
}

/// The default --steps, --batch and --eval-max of a demo or a run on files.
fn defaults_of(demo: Option<DemoKind>) -> (u64, usize, usize) {
    match demo {
        Some(DemoKind::Synthetic) => (300, 16, 0),
        Some(DemoKind::Shakespeare) => (200, 8, 64),
        None => (200, 4, 0),
    }
}

pub fn run(a: TuneArgs) -> Result<()> {
    let mut say = |line: &str| println!("{line}");
    // Every flag and path is checked before the GPU, the model or the data
    // is touched: a bad number or an output over an input costs nothing.
    check_flags(&a)?;
    let decay: Decay = a.decay.parse()?;
    {
        let mut tc = train_config(&a, defaults_of(a.demo), decay)?;
        tc.grad.observer_weight = if a.observer.is_some() {
            a.observer_weight
        } else {
            0.0
        };
        tc.dbp = (!a.no_dbp && a.upscale.is_none() && a.method == Method::State)
            .then_some((a.dbp_eta, a.dbp_kappa));
        tc.validate()?;
        check_paths(&a, &tc)?;
    }
    if a.device == Device::Emu {
        eprintln!(
            "note: --device emu runs the CUDA kernel source on the CPU emulator (one OS \
             thread per CUDA thread): correct but slow; keep --steps and --eval-max small"
        );
    }
    // Open the GPU first, so a machine without one fails before any work.
    let builder = EngineBuilder::open(engine_options(&a), &mut say)?;
    if let Some(t) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("setting the thread count")?;
    }
    let t0 = Instant::now();

    let Data {
        weights,
        train: train_ds,
        valid: valid_ds,
        defaults,
        unit,
    } = load_data(&a)?;
    let model = Model::new(weights)?;
    let tc = train_config(&a, defaults, decay)?;
    check_space(&a, &tc, model.config())?;

    // The engine for --device × --upscale × DBP × --observer, then the loop.
    let batch = tc.batch;
    // adapters read each layer's GEMM inputs in the backward, so those
    // methods always recompute one layer at a time
    let recompute = match (a.method, a.recompute.as_str()) {
        (Method::State | Method::StateOffset, r) => r.to_string(),
        (_, _) => "layer, always with adapters".to_string(),
    };
    let mut tuning = builder.build(&model, &train_ds, valid_ds.as_ref(), tc, &mut say)?;
    let ctx = train_ds
        .examples
        .iter()
        .map(|e| e.tokens.len())
        .max()
        .unwrap_or(0);
    if let Some(b) = tuning.plan_bytes(batch, ctx) {
        println!(
            "activations planned: {:.1} MiB for a step of {batch} × {ctx} tokens \
             (--recompute {recompute}; from the buffer sizes, weights and states not included)",
            mib(b)
        );
        // Say so now instead of failing (or aborting) at the first step.
        let what = format!(
            "a step of {batch} × {ctx} tokens (--recompute {recompute}; try --recompute layer, \
             a smaller --batch or --ctx)"
        );
        match builder.gpu() {
            Some(gpu) => gpu.check_memory(&what, b as u64)?,
            None => rwkv_tune::guard::check_host_memory(&what, b as u64)?,
        }
    }
    let c0 = tuning.counters();
    crate::interrupt::install();
    let rep = tuning.run()?;
    if let Some(b) = tuning.peak_bytes() {
        println!(
            "activations: {:.1} MiB in the last step's workspace",
            mib(b)
        );
    }
    if let (true, Some(c0), Some(c1)) = (a.verbose, c0, tuning.counters()) {
        let d = c1.since(&c0);
        let per = |x: u64| x as f64 / rep.steps.max(1) as f64;
        println!("device ops counters over the run (training, validation and checkpoints):\n  {d}");
        println!(
            "  per step on average: {:.1} op launches, {:.1} allocations, {:.1} uploads, \
             {:.1} downloads",
            per(d.total_launches()),
            per(d.allocs),
            per(d.uploads),
            per(d.downloads)
        );
    }
    if let Some(s) = rep.resumed_from {
        println!("resumed from step {s}");
    }
    if rep.interrupted {
        println!("interrupted: stopped after step {}", rep.steps);
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
            if tuning.upscale().is_some() {
                ", upscaled read-out"
            } else {
                ""
            }
        );
        print_eval("before", b, unit);
        print_eval("after", f, unit);
    }
    if let Some(o) = &a.out {
        match tuning.export(o, &rep.state)? {
            Exported::Adapter { params } => println!(
                "wrote {} (adapter, {params} parameters; use: rwkv-tune merge --model M \
                 --adapter {} --out M2.safetensors, or generate / eval --adapter {})",
                o.display(),
                o.display(),
                o.display()
            ),
            Exported::Upscaled { sidecar, m } => println!(
                "wrote {} (the N×N states, ai00 / web-rwkv layout) and {} (kernel and U, M = \
                 {m}); use: rwkv-tune generate --state {} (picks up the sidecar; cpu only)",
                o.display(),
                sidecar.display(),
                o.display()
            ),
            Exported::Plain { removed_sidecar } => {
                if let Some(side) = removed_sidecar {
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
    if rep.interrupted {
        match tuning.config().checkpoint.as_ref() {
            Some(c) => eprintln!(
                "interrupted after step {} of {}: checkpoint {} (continue with the same \
                 arguments and --resume)",
                rep.steps,
                tuning.config().steps,
                c.display()
            ),
            None => eprintln!(
                "interrupted after step {} of {} (no --out or --checkpoint: nothing to resume \
                 from)",
                rep.steps,
                tuning.config().steps
            ),
        }
        std::process::exit(130);
    }
    Ok(())
}

/// The model, the data and the defaults of a run.
struct Data {
    weights: Weights,
    train: Dataset,
    valid: Option<Dataset>,
    /// Default --steps, --batch and --eval-max.
    defaults: (u64, usize, usize),
    /// What a token is, for the validation lines: byte or token.
    unit: &'static str,
}

/// Loads the model, tokenizer and data of --demo or --model / --data.
fn load_data(a: &TuneArgs) -> Result<Data> {
    let (weights, train, valid, defaults, unit) = match a.demo {
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
            (w, tr, Some(va), defaults_of(a.demo), "byte")
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
                defaults_of(a.demo),
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
            (w, tr, va, defaults_of(None), unit)
        }
    };
    if train.examples.is_empty() {
        bail!("the training data gave no examples");
    }
    Ok(Data {
        weights,
        train,
        valid,
        defaults,
        unit,
    })
}

/// The loop's configuration from the flags (the engine's options set DBP,
/// the observer weight and the rest of the tag).
fn train_config(a: &TuneArgs, defaults: (u64, usize, usize), decay: Decay) -> Result<TrainConfig> {
    let (def_steps, def_batch, def_eval_max) = defaults;
    let steps = a.steps.unwrap_or(def_steps);
    let lr = a.lr.unwrap_or(a.method.lr_defaults().0);
    let lr_final = a.lr_final.unwrap_or(match a.method {
        Method::State | Method::StateOffset => a.method.lr_defaults().1,
        _ => lr / 10.0,
    });
    let mut tc = TrainConfig::new(steps);
    tc.batch = a.batch.unwrap_or(def_batch);
    tc.schedule = Schedule {
        lr,
        lr_final,
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
    tc.grad.chunk = a.chunk;
    tc.verbose = !a.quiet;
    tc.throttle_ms = a.throttle_ms;
    tc.tag = format!("demo={:?}", a.demo);
    Ok(tc)
}

/// The engine's options from the flags: --device, --wkv, --dbp / --no-dbp,
/// --upscale, --observer, --init-state, --seed.
fn engine_options(a: &TuneArgs) -> EngineOptions {
    EngineOptions {
        device: a.device.into(),
        wkv: Version::parse(&a.wkv).unwrap_or(Version::V1),
        dbp: (!a.no_dbp).then_some((a.dbp_eta, a.dbp_kappa)),
        upscale: a.upscale,
        observer: a.observer.clone().map(|model| ObserverOptions {
            model,
            weight: a.observer_weight,
            temperature: a.observer_temp,
        }),
        init_state: a.init_state.clone(),
        seed: a.seed,
        recompute: if a.recompute == "layer" {
            Recompute::PerLayer
        } else {
            Recompute::KeepAll
        },
        lora: lora_options(a),
        offset: a.method == Method::StateOffset,
        sdt: matches!(a.method, Method::Sdt | Method::Sdlora | Method::Recurrent).then(|| {
            SdtOptions {
                heads: a.sdt_heads,
                dims: a.sdt_dims,
                warmup: a
                    .sdt_warmup
                    .unwrap_or_else(|| (a.steps.unwrap_or(defaults_of(a.demo).0) / 5).max(1)),
                dense: a.method == Method::Recurrent,
            }
        }),
    }
}

/// The LoRA options of --method lora (`None` for state tuning; targets
/// checked by [`check_flags`]).
fn lora_options(a: &TuneArgs) -> Option<LoraOptions> {
    matches!(a.method, Method::Lora | Method::Sdlora).then(|| LoraOptions {
        rank: a.lora_rank,
        alpha: a.lora_alpha.unwrap_or(a.lora_rank as f32),
        dropout: a.lora_dropout,
        targets: LoraTarget::parse_list(&a.lora_targets).unwrap_or_default(),
    })
}

fn append_ext(p: &Path, ext: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}
