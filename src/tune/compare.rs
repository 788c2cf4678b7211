//! The comparison behind `rwkv-tune compare`: plain state tuning, DBP,
//! the kernel-upscaled state and the observer (soft targets from a stronger
//! model) on ONE task at the same budget — same steps, batch, lr schedule,
//! data order and seed — reporting the held-out loss curve, the steps to
//! reach a target held-out loss, the final held-out loss and the exact-match
//! accuracy of the response.
//!
//! The task is the bundled synthetic "punctuation persona" task on the
//! seeded random demo RWKV-7 ([`super::demo`]); everything is deterministic
//! from the seed and needs no download. The observer is the same family with
//! more layers ([`CompareConfig::observer_layers`], its own seeded weights),
//! whose initial state is first state-tuned on the same training data (a
//! random model is not stronger at anything until it has seen the task);
//! its cost is reported separately and not charged to the student's budget.
use std::time::Instant;

use super::data::{pad_batch, ByteTokenizer, Dataset, Loader};
use super::dbp::Dbp;
use super::demo;
use super::device::{DeviceTuner, LStart};
use super::grad::{self, Example, GradOpts, HeadVector, TunedState};
use super::observer::{
    fill_soft_targets_on, kl_only_loss_and_grad_on, soft_target_stats, SoftStats,
};
use super::optim::{clip_global_norm, Adam, AdamConfig, Schedule};
use super::upscale::{Kernel, UpscaleConfig, UpscaledState};
use crate::error::{Error, Result};
use crate::model::weights::{Config, Weights};
use crate::ops::cpu::CpuOps;

/// The four methods compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Plain state tuning: Adam on the per-layer WKV initial states.
    Plain,
    /// DBP: `S = S′R`, Adam on `S′`, `R` by the decorrelation rule.
    Dbp,
    /// Plain state plus the kernel-upscaled read-out `U φ(r)`.
    Upscaled,
    /// Plain state with the observer's KL term (soft targets).
    Observer,
}

impl Method {
    /// All four, in table order.
    pub const ALL: [Method; 4] = [
        Method::Plain,
        Method::Dbp,
        Method::Upscaled,
        Method::Observer,
    ];

    /// The row label.
    pub fn name(self) -> &'static str {
        match self {
            Method::Plain => "plain",
            Method::Dbp => "DBP",
            Method::Upscaled => "upscaled",
            Method::Observer => "observer",
        }
    }
}

/// Which positions of a training example carry the observer's KL term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KlPositions {
    /// The masked (response) positions only, where the CE is too.
    Response,
    /// Every position: CE + λ·KL on the response, λ·KL alone on the prompt.
    All,
}

impl KlPositions {
    /// The CLI / report spelling.
    pub fn name(self) -> &'static str {
        match self {
            KlPositions::Response => "response",
            KlPositions::All => "all",
        }
    }
}

/// Settings of a comparison (all methods share them).
#[derive(Clone, Debug)]
pub struct CompareConfig {
    /// Optimiser steps per method.
    pub steps: u64,
    /// Examples per step.
    pub batch: usize,
    /// Seed of the task data, the data order and the kernel fitting.
    pub seed: u64,
    /// Training / held-out examples of the synthetic task.
    pub n_train: usize,
    /// Held-out examples.
    pub n_valid: usize,
    /// Held-out evaluation every this many steps (≥ 1).
    pub eval_every: u64,
    /// Learning-rate schedule (RWKV-PEFT: lr 1 → 0.01, 10 warm-up steps).
    pub schedule: Schedule,
    /// Global-norm gradient clipping (0 = off).
    pub clip: f64,
    /// Target held-out loss for "steps to reach"; `None`: the plain method's
    /// final held-out loss.
    pub target: Option<f64>,
    /// DBP learning rate η and whitening κ.
    pub dbp_eta: f64,
    /// DBP κ (mix of the two terms of the rule).
    pub dbp_kappa: f64,
    /// Support vectors per head of the upscaled state (M), and which head
    /// vectors k-means places them on.
    pub upscale_m: usize,
    /// What the upscaled state is initialised from.
    pub upscale_source: HeadVector,
    /// Observer: layers of the stronger model, KL weight λ, temperature, and
    /// the steps its own state is tuned for before it teaches.
    pub observer_layers: usize,
    /// Weight of the soft-target loss.
    pub observer_weight: f32,
    /// Temperature of the soft targets.
    pub observer_temperature: f32,
    /// Tuning steps of the observer's own state.
    pub observer_steps: u64,
    /// Positions carrying the KL term.
    pub observer_positions: KlPositions,
    /// Labels-scarce variant: only the first `labelled` training examples
    /// keep their responses; every method trains on those alone, except the
    /// observer method, which also gets the other training prompts with the
    /// observer's greedy response, supervised by λ·KL alone (no labels).
    /// The observer itself is tuned on the labelled examples only when
    /// `observer_labelled_only`, else on the whole training set (a stronger
    /// model that already does the task). `None`: all labelled.
    pub labelled: Option<usize>,
    /// Whether the observer method sees the labelled examples only.
    pub observer_labelled_only: bool,
}

