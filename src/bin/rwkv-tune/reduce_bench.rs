//! `rwkv-tune reduce-bench`: token reduction of the prefill measured on the
//! shared datasets (LAMBADA last word, tiny-shakespeare window tails,
//! GSM8K answers): quality, prefill time and counted FLOPs saved for each
//! ratio × method, plus the ablations behind the design decisions of
//! docs/token-reduction.md. Writes one markdown report.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use rwkv_tune::model::reduce::{
    default_layers, Method, ReduceConfig, ReduceReport, Score, Similarity,
};
use rwkv_tune::model::sample::log_softmax;
use rwkv_tune::model::{argmax, Config, Logits};
use rwkv_tune::tokenizer::Tokenizer;

use crate::generate::{tokenizer_for, Device, Gemm, Runner};

#[derive(clap::Args)]
#[command(after_help = "Example (the table of docs/token-reduction.md):\n  \
    rwkv-tune reduce-bench --out docs/token-reduction-results.md")]
pub struct ReduceBenchArgs {
    /// Model checkpoint.
    #[arg(
        long,
        default_value = "../shared/fixtures/rwkv7-tiny-834k/rwkv7-tiny-834k.safetensors"
    )]
    pub model: PathBuf,
    /// Folder with lambada-test.jsonl, tinyshakespeare.txt, gsm8k-test.jsonl.
    #[arg(long, default_value = "../shared/datasets")]
    pub data: PathBuf,
    /// Tokenizer spec (default bytes for vocab 256).
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Device.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// LAMBADA passages (the first N).
    #[arg(long, default_value_t = 200)]
    pub lambada: usize,
    /// tiny-shakespeare windows (evenly spaced over the file).
    #[arg(long, default_value_t = 40)]
    pub windows: usize,
    /// Tokens per tiny-shakespeare window.
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Scored (protected) tokens at the end of each window.
    #[arg(long, default_value_t = 32)]
    pub tail: usize,
    /// GSM8K problems (the first N of the test set).
    #[arg(long, default_value_t = 50)]
    pub gsm8k: usize,
    /// Target FLOP savings, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,0.1,0.2,0.3")]
    pub ratios: Vec<f64>,
    /// Anchor layers (default: the model's default schedule).
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<usize>>,
    /// Timing repeats of each prefill pass (the fastest is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Skip the ablations (score, similarity, q, anchors) at 20 %.
    #[arg(long)]
    pub no_ablations: bool,
    /// Write the markdown report here (also printed).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One scored example: the tokens fed, how many final ones are scored
/// (protected), and the targets they predict.
struct Example {
    fed: Vec<u32>,
    tail: usize,
    targets: Vec<u32>,
}

struct Task {
    name: &'static str,
    examples: Vec<Example>,
    /// Whether "all tail tokens argmax-correct" is an accuracy to report.
    accuracy: bool,
}

#[derive(Default, Clone)]
struct Row {
    nll: f64,
    tokens: usize,
    correct: usize,
    examples: usize,
    secs: f64,
    cpu_secs: f64,
    report: ReduceReport,
}

