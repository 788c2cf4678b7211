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

pub fn run(a: CompareArgs) -> Result<()> {
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