impl CompareConfig {
    /// The defaults of `rwkv-tune compare` for `steps` steps.
    pub fn new(steps: u64) -> CompareConfig {
        CompareConfig {
            steps,
            batch: 8,
            seed: 0,
            n_train: 256,
            n_valid: 64,
            eval_every: 5,
            schedule: Schedule::rwkv_peft(steps),
            clip: 1.0,
            target: None,
            dbp_eta: 0.05,
            dbp_kappa: 0.0,
            upscale_m: 128,
            upscale_source: HeadVector::Receptance,
            observer_layers: 4,
            observer_weight: 1.0,
            // docs/observer.md: at T = 1 the tuned observer's argmax is the
            // label on 98.9% of the training positions but its target puts
            // only 0.47 there, the rest spread thin (entropy 3.3 nats).
            observer_temperature: 0.25,
            observer_steps: steps,
            observer_positions: KlPositions::Response,
            labelled: None,
            observer_labelled_only: false,
        }
    }

    fn check(&self) -> Result<()> {
        if self.steps == 0 || self.batch == 0 || self.eval_every == 0 {
            return Err(Error::Tune(
                "compare: steps, batch and eval_every must be at least 1".into(),
            ));
        }
        if self.n_train == 0 || self.n_valid == 0 {
            return Err(Error::Tune(
                "compare: n_train and n_valid must be at least 1".into(),
            ));
        }
        if let Some(k) = self.labelled {
            if k == 0 || k > self.n_train {
                return Err(Error::Tune(format!(
                    "compare: labelled = {k} (must be in 1..=n_train = {})",
                    self.n_train
                )));
            }
        }
        if !(self.observer_temperature.is_finite() && self.observer_temperature > 0.0) {
            return Err(Error::Tune(format!(
                "compare: observer temperature = {} (must be finite and > 0)",
                self.observer_temperature
            )));
        }
        if !(self.observer_weight.is_finite() && self.observer_weight >= 0.0) {
            return Err(Error::Tune(format!(
                "compare: observer weight = {} (must be finite and ≥ 0)",
                self.observer_weight
            )));
        }
        if self.observer_layers == 0 || self.upscale_m == 0 {
            return Err(Error::Tune(
                "compare: observer_layers and upscale_m must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// One method's result.
#[derive(Clone, Debug)]
pub struct Row {
    /// Which method this row is.
    pub method: Method,
    /// Trainable parameters.
    pub params: usize,
    /// Held-out loss (nats/token) at step 0 and every `eval_every` steps and
    /// at the end: `(step, loss)`.
    pub curve: Vec<(u64, f64)>,
    /// Held-out loss after the last step.
    pub final_loss: f64,
    /// First evaluated step whose held-out loss is ≤ the target (`None`:
    /// not reached).
    pub steps_to_target: Option<u64>,
    /// Exact-match accuracy of the response on the held-out tasks.
    pub accuracy: Option<f64>,
    /// Mean training loss over the last 10 steps.
    pub train_loss: f64,
    /// Training examples this method saw (labelled, and for the observer
    /// method also the observer-labelled prompts).
    pub train_examples: usize,
    /// Largest global gradient norm before clipping (after the 1/n mean),
    /// and the steps whose norm exceeded the clip.
    pub max_grad_norm: f64,
    /// Steps whose gradient norm exceeded the clip.
    pub clipped_steps: u64,
    /// Wall time of the training steps and evaluations.
    pub seconds: f64,
}

/// The comparison's result.
#[derive(Clone, Debug)]
pub struct Comparison {
    /// The configuration the comparison ran.
    pub config: CompareConfig,
    /// Task and model description.
    pub task: String,
    /// What the observer was.
    pub observer: String,
    /// Held-out loss and accuracy of the untuned (zero-state) model.
    pub base_loss: f64,
    /// Exact-match accuracy of the untuned model.
    pub base_accuracy: Option<f64>,
    /// The observer's own held-out loss and accuracy (after its tuning), and
    /// the seconds spent preparing it.
    pub observer_loss: f64,
    /// The observer's exact-match accuracy.
    pub observer_accuracy: Option<f64>,
    /// Seconds spent preparing the observer.
    pub observer_seconds: f64,
    /// The observer's soft targets on the training examples against their
    /// labels, rows `soft[t−1]`, `soft[t]` (as used), `soft[t+1]`; and on the
    /// held-out examples (`soft[t]`).
    pub observer_train_stats: [SoftStats; 3],
    /// The observer's soft targets on the held-out examples (`soft[t]`).
    pub observer_valid_stats: SoftStats,
    /// Labelled training examples, unlabelled prompts given to the observer
    /// method, and the observer's greedy responses on them that equal the
    /// withheld reference.
    pub labelled: usize,
    /// Unlabelled prompts given to the observer method.
    pub unlabelled: usize,
    /// The observer's greedy responses that equal the withheld reference.
    pub greedy_hits: usize,
    /// The target used for "steps to reach".
    pub target: f64,
    /// One row per method.
    pub rows: Vec<Row>,
}

/// A CPU tuner and a state uploaded to it.
type CpuSession = (DeviceTuner<CpuOps>, Vec<LStart<Vec<f32>>>);

/// A trained state of any method (for evaluation).
enum Trained<'a> {
    State(TunedState),
    Up(&'a Kernel, UpscaledState),
}

impl Trained<'_> {
    /// A CPU tuner of `w` (the weights uploaded once, with the kernel when
    /// upscaled) and this state on it, for the evaluations of a pass.
    fn session(&self, w: &Weights) -> Result<CpuSession> {
        match self {
            Trained::State(s) => {
                let t = grad::cpu_tuner::<f32>(w)?;
                let st = t.upload_state(s)?;
                Ok((t, st))
            }
            Trained::Up(k, s) => {
                let t = DeviceTuner::new_upscaled(CpuOps::new(), w, k)?;
                let st = t.upload_upscaled(s)?;
                Ok((t, st))
            }
        }
    }
}

/// Mean held-out cross-entropy (nats per target token).
fn held_out_loss(w: &Weights, t: &Trained<'_>, valid: &Dataset) -> Result<f64> {
    let refs: Vec<&Example> = valid.examples.iter().collect();
    let b: Vec<Example> = pad_batch(&refs)
        .into_iter()
        .map(|mut e| {
            e.soft = None;
            e
        })
        .collect();
    let (tuner, st) = t.session(w)?;
    let (l, n) = tuner.loss_only_dev(&st, &b, &GradOpts::default())?;
    Ok(if n > 0.0 { l / n } else { 0.0 })
}

/// Exact match of the teacher-forced greedy response (every response
/// position's argmax is the reference token, i.e. greedy decoding
/// reproduces it).
fn accuracy(w: &Weights, t: &Trained<'_>, valid: &Dataset) -> Result<Option<f64>> {
    if valid.tasks.is_empty() {
        return Ok(None);
    }
    let v = w.config.vocab;
    let (tuner, st) = t.session(w)?;
    let mut hits = 0usize;
    for task in &valid.tasks {
        if task.prompt.is_empty() || task.response.is_empty() {
            continue;
        }
        let seq: Vec<u32> = task
            .prompt
            .iter()
            .chain(&task.response[..task.response.len() - 1])
            .copied()
            .collect();
        let lg = tuner.logits(&st, &seq)?;
        let p = task.prompt.len();
        let ok = task.response.iter().enumerate().all(|(j, &r)| {
            let row = &lg[(p - 1 + j) * v..(p + j) * v];
            let mut best = 0;
            for (i, &x) in row.iter().enumerate() {
                if x > row[best] {
                    best = i;
                }
            }
            best == r as usize
        });
        hits += ok as usize;
    }
    Ok(Some(hits as f64 / valid.tasks.len() as f64))
}

/// Scales every gradient tensor by `1/n` and clips to the global norm;
/// returns the norm before clipping.
fn mean_and_clip(grads: &mut [Vec<f32>], n: f64, clip: f64) -> f64 {
    let inv = (1.0 / n.max(1.0)) as f32;
    for g in grads.iter_mut() {
        g.iter_mut().for_each(|x| *x *= inv);
    }
    let mut refs: Vec<&mut [f32]> = grads.iter_mut().map(|g| g.as_mut_slice()).collect();
    clip_global_norm(&mut refs, clip)
}

/// Pads a batch; drops `soft` unless `keep_soft` (pad_batch pads the soft
/// rows with zeros, which the mask excludes).
fn padded(refs: &[&Example], keep_soft: bool) -> Vec<Example> {
    let mut b = pad_batch(refs);
    if !keep_soft {
        b.iter_mut().for_each(|e| e.soft = None);
    }
    b
}

/// What a method's parameters mean for evaluation.
fn snapshot<'k>(
    st: &TunedState,
    ups: &Option<(&'k Kernel, UpscaledState)>,
    dbp: &Option<Dbp>,
) -> Result<Trained<'k>> {
    Ok(match (ups, dbp) {
        (Some((k, u)), _) => Trained::Up(k, u.clone()),
        (None, Some(d)) => Trained::State(d.effective_state(st)?),
        (None, None) => Trained::State(st.clone()),
    })
}

fn to_vecs(p: Vec<&[f32]>) -> Vec<Vec<f32>> {
    p.into_iter().map(|x| x.to_vec()).collect()
}

/// Trains one method; returns its row (without `steps_to_target`) and the
/// trained plain state (for methods that have one). `kl_only` (observer
/// method only; same length as `train`): per training example, the
/// positions that carry `λ·KL` without a CE (its mask) and their soft
/// targets; `train[i]`'s own mask carries CE + λ·KL.
#[allow(clippy::too_many_arguments)]
fn train_method(
    method: Method,
    w: &Weights,
    train: &[Example],
    kl_only: Option<&[Option<Example>]>,
    valid: &Dataset,
    kernel: Option<&Kernel>,
    cc: &CompareConfig,
    steps: u64,
    schedule: &Schedule,
    observer_weight: f32,
) -> Result<(Row, TunedState)> {
    let cfg = &w.config;
    let t0 = Instant::now();
    let mut st = TunedState::zeros(cfg, false);
    let mut ups = match (method, kernel) {
        (Method::Upscaled, Some(k)) => Some((k, UpscaledState::new(st.clone(), k))),
        (Method::Upscaled, None) => {
            return Err(Error::Tune(
                "compare: upscaled method without a kernel".into(),
            ))
        }
        _ => None,
    };
    let mut dbp = match method {
        Method::Dbp => Some(Dbp::new(cfg, cc.dbp_eta, cc.dbp_kappa)?),
        _ => None,
    };
    let sizes: Vec<usize> = match &ups {
        Some((_, u)) => u.params().iter().map(|p| p.len()).collect(),
        None => st.params().iter().map(|p| p.len()).collect(),
    };
    let params = sizes.iter().sum();
    let mut adam = Adam::new(AdamConfig::default(), &sizes);
    let opts = GradOpts {
        observer_weight: if method == Method::Observer {
            observer_weight
        } else {
            0.0
        },
        ..GradOpts::default()
    };
    let mut loader = Loader::new(train.len(), cc.seed);
    let mut curve = vec![(0, held_out_loss(w, &snapshot(&st, &ups, &dbp)?, valid)?)];
    let mut hist = Vec::with_capacity(steps as usize);
    if let Some(k) = kl_only {
        if method != Method::Observer || k.len() != train.len() {
            return Err(Error::Tune(format!(
                "compare: KL-only positions for {} ({} for {} examples)",
                method.name(),
                k.len(),
                train.len()
            )));
        }
    }
    let is_obs = method == Method::Observer;
    let (mut max_norm, mut clipped) = (0.0f64, 0u64);
    // one CPU tuner (the weights uploaded once) for every step
    let tuner = match &ups {
        Some((k, _)) => DeviceTuner::new_upscaled(CpuOps::new(), w, k)?,
        None => grad::cpu_tuner::<f32>(w)?,
    };
    for step in 0..steps {
        let idx = loader.next_batch(cc.batch);
        let refs: Vec<&Example> = idx
            .iter()
            .map(|&i| &train[i])
            .filter(|e| e.mask.iter().any(|&m| m > 0.0))
            .collect();
        let batch = padded(&refs, is_obs);
        let kl_refs: Vec<&Example> = kl_only.map_or(Vec::new(), |k| {
            idx.iter().filter_map(|&i| k[i].as_ref()).collect()
        });
        let kl_batch = padded(&kl_refs, true);
        let lr = schedule.lr_at(step);
        let mut clip_norm = |g: &mut Vec<Vec<f32>>, n: f64| {
            let norm = mean_and_clip(g, n, cc.clip);
            max_norm = max_norm.max(norm);
            clipped += (cc.clip > 0.0 && norm > cc.clip) as u64;
        };
        let (loss, n) = match (&mut ups, &mut dbp) {
            (Some((_, u)), _) => {
                let (loss, n, grad, _) = tuner.loss_and_grad_upscaled(u, &batch, &opts)?;
                let mut g = to_vecs(grad.params());
                clip_norm(&mut g, n);
                let gr: Vec<&[f32]> = g.iter().map(|x| x.as_slice()).collect();
                adam.step(&mut u.params_mut(), &gr, lr)?;
                (loss, n)
            }
            (None, Some(d)) => {
                let s = d.effective_state(&st)?;
                let (loss, n, grad, stats, _) = tuner.loss_and_grad(&s, &batch, &opts, true)?;
                let gp = d.grad_to_prime(&grad)?;
                let mut g = to_vecs(gp.params());
                clip_norm(&mut g, n);
                let gr: Vec<&[f32]> = g.iter().map(|x| x.as_slice()).collect();
                adam.step(&mut st.params_mut(), &gr, lr)?;
                if let Some(stats) = &stats {
                    d.update_keep_state(stats, &mut st)?;
                }
                (loss, n)
            }
            (None, None) => {
                let (mut loss, mut n, mut g) = if batch.is_empty() {
                    let z: Vec<Vec<f32>> = sizes.iter().map(|&k| vec![0.0; k]).collect();
                    (0.0, 0.0, z)
                } else {
                    let (loss, n, grad, _, _) = tuner.loss_and_grad(&st, &batch, &opts, false)?;
                    (loss, n, to_vecs(grad.params()))
                };
                if !kl_batch.is_empty() {
                    let (kl, nk, gk) = kl_only_loss_and_grad_on(&tuner, &st, &kl_batch, &opts)?;
                    for (x, y) in g.iter_mut().zip(gk.params()) {
                        x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
                    }
                    loss += kl;
                    n += nk;
                }
                clip_norm(&mut g, n);
                let gr: Vec<&[f32]> = g.iter().map(|x| x.as_slice()).collect();
                adam.step(&mut st.params_mut(), &gr, lr)?;
                (loss, n)
            }
        };
        let l = loss / n.max(1.0);
        if !l.is_finite() {
            return Err(Error::Tune(format!(
                "compare: {} loss is {l} at step {}",
                method.name(),
                step + 1
            )));
        }
        hist.push(l);
        let done = step + 1;
        if done % cc.eval_every == 0 || done == steps {
            curve.push((done, held_out_loss(w, &snapshot(&st, &ups, &dbp)?, valid)?));
        }
    }
    let fin = snapshot(&st, &ups, &dbp)?;
    let acc = accuracy(w, &fin, valid)?;
    let final_state = match &fin {
        Trained::State(s) => s.clone(),
        Trained::Up(_, u) => u.state.clone(),
    };
    let tail = &hist[hist.len().saturating_sub(10)..];
    Ok((
        Row {
            method,
            params,
            final_loss: curve.last().map_or(f64::NAN, |c| c.1),
            curve,
            steps_to_target: None,
            accuracy: acc,
            train_loss: tail.iter().sum::<f64>() / tail.len().max(1) as f64,
            train_examples: match kl_only {
                Some(k) => (0..train.len())
                    .filter(|&i| {
                        train[i].mask.iter().any(|&m| m > 0.0)
                            || k[i]
                                .as_ref()
                                .is_some_and(|e| e.mask.iter().any(|&m| m > 0.0))
                    })
                    .count(),
                None => train.len(),
            },
            max_grad_norm: max_norm,
            clipped_steps: clipped,
            seconds: t0.elapsed().as_secs_f64(),
        },
        final_state,
    ))
}

/// The observer's model: the demo family with `layers` layers.
pub fn observer_config(layers: usize) -> Config {
    let d = demo::demo_config();
    Config::with_defaults(layers, d.n_embd, d.head_size, d.vocab)
}

/// Runs the comparison (see the module docs). `progress` receives one line
/// per finished phase.
pub fn run_comparison(cc: &CompareConfig, progress: &mut dyn FnMut(&str)) -> Result<Comparison> {
    cc.check()?;
    let w = demo::demo_weights(demo::DEMO_MODEL_SEED)?;
    let cfg = w.config.clone();
    let (train_ds, valid) = demo::synthetic_datasets(
        cc.n_train,
        cc.n_valid,
        cc.seed.wrapping_add(1),
        &ByteTokenizer,
    )?;
    if train_ds.examples.is_empty() || valid.examples.is_empty() {
        return Err(Error::Tune("compare: empty synthetic data set".into()));
    }
    let task = format!(
        "synthetic punctuation-persona task ({} train / {} held-out prompt→response pairs, \
         loss on the response bytes) on the seeded random demo RWKV-7 ({} layers, width {}, \
         {} heads × {}, byte vocab {}, seed {})",
        train_ds.examples.len(),
        valid.examples.len(),
        cfg.n_layer,
        cfg.n_embd,
        cfg.n_head,
        cfg.head_size,
        cfg.vocab,
        demo::DEMO_MODEL_SEED
    );
    let zero = Trained::State(TunedState::zeros(&cfg, false));
    let base_loss = held_out_loss(&w, &zero, &valid)?;
    let base_accuracy = accuracy(&w, &zero, &valid)?;
    progress(&format!("untuned: held-out loss {base_loss:.4}"));

    let n_lab = cc
        .labelled
        .unwrap_or(train_ds.examples.len())
        .min(train_ds.examples.len());
    let train_lab = &train_ds.examples[..n_lab];

    // Observer: deeper model of the same family, its state tuned first.
    let t_obs = Instant::now();
    let ocfg = observer_config(cc.observer_layers);
    let ow = Weights::random(&ocfg, demo::DEMO_MODEL_SEED.wrapping_add(1))?;
    let (orow, ostate) = train_method(
        Method::Plain,
        &ow,
        if cc.observer_labelled_only {
            train_lab
        } else {
            &train_ds.examples
        },
        None,
        &valid,
        None,
        cc,
        cc.observer_steps,
        &Schedule {
            total: cc.observer_steps,
            ..cc.schedule
        },
        0.0,
    )?;
    let temp = cc.observer_temperature;
    // the tuned observer on one CPU tuner (its weights uploaded once) for
    // its soft targets and greedy responses below
    let otuner = grad::cpu_tuner::<f32>(&ow)?;
    let ost = otuner.upload_state(&ostate)?;
    // The observer's targets on the labelled training examples, and how they
    // line up with the labels (shift 0 is how the engine pairs them).
    let mut soft_all = train_ds.examples.clone();
    fill_soft_targets_on(&otuner, &ost, &mut soft_all, temp)?;
    let v = cfg.vocab;
    let observer_train_stats = [
        soft_target_stats(&soft_all, v, -1)?,
        soft_target_stats(&soft_all, v, 0)?,
        soft_target_stats(&soft_all, v, 1)?,
    ];
    let mut soft_valid = valid.examples.clone();
    fill_soft_targets_on(&otuner, &ost, &mut soft_valid, temp)?;
    let observer_valid_stats = soft_target_stats(&soft_valid, v, 0)?;
    // The observer method's data: CE + λ·KL on the labelled responses;
    // λ·KL alone on the prompts (positions = all) and on the unlabelled
    // prompts' observer-written responses (labels-scarce).
    let mut obs_train: Vec<Example> = Vec::with_capacity(soft_all.len());
    let mut kl_only: Vec<Option<Example>> = Vec::with_capacity(soft_all.len());
    let (mut greedy_hits, mut unlabelled) = (0usize, 0usize);
    for (i, e) in soft_all.into_iter().enumerate() {
        if i < n_lab {
            let prompt_kl = (cc.observer_positions == KlPositions::All).then(|| Example {
                mask: e
                    .mask
                    .iter()
                    .map(|&m| if m > 0.0 { 0.0 } else { 1.0 })
                    .collect(),
                ..e.clone()
            });
            kl_only.push(prompt_kl);
            obs_train.push(e);
            continue;
        }
        let Some(first) = e.mask.iter().position(|&m| m > 0.0) else {
            continue;
        };
        let prompt = &e.tokens[..first + 1];
        let mut seq = prompt.to_vec();
        let max_new = 16;
        for _ in 0..max_new {
            let lg = otuner.logits(&ost, &seq)?;
            let row = &lg[lg.len() - v..];
            let mut best = 0;
            for (j, &x) in row.iter().enumerate() {
                if x > row[best] {
                    best = j;
                }
            }
            seq.push(best as u32);
            if best == b'\n' as usize {
                break;
            }
        }
        let truth: Vec<u32> = e.tokens[first..]
            .iter()
            .skip(1)
            .chain(e.targets.last())
            .copied()
            .collect();
        unlabelled += 1;
        greedy_hits += (seq[first + 1..] == truth[..]) as usize;
        let n = seq.len() - 1;
        let mut t = Example {
            tokens: seq[..n].to_vec(),
            targets: seq[1..].to_vec(),
            mask: (0..n)
                .map(|j| {
                    if j >= first || cc.observer_positions == KlPositions::All {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect(),
            soft: None,
        };
        fill_soft_targets_on(&otuner, &ost, std::slice::from_mut(&mut t), temp)?;
        kl_only.push(Some(t));
        // no labels: nothing carries the CE
        obs_train.push(Example {
            mask: vec![0.0; e.mask.len()],
            ..e
        });
    }
    let use_kl_only = kl_only.iter().any(|k| k.is_some());
    let observer_seconds = t_obs.elapsed().as_secs_f64();
    let observer = format!(
        "the same family with {} layers (width {}, seeded random weights, seed {}), its \
         initial state first plain-tuned on {} for {} steps (not charged to the student's \
         budget); soft targets softmax(logits/{}) with λ = {}, KL on the {} positions",
        ocfg.n_layer,
        ocfg.n_embd,
        demo::DEMO_MODEL_SEED.wrapping_add(1),
        if cc.observer_labelled_only && n_lab < train_ds.examples.len() {
            format!("the {n_lab} labelled training examples")
        } else {
            "the whole labelled training set".to_string()
        },
        cc.observer_steps,
        cc.observer_temperature,
        cc.observer_weight,
        match cc.observer_positions {
            KlPositions::Response => "response (masked)",
            KlPositions::All => "response and prompt",
        }
    );
    progress(&format!(
        "observer ready: held-out loss {:.4} ({:.1} s)",
        orow.final_loss, observer_seconds
    ));

    let kernel = Kernel::fit(
        &w,
        &TunedState::zeros(&cfg, false),
        train_lab,
        &UpscaleConfig {
            m: cc.upscale_m,
            source: cc.upscale_source,
            seed: cc.seed,
            ..UpscaleConfig::new(cfg.head_size)
        },
    )?;

    let mut rows = Vec::new();
    for m in Method::ALL {
        let (data, klo) = if m == Method::Observer {
            (&obs_train[..], use_kl_only.then_some(&kl_only[..]))
        } else {
            (train_lab, None)
        };
        let (row, _) = train_method(
            m,
            &w,
            data,
            klo,
            &valid,
            Some(&kernel),
            cc,
            cc.steps,
            &cc.schedule,
            cc.observer_weight,
        )?;
        progress(&format!(
            "{}: held-out loss {:.4}, accuracy {} ({:.1} s)",
            m.name(),
            row.final_loss,
            row.accuracy
                .map_or("-".to_string(), |a| format!("{:.1}%", 100.0 * a)),
            row.seconds
        ));
        rows.push(row);
    }
    let target = cc
        .target
        .unwrap_or(rows.first().map_or(f64::NAN, |r| r.final_loss));
    for r in rows.iter_mut() {
        r.steps_to_target = r
            .curve
            .iter()
            .find(|(_, l)| *l <= target + 1e-12)
            .map(|c| c.0);
    }
    Ok(Comparison {
        config: cc.clone(),
        task,
        observer,
        base_loss,
        base_accuracy,
        observer_loss: orow.final_loss,
        observer_accuracy: orow.accuracy,
        observer_seconds,
        observer_train_stats,
        observer_valid_stats,
        labelled: n_lab,
        unlabelled,
        greedy_hits,
        target,
        rows,
    })
}

fn pct(a: Option<f64>) -> String {
    a.map_or("–".into(), |a| format!("{:.1}%", 100.0 * a))
}

impl Comparison {
    /// The results table (markdown): one row per method.
    pub fn table(&self) -> String {
        let mut s = String::from(
            "| method | trainable params | train examples | steps to held-out loss ≤ target | final held-out loss (nats/byte) | exact match | train objective, last 10 steps (observer: CE + λ·KL) | max grad norm (steps clipped) | wall s |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in &self.rows {
            s += &format!(
                "| {} | {} | {} | {} | {:.4} | {} | {:.4} | {:.3} ({}) | {:.1} |\n",
                r.method.name(),
                r.params,
                r.train_examples,
                r.steps_to_target
                    .map_or(format!("not reached in {}", self.config.steps), |k| k
                        .to_string()),
                r.final_loss,
                pct(r.accuracy),
                r.train_loss,
                r.max_grad_norm,
                r.clipped_steps,
                r.seconds
            );
        }
        s
    }

    /// Held-out loss at every evaluated step, one column per method.
    pub fn curves(&self) -> String {
        let mut s = String::from("| step |");
        for r in &self.rows {
            s += &format!(" {} |", r.method.name());
        }
        s += "\n|---:|";
        s += &"---:|".repeat(self.rows.len());
        s += "\n";
        let steps: Vec<u64> = self
            .rows
            .iter()
            .max_by_key(|r| r.curve.len())
            .map(|r| r.curve.iter().map(|c| c.0).collect())
            .unwrap_or_default();
        for (i, st) in steps.iter().enumerate() {
            s += &format!("| {st} |");
            for r in &self.rows {
                match r.curve.get(i) {
                    Some(c) => s += &format!(" {:.4} |", c.1),
                    None => s += " – |",
                }
            }
            s += "\n";
        }
        s
    }

    /// Automatic one-line verdicts against the plain method.
    pub fn verdicts(&self) -> Vec<String> {
        let Some((plain, rest)) = self.rows.split_first() else {
            return Vec::new();
        };
        rest
            .iter()
            .map(|r| {
                let d = r.final_loss - plain.final_loss;
                let speed = match (r.steps_to_target, plain.steps_to_target) {
                    (Some(a), Some(b)) => format!("reaches the target at step {a} (plain: {b})"),
                    (None, _) => "does not reach the target".to_string(),
                    (Some(a), None) => format!("reaches the target at step {a}"),
                };
                format!(
                    "{} vs plain: final held-out loss {:+.4} nats/byte ({}), {}; exact match {} vs {}.",
                    r.method.name(),
                    d,
                    if d < -0.005 {
                        "better"
                    } else if d > 0.005 {
                        "worse"
                    } else {
                        "same within 0.005"
                    },
                    speed,
                    pct(r.accuracy),
                    pct(plain.accuracy)
                )
            })
            .collect()
    }

    /// The whole report (markdown) with a header describing how it was made.
    pub fn to_markdown(&self, command: &str, machine: &str, date: &str) -> String {
        let c = &self.config;
        let mut s = String::from("# State-tuning methods compared on one task\n\n");
        s += &format!(
            "Generated by `{command}` on {date} ({machine}). Re-run the same command to \
             reproduce it; everything is deterministic from the seed (timings aside).\n\n"
        );
        s += &format!("- Task: {}.\n", self.task);
        s += &format!(
            "- Budget, identical for every method: {} steps, batch {}, Adam (β 0.9/0.99, ε 1e-8), \
             lr {} → {} with {} warm-up steps ({:?} decay), gradient clipping at global norm {}, \
             data order seed {}, held-out evaluation every {} steps.\n",
            c.steps,
            c.batch,
            c.schedule.lr,
            c.schedule.lr_final,
            c.schedule.warmup,
            c.schedule.decay,
            c.clip,
            c.seed,
            c.eval_every
        );
        s += &format!(
            "- plain: the per-layer WKV initial states. DBP: S = S′R with η = {}, κ = {} \
             (`update_keep_state` after every step). upscaled: plain plus the kernel read-out \
             U φ(r), M = {} support vectors per head (k-means on the {}, see docs/upscale.md). \
             observer: plain plus λ·KL(teacher ‖ student).\n",
            c.dbp_eta,
            c.dbp_kappa,
            c.upscale_m,
            match c.upscale_source {
                HeadVector::Key => "keys k̃_t",
                HeadVector::Receptance => "receptances r_t",
            }
        );
        s += &format!("- Observer: {}.\n", self.observer);
        s += &format!(
            "- Untuned model: held-out loss {:.4}, exact match {}. Observer after its own \
             tuning: held-out loss {:.4}, exact match {} ({:.1} s to prepare).\n",
            self.base_loss,
            pct(self.base_accuracy),
            self.observer_loss,
            pct(self.observer_accuracy),
            self.observer_seconds
        );
        let st = |x: &SoftStats| {
            format!(
                "mean p(label) {:.3}, −ln p(label) {:.3}, entropy {:.3} nats, argmax = label {:.1}%",
                x.mean_p_target,
                x.ce,
                x.entropy,
                100.0 * x.argmax_hits
            )
        };
        let [m1, s0, p1] = &self.observer_train_stats;
        s += &format!(
            "- The observer's soft targets against the labels, over the {} masked training \
             positions: {}. Shifted by one (alignment check): soft[t−1] vs targets[t]: argmax = \
             label {:.1}%; soft[t+1]: {:.1}%. Held-out ({} positions): {}.\n",
            s0.positions,
            st(s0),
            100.0 * m1.argmax_hits,
            100.0 * p1.argmax_hits,
            self.observer_valid_stats.positions,
            st(&self.observer_valid_stats)
        );
        if self.unlabelled > 0 || self.labelled < c.n_train {
            s += &format!(
                "- **Labels scarce**: only {} of the {} training examples keep their responses; \
                 plain, DBP and upscaled train on those {} alone. The observer method also gets \
                 the other {} training prompts with the observer's greedy response (equal to the \
                 withheld reference on {} of them), supervised by λ·KL alone.\n",
                self.labelled, c.n_train, self.labelled, self.unlabelled, self.greedy_hits
            );
        }
        s += &format!(
            "- Target held-out loss: {:.4} nats/byte ({}).\n\n",
            self.target,
            if c.target.is_some() {
                "given"
            } else {
                "the plain method's final held-out loss"
            }
        );
        s += "## Results\n\n";
        s += &self.table();
        s += "\n## Held-out loss during training\n\n";
        s += &self.curves();
        s += "\n## Verdicts (automatic)\n\n";
        for v in self.verdicts() {
            s += &format!("- {v}\n");
        }
        s
    }
}
