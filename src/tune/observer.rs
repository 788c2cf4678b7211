//! The observer (arXiv 2504.05097, "guidance from a larger model"), as read
//! in `shared/docs/state-tuning-and-dbp.md` §2.1(b): a stronger frozen model
//! reads the task inputs; its next-token distributions become the soft
//! targets `Example::soft`, and the tuned model's loss adds
//! `λ·KL(teacher ‖ student)` on the masked positions
//! (`GradOpts::observer_weight`, implemented in [`super::grad`]).
use rayon::prelude::*;

use super::grad::{forward_logits, Example, TunedState};
use crate::error::{Error, Result};
use crate::model::weights::Weights;

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
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::Tune(format!(
            "observer temperature = {temperature} (must be finite and > 0)"
        )));
    }
    let zero;
    let s = match state {
        Some(s) => s,
        None => {
            zero = TunedState::zeros(&observer.config, false);
            &zero
        }
    };
    let v = observer.config.vocab;
    let inv_t = 1.0 / temperature;
    batch.par_iter_mut().try_for_each(|e| -> Result<()> {
        let mut p = forward_logits(observer, s, &e.tokens)?;
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
