//! Validation of a tuned state: the mean masked cross-entropy over a
//! dataset, bits per token, and the exact-match rate of the greedy response
//! on prompt/response tasks ([`EvalResult`]); [`evaluate`] runs the CPU
//! model, [`evaluate_with`] any logits function (the device engines, the
//! upscaled read-out). The scoring helpers are shared with
//! [`super::upscale`].
use rayon::prelude::*;

use super::data::{Dataset, Task};
use super::state::{to_model_state, Example, TunedState};
use crate::error::Result;
use crate::model::{Logits, Model};

/// Validation results.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy per target token, in nats.
    pub loss: f64,
    /// Number of target tokens.
    pub n_tokens: f64,
    /// (exact matches, tasks) for prompt/response data.
    pub exact: Option<(usize, usize)>,
}

impl EvalResult {
    /// Bits per target token (= bits per byte for byte-level models).
    pub fn bits_per_token(&self) -> f64 {
        self.loss / std::f64::consts::LN_2
    }
    /// Exact-match accuracy in [0, 1].
    pub fn accuracy(&self) -> Option<f64> {
        self.exact
            .map(|(k, n)| if n == 0 { 0.0 } else { k as f64 / n as f64 })
    }
    /// `loss 1.234 (1.780 bits/token), exact match 12/40` style summary.
    pub fn summary(&self, unit: &str) -> String {
        let mut s = format!(
            "loss {:.4} ({:.4} bits/{unit})",
            self.loss,
            self.bits_per_token()
        );
        if let Some((k, n)) = self.exact {
            s += &format!(
                ", exact match {k}/{n} ({:.1}%)",
                100.0 * k as f64 / n.max(1) as f64
            );
        }
        s
    }
}

pub(crate) fn log_softmax_at(row: &[f32], target: usize) -> f64 {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    row[target] as f64 - m - s.ln()
}

pub(crate) fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// The masked cross-entropy sum and mask sum of one example, given its
/// logits `[T, V]`.
pub(crate) fn score_example(e: &Example, logits: &[f32], v: usize) -> (f64, f64) {
    let mut sum = 0.0;
    let mut n = 0.0;
    for (i, (&tgt, &m)) in e.targets.iter().zip(&e.mask).enumerate() {
        if m > 0.0 {
            sum -= m as f64 * log_softmax_at(&logits[i * v..(i + 1) * v], tgt as usize);
            n += m as f64;
        }
    }
    (sum, n)
}

/// The token sequence whose logits decide a task's exact match: the prompt
/// and the response without its last token.
pub(crate) fn task_sequence(t: &Task) -> Vec<u32> {
    t.prompt
        .iter()
        .chain(&t.response[..t.response.len() - 1])
        .copied()
        .collect()
}

/// Whether the teacher-forced argmax reproduces the task's response, given
/// the logits `[T, V]` of [`task_sequence`].
pub(crate) fn task_hit(t: &Task, logits: &[f32], v: usize) -> bool {
    let p = t.prompt.len();
    t.response
        .iter()
        .enumerate()
        .all(|(j, &r)| argmax(&logits[(p - 1 + j) * v..(p + j) * v]) == r as usize)
}

/// Sums per-example scores and task hits into an [`EvalResult`].
pub(crate) fn eval_result(sums: &[(f64, f64)], hits: Option<&[bool]>) -> EvalResult {
    let (sum, n) = sums.iter().fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    EvalResult {
        loss: if n > 0.0 { sum / n } else { 0.0 },
        n_tokens: n,
        exact: hits.map(|h| (h.iter().filter(|&&x| x).count(), h.len())),
    }
}

/// Validation: mean masked cross-entropy over `ds` (first `max` examples; 0
/// = all) from state `s`, and the exact-match rate of the greedy response
/// on its prompt/response tasks (a response matches when the argmax at every
/// response position, teacher-forced, is the reference token — the same as
/// greedy decoding reproducing it).
pub fn evaluate(model: &Model, s: &TunedState, ds: &Dataset, max: usize) -> Result<EvalResult> {
    let cfg = model.config();
    let v = cfg.vocab;
    let start = to_model_state(cfg, s);
    let take = |n: usize| if max == 0 { n } else { n.min(max) };
    let sums = ds.examples[..take(ds.examples.len())]
        .par_iter()
        .map(|e| -> Result<(f64, f64)> {
            let mut st = start.clone();
            let logits = model.forward(&e.tokens, &mut st, Logits::All)?;
            Ok(score_example(e, &logits, v))
        })
        .collect::<Result<Vec<_>>>()?;
    let tasks = &ds.tasks[..take(ds.tasks.len())];
    let hits = if tasks.is_empty() {
        None
    } else {
        Some(
            tasks
                .par_iter()
                .map(|t| -> Result<bool> {
                    let mut st = start.clone();
                    let logits = model.forward(&task_sequence(t), &mut st, Logits::All)?;
                    Ok(task_hit(t, &logits, v))
                })
                .collect::<Result<Vec<_>>>()?,
        )
    };
    Ok(eval_result(&sums, hits.as_deref()))
}

/// [`evaluate`] with any logits function (`tokens → [T, V]` from the tuned
/// state), run sequentially (for device engines).
pub fn evaluate_with(
    v: usize,
    ds: &Dataset,
    max: usize,
    mut logits: impl FnMut(&[u32]) -> Result<Vec<f32>>,
) -> Result<EvalResult> {
    let take = |n: usize| if max == 0 { n } else { n.min(max) };
    let sums = ds.examples[..take(ds.examples.len())]
        .iter()
        .map(|e| Ok(score_example(e, &logits(&e.tokens)?, v)))
        .collect::<Result<Vec<_>>>()?;
    let tasks = &ds.tasks[..take(ds.tasks.len())];
    let hits = if tasks.is_empty() {
        None
    } else {
        Some(
            tasks
                .iter()
                .map(|t| Ok(task_hit(t, &logits(&task_sequence(t))?, v)))
                .collect::<Result<Vec<_>>>()?,
        )
    };
    Ok(eval_result(&sums, hits.as_deref()))
}
