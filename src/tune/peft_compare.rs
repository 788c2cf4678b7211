//! The parameter-efficient methods side by side (`rwkv-tune compare
//! --peft`; docs/peft-comparison.md): state tuning, LoRA, SDT, SDLoRA and
//! dense tuning of the recurrent module, each run through the same
//! [`EngineBuilder`] and loop as `rwkv-tune tune`, on the same task, data
//! order and step budget; held-out loss and accuracy, trainable parameters,
//! planned activation memory and throughput, as a markdown table.
use super::builder::{DeviceKind, EngineBuilder, EngineOptions, LoraOptions, SdtOptions};
use super::data::Dataset;
use super::device::Recompute;
use super::optim::{Decay, Schedule};
use super::train::TrainConfig;
use crate::error::{Error, Result};
use crate::model::lora::LoraTarget;
use crate::model::Model;

/// A method of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeftMethod {
    /// Initial-state tuning with DBP (the project's default).
    State,
    /// State-offset tuning (`y_t += S_off r_t`).
    StateOffset,
    /// LoRA on the projections.
    Lora,
    /// Sparse dimension tuning.
    Sdt,
    /// SDT plus LoRA.
    Sdlora,
    /// Dense tuning of the recurrent module's tensors.
    Recurrent,
}

impl PeftMethod {
    /// Every method, in table order.
    pub const ALL: [PeftMethod; 6] = [
        PeftMethod::State,
        PeftMethod::StateOffset,
        PeftMethod::Lora,
        PeftMethod::Sdt,
        PeftMethod::Sdlora,
        PeftMethod::Recurrent,
    ];

    /// The `--method` name.
    pub fn name(self) -> &'static str {
        match self {
            PeftMethod::State => "state",
            PeftMethod::StateOffset => "state-offset",
            PeftMethod::Lora => "lora",
            PeftMethod::Sdt => "sdt",
            PeftMethod::Sdlora => "sdlora",
            PeftMethod::Recurrent => "recurrent",
        }
    }
}

/// One comparison's settings (shared by every method).
#[derive(Clone, Debug)]
pub struct PeftConfig {
    /// Optimiser steps per method (SDT's warm-up comes on top).
    pub steps: u64,
    /// Examples per step.
    pub batch: usize,
    /// Seed of the data order and the adapters' initialisation.
    pub seed: u64,
    /// Peak learning rate of state tuning (RWKV-PEFT's 1).
    pub lr_state: f64,
    /// Peak learning rate of the other methods.
    pub lr_peft: f64,
    /// LoRA rank (alpha = rank).
    pub lora_rank: usize,
    /// SDT's head and key-dimension fractions.
    pub sdt_heads: f64,
    /// See `sdt_heads`.
    pub sdt_dims: f64,
    /// SDT's warm-up steps.
    pub sdt_warmup: u64,
    /// Held-out examples evaluated (0 = all).
    pub eval_max: usize,
}

/// One method's result.
#[derive(Clone, Debug)]
pub struct PeftRow {
    /// The method.
    pub method: PeftMethod,
    /// Trainable parameters (after SDT's selection).
    pub params: usize,
    /// Held-out loss before and after.
    pub loss_before: f64,
    /// See `loss_before`.
    pub loss_after: f64,
    /// Held-out exact matches after (prompt / response data).
    pub exact: Option<(usize, usize)>,
    /// Training tokens per second of the main run.
    pub tokens_per_s: f64,
    /// Planned activation bytes of a step.
    pub plan_bytes: Option<usize>,
    /// Wall seconds of the whole method (warm-up and evaluations included).
    pub seconds: f64,
}

/// Runs every method of `methods` on `model` / `train` / `valid` with the
/// settings of `pc` on the CPU engine; `say` gets progress lines.
pub fn run_peft_comparison(
    model: &Model,
    train: &Dataset,
    valid: &Dataset,
    pc: &PeftConfig,
    methods: &[PeftMethod],
    say: &mut dyn FnMut(&str),
) -> Result<Vec<PeftRow>> {
    if pc.steps == 0 || pc.batch == 0 {
        return Err(Error::Options(
            "compare --peft: steps and batch must be ≥ 1".into(),
        ));
    }
    let mut rows = Vec::new();
    for &m in methods {
        let t0 = std::time::Instant::now();
        say(&format!("== {} ==", m.name()));
        let lora = LoraOptions {
            rank: pc.lora_rank,
            alpha: pc.lora_rank as f32,
            dropout: 0.0,
            targets: LoraTarget::DEFAULT.to_vec(),
        };
        let sdt = SdtOptions {
            heads: pc.sdt_heads,
            dims: pc.sdt_dims,
            warmup: pc.sdt_warmup,
            dense: m == PeftMethod::Recurrent,
        };
        let opts = EngineOptions {
            device: DeviceKind::Cpu,
            dbp: (m == PeftMethod::State).then_some((0.05, 0.0)),
            seed: pc.seed,
            recompute: Recompute::KeepAll,
            lora: matches!(m, PeftMethod::Lora | PeftMethod::Sdlora).then(|| lora.clone()),
            sdt: matches!(
                m,
                PeftMethod::Sdt | PeftMethod::Sdlora | PeftMethod::Recurrent
            )
            .then_some(sdt),
            offset: m == PeftMethod::StateOffset,
            ..EngineOptions::default()
        };
        let state_like = matches!(m, PeftMethod::State | PeftMethod::StateOffset);
        let lr = if state_like { pc.lr_state } else { pc.lr_peft };
        let mut tc = TrainConfig::new(pc.steps);
        tc.batch = pc.batch;
        tc.seed = pc.seed;
        tc.schedule = Schedule {
            lr,
            lr_final: lr / if state_like { 100.0 } else { 10.0 },
            warmup: 10.min(pc.steps / 2),
            total: pc.steps,
            decay: Decay::Exp,
        };
        tc.eval_max = pc.eval_max;
        tc.tag = format!("peft-compare {}", m.name());
        let b = EngineBuilder::open(opts, say)?;
        let mut t = b.build(model, train, Some(valid), tc, say)?;
        let plan_bytes = train
            .examples
            .iter()
            .map(|e| e.tokens.len())
            .max()
            .and_then(|ctx| t.plan_bytes(pc.batch, ctx));
        let rep = t.run()?;
        let (before, after) = match (&rep.before, &rep.after) {
            (Some(b), Some(a)) => (b.clone(), a.clone()),
            _ => return Err(Error::Tune("internal: no held-out evaluation".into())),
        };
        let params = t.n_params;
        say(&format!(
            "{}: held-out loss {:.4} → {:.4}, {params} trainable, {:.0} tokens/s",
            m.name(),
            before.loss,
            after.loss,
            rep.tokens_per_sec
        ));
        rows.push(PeftRow {
            method: m,
            params,
            loss_before: before.loss,
            loss_after: after.loss,
            exact: after.exact,
            tokens_per_s: rep.tokens_per_sec,
            plan_bytes,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    Ok(rows)
}

/// The markdown table of `rows`.
pub fn peft_table(rows: &[PeftRow]) -> String {
    let mut s = String::from(
        "| method | trainable params | held-out loss before → after | exact match after | \
         train tokens/s | planned activations | wall s |\n|---|---:|---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {:.4} → **{:.4}** | {} | {:.0} | {} | {:.1} |\n",
            r.method.name(),
            r.params,
            r.loss_before,
            r.loss_after,
            r.exact.map_or("–".into(), |(k, n)| format!("{k}/{n}")),
            r.tokens_per_s,
            r.plan_bytes
                .map_or("–".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
            r.seconds
        );
    }
    s
}
