//! The state-tuning loop: batches from a [`Loader`], one optimiser step per
//! batch from an [`Engine`] (the CPU engine, the device engine, the
//! upscaled engines: loss, gradient, clipping, Adam), the warm-up/decay
//! schedule, validation before and after (loss, bits per token, and
//! exact-match accuracy of the greedy response where the data has
//! prompt/response pairs), a JSON-lines metrics log, a PNG loss curve,
//! atomic checkpoints and exact resume.
//!
//! Exactness of resume: a step depends only on the tuned parameters, Adam's
//! moments and update count, the step number (learning rate) and the loader
//! position (which examples). All of them are in the checkpoint, stored
//! bit-exactly as f32, so a resumed run computes the same steps as an
//! uninterrupted one.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use super::checkpoint::{remove_stale_temps, Checkpoint};
use super::data::{pad_batch, Dataset, Loader};
use super::device::DeviceEngine;
use super::engine::{Engine, EngineState};
use super::grad::GradOpts;
use super::optim::{AdamConfig, Schedule};
use super::plot::write_loss_png;
use super::state::{Example, TunedState};
use crate::error::{Error, Result};
use crate::model::{Logits, Model};
use crate::ops::cpu::CpuOps;

// Validation moved to [`super::eval`] and the state conversions to
// [`super::state`]; these paths keep working.
pub use super::eval::{evaluate, evaluate_with, EvalResult};
pub use super::state::{export_state, from_model_state, to_model_state};

/// Everything that controls a tuning run.
pub struct TrainConfig {
    /// Optimiser steps.
    pub steps: u64,
    /// Examples per step.
    pub batch: usize,
    /// Learning-rate schedule (its `total` should equal `steps`).
    pub schedule: Schedule,
    /// Optimiser hyper-parameters.
    pub adam: AdamConfig,
    /// Clip gradients to this global norm (0 = no clipping).
    pub clip: f64,
    /// Seed of the data order.
    pub seed: u64,
    /// Also tune the token-shift states (not part of the ai00 state file).
    pub with_shift: bool,
    /// Checkpoint file (written atomically every `checkpoint_every` steps and
    /// at the end); `None` disables checkpoints.
    pub checkpoint: Option<PathBuf>,
    /// Steps between checkpoints (0 = none).
    pub checkpoint_every: u64,
    /// Continue from `checkpoint` if it exists.
    pub resume: bool,
    /// JSON-lines metrics log.
    pub metrics: Option<PathBuf>,
    /// PNG loss curve, rewritten at each checkpoint and at the end.
    pub plot: Option<PathBuf>,
    /// Validate every this many steps (0 = only before and after).
    pub eval_every: u64,
    /// At most this many validation examples per evaluation (0 = all).
    pub eval_max: usize,
    /// Options passed to the gradient engine.
    pub grad: GradOpts,
    /// Show a progress bar and print progress messages to stderr.
    pub verbose: bool,
    /// Sleep this long after every step (for tests that interrupt a run).
    pub throttle_ms: u64,
    /// Extra text mixed into the run fingerprint (e.g. data file names).
    pub tag: String,
    /// Decorrelated backpropagation `(eta, kappa)` (see [`super::dbp`]): the
    /// optimiser trains `S′` with `S = S′·R` and `R` follows the DBP rule.
    pub dbp: Option<(f64, f64)>,
}

impl TrainConfig {
    /// Defaults: the RWKV-PEFT recipe (lr 1 → 0.01, 10 warm-up steps), batch
    /// 4, clipping at 1, no checkpoints, quiet.
    pub fn new(steps: u64) -> TrainConfig {
        TrainConfig {
            steps,
            batch: 4,
            schedule: Schedule::rwkv_peft(steps),
            adam: AdamConfig::default(),
            clip: 1.0,
            seed: 0,
            with_shift: false,
            checkpoint: None,
            checkpoint_every: 0,
            resume: false,
            metrics: None,
            plot: None,
            eval_every: 0,
            eval_max: 0,
            grad: default_grad_opts(),
            verbose: false,
            throttle_ms: 0,
            tag: String::new(),
            dbp: None,
        }
    }
}

