//! Choosing the next token from logits: greedy argmax, or temperature plus
//! nucleus (top-p) sampling with a seeded generator.
use super::init::SplitMix64;
use crate::error::{Error, Result};

/// Index of the largest logit (the first one on ties; NaNs are ignored).
/// Returns 0 for an empty slice.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    best as u32
}

/// Log-softmax of one row, computed in f64 for accuracy.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let s: f64 = logits.iter().map(|&v| (v as f64 - m).exp()).sum();
    let lse = m + s.ln();
    logits.iter().map(|&v| v as f64 - lse).collect()
}

/// Temperature + top-p sampler.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// Temperature; 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 keeps every token.
    pub top_p: f32,
    rng: SplitMix64,
}

impl Sampler {
    /// A sampler; errors on a negative or non-finite temperature or a top-p
    /// outside (0, 1].
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Result<Sampler> {
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(Error::Invalid(format!(
                "temperature must be >= 0, got {temperature}"
            )));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::Invalid(format!(
                "top_p must be in (0, 1], got {top_p}"
            )));
        }
        Ok(Sampler {
            temperature,
            top_p,
            rng: SplitMix64::new(seed),
        })
    }

    /// Picks a token from the logits of one position.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 || logits.len() <= 1 {
            return argmax(logits);
        }
        let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let inv_t = 1.0 / self.temperature as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, (((v - m) as f64) * inv_t).exp()))
            .filter(|(_, p)| p.is_finite())
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        if total.is_nan() || total <= 0.0 {
            return argmax(logits);
        }
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let cut = self.top_p as f64 * total;
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p.1;
            if acc >= cut {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let kept: f64 = probs.iter().map(|p| p.1).sum();
        let mut u = self.rng.uniform_f64() * kept;
        for &(id, p) in &probs {
            if u < p {
                return id;
            }
            u -= p;
        }
        probs.last().map(|p| p.0).unwrap_or(0)
    }
}
