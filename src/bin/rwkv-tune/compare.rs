//! `rwkv-tune compare`: plain / DBP / upscaled / observer state tuning on one
//! task at the same budget; writes a markdown report (docs/comparison.md).
use std::path::PathBuf;

use anyhow::{Context, Result};
use rwkv_tune::tune::compare::{run_comparison, CompareConfig, KlPositions};
use rwkv_tune::tune::grad::HeadVector;

/// Compare plain state tuning, DBP, the kernel-upscaled state and the
/// observer on the bundled synthetic task (seeded random RWKV-7, no files
/// needed) at the same budget: steps to reach a held-out loss, final
/// held-out loss, exact-match accuracy.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  rwkv-tune compare --steps 60 --seed 0 --out docs/comparison.md"
)]
pub struct CompareArgs {
    /// Optimiser steps per method (the lr schedule spans them).
    #[arg(long, default_value_t = 60)]
    pub steps: u64,
    /// Seed of the task data, the data order and the kernel fitting.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Examples per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Held-out evaluation every this many steps.
    #[arg(long, default_value_t = 5)]
    pub eval_every: u64,
    /// Target held-out loss for "steps to reach" (default: the plain
    /// method's final held-out loss).
    #[arg(long)]
    pub target: Option<f64>,
    /// Training / held-out examples.
    #[arg(long, default_value_t = 256)]
    pub n_train: usize,
    #[arg(long, default_value_t = 64)]
    pub n_valid: usize,
    /// Support vectors per head of the upscaled state (M).
    #[arg(long, default_value_t = 128)]
    pub upscale_m: usize,
    /// Place the support vectors on the heads' keys or receptances.
    #[arg(long, value_enum, default_value_t = Source::Receptance)]
    pub upscale_source: Source,
    /// Observer KL weight λ.
    #[arg(long, default_value_t = 1.0)]
    pub observer_weight: f32,
    /// Observer soft-target temperature: targets softmax(logits / T). Below
    /// 1 sharpens the observer's (under-confident) distribution towards its
    /// argmax; see docs/observer.md for why 0.25.
    #[arg(long, default_value_t = 0.25)]
    pub observer_temp: f32,
    /// Steps the observer's own state is tuned for (default: --steps).
    #[arg(long)]
    pub observer_steps: Option<u64>,
    /// Positions that carry the observer's KL: the response (where the CE
    /// is) or all (KL alone on the prompt too).
    #[arg(long, value_enum, default_value_t = Positions::Response)]
    pub observer_positions: Positions,
    /// Labels-scarce variant: only the first N training examples keep their
    /// responses (every method trains on those); the observer method also
    /// gets the other training prompts, supervised by the observer alone.
    #[arg(long)]
    pub labelled: Option<usize>,
    /// With --labelled: tune the observer on the labelled examples only
    /// (default: on the whole training set).
    #[arg(long)]
    pub observer_labelled_only: bool,
    /// Global-norm gradient clipping (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// Write the markdown report here (else print it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Machine description for the report (default: detected core count).
    #[arg(long)]
    pub machine: Option<String>,
    /// Compare the parameter-efficient methods instead (state,
    /// state-offset, lora, sdt, sdlora, recurrent; docs/peft-comparison.md) on --peft-task, each
    /// through the same engine and loop as `rwkv-tune tune`, at --steps
    /// (default 150 here) and --batch (default 8).
    #[arg(long)]
    pub peft: bool,
    /// The --peft task: synthetic (the bundled demo task), shakespeare (the
    /// real tiny model of ../shared/fixtures on tinyshakespeare; skipped
    /// with a note when absent) or both.
    #[arg(long, value_enum, default_value_t = PeftTask::Both)]
    pub peft_task: PeftTask,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PeftTask {
    Synthetic,
    Shakespeare,
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Positions {
    Response,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    Key,
    Receptance,
}

/// `YYYY-MM-DD` (UTC) of now, without a date crate.
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // civil-from-days (H. Hinnant)
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `compare --peft`: every method on each task, one markdown report.
fn run_peft(a: &CompareArgs) -> Result<()> {
    use rwkv_tune::tune::data::{self, ByteTokenizer, Dataset};
    use rwkv_tune::tune::demo;
    use rwkv_tune::tune::peft_compare::{peft_table, run_peft_comparison, PeftConfig, PeftMethod};
    let steps_given = std::env::args().any(|x| x == "--steps" || x.starts_with("--steps="));
    let batch_given = std::env::args().any(|x| x == "--batch" || x.starts_with("--batch="));
    let steps = if steps_given { a.steps } else { 150 };
    let batch = if batch_given { a.batch } else { 8 };
    let pc = PeftConfig {
        steps,
        batch,
        seed: a.seed,
        lr_state: 1.0,
        lr_peft: 1e-2,
        lora_rank: 8,
        sdt_heads: 0.25,
        sdt_dims: 0.25,
        sdt_warmup: (steps / 5).max(1),
        eval_max: 64,
    };
    let machine = a.machine.clone().unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        format!("{cores}-core CPU, no GPU used")
    });
    let mut md = format!(
        "Generated by `cargo run --release -- compare --peft --steps {steps} --batch {batch} \
         --seed {} --peft-task {}` on {machine}, {}. Every method: the CPU engine, the \
         same data order and {steps} optimiser steps of batch {batch} (SDT and SDLoRA also \
         run a dense warm-up of {} steps first, not counted in tokens/s); lr 1 → 0.01 for \
         state tuning (its RWKV-PEFT recipe, with DBP) and state-offset tuning, 0.01 → \
         0.001 for the others; LoRA \
         rank 8, alpha 8 on r, k, v, o, ffn.key, ffn.value; SDT keeps 25% of heads × 25% of \
         key dimensions. Held-out loss on at most 64 held-out examples.\n\n",
        a.seed,
        format!("{:?}", a.peft_task).to_lowercase(),
        today(),
        pc.sdt_warmup
    );
    let mut say = |l: &str| eprintln!("{l}");
    let tasks: Vec<PeftTask> = match a.peft_task {
        PeftTask::Both => vec![PeftTask::Synthetic, PeftTask::Shakespeare],
        t => vec![t],
    };
    for task in tasks {
        let (title, model, tr, va): (String, rwkv_tune::model::Model, Dataset, Dataset) = match task
        {
            PeftTask::Shakespeare => {
                let Some((m, t)) = demo::shakespeare_paths() else {
                    md += "### shakespeare\n\nSKIPPED: ../shared/fixtures/rwkv7-tiny-834k or \
                           ../shared/datasets/tinyshakespeare.txt not found.\n\n";
                    continue;
                };
                let w = rwkv_tune::model::Weights::load(&m)
                    .with_context(|| format!("loading {}", m.display()))?;
                let recs = data::read_records(&t, &ByteTokenizer)?;
                let (tr, va) = data::split_records(recs, 0.05, 0);
                (
                    format!(
                        "shakespeare: the real trained tiny RWKV-7 ({}) on tinyshakespeare, \
                         128-byte windows, last 5% held out (next-byte loss)",
                        m.file_name()
                            .map_or("".into(), |f| f.to_string_lossy().to_string())
                    ),
                    rwkv_tune::model::Model::new(w)?,
                    Dataset::from_records(&tr, 128)?,
                    Dataset::from_records(&va, 128)?,
                )
            }
            _ => {
                let w = demo::demo_weights(demo::DEMO_MODEL_SEED)?;
                let (tr, va) =
                    demo::synthetic_datasets(512, 128, a.seed.wrapping_add(1), &ByteTokenizer)?;
                (
                    "synthetic: the bundled demo task (seeded random 2-layer model; answer \
                     ` Yes.` / ` Wow!` / ` Ok.` by the prompt's punctuation; loss on the answer)"
                        .to_string(),
                    rwkv_tune::model::Model::new(w)?,
                    tr,
                    va,
                )
            }
        };
        let rows = run_peft_comparison(&model, &tr, &va, &pc, &PeftMethod::ALL, &mut say)?;
        let table = peft_table(&rows);
        println!("{title}\n{table}");
        md += &format!("### {title}\n\n{table}\n");
    }
    match &a.out {
        Some(p) => {
            std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?;
            eprintln!("wrote {}", p.display());
        }
        None => println!("{md}"),
    }
    Ok(())
}