impl TrainConfig {
    /// Checks every number of the run before any work: at least one step
    /// and one example per step; learning rates, clipping, weight decay and
    /// Adam's ε finite and in range, β₁ and β₂ in [0, 1), the observer
    /// weight finite and ≥ 0, DBP's η ≥ 0 and κ ∈ [0, 1], the recomputation
    /// chunk ≥ 1 ([`Error::Options`], naming the CLI flag).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Options(m));
        let fin = |flag: &str, x: f64, ok: bool, range: &str| -> Result<()> {
            if !x.is_finite() || !ok {
                return Err(Error::Options(format!("{flag} is {x}; it must be {range}")));
            }
            Ok(())
        };
        if self.steps == 0 {
            return bad("--steps is 0: nothing would be trained (give at least 1)".into());
        }
        if self.batch == 0 {
            return bad("--batch must be at least 1".into());
        }
        let s = &self.schedule;
        fin("--lr", s.lr, s.lr > 0.0, "a finite number > 0")?;
        fin(
            "--lr-final",
            s.lr_final,
            s.lr_final >= 0.0,
            "a finite number >= 0",
        )?;
        fin(
            "--clip",
            self.clip,
            self.clip >= 0.0,
            "finite and >= 0 (0 = off)",
        )?;
        let a = &self.adam;
        fin(
            "--weight-decay",
            a.weight_decay,
            a.weight_decay >= 0.0,
            "finite and >= 0",
        )?;
        fin(
            "--beta1",
            a.beta1,
            (0.0..1.0).contains(&a.beta1),
            "in [0, 1)",
        )?;
        fin(
            "--beta2",
            a.beta2,
            (0.0..1.0).contains(&a.beta2),
            "in [0, 1)",
        )?;
        fin("--adam-eps", a.eps, a.eps > 0.0, "a finite number > 0")?;
        let ow = self.grad.observer_weight as f64;
        fin("--observer-weight", ow, ow >= 0.0, "finite and >= 0")?;
        if let Some((eta, kappa)) = self.dbp {
            fin("--dbp-eta", eta, eta >= 0.0, "finite and >= 0")?;
            fin(
                "--dbp-kappa",
                kappa,
                (0.0..=1.0).contains(&kappa),
                "in [0, 1]",
            )?;
        }
        if self.grad.chunk == 0 {
            return bad("--chunk must be at least 1".into());
        }
        Ok(())
    }
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks a running [`train_with`] loop to stop after the step it is on: it
/// then writes the checkpoint (when it has a path) and returns a report
/// with [`TrainReport::interrupted`] set. Safe to call from a signal
/// handler (one atomic store).
pub fn request_stop() {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether [`request_stop`] was called (and not cleared).
pub fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::SeqCst)
}

/// Clears a [`request_stop`] (for a process that runs several loops).
pub fn clear_stop() {
    STOP.store(false, std::sync::atomic::Ordering::SeqCst);
}

/// The gradient options used when none are given.
pub fn default_grad_opts() -> GradOpts {
    GradOpts::default()
}

/// Fills `Example::soft` (per-position next-token probabilities `[T, V]`)
/// for observer / distillation training.
pub trait SoftTargets: Sync {
    /// Fills `batch` with the next examples.
    fn fill(&self, batch: &mut [Example]) -> Result<()>;
}

/// A frozen (usually larger) model whose next-token distribution is the soft
/// target: the "observer" of arXiv 2504.05097 as read in
/// docs/state-tuning.md. Its vocabulary must equal the tuned model's.
pub struct Observer {
    /// The frozen model.
    pub model: Model,
    /// Softmax temperature applied to the observer's logits.
    pub temperature: f32,
}

