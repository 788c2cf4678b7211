//! `rwkv-tune eval`: loss, bits per byte, perplexity and LAMBADA-style
//! last-word accuracy of a model on a dataset.
use std::path::PathBuf;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rwkv_tune::model::sample::log_softmax;
use rwkv_tune::model::{argmax, Logits, State};
use rwkv_tune::tokenizer::Tokenizer;

use crate::generate::{tokenizer_for, Device, Gemm, Runner};

#[derive(clap::Args)]
#[command(
    long_about = "Evaluate a model on a dataset.\n\n\
    JSONL files (one {\"text\": ...} object per line) are evaluated document by document, each \
    from the zero state (or the --state file). Reported: the mean loss over all predicted tokens (nats/token), bits per \
    byte, perplexity, and LAMBADA-style last-word accuracy: the last word is everything after \
    the last space (the space included), the context everything before it; a document counts \
    as correct when greedy decoding from the context reproduces the last word's tokens exactly. \
    The perplexity of the last word alone is reported too.\n\n\
    Any other file is read as plain text and evaluated as one long document (state carried \
    across chunks of --chunk tokens).\n\n\
    With the world tokenizer every document starts with the end-of-text token 0, so its first \
    token is scored too; with other tokenizers the first token is context only.",
    after_help = "Example:\n  rwkv-tune eval --model rwkv7-tiny-834k.safetensors --data lambada-test.jsonl --limit 500"
)]
pub struct EvalArgs {
    /// Model checkpoint: safetensors or PyTorch `.pth` (told apart by content).
    #[arg(long)]
    pub model: PathBuf,
    /// Dataset: `.jsonl` with a "text" field per line, or a plain text file.
    #[arg(long)]
    pub data: PathBuf,
    /// Evaluate only the first N documents (JSONL) or N tokens (plain text).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Tokenizer: `world:PATH`, `hf:PATH` or `bytes` (default `bytes` for vocab 256).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Tokens per forward pass for plain-text files.
    #[arg(long, default_value_t = 4096)]
    pub chunk: usize,
    /// Device to run on: cpu, cuda (the device forward: cuBLAS and the
    /// project's kernels) or emu (the same kernels on the CPU emulator; slow).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Start every document (or the plain-text stream) from this state file
    /// (ai00 / web-rwkv layout, e.g. from `rwkv-tune tune --out`) instead of
    /// the zero state. An upscale sidecar next to it is not used by eval.
    /// Accepts safetensors or `.pth` (RWKV-PEFT) state files.
    #[arg(long, value_name = "STATE")]
    pub state: Option<PathBuf>,
    /// A LoRA adapter (from `rwkv-tune tune --method lora`), applied in
    /// memory: the same exact merge as `rwkv-tune merge`, no file written.
    #[arg(long, value_name = "ADAPTER")]
    pub adapter: Option<PathBuf>,
    /// Print one JSON object (full precision) instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// Write the per-token logits of the first --logits-docs documents (JSONL)
    /// or forward passes (plain text) to this safetensors file:
    /// `doc{i}.tokens` [T] (i64, the tokens fed) and `doc{i}.logits` [T, vocab].
    #[arg(long, value_name = "FILE")]
    pub logits: Option<PathBuf>,
    /// How many documents --logits writes.
    #[arg(long, default_value_t = 1)]
    pub logits_docs: usize,
    /// Token reduction: each JSONL document's context is prefilled with
    /// reduction and only its last word is scored (at its real positions);
    /// a plain-text file is cut into windows of --chunk tokens whose last
    /// --reduce-tail tokens are scored. The loss then covers those tokens.
    #[command(flatten)]
    pub reduce: crate::reduce::ReduceArgs,
    /// With --reduce on plain text: scored (never removed) tokens at the
    /// end of each window.
    #[arg(long, default_value_t = 64)]
    pub reduce_tail: usize,
}