fn read(p: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

fn load_tasks(a: &ReduceBenchArgs, tok: &Tokenizer) -> anyhow::Result<Vec<Task>> {
    let mut tasks = Vec::new();
    // LAMBADA: context → last word (everything after the last space)
    let mut ex = Vec::new();
    for line in read(&a.data.join("lambada-test.jsonl"))?
        .lines()
        .take(a.lambada)
    {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let text = v["text"].as_str().context("lambada: no text")?;
        let Some(i) = text.rfind(' ') else { continue };
        let (ctx, word) = (tok.encode(&text[..i])?, tok.encode(&text[i..])?);
        ex.push(example(ctx, word));
    }
    tasks.push(Task {
        name: "LAMBADA last word",
        examples: ex,
        accuracy: true,
    });
    // tiny-shakespeare: windows, the last `tail` tokens scored
    let ids = tok.encode(&read(&a.data.join("tinyshakespeare.txt"))?)?;
    let w = a.window.max(a.tail + 2);
    if ids.len() <= w {
        bail!("tinyshakespeare.txt is shorter than one window");
    }
    let step = (ids.len() - w) / a.windows.max(1);
    let ex = (0..a.windows)
        .map(|i| {
            let s = i * step;
            let win = &ids[s..s + w];
            example(win[..w - a.tail].to_vec(), win[w - a.tail..].to_vec())
        })
        .collect();
    tasks.push(Task {
        name: "tiny-shakespeare window tail",
        examples: ex,
        accuracy: false,
    });
    // GSM8K: question prompt → full answer
    let mut ex = Vec::new();
    for line in read(&a.data.join("gsm8k-test.jsonl"))?
        .lines()
        .take(a.gsm8k)
    {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let q = v["question"].as_str().context("gsm8k: no question")?;
        let ans = v["answer"].as_str().context("gsm8k: no answer")?;
        let ctx = tok.encode(&format!("Question: {q}\nAnswer:"))?;
        ex.push(example(ctx, tok.encode(&format!(" {ans}"))?));
    }
    tasks.push(Task {
        name: "GSM8K answer",
        examples: ex,
        accuracy: false,
    });
    Ok(tasks)
}

/// `ctx` then `ans`: feed all but the last token, score the rows that
/// predict `ans`.
fn example(ctx: Vec<u32>, ans: Vec<u32>) -> Example {
    let mut all = ctx;
    all.extend_from_slice(&ans);
    let fed = all[..all.len() - 1].to_vec();
    Example {
        fed,
        tail: ans.len(),
        targets: ans,
    }
}

fn run_task(
    model: &Runner,
    cfg: &Config,
    task: &Task,
    red: &ReduceConfig,
    repeats: usize,
) -> anyhow::Result<Row> {
    let v = cfg.vocab;
    let mut row = Row::default();
    for e in &task.examples {
        if e.tail == 0 || e.fed.len() < e.tail {
            continue;
        }
        let mut st = rwkv_tune::model::State::zeros(cfg);
        let out = model.forward_reduced(&e.fed, &mut st, red, e.tail, Logits::All)?;
        let k = out.positions.len();
        let first = e.fed.len() - e.tail;
        let mut all_ok = true;
        for (r, &p) in out.positions.iter().enumerate().skip(k - e.tail) {
            let target = e.targets[p - first];
            let lr = &out.logits[r * v..(r + 1) * v];
            row.nll -= log_softmax(lr)[target as usize];
            row.tokens += 1;
            all_ok &= argmax(lr) == target;
        }
        row.correct += all_ok as usize;
        row.examples += 1;
        row.report.add(&out.report);
    }
    // prefill time: the whole context pass with the last logits only
    let (mut best, mut best_cpu) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..repeats.max(1) {
        let (t0, c0) = (Instant::now(), process_cpu_secs());
        for e in &task.examples {
            if e.tail == 0 || e.fed.len() < e.tail {
                continue;
            }
            let mut st = rwkv_tune::model::State::zeros(cfg);
            model.forward_reduced(&e.fed, &mut st, red, e.tail, Logits::Last)?;
        }
        best = best.min(t0.elapsed().as_secs_f64());
        best_cpu = best_cpu.min(process_cpu_secs() - c0);
    }
    row.secs = best;
    row.cpu_secs = best_cpu;
    Ok(row)
}

/// CPU time of this process (all threads), in seconds: less disturbed than
/// wall time by other jobs on a shared machine.
fn process_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the valid pointer
    // it is given; CLOCK_PROCESS_CPUTIME_ID is supported on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn fmt_row(label: &str, task: &Task, r: &Row, dense: &Row) -> String {
    let loss = r.nll / r.tokens.max(1) as f64;
    let dloss = loss - dense.nll / dense.tokens.max(1) as f64;
    let acc = if task.accuracy {
        format!("{:.1}", 100.0 * r.correct as f64 / r.examples.max(1) as f64)
    } else {
        "–".into()
    };
    let kept = 1.0
        - (r.report.rows_ffn.iter().sum::<usize>() as f64
            / (r.report.tokens * r.report.rows_ffn.len()).max(1) as f64);
    format!(
        "| {label} | {loss:.4} | {dloss:+.4} | {acc} | {:.3} | {:.3} | {:.2}× | {:.1} % | {:.1} % |",
        r.secs,
        r.cpu_secs,
        dense.cpu_secs / r.cpu_secs.max(1e-12),
        100.0 * r.report.saved(),
        100.0 * kept,
    )
}

const HEADER: &str = "| setting | loss (nats/token) | Δ loss vs dense | acc % | prefill wall s | prefill CPU s | CPU speed-up | counted FLOPs saved | layer-tokens removed |\n|---|---|---|---|---|---|---|---|---|";