/// Softmax with temperature `temperature` over every row of `[T, V]`
/// logits, in place.
fn soften(logits: &mut [f32], v: usize, temperature: f32) {
    let t_inv = 1.0 / temperature.max(1e-6);
    for row in logits.chunks_mut(v) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut s = 0.0f32;
        for x in row.iter_mut() {
            *x = ((*x - m) * t_inv).exp();
            s += *x;
        }
        row.iter_mut().for_each(|x| *x /= s);
    }
}

impl SoftTargets for Observer {
    fn fill(&self, batch: &mut [Example]) -> Result<()> {
        let v = self.model.config().vocab;
        batch.par_iter_mut().try_for_each(|e| -> Result<()> {
            let mut st = self.model.new_state();
            let mut logits = self.model.forward(&e.tokens, &mut st, Logits::All)?;
            soften(&mut logits, v, self.temperature);
            e.soft = Some(logits);
            Ok(())
        })
    }
}

/// Result of a run.
pub struct TrainReport {
    /// The tuned state.
    pub state: TunedState,
    /// Validation on the zero state and after tuning (when a valid set is given).
    pub before: Option<EvalResult>,
    /// Validation after the last step, if run.
    pub after: Option<EvalResult>,
    /// Steps done in total, and the step the run resumed from.
    pub steps: u64,
    /// The checkpoint step the run resumed from, if any.
    pub resumed_from: Option<u64>,
    /// Train loss per step (all steps, including those before a resume).
    pub history: Vec<f32>,
    /// Validation losses `(step, loss)`.
    pub valid_history: Vec<(u64, f64)>,
    /// Wall time of this invocation's training steps, and token throughput.
    pub seconds: f64,
    /// Training throughput, tokens per second (on the machine that ran it).
    pub tokens_per_sec: f64,
    /// The run stopped early at `steps` because [`request_stop`] was
    /// called (Ctrl-C); the checkpoint holds that step, and `after` is not
    /// computed.
    pub interrupted: bool,
}

/// FNV-1a over a data set's examples (tokens, targets, masks).
fn data_hash(ds: &Dataset) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    };
    for e in &ds.examples {
        eat(e.tokens.len() as u64);
        e.tokens.iter().for_each(|&t| eat(t as u64));
        e.targets.iter().for_each(|&t| eat(t as u64));
        e.mask.iter().for_each(|&m| eat(m.to_bits() as u64));
    }
    h
}

/// A content hash of the model's weights (every tensor's bits, in the
/// official order), so a resume with another model of the same shape is
/// refused. Tensors are hashed in parallel, 32-bit words at a time.
pub fn weights_hash(model: &Model) -> u64 {
    let w = model.weights();
    let specs = w.config.tensor_specs();
    let per: Vec<u64> = specs
        .par_iter()
        .map(|spec| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in spec.name.bytes() {
                h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
            }
            if let Some(d) = w.get(&spec.name) {
                for x in d {
                    h = (h ^ x.to_bits() as u64).wrapping_mul(0x100_0000_01b3);
                }
            }
            h
        })
        .collect();
    per.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x).wrapping_mul(0x100_0000_01b3).rotate_left(17)
    })
}

/// The run's identity: the model (shape and a hash of its weights), the
/// training and validation data, and the hyper-parameters, so a resume
/// with different inputs is refused.
fn fingerprint(
    model: &Model,
    train: &Dataset,
    valid: Option<&Dataset>,
    cfg: &TrainConfig,
) -> String {
    let h = data_hash(train);
    let vh = valid.map(data_hash).unwrap_or(0);
    let s = &cfg.schedule;
    format!(
        "model={:?}; weights={:016x}; data={h:016x}/{}; valid={vh:016x}; steps={}; batch={}; lr={}->{} warmup={} {:?}; adam={:?}; \
         clip={}; seed={}; shift={}; observer_weight={}; dbp={:?}; {}",
        model.config(),
        weights_hash(model),
        train.examples.len(),
        cfg.steps,
        cfg.batch,
        s.lr,
        s.lr_final,
        s.warmup,
        s.decay,
        cfg.adam,
        cfg.clip,
        cfg.seed,
        cfg.with_shift,
        cfg.grad.observer_weight,
        cfg.dbp,
        cfg.tag
    )
}

