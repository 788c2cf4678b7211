//! `rwkv-tune generate`: stream text from a model, optionally starting from a
//! tuned state file.
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use rwkv_tune::model::device::DeviceModel;
use rwkv_tune::model::reduce::{ReduceConfig, Reduced};
use rwkv_tune::model::{Logits, Model, Sampler, State};
use rwkv_tune::ops::{cuda::CudaOps, emu::EmuOps, GemmPrecision};
use rwkv_tune::tokenizer::{StreamDecoder, Tokenizer};
use rwkv_tune::tune::upscale::{self, Kernel, UpscaledState};

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// Multi-threaded CPU (rayon; set RAYON_NUM_THREADS to limit threads).
    Cpu,
    /// NVIDIA GPU: weights on the device, cuBLAS GEMMs, the project's kernels.
    Cuda,
    /// The GPU code path with the CUDA kernels emulated on the CPU (slow; for
    /// checking the device path without a GPU).
    Emu,
}

/// Operand precision of the weight GEMMs on `--device cuda|emu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Gemm {
    /// f32 operands (cuBLAS sgemm on cuda): matches the CPU model to float rounding.
    F32,
    /// bf16 weights and bf16-rounded activations, f32 accumulation and output
    /// (cuBLAS GemmEx on cuda; the same arithmetic emulated on emu).
    Bf16,
}

impl From<Gemm> for GemmPrecision {
    fn from(g: Gemm) -> Self {
        match g {
            Gemm::F32 => GemmPrecision::F32,
            Gemm::Bf16 => GemmPrecision::Bf16,
        }
    }
}

/// The model on the chosen device (the same forward math on each).
pub enum Runner {
    Cpu(Model),
    Emu(DeviceModel<EmuOps>),
    Cuda(DeviceModel<CudaOps>),
}

impl Runner {
    /// Loads `path` onto `device`, with weight GEMMs in `gemm` precision
    /// (`Gemm::Bf16` needs `cuda` or `emu`); with `adapter`, a LoRA adapter
    /// file applied in memory (the exact merge of `rwkv-tune merge`; no
    /// file is written).
    pub fn load(
        path: &std::path::Path,
        adapter: Option<&std::path::Path>,
        device: Device,
        gemm: Gemm,
    ) -> anyhow::Result<(Runner, rwkv_tune::model::Config)> {
        if device == Device::Cpu && gemm != Gemm::F32 {
            bail!("--gemm bf16 needs --device cuda or emu (the cpu model is f32 only)");
        }
        let mut model = Model::load(path).with_context(|| format!("loading {}", path.display()))?;
        let mut offsets = None;
        if let Some(p) = adapter {
            let mut w = model.weights().clone();
            let mut ad = rwkv_tune::model::lora::Adapter::load(p, &w.config)?;
            offsets = ad.offset.take();
            ad.merge_into(&mut w)?;
            eprintln!(
                "adapter: {} ({}{}) applied",
                p.display(),
                crate::merge::describe(&ad),
                if offsets.is_some() {
                    "state offsets"
                } else {
                    ""
                }
            );
            model = Model::new(w)?;
            model.set_state_offsets(offsets.clone())?;
        }
        let cfg = model.config().clone();
        let prec = GemmPrecision::from(gemm);
        let r = match device {
            Device::Cpu => Runner::Cpu(model),
            Device::Emu => {
                let mut m = DeviceModel::new(EmuOps::default().with_gemm(prec), model.weights())?;
                m.set_state_offsets(offsets.as_deref())?;
                Runner::Emu(m)
            }
            Device::Cuda => {
                let gpu = std::sync::Arc::new(rwkv_tune::cuda::Gpu::new(0)?);
                eprintln!("device: {}, GEMMs {prec}", gpu.describe());
                let mut m = DeviceModel::new(CudaOps::new(gpu)?.with_gemm(prec), model.weights())?;
                m.set_state_offsets(offsets.as_deref())?;
                Runner::Cuda(m)
            }
        };
        Ok((r, cfg))
    }

    /// Runs `tokens` from `state` (updated), returning the requested logits.
    pub fn forward(
        &self,
        tokens: &[u32],
        state: &mut State,
        which: Logits,
    ) -> anyhow::Result<Vec<f32>> {
        Ok(match self {
            Runner::Cpu(m) => m.forward(tokens, state, which)?,
            Runner::Emu(m) => m.forward(tokens, state, which)?,
            Runner::Cuda(m) => m.forward(tokens, state, which)?,
        })
    }

