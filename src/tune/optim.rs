//! The optimiser for state tuning: Adam / AdamW over the tuned state's
//! parameters, the learning-rate schedule (warm-up, then decay from `lr` to
//! `lr_final`), and global-norm gradient clipping.
//!
//! Defaults follow the RWKV-PEFT state-tuning recipe: Adam with β = (0.9,
//! 0.99), ε = 1e-8, lr 1 → 0.01 with 10 warm-up steps, no weight decay,
//! gradient clipping at global norm 1. The schedule is RWKV-LM's: during
//! warm-up the lr is `lr · (0.01 + 0.99 · step / warmup)`; after it the lr
//! decays exponentially (log-linearly) from `lr` to `lr_final` at the last
//! step (linearly when either is 0).
use crate::error::{Error, Result};

/// How the learning rate decays after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Decay {
    /// `lr · (lr_final/lr)^progress` (RWKV-LM's default).
    #[default]
    Exp,
    /// `lr + (lr_final − lr) · progress`.
    Linear,
    /// `lr_final + (lr − lr_final) · (1 + cos(π · progress)) / 2`.
    Cosine,
}

impl std::str::FromStr for Decay {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "exp" => Ok(Decay::Exp),
            "linear" => Ok(Decay::Linear),
            "cos" | "cosine" => Ok(Decay::Cosine),
            _ => Err(Error::Invalid(format!(
                "unknown decay `{s}` (use exp, linear or cosine)"
            ))),
        }
    }
}

/// Learning-rate schedule over `total` steps (steps are numbered from 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the decay.
    pub lr_final: f64,
    /// Linear warm-up steps.
    pub warmup: u64,
    /// Total steps (the decay ends here).
    pub total: u64,
    /// Shape of the decay after warm-up.
    pub decay: Decay,
}

impl Schedule {
    /// The RWKV-PEFT state-tuning preset: lr 1 → 0.01, 10 warm-up steps,
    /// exponential decay.
    pub fn rwkv_peft(total: u64) -> Schedule {
        Schedule {
            lr: 1.0,
            lr_final: 0.01,
            warmup: 10,
            total,
            decay: Decay::Exp,
        }
    }

    /// The learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        let (l0, l1) = (self.lr, self.lr_final);
        let progress = if self.total <= self.warmup + 1 {
            0.0
        } else {
            let p = (step as f64 - self.warmup as f64) / ((self.total - 1 - self.warmup) as f64);
            p.clamp(0.0, 1.0)
        };
        let base = if l0 == l1 {
            l0
        } else {
            match self.decay {
                Decay::Exp if l0 > 0.0 && l1 > 0.0 => l0 * (l1 / l0).powf(progress),
                Decay::Exp | Decay::Linear => l0 + (l1 - l0) * progress,
                Decay::Cosine => {
                    l1 + (l0 - l1) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
        };
        if step < self.warmup {
            base * (0.01 + 0.99 * step as f64 / self.warmup as f64)
        } else {
            base
        }
    }
}

/// Adam / AdamW hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    /// First-moment decay β₁.
    pub beta1: f64,
    /// Second-moment decay β₂.
    pub beta2: f64,
    /// ε added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (AdamW); 0 gives Adam.
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Adam's moment estimates, one pair of buffers per parameter tensor, and
/// the number of updates taken (for bias correction).
#[derive(Clone, Debug, PartialEq)]
pub struct Adam {
    /// Hyper-parameters.
    pub cfg: AdamConfig,
    /// First moments, parallel to the parameter list.
    pub m: Vec<Vec<f32>>,
    /// Second moments, parallel to the parameter list.
    pub v: Vec<Vec<f32>>,
    /// Updates taken so far.
    pub t: u64,
}

impl Adam {
    /// Zero moments for parameters of the given lengths.
    pub fn new(cfg: AdamConfig, sizes: &[usize]) -> Adam {
        Adam {
            cfg,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            t: 0,
        }
    }

    /// One update: `params[i] -= lr · m̂ / (√v̂ + ε)` (plus decoupled decay).
    pub fn step(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]], lr: f64) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != self.m.len() {
            return Err(Error::Tune(format!(
                "optimizer has {} tensors, got {} parameters and {} gradients",
                self.m.len(),
                params.len(),
                grads.len()
            )));
        }
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            if p.len() != g.len() || p.len() != m.len() {
                return Err(Error::Tune(format!(
                    "tensor {i}: parameter {} / gradient {} / moment {} lengths differ",
                    p.len(),
                    g.len(),
                    m.len()
                )));
            }
            for j in 0..p.len() {
                let gj = g[j] as f64;
                let mj = c.beta1 * m[j] as f64 + (1.0 - c.beta1) * gj;
                let vj = c.beta2 * v[j] as f64 + (1.0 - c.beta2) * gj * gj;
                m[j] = mj as f32;
                v[j] = vj as f32;
                let upd = (mj / bc1) / ((vj / bc2).sqrt() + c.eps);
                let mut pj = p[j] as f64;
                if c.weight_decay > 0.0 {
                    pj -= lr * c.weight_decay * pj;
                }
                p[j] = (pj - lr * upd) as f32;
            }
        }
        Ok(())
    }
}