/// Keeps the metrics lines of steps `<= step` (dropping those a killed run
/// wrote after its last checkpoint), rewriting the file atomically. The
/// final validation line of a finished run (`step == total`) is dropped
/// too: a resume of a finished run writes it again.
fn truncate_metrics(path: &Path, step: u64, total: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                return false;
            };
            let Some(s) = v.get("step").and_then(|s| s.as_u64()) else {
                return false;
            };
            let final_valid =
                s == total && s > 0 && v.get("type").and_then(|t| t.as_str()) == Some("valid");
            s <= step && !final_valid
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::tensors::write_atomic(path, kept.as_bytes())
}

struct Metrics(Option<std::fs::File>, Option<PathBuf>);

impl Metrics {
    fn line(&mut self, v: serde_json::Value) -> Result<()> {
        if let (Some(f), Some(p)) = (self.0.as_mut(), self.1.as_ref()) {
            writeln!(f, "{v}").map_err(|e| Error::io(p, e))?;
        }
        Ok(())
    }
}

/// Runs state tuning from the zero state. `observer` fills soft targets
/// when `cfg.grad.observer_weight > 0`.
pub fn train(
    model: &Model,
    train: &Dataset,
    valid: Option<&Dataset>,
    cfg: &TrainConfig,
    observer: Option<&dyn SoftTargets>,
) -> Result<TrainReport> {
    train_from(model, train, valid, cfg, observer, None)
}

/// Runs state tuning from `init` (zeros when `None`; a checkpoint, when
/// resuming, takes precedence) on the CPU: [`DeviceEngine`] over
/// [`CpuOps`].
pub fn train_from(
    model: &Model,
    train: &Dataset,
    valid: Option<&Dataset>,
    cfg: &TrainConfig,
    observer: Option<&dyn SoftTargets>,
    init: Option<TunedState>,
) -> Result<TrainReport> {
    let mcfg = model.config().clone();
    let init = match init {
        Some(s) => {
            s.check(&mcfg)?;
            s
        }
        None => TunedState::zeros(&mcfg, cfg.with_shift),
    };
    let mut engine = DeviceEngine::new(
        CpuOps::new(),
        model.weights(),
        &init,
        cfg.adam,
        cfg.dbp,
        cfg.grad.clone(),
    )?;
    train_with(model, &mut engine, train, valid, cfg, observer)
}