    /// A prefill with token reduction (`model::reduce`): logits of the
    /// surviving rows (or the last), their positions and the FLOP report.
    pub fn forward_reduced(
        &self,
        tokens: &[u32],
        state: &mut State,
        red: &ReduceConfig,
        protect_last: usize,
        which: Logits,
    ) -> anyhow::Result<Reduced> {
        Ok(match self {
            Runner::Cpu(m) => m.forward_reduced(tokens, state, red, protect_last, which)?,
            Runner::Emu(m) => m.forward_reduced(tokens, state, red, protect_last, which)?,
            Runner::Cuda(m) => m.forward_reduced(tokens, state, red, protect_last, which)?,
        })
    }

    /// One token (the RNN step), returning its logits.
    pub fn step(&self, token: u32, state: &mut State) -> anyhow::Result<Vec<f32>> {
        Ok(match self {
            Runner::Cpu(m) => m.step(token, state)?,
            Runner::Emu(m) => m.step(token, state)?,
            Runner::Cuda(m) => m.step(token, state)?,
        })
    }
}

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    rwkv-tune generate --model rwkv7-tiny-834k.safetensors --prompt 'The ' --max-tokens 200\n  \
    rwkv-tune generate --model rwkv7-g1-0.1b.safetensors --tokenizer world:rwkv_vocab_v20230424.txt \\\n      \
    --state tuned.safetensors --prompt 'User: hi\\n\\nAssistant:' --temperature 1.0 --top-p 0.3")]