pub fn run(a: ReduceBenchArgs) -> anyhow::Result<()> {
    if !a.model.is_file() {
        bail!(
            "model {} not found (the default is the tiny model of ../shared/fixtures)",
            a.model.display()
        );
    }
    let (model, cfg) = Runner::load(&a.model, None, a.device, Gemm::F32)?;
    let tok = tokenizer_for(a.tokenizer.as_deref(), cfg.vocab)?;
    let tasks = load_tasks(&a, &tok)?;
    let layers = a
        .layers
        .clone()
        .unwrap_or_else(|| default_layers(cfg.n_layer));
    let threads = rayon::current_num_threads();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cmd: Vec<String> = std::env::args().collect();
    let mut md = String::new();
    md.push_str(&format!(
        "Measured with `{}` on {} ({} rayon threads, device {:?}), model `{}` ({} layers, C = {}), anchors {:?}. \
         Loss: mean NLL of the scored (protected) tokens; prefill wall s / CPU s: the fastest of {} passes \
         over the task's contexts with the last logits only, wall clock and process CPU time (all threads; \
         the machine is shared, so CPU time is the steadier one and the speed-up uses it); counted FLOPs: the layers' GEMMs and WKV (`model::reduce::LayerCost`) \
         plus the matching, head left out.\n\n",
        cmd.join(" "),
        cpu,
        threads,
        a.device,
        a.model.display(),
        cfg.n_layer,
        cfg.n_embd,
        layers,
        a.repeats
    ));
    let mut dense_rows = Vec::new();
    for task in &tasks {
        let n_tok: usize = task.examples.iter().map(|e| e.fed.len()).sum();
        md.push_str(&format!(
            "### {} ({} examples, {} context tokens, {} scored)\n\n{HEADER}\n",
            task.name,
            task.examples.len(),
            n_tok,
            task.examples.iter().map(|e| e.tail).sum::<usize>()
        ));
        let dense_cfg = ReduceConfig::uniform(&[], 0.0)?;
        let dense = run_task(&model, &cfg, task, &dense_cfg, a.repeats)?;
        md.push_str(&fmt_row("dense (0 %)", task, &dense, &dense));
        md.push('\n');
        for &r in a.ratios.iter().filter(|&&r| r > 0.0) {
            for m in [Method::Hybrid, Method::Prune, Method::Merge] {
                let mut red = ReduceConfig::for_target(&cfg, &layers, r)?;
                red.method = m;
                let row = run_task(&model, &cfg, task, &red, a.repeats)?;
                let label = format!(
                    "{m} {:.0} % (per layer {:.1} %)",
                    100.0 * r,
                    100.0 * red.anchors.first().map_or(0.0, |x| x.ratio)
                );
                md.push_str(&fmt_row(&label, task, &row, &dense));
                md.push('\n');
                eprintln!("{}: {label} done", task.name);
            }
        }
        md.push('\n');
        dense_rows.push(dense);
    }
    if !a.no_ablations {
        md.push_str("### Ablations at a 20 % target (hybrid unless named)\n\n");
        let base = ReduceConfig::for_target(&cfg, &layers, 0.2)?;
        let mut variants: Vec<(String, ReduceConfig)> = Vec::new();
        for s in [
            "wkv", "wkv-l1", "wkv-l2", "wkv-mean", "gated", "out", "erase",
        ] {
            let mut r = base.clone();
            r.score = s.parse::<Score>()?;
            variants.push((format!("score {s}"), r));
        }
        let mut r = base.clone();
        r.merge_into_protected = true;
        variants.push(("merge into protected tokens too".into(), r));
        let mut r = base.clone();
        r.sim = Similarity::Dx;
        variants.push(("similarity dx".into(), r));
        for q in [0.0, 0.25, 0.75, 1.0] {
            let mut r = base.clone();
            r.q = q;
            variants.push((format!("q {q}"), r));
        }
        let n = cfg.n_layer;
        let early: Vec<usize> = layers.iter().map(|&l| l.saturating_sub(2)).collect();
        let late: Vec<usize> = layers.iter().map(|&l| (l + 2).min(n - 1)).collect();
        for (name, ls) in [("anchors early", early), ("anchors late", late)] {
            let mut ls = ls;
            ls.dedup();
            match ReduceConfig::for_target(&cfg, &ls, 0.2) {
                Ok(r) => variants.push((format!("{name} {ls:?}"), r)),
                Err(e) => eprintln!("{name}: {e}"),
            }
        }
        for (task, dense) in tasks.iter().zip(&dense_rows) {
            if task.name.starts_with("GSM8K") {
                continue; // the two faster tasks decide
            }
            md.push_str(&format!("#### {}\n\n{HEADER}\n", task.name));
            md.push_str(&fmt_row(
                "hybrid wkv (default)",
                task,
                &run_task(&model, &cfg, task, &base, 1)?,
                dense,
            ));
            md.push('\n');
            for (label, r) in &variants {
                let row = run_task(&model, &cfg, task, r, 1)?;
                md.push_str(&fmt_row(label, task, &row, dense));
                md.push('\n');
                eprintln!("{}: {label} done", task.name);
            }
            md.push('\n');
        }
    }
    print!("{md}");
    if let Some(p) = &a.out {
        let mut f = std::fs::File::create(p).with_context(|| format!("writing {}", p.display()))?;
        f.write_all(md.as_bytes())?;
    }
    Ok(())
}