/// Global L2 norm of a set of gradient tensors.
pub fn global_norm(grads: &[&[f32]]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// Scales `grads` so that their global norm is at most `max_norm` (no-op
/// when `max_norm <= 0` or the norm is smaller). Returns the norm before
/// clipping.
pub fn clip_global_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let norm = global_norm(&grads.iter().map(|g| &**g).collect::<Vec<_>>());
    if max_norm > 0.0 && norm > max_norm && norm.is_finite() {
        let s = (max_norm / norm) as f32;
        for g in grads.iter_mut() {
            g.iter_mut().for_each(|x| *x *= s);
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_the_rwkv_recipe() {
        let s = Schedule::rwkv_peft(100);
        assert!((s.lr_at(0) - 0.01).abs() < 1e-12);
        assert!((s.lr_at(5) - (0.01 + 0.99 * 0.5)).abs() < 1e-12);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(99) - 0.01).abs() < 1e-12);
        // Half way through the decay: geometric mean of 1 and 0.01.
        let mid = 10 + (99 - 10) / 2;
        let p = (mid - 10) as f64 / 89.0;
        assert!((s.lr_at(mid) - 0.01f64.powf(p)).abs() < 1e-12);
        for k in 11..100 {
            assert!(s.lr_at(k) < s.lr_at(k - 1));
        }
        let lin = Schedule {
            decay: Decay::Linear,
            ..s
        };
        assert!((lin.lr_at(99) - 0.01).abs() < 1e-12);
        let cos = Schedule {
            decay: Decay::Cosine,
            ..s
        };
        assert!((cos.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((cos.lr_at(99) - 0.01).abs() < 1e-12);
        let constant = Schedule {
            lr: 0.5,
            lr_final: 0.5,
            warmup: 0,
            total: 10,
            decay: Decay::Exp,
        };
        assert_eq!(constant.lr_at(7), 0.5);
    }

    #[test]
    fn adam_converges_on_a_quadratic() {
        // f(x) = Σ c_i (x_i − t_i)², badly conditioned.
        let target = [3.0f32, -2.0, 0.5, 10.0];
        let curv = [1.0f32, 100.0, 0.01, 5.0];
        let mut x = vec![0.0f32; 4];
        let mut opt = Adam::new(AdamConfig::default(), &[4]);
        let sched = Schedule {
            lr: 1.0,
            lr_final: 0.001,
            warmup: 10,
            total: 600,
            decay: Decay::Exp,
        };
        for step in 0..600 {
            let g: Vec<f32> = (0..4).map(|i| 2.0 * curv[i] * (x[i] - target[i])).collect();
            opt.step(&mut [&mut x], &[&g], sched.lr_at(step)).unwrap();
        }
        for i in 0..4 {
            assert!((x[i] - target[i]).abs() < 0.05, "x = {x:?}");
        }
        assert_eq!(opt.t, 600);
    }

    #[test]
    fn adamw_decays_weights_without_gradient() {
        let mut x = vec![1.0f32];
        let cfg = AdamConfig {
            weight_decay: 0.1,
            ..AdamConfig::default()
        };
        let mut opt = Adam::new(cfg, &[1]);
        opt.step(&mut [&mut x], &[&[0.0]], 1.0).unwrap();
        assert!((x[0] - 0.9).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut a = vec![3.0f32, 0.0];
        let mut b = vec![4.0f32];
        let n = clip_global_norm(&mut [&mut a, &mut b], 1.0);
        assert!((n - 5.0).abs() < 1e-9);
        assert!((global_norm(&[&a, &b]) - 1.0).abs() < 1e-6);
        let n2 = clip_global_norm(&mut [&mut a, &mut b], 10.0);
        assert!((n2 - 1.0).abs() < 1e-6);
        assert!((a[0] - 0.6).abs() < 1e-6);
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        let mut opt = Adam::new(AdamConfig::default(), &[2]);
        let mut x = vec![0.0f32; 3];
        assert!(opt.step(&mut [&mut x], &[&[0.0, 0.0, 0.0]], 1.0).is_err());
    }
}