pub struct GenerateArgs {
    /// Model checkpoint (safetensors or PyTorch .pth, told apart by content;
    /// official BlinkDL x070 or fla/HF names; f32/f16/bf16).
    #[arg(long)]
    pub model: PathBuf,
    /// Initial WKV state (`blocks.N.att.time_state` [H,N,N], safetensors or an
    /// RWKV-PEFT `.pth`, e.g. from state tuning).
    /// When `<stem>.upscale.safetensors` (from `tune --upscale`) lies next to
    /// it, the kernel-upscaled read-out is used too (--device cpu only; that
    /// path re-runs the whole sequence for every generated token, so it is
    /// O(T²) and meant for short generations).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// A LoRA adapter (from `rwkv-tune tune --method lora`), applied in
    /// memory: the same exact merge as `rwkv-tune merge`, no file written.
    #[arg(long, value_name = "ADAPTER")]
    pub adapter: Option<PathBuf>,
    /// Prompt text.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Number of tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability.
    #[arg(long, default_value_t = 0.85)]
    pub top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Device to run on.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Weight GEMM precision on `--device cuda|emu` (default f32 on every
    /// device): `bf16` = bf16 operands with f32 accumulation.
    #[arg(long, value_enum, default_value_t = Gemm::F32)]
    pub gemm: Gemm,
    /// Tokenizer: `world:PATH` (rwkv_vocab_v20230424.txt), `hf:PATH` (tokenizer.json) or
    /// `bytes`. Default: `bytes` when the model's vocab is 256, otherwise required.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Token reduction of the prompt's prefill (decoding is unchanged).
    #[command(flatten)]
    pub reduce: crate::reduce::ReduceArgs,
}

/// Picks the tokenizer from `--tokenizer` or the model's vocabulary size.
pub fn tokenizer_for(spec: Option<&str>, vocab: usize) -> anyhow::Result<Tokenizer> {
    match spec {
        Some(s) => Ok(Tokenizer::from_spec(s)?),
        None if vocab == 256 => Ok(Tokenizer::from_spec("bytes")?),
        None => bail!(
            "the model has a vocabulary of {vocab}; pass --tokenizer world:PATH, hf:PATH or bytes"
        ),
    }
}

/// Tokens per forward when reading the prompt.
const PROMPT_CHUNK: usize = 1024;

/// Refuses to sample from NaN / Inf logits (they would print garbage),
/// unless `--allow-nonfinite`.
fn check_logits(logits: &[f32]) -> anyhow::Result<()> {
    rwkv_tune::guard::check_finite("the model's logits", logits)?;
    Ok(())
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    if let Some(p) = &a.state {
        let side = upscale::sidecar_path(p);
        if side.is_file() && a.reduce.reduce.is_some() {
            bail!(
                "--reduce does not apply to the upscaled read-out of {} (its sidecar lies next to it)",
                side.display()
            );
        }
        if side.is_file() && a.device != Device::Cpu {
            bail!(
                "{} (an upscale sidecar) lies next to the state file: the upscaled read-out \
                 runs on --device cpu only",
                side.display()
            );
        }
    }
    let (model, cfg) = Runner::load(&a.model, a.adapter.as_deref(), a.device, a.gemm)?;
    let tok = tokenizer_for(a.tokenizer.as_deref(), cfg.vocab)?;
    if let (Some(p), Runner::Cpu(m)) = (&a.state, &model) {
        if let Some((k, s)) = upscale::load_upscaled(p, &cfg)
            .with_context(|| format!("loading {} and its upscale sidecar", p.display()))?
        {
            eprintln!(
                "upscale sidecar in use: {} (M = {}); re-running the sequence for every token",
                upscale::sidecar_path(p).display(),
                k.m
            );
            return generate_upscaled(&a, m, &tok, &k, &s);
        }
    }
    let mut state = match &a.state {
        Some(p) => State::load(p, &cfg).with_context(|| format!("loading {}", p.display()))?,
        None => State::zeros(&cfg),
    };
    let mut sampler = Sampler::new(a.temperature, a.top_p, a.seed)?;
    let prompt = tok.encode(&a.prompt)?;
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= cfg.vocab) {
        bail!(
            "the tokenizer produced id {bad}, outside the model's vocabulary of {}",
            cfg.vocab
        );
    }
    let red = a.reduce.config(&cfg)?;
    let mut logits = if let (Some(red), false) = (&red, prompt.is_empty()) {
        // the prompt with token reduction (its chunks are reduced one by one)
        let t0 = std::time::Instant::now();
        let out = model.forward_reduced(&prompt, &mut state, red, 1, Logits::Last)?;
        eprintln!(
            "[prefill: {} tokens reduced ({}) in {:.3} s; counted layer FLOPs saved {:.1} %]",
            prompt.len(),
            crate::reduce::describe(red),
            t0.elapsed().as_secs_f64(),
            100.0 * out.report.saved()
        );
        out.logits
    } else if prompt.is_empty() {
        // No prompt: start from the end-of-text token 0.
        model.forward(&[0], &mut state, Logits::Last)?
    } else {
        // The prompt in chunks: a long prompt's activations never exist at
        // once (memory independent of its length).
        let mut last = Vec::new();
        for part in prompt.chunks(PROMPT_CHUNK) {
            last = model.forward(part, &mut state, Logits::Last)?;
        }
        last
    };
    check_logits(&logits)?;
    let stop_at_zero = matches!(tok, Tokenizer::World(_));
    let mut out = std::io::stdout().lock();
    let mut dec = StreamDecoder::new();
    let start = std::time::Instant::now();
    let mut n = 0;
    for _ in 0..a.max_tokens {
        let next = sampler.sample(&logits);
        if stop_at_zero && next == 0 {
            break;
        }
        n += 1;
        let text = dec.push(&tok, next)?;
        if !text.is_empty() {
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        logits = model.step(next, &mut state)?;
        check_logits(&logits)?;
    }
    out.write_all(dec.finish().as_bytes())?;
    writeln!(out)?;
    out.flush()?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "[{n} tokens in {secs:.2} s, {:.1} tokens/s]",
        n as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// Generation with the kernel-upscaled read-out: the library has only the
/// whole-sequence forward for it ([`upscale::forward_logits_upscaled`]), so
/// every token re-runs the sequence so far.
fn generate_upscaled(
    a: &GenerateArgs,
    model: &Model,
    tok: &Tokenizer,
    k: &Kernel,
    s: &UpscaledState,
) -> anyhow::Result<()> {
    let w = model.weights();
    let v = w.config.vocab;
    let mut sampler = Sampler::new(a.temperature, a.top_p, a.seed)?;
    let mut seq = tok.encode(&a.prompt)?;
    if let Some(&bad) = seq.iter().find(|&&t| t as usize >= v) {
        bail!("the tokenizer produced id {bad}, outside the model's vocabulary of {v}");
    }
    if seq.is_empty() {
        // No prompt: start from the end-of-text token 0.
        seq.push(0);
    }
    let stop_at_zero = matches!(tok, Tokenizer::World(_));
    let mut out = std::io::stdout().lock();
    let mut dec = StreamDecoder::new();
    let start = std::time::Instant::now();
    let mut n = 0;
    for _ in 0..a.max_tokens {
        let logits = upscale::forward_logits_upscaled(w, k, s, &seq)?;
        check_logits(&logits[logits.len() - v..])?;
        let next = sampler.sample(&logits[logits.len() - v..]);
        if stop_at_zero && next == 0 {
            break;
        }
        n += 1;
        let text = dec.push(tok, next)?;
        if !text.is_empty() {
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        seq.push(next);
    }
    out.write_all(dec.finish().as_bytes())?;
    writeln!(out)?;
    out.flush()?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "[{n} tokens in {secs:.2} s, {:.1} tokens/s]",
        n as f64 / secs.max(1e-9)
    );
    Ok(())
}