/// With --reduce: scores the last `tail` tokens of `prefix + toks` after a
/// reduced prefill of the rest (the scored rows are protected), like
/// [`score`] otherwise.
#[allow(clippy::too_many_arguments)]
fn score_reduced(
    model: &Runner,
    tok: &Tokenizer,
    prefix: &[u32],
    toks: &[u32],
    tail: usize,
    red: &rwkv_tune::model::reduce::ReduceConfig,
    tot: &mut Totals,
    state: &mut State,
    rep: &mut rwkv_tune::model::reduce::ReduceReport,
) -> anyhow::Result<Vec<(f64, bool)>> {
    let v = tot.vocab;
    let mut input = prefix.to_vec();
    input.extend_from_slice(toks);
    if input.len() < 2 || tail == 0 {
        return Ok(Vec::new());
    }
    let fed = input.len() - 1;
    let tail = tail.min(toks.len()).min(fed);
    let r = model.forward_reduced(&input[..fed], state, red, tail, Logits::All)?;
    rep.add(&r.report);
    let mut out = Vec::new();
    for (row, &p) in r.positions.iter().enumerate() {
        if p + tail < fed {
            continue;
        }
        let target = input[p + 1];
        let lr = &r.logits[row * v..(row + 1) * v];
        let lp = log_softmax(lr)[target as usize];
        out.push((-lp, argmax(lr) == target));
        tot.nll -= lp;
        tot.tokens += 1;
        tot.bytes += tok.decode(&[target])?.len();
    }
    Ok(out)
}

/// The logits kept for --logits.
struct LogitsSink {
    want: usize,
    docs: Vec<(Vec<u32>, Vec<f32>)>,
}

#[derive(Default)]
struct Totals {
    vocab: usize,
    nll: f64,
    tokens: usize,
    bytes: usize,
    docs: usize,
    correct: usize,
    target_nll: f64,
    target_tokens: usize,
}

/// Scores `toks` (after `prefix`, which is context only) from `state`,
/// feeding at most `chunk` tokens per forward so the `[T, V]` logits of a
/// long document never exist at once (memory independent of its length).
/// Returns (nll, argmax-correct) of the predicted tokens among the last
/// `tail` of `toks` (the last word), oldest first.
#[allow(clippy::too_many_arguments)]
fn score(
    model: &Runner,
    tok: &Tokenizer,
    prefix: &[u32],
    toks: &[u32],
    tail: usize,
    chunk: usize,
    tot: &mut Totals,
    state: &mut rwkv_tune::model::State,
    sink: &mut LogitsSink,
) -> anyhow::Result<Vec<(f64, bool)>> {
    let v = tot.vocab;
    let mut input = prefix.to_vec();
    input.extend_from_slice(toks);
    if input.len() < 2 {
        return Ok(Vec::new());
    }
    let fed = input.len() - 1;
    let first = (input.len() - toks.len()).max(1); // index in `input` of the first scored token
    let tail_from = input.len() - tail.min(toks.len());
    let keep = sink.docs.len() < sink.want;
    let mut kept = Vec::new();
    let mut out = Vec::new();
    let mut start = 0;
    while start < fed {
        let end = (start + chunk).min(fed);
        let logits = model.forward(&input[start..end], state, Logits::All)?;
        for p in start..end {
            let pos = p + 1; // the token that row p predicts
            if pos < first {
                continue;
            }
            let target = input[pos];
            let row = &logits[(p - start) * v..(p - start + 1) * v];
            let lp = log_softmax(row)[target as usize];
            if pos >= tail_from {
                out.push((-lp, argmax(row) == target));
            }
            tot.nll -= lp;
            tot.tokens += 1;
            tot.bytes += tok.decode(&[target])?.len();
        }
        if keep {
            kept.extend_from_slice(&logits);
        }
        start = end;
    }
    if keep {
        sink.docs.push((input[..fed].to_vec(), kept));
    }
    Ok(out)
}