pub fn run(a: CompareArgs) -> Result<()> {
    if a.peft {
        return run_peft(&a);
    }
    let mut cc = CompareConfig::new(a.steps);
    cc.seed = a.seed;
    cc.batch = a.batch;
    cc.eval_every = a.eval_every;
    cc.target = a.target;
    cc.n_train = a.n_train;
    cc.n_valid = a.n_valid;
    cc.upscale_m = a.upscale_m;
    cc.upscale_source = match a.upscale_source {
        Source::Key => HeadVector::Key,
        Source::Receptance => HeadVector::Receptance,
    };
    cc.observer_weight = a.observer_weight;
    cc.observer_temperature = a.observer_temp;
    if let Some(k) = a.observer_steps {
        cc.observer_steps = k;
    }
    cc.clip = a.clip;
    cc.observer_positions = match a.observer_positions {
        Positions::Response => KlPositions::Response,
        Positions::All => KlPositions::All,
    };
    cc.labelled = a.labelled;
    cc.observer_labelled_only = a.observer_labelled_only;
    let mut command = format!(
        "cargo run --release -- compare --steps {} --seed {} --batch {} --eval-every {}",
        a.steps, a.seed, a.batch, a.eval_every
    );
    if let Some(t) = a.target {
        command += &format!(" --target {t}");
    }
    if (a.n_train, a.n_valid) != (256, 64) {
        command += &format!(" --n-train {} --n-valid {}", a.n_train, a.n_valid);
    }
    if a.upscale_m != 128 {
        command += &format!(" --upscale-m {}", a.upscale_m);
    }
    if a.upscale_source != Source::Receptance {
        command += " --upscale-source key";
    }
    if a.observer_weight != 1.0 {
        command += &format!(" --observer-weight {}", a.observer_weight);
    }
    if a.observer_temp != 0.25 {
        command += &format!(" --observer-temp {}", a.observer_temp);
    }
    if let Some(k) = a.observer_steps {
        command += &format!(" --observer-steps {k}");
    }
    if a.observer_positions != Positions::Response {
        command += " --observer-positions all";
    }
    if let Some(k) = a.labelled {
        command += &format!(" --labelled {k}");
    }
    if a.observer_labelled_only {
        command += " --observer-labelled-only";
    }
    if a.clip != 1.0 {
        command += &format!(" --clip {}", a.clip);
    }
    if let Some(m) = &a.machine {
        command += &format!(" --machine {m:?}");
    }
    if let Some(o) = &a.out {
        command += &format!(" --out {}", o.display());
    }
    let machine = a.machine.clone().unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        format!("{cores}-core CPU, no GPU used")
    });
    let res = run_comparison(&cc, &mut |line| eprintln!("{line}"))?;
    let md = res.to_markdown(&command, &machine, &today());
    match &a.out {
        Some(p) => {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?;
            println!("{}", res.table());
            eprintln!("wrote {}", p.display());
        }
        None => println!("{md}"),
    }
    Ok(())
}