/// The tuning loop on any [`Engine`] (which holds the starting parameters;
/// a checkpoint, when resuming, replaces them).
pub fn train_with(
    model: &Model,
    engine: &mut dyn Engine,
    train: &Dataset,
    valid: Option<&Dataset>,
    cfg: &TrainConfig,
    observer: Option<&dyn SoftTargets>,
) -> Result<TrainReport> {
    if train.examples.is_empty() {
        return Err(Error::Tune("the training set is empty".into()));
    }
    cfg.validate()?;
    if cfg.grad.observer_weight > 0.0 && observer.is_none() && !engine.has_teacher() {
        return Err(Error::Tune(
            "observer_weight > 0 needs an observer model".into(),
        ));
    }
    let fp = fingerprint(model, train, valid, cfg);
    let say = |pb: &indicatif::ProgressBar, m: String| {
        if cfg.verbose {
            pb.suspend(|| eprintln!("{m}"));
        }
    };
    let hidden = indicatif::ProgressBar::hidden();

    // Validation of the starting parameters (before a checkpoint is loaded).
    let before = match valid {
        Some(v) if !v.examples.is_empty() => Some(engine.evaluate(model, v, cfg.eval_max)?),
        _ => None,
    };

    // Start or resume.
    let mut loader = Loader::new(train.examples.len(), cfg.seed);
    let mut history: Vec<f32> = Vec::new();
    let mut step0 = 0u64;
    let mut resumed_from = None;
    if let Some(ck_path) = &cfg.checkpoint {
        for p in remove_stale_temps(ck_path) {
            say(
                &hidden,
                format!("removed a partial checkpoint write: {}", p.display()),
            );
        }
        if cfg.resume && ck_path.exists() {
            let ck = Checkpoint::load(ck_path)?;
            if ck.fingerprint != fp {
                return Err(Error::Tune(format!(
                    "checkpoint {} belongs to a different run (model, data or hyper-parameters \
                     differ); delete it or run without --resume.\n  checkpoint: {}\n  this run:   {}",
                    ck_path.display(),
                    ck.fingerprint,
                    fp
                )));
            }
            if ck.step > cfg.steps {
                return Err(Error::Tune(format!(
                    "checkpoint {} is at step {}, beyond this run's {} steps; refusing to \
                     resume (delete it, or give --steps >= {})",
                    ck_path.display(),
                    ck.step,
                    cfg.steps,
                    ck.step
                )));
            }
            engine
                .load(EngineState {
                    params: ck.params,
                    adam_m: ck.adam_m,
                    adam_v: ck.adam_v,
                    adam_t: ck.adam_t,
                    dbp_r: ck.dbp_r,
                })
                .map_err(|e| Error::Tune(format!("checkpoint {}: {e}", ck_path.display())))?;
            loader = Loader::at(train.examples.len(), cfg.seed, ck.loader);
            history = ck.history;
            step0 = ck.step;
            resumed_from = Some(ck.step);
            say(
                &hidden,
                format!(
                    "resuming from checkpoint {} at step {}",
                    ck_path.display(),
                    ck.step
                ),
            );
        } else if cfg.resume {
            say(
                &hidden,
                format!(
                    "no checkpoint at {}: starting from step 0",
                    ck_path.display()
                ),
            );
        }
    } else if cfg.resume {
        return Err(Error::Tune("--resume needs a checkpoint path".into()));
    }

    // Metrics log.
    let mut metrics = Metrics(None, cfg.metrics.clone());
    if let Some(p) = &cfg.metrics {
        if resumed_from.is_some() {
            truncate_metrics(p, step0, cfg.steps)?;
        } else {
            crate::tensors::write_atomic(p, b"")?;
        }
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(p)
            .map_err(|e| Error::io(p, e))?;
        metrics.0 = Some(f);
    }

    let mut valid_history = Vec::new();
    if let Some(r) = &before {
        if resumed_from.is_none() {
            metrics.line(serde_json::json!({
                "type": "valid", "step": 0, "valid_loss": r.loss,
                "valid_bits_per_token": r.bits_per_token(), "valid_exact_match": r.accuracy(),
            }))?;
        }
        valid_history.push((0u64, r.loss));
    }

    let pb = if cfg.verbose {
        let pb = indicatif::ProgressBar::new(cfg.steps);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(step0);
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };

    let save_ck = |engine: &dyn Engine, loader: &Loader, history: &[f32], step: u64| {
        if let Some(p) = &cfg.checkpoint {
            let es = engine.save()?;
            Checkpoint {
                step,
                params: es.params,
                adam_m: es.adam_m,
                adam_v: es.adam_v,
                adam_t: es.adam_t,
                loader: loader.pos(),
                history: history.to_vec(),
                fingerprint: fp.clone(),
                dbp_r: es.dbp_r,
            }
            .save(p)?;
        }
        if let Some(p) = &cfg.plot {
            write_loss_png(p, history, &[])?;
        }
        Ok::<(), Error>(())
    };

    let t_start = Instant::now();
    let mut tokens_done = 0f64;
    let mut smooth: Option<f64> = None;
    let mut stopped_at = None;
    for step in step0..cfg.steps {
        if stop_requested() {
            stopped_at = Some(step);
            break;
        }
        let idx = loader.next_batch(cfg.batch);
        let refs: Vec<&Example> = idx.iter().map(|&i| &train.examples[i]).collect();
        let mut batch = pad_batch(&refs);
        if cfg.grad.observer_weight > 0.0 && !engine.has_teacher() {
            if let Some(o) = observer {
                o.fill(&mut batch)?;
            }
        }
        let n_real: usize = refs.iter().map(|e| e.tokens.len()).sum();
        let lr = cfg.schedule.lr_at(step);
        let out = engine.step(&batch, lr, cfg.clip)?;
        let (out_n, gnorm) = (out.n_tokens, out.grad_norm);
        let loss = out.loss_sum / out_n.max(1.0);
        if !loss.is_finite() {
            return Err(Error::Tune(format!("loss is {loss} at step {}", step + 1)));
        }
        history.push(loss as f32);
        tokens_done += n_real as f64;
        let el = t_start.elapsed().as_secs_f64().max(1e-9);
        let tps = tokens_done / el;
        let done = step + 1;
        metrics.line(serde_json::json!({
            "type": "train", "step": done, "loss": loss, "lr": lr, "grad_norm": gnorm,
            "tokens": n_real, "target_tokens": out_n, "tokens_per_s": tps,
            "elapsed_s": el,
        }))?;
        let sm = smooth.map_or(loss, |s| 0.9 * s + 0.1 * loss);
        smooth = Some(sm);
        pb.set_message(format!(
            "loss {loss:.4} (avg {sm:.4}) lr {lr:.3e} {tps:.0} tok/s"
        ));
        pb.set_position(done);

        if cfg.eval_every > 0 && done % cfg.eval_every == 0 && done < cfg.steps {
            if let Some(v) = valid.filter(|v| !v.examples.is_empty()) {
                let r = engine.evaluate(model, v, cfg.eval_max)?;
                metrics.line(serde_json::json!({
                    "type": "valid", "step": done, "valid_loss": r.loss,
                    "valid_bits_per_token": r.bits_per_token(), "valid_exact_match": r.accuracy(),
                }))?;
                valid_history.push((done, r.loss));
                say(&pb, format!("step {done}: valid {}", r.summary("token")));
            }
        }
        if cfg.checkpoint_every > 0 && done % cfg.checkpoint_every == 0 && done < cfg.steps {
            save_ck(&*engine, &loader, &history, done)?;
        }
        if cfg.throttle_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(cfg.throttle_ms));
        }
    }
    pb.finish_and_clear();
    let seconds = t_start.elapsed().as_secs_f64();
    let steps_done = stopped_at.unwrap_or(cfg.steps.max(step0));
    save_ck(&*engine, &loader, &history, steps_done)?;

    let state = engine.tuned()?;
    let after = match valid {
        Some(v) if !v.examples.is_empty() && stopped_at.is_none() => {
            let r = engine.evaluate(model, v, cfg.eval_max)?;
            metrics.line(serde_json::json!({
                "type": "valid", "step": steps_done, "valid_loss": r.loss,
                "valid_bits_per_token": r.bits_per_token(), "valid_exact_match": r.accuracy(),
            }))?;
            valid_history.push((steps_done, r.loss));
            Some(r)
        }
        _ => None,
    };
    if let Some(p) = &cfg.plot {
        write_loss_png(p, &history, &valid_history)?;
    }
    Ok(TrainReport {
        state,
        before,
        after,
        steps: steps_done,
        resumed_from,
        history,
        valid_history,
        seconds,
        tokens_per_sec: if seconds > 0.0 {
            tokens_done / seconds
        } else {
            0.0
        },
        interrupted: stopped_at.is_some(),
    })
}