/// The most tokens one forward of `eval` may take.
const MAX_CHUNK: usize = 1 << 20;

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    if a.chunk == 0 || a.chunk > MAX_CHUNK {
        bail!(
            "--chunk {}: give 1 to {MAX_CHUNK} tokens per forward",
            a.chunk
        );
    }
    if a.limit == Some(0) {
        bail!("--limit 0 would evaluate nothing; give at least 1 (or leave it out for all)");
    }
    if let Some(out) = &a.logits {
        let mut ins: Vec<(&str, &std::path::Path)> =
            vec![("--model", a.model.as_path()), ("--data", a.data.as_path())];
        if let Some(p) = &a.state {
            ins.push(("--state", p.as_path()));
        }
        rwkv_tune::guard::check_outputs(&ins, &[("--logits", out.as_path())])?;
    }
    let (model, cfg) = Runner::load(&a.model, a.adapter.as_deref(), a.device, Gemm::F32)?;
    // One forward's logits, activations and FFN rows, as f32.
    let per_token = cfg.vocab + 8 * cfg.n_embd + cfg.d_ffn;
    let chunk_bytes = (a.chunk as u64).saturating_mul(per_token as u64 * 4);
    rwkv_tune::guard::check_host_memory(
        &format!(
            "--chunk {} (a forward of {} tokens with a vocabulary of {})",
            a.chunk, a.chunk, cfg.vocab
        ),
        chunk_bytes,
    )?;
    let start_state = match &a.state {
        Some(p) => {
            let st =
                State::load(p, &cfg).with_context(|| format!("loading state {}", p.display()))?;
            if !a.json {
                println!("initial state:    {}", p.display());
            }
            let side = rwkv_tune::tune::upscale::sidecar_path(p);
            if side.is_file() {
                eprintln!(
                    "note: {} (upscaled read-out) is not used by eval; the N×N states are",
                    side.display()
                );
            }
            st
        }
        None => State::zeros(&cfg),
    };
    let tok = tokenizer_for(a.tokenizer.as_deref(), cfg.vocab)?;
    let prefix: Vec<u32> = if matches!(tok, Tokenizer::World(_)) {
        vec![0]
    } else {
        Vec::new()
    };
    let raw = std::fs::read_to_string(&a.data)
        .with_context(|| format!("reading {}", a.data.display()))?;
    let jsonl = a.data.extension().is_some_and(|e| e == "jsonl");
    let mut tot = Totals {
        vocab: cfg.vocab,
        ..Totals::default()
    };
    let mut sink = LogitsSink {
        want: if a.logits.is_some() { a.logits_docs } else { 0 },
        docs: Vec::new(),
    };
    let red = a.reduce.config(&cfg)?;
    if red.is_some() && a.logits.is_some() {
        bail!("--logits and --reduce cannot be used together (a reduced forward has fewer rows)");
    }
    if red.is_some() && a.reduce_tail == 0 {
        bail!("--reduce-tail 0 would score nothing");
    }
    let mut rep = rwkv_tune::model::reduce::ReduceReport::default();
    let start = std::time::Instant::now();
    if jsonl {
        let mut texts = Vec::new();
        for (i, line) in raw.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not JSON", a.data.display(), i + 1))?;
            let Some(t) = v.get("text").and_then(|t| t.as_str()) else {
                bail!(
                    "{} line {}: no \"text\" string field",
                    a.data.display(),
                    i + 1
                );
            };
            texts.push(t.to_string());
        }
        if let Some(n) = a.limit {
            texts.truncate(n);
        }
        let pb = ProgressBar::new(texts.len() as u64);
        pb.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} docs [{elapsed} < {eta}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        for text in &texts {
            let (ctx, target) = match text.rfind(' ') {
                Some(i) if i > 0 => (&text[..i], &text[i..]),
                _ => (text.as_str(), ""),
            };
            let ctx_ids = tok.encode(ctx)?;
            let tgt_ids = tok.encode(target)?;
            let mut all = ctx_ids.clone();
            all.extend_from_slice(&tgt_ids);
            let mut state = start_state.clone();
            let scored = match &red {
                Some(red) => score_reduced(
                    &model,
                    &tok,
                    &prefix,
                    &all,
                    tgt_ids.len(),
                    red,
                    &mut tot,
                    &mut state,
                    &mut rep,
                )?,
                None => score(
                    &model,
                    &tok,
                    &prefix,
                    &all,
                    tgt_ids.len(),
                    a.chunk,
                    &mut tot,
                    &mut state,
                    &mut sink,
                )?,
            };
            tot.docs += 1;
            if !tgt_ids.is_empty() && scored.len() >= tgt_ids.len() {
                let tail = &scored[scored.len() - tgt_ids.len()..];
                if tail.iter().all(|s| s.1) {
                    tot.correct += 1;
                }
                tot.target_nll += tail.iter().map(|s| s.0).sum::<f64>();
                tot.target_tokens += 1;
            }
            pb.inc(1);
            if tot.docs % 16 == 0 {
                pb.set_message(format!(
                    "acc {:.2}%  loss {:.4}",
                    100.0 * tot.correct as f64 / tot.docs as f64,
                    tot.nll / tot.tokens.max(1) as f64
                ));
            }
        }
        pb.finish_and_clear();
    } else {
        let mut ids = tok.encode(&raw)?;
        if let Some(n) = a.limit {
            ids.truncate(n);
        }
        let pb = ProgressBar::new(ids.len() as u64);
        pb.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} tokens [{elapsed} < {eta}]")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let mut state = start_state.clone();
        let chunk = a.chunk.max(2);
        // Chunks overlap by one token so every token after the first is scored once.
        let mut startpos = 0;
        let mut first = true;
        while startpos + 1 < ids.len() {
            let end = (startpos + chunk).min(ids.len());
            let pre: &[u32] = if first { &prefix } else { &[] };
            match &red {
                Some(red) => {
                    score_reduced(
                        &model,
                        &tok,
                        pre,
                        &ids[startpos..end],
                        a.reduce_tail,
                        red,
                        &mut tot,
                        &mut state,
                        &mut rep,
                    )?;
                }
                None => {
                    score(
                        &model,
                        &tok,
                        pre,
                        &ids[startpos..end],
                        0,
                        chunk,
                        &mut tot,
                        &mut state,
                        &mut sink,
                    )?;
                }
            }
            // `score` fed all but the last token; continue from it.
            startpos = end - 1;
            first = false;
            pb.set_position(end as u64);
        }
        pb.finish_and_clear();
        tot.docs = 1;
    }
    let secs = start.elapsed().as_secs_f64();
    if tot.tokens == 0 {
        bail!(
            "no token was scored: {} gave no document of at least two tokens (empty, \
             whitespace only, or every text too short); a loss over zero tokens means nothing",
            a.data.display()
        );
    }
    let loss = tot.nll / tot.tokens as f64;
    if !loss.is_finite() && !rwkv_tune::guard::allow_nonfinite() {
        bail!("the loss is {loss} (the model's logits are not finite on this data)");
    }
    if let Some(path) = &a.logits {
        rwkv_tune::model::load::write_logits(path, &sink.docs, cfg.vocab)
            .with_context(|| format!("writing logits to {}", path.display()))?;
        if !a.json {
            println!(
                "logits:           {} ({} documents)",
                path.display(),
                sink.docs.len()
            );
        }
    }
    let bpb = tot.nll / std::f64::consts::LN_2 / tot.bytes.max(1) as f64;
    if a.json {
        let mut j = serde_json::json!({
            "model": a.model.display().to_string(),
            "data": a.data.display().to_string(),
            "state": a.state.as_ref().map(|p| p.display().to_string()),
            "device": format!("{:?}", a.device).to_lowercase(),
            "documents": tot.docs,
            "tokens": tot.tokens,
            "bytes": tot.bytes,
            "loss": loss,
            "bits_per_byte": bpb,
            "perplexity": loss.exp(),
            "seconds": secs,
            "tokens_per_second": tot.tokens as f64 / secs.max(1e-9),
        });
        if jsonl && tot.target_tokens > 0 {
            j["last_word_accuracy"] = (tot.correct as f64 / tot.target_tokens as f64).into();
            j["last_word_correct"] = tot.correct.into();
            j["last_word_count"] = tot.target_tokens.into();
            j["last_word_perplexity"] = (tot.target_nll / tot.target_tokens as f64).exp().into();
        }
        if let Some(p) = &a.logits {
            j["logits_file"] = p.display().to_string().into();
        }
        if let Some(r) = &red {
            j["reduce"] = crate::reduce::describe(r).into();
            j["reduce_flops_saved"] = rep.saved().into();
        }
        println!("{j}");
        return Ok(());
    }
    if let Some(r) = &red {
        println!("token reduction:  {}", crate::reduce::describe(r));
        println!(
            "                  counted layer FLOPs saved {:.1} % (scored: the protected tail / last word only)",
            100.0 * rep.saved()
        );
    }
    println!("data:             {}", a.data.display());
    println!("documents:        {}", tot.docs);
    println!("scored tokens:    {}  ({} bytes)", tot.tokens, tot.bytes);
    println!("loss:             {loss:.4} nats/token");
    println!("bits per byte:    {bpb:.4}");
    println!("perplexity:       {:.3}", loss.exp());
    if jsonl && tot.target_tokens > 0 {
        println!(
            "last-word acc:    {:.2}%  ({}/{})",
            100.0 * tot.correct as f64 / tot.target_tokens as f64,
            tot.correct,
            tot.target_tokens
        );
        println!(
            "last-word ppl:    {:.3}",
            (tot.target_nll / tot.target_tokens as f64).exp()
        );
    }
    println!(
        "time:             {secs:.1} s ({:.0} tokens/s)",
        tot.tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}
