//! The observer (arXiv 2504.05097, "guidance from a larger model"), as read
//! in `shared/docs/state-tuning-and-dbp.md` §2.1(b): a stronger frozen model
//! reads the task inputs; its next-token distributions become the soft
//! targets `Example::soft`, and the tuned model's loss adds
//! `λ·KL(teacher ‖ student)` on the masked positions
//! (`GradOpts::observer_weight`, implemented in [`super::grad`]).
use rayon::prelude::*;

use super::device::{DeviceTuner, LStart};
use super::grad::{cpu_tuner, Example, GradOpts, TunedState};
use crate::error::{Error, Result};
use crate::model::weights::Weights;
use crate::ops::cpu::CpuOps;

/// Fills `soft` (`[T, V]`) of every example with the observer's next-token
/// distribution `softmax(logits / temperature)`, the observer starting from
/// `state` (`None`: the zero state). The observer's vocabulary must be the
/// tuned model's (the engine checks `soft`'s length against it).
pub fn fill_soft_targets(
    observer: &Weights,
    state: Option<&TunedState>,
    batch: &mut [Example],
    temperature: f32,
) -> Result<()> {
    let zero;
    let s = match state {
        Some(s) => s,
        None => {
            zero = TunedState::zeros(&observer.config, false);
            &zero
        }
    };
    let tuner = cpu_tuner::<f32>(observer)?;
    let st = tuner.upload_state(s)?;
    fill_soft_targets_on(&tuner, &st, batch, temperature)
}

/// [`fill_soft_targets`] with the observer on a CPU tuner the caller holds
/// and its state `st` on it (a loop uploads the weights once).
pub fn fill_soft_targets_on(
    tuner: &DeviceTuner<CpuOps>,
    st: &[LStart<Vec<f32>>],
    batch: &mut [Example],
    temperature: f32,
) -> Result<()> {
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::Tune(format!(
            "observer temperature = {temperature} (must be finite and > 0)"
        )));
    }
    let v = tuner.config().vocab;
    let inv_t = 1.0 / temperature;
    batch.par_iter_mut().try_for_each(|e| -> Result<()> {
        let mut p = tuner.logits(st, &e.tokens)?;
        for row in p.chunks_mut(v) {
            let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0.0f64;
            for x in row.iter_mut() {
                *x = ((*x - mx) * inv_t).exp();
                sum += *x as f64;
            }
            let inv = (1.0 / sum) as f32;
            row.iter_mut().for_each(|x| *x *= inv);
        }
        e.soft = Some(p);
        Ok(())
    })
}

/// `λ·KL(teacher ‖ student)` alone, without the CE, on the masked positions
/// of `batch` (every example must carry `soft`): the positions where only
/// the observer supervises (unlabelled prompts, or the prompt positions).
/// Computed as the engine's `CE + λ·KL` minus its CE (`observer_weight = 0`)
/// on the same batch, so it needs no change to the engine; costs two
/// passes. Returns `(Σ mask·λ·KL, Σ mask, gradient)`.
pub fn kl_only_loss_and_grad(
    w: &Weights,
    s: &TunedState,
    batch: &[Example],
    o: &GradOpts,
) -> Result<(f64, f64, TunedState)> {
    kl_only_loss_and_grad_on(&cpu_tuner::<f32>(w)?, s, batch, o)
}

/// [`kl_only_loss_and_grad`] on a CPU tuner the caller holds (a loop
/// uploads the weights once).
pub fn kl_only_loss_and_grad_on(
    tuner: &DeviceTuner<CpuOps>,
    s: &TunedState,
    batch: &[Example],
    o: &GradOpts,
) -> Result<(f64, f64, TunedState)> {
    if let Some(i) = batch.iter().position(|e| e.soft.is_none()) {
        return Err(Error::Tune(format!(
            "kl_only_loss_and_grad: batch[{i}] has no soft targets"
        )));
    }
    let (la, n, mut g, _, _) = tuner.loss_and_grad(s, batch, o, false)?;
    let ce_only = GradOpts {
        observer_weight: 0.0,
        ..o.clone()
    };
    let (lb, _, gb, _, _) = tuner.loss_and_grad(s, batch, &ce_only, false)?;
    for (x, y) in g.params_mut().into_iter().zip(gb.params()) {
        x.iter_mut().zip(y).for_each(|(x, y)| *x -= y);
    }
    Ok((la - lb, n, g))
}

/// How well soft targets predict the hard targets, over the masked
/// positions of examples that carry `soft` (see [`soft_target_stats`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SoftStats {
    /// Masked positions counted.
    pub positions: usize,
    /// Mean `p_t(targets[t])`.
    pub mean_p_target: f64,
    /// Mean `−ln p_t(targets[t])` (nats; the soft targets' cross-entropy
    /// against the labels, floored at `p = 1e-30`).
    pub ce: f64,
    /// Mean entropy `H(p_t)` (nats).
    pub entropy: f64,
    /// Fraction of positions whose `argmax p_t` is `targets[t]`.
    pub argmax_hits: f64,
}

/// [`SoftStats`] of the soft rows `soft[t + shift]` against `targets[t]`
/// (`shift = 0`: as the engine pairs them; ±1 shows what an off-by-one
/// would look like). Positions whose shifted row falls outside `[0, T)` are
/// skipped. `vocab` is the row length; examples without `soft` are skipped.
pub fn soft_target_stats(batch: &[Example], vocab: usize, shift: isize) -> Result<SoftStats> {
    if vocab == 0 {
        return Err(Error::Tune("soft_target_stats: vocab = 0".into()));
    }
    let mut s = SoftStats::default();
    let (mut pt, mut ce, mut h, mut hits) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    for (i, e) in batch.iter().enumerate() {
        let Some(p) = &e.soft else { continue };
        let t_len = e.tokens.len();
        if p.len() != t_len * vocab || e.targets.len() != t_len || e.mask.len() != t_len {
            return Err(Error::Tune(format!(
                "soft_target_stats: batch[{i}] has {} soft values, {} targets and {} mask \
                 values for {t_len} tokens × vocab {vocab}",
                p.len(),
                e.targets.len(),
                e.mask.len()
            )));
        }
        for t in 0..t_len {
            let u = t as isize + shift;
            if e.mask[t] <= 0.0 || u < 0 || u >= t_len as isize {
                continue;
            }
            let row = &p[u as usize * vocab..(u as usize + 1) * vocab];
            let tgt = e.targets[t] as usize;
            let q = row.get(tgt).copied().unwrap_or(0.0) as f64;
            pt += q;
            ce -= q.max(1e-30).ln();
            h -= row
                .iter()
                .filter(|&&x| x > 0.0)
                .map(|&x| x as f64 * (x as f64).ln())
                .sum::<f64>();
            let mut best = 0;
            for (j, &x) in row.iter().enumerate() {
                if x > row[best] {
                    best = j;
                }
            }
            hits += (best == tgt) as usize;
            s.positions += 1;
        }
    }
    if s.positions > 0 {
        let n = s.positions as f64;
        s.mean_p_target = pt / n;
        s.ce = ce / n;
        s.entropy = h / n;
        s.argmax_hits = hits as f64 / n;
    }
    Ok(s)
}
