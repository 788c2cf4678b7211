//! Seeded random weights with realistic magnitudes, for tests, benchmarks and
//! comparisons between the CPU and GPU paths.
//!
//! The shapes follow the config; the values imitate a trained x070 model:
//! token-shift coefficients in (0, 1), decay logits spread so that the decay
//! `w = exp(-e^{-0.5} σ(d))` covers roughly (0.55, 1), `k_k` near 0.7 (the
//! normalised `κ̂` is well defined), `k_a` near 1, small LoRA factors, and
//! projections scaled by 1/√fan_in.
use super::weights::{Block, ChannelMix, Config, LayerNorm, TimeMix, Weights};
use crate::error::Result;

/// SplitMix64: a tiny, well-mixed, seedable generator (private to the model).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }
    /// Uniform in [0, 1) as f64 (53 bits).
    pub fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }
    /// A vector of `n` values uniform in [lo, hi).
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.range(lo, hi)).collect()
    }
    /// A vector of `n` values uniform in (-s, s).
    pub fn sym(&mut self, n: usize, s: f32) -> Vec<f32> {
        self.vec(n, -s, s)
    }
}

impl Weights {
    /// Random weights for `config`, deterministic in `seed`. Errors only when
    /// the config is inconsistent ([`Config::validate`]).
    pub fn random(config: &Config, seed: u64) -> Result<Weights> {
        config.validate()?;
        let mut r = SplitMix64::new(seed);
        let c = config.n_embd;
        let f = config.d_ffn;
        let sc = 1.0 / (c as f32).sqrt();
        let ln = |r: &mut SplitMix64| LayerNorm {
            weight: r.vec(c, 0.8, 1.2),
            bias: r.sym(c, 0.1),
        };
        let lora = |r: &mut SplitMix64, d: usize| (r.sym(c * d, 0.3 * sc), r.sym(d * c, 0.3));
        let mut blocks = Vec::with_capacity(config.n_layer);
        for l in 0..config.n_layer {
            let ln0 = if l == 0 { Some(ln(&mut r)) } else { None };
            let ln1 = ln(&mut r);
            let ln2 = ln(&mut r);
            let (w1, w2) = lora(&mut r, config.d_w);
            let (a1, a2) = lora(&mut r, config.d_a);
            let (g1, g2) = lora(&mut r, config.d_g);
            let (v0, v1, v2) = if l > 0 {
                let (v1, v2) = lora(&mut r, config.d_v);
                (Some(r.vec(c, -0.5, 1.5)), Some(v1), Some(v2))
            } else {
                (None, None, None)
            };
            let att = TimeMix {
                x_r: r.vec(c, 0.05, 0.95),
                x_w: r.vec(c, 0.05, 0.95),
                x_k: r.vec(c, 0.05, 0.95),
                x_v: r.vec(c, 0.05, 0.95),
                x_a: r.vec(c, 0.05, 0.95),
                x_g: r.vec(c, 0.05, 0.95),
                // σ(d) from ~0.002 to ~0.8: w from ~0.999 down to ~0.6.
                w0: r.vec(c, -6.0, 1.5),
                w1,
                w2,
                a0: r.vec(c, -1.5, 1.0),
                a1,
                a2,
                v0,
                v1,
                v2,
                g1,
                g2,
                k_k: r.vec(c, 0.5, 1.0),
                k_a: r.vec(c, 0.8, 1.2),
                r_k: r.sym(c, 0.3),
                receptance: r.sym(c * c, 1.7 * sc),
                key: r.sym(c * c, 1.7 * sc),
                value: r.sym(c * c, 1.7 * sc),
                output: r.sym(c * c, 0.5 * sc),
                ln_x: LayerNorm {
                    weight: r.vec(c, 0.5, 1.5),
                    bias: r.sym(c, 0.1),
                },
            };
            let ffn = ChannelMix {
                x_k: r.vec(c, 0.05, 0.95),
                key: r.sym(f * c, 1.7 * sc),
                value: r.sym(c * f, 0.5 / (f as f32).sqrt()),
            };
            blocks.push(Block {
                ln0,
                ln1,
                ln2,
                att,
                ffn,
            });
        }
        let emb = r.sym(config.vocab * c, 1.0);
        let ln_out = ln(&mut r);
        let head = r.sym(config.vocab * c, 1.7 * sc);
        Ok(Weights {
            config: config.clone(),
            emb,
            blocks,
            ln_out,
            head,
        })
    }
}

impl Config {
    /// A config with the official LoRA-width heuristics for width `n_embd`
    /// (`D_w = D_a = max(32, round(2.5√C/32)·32)`, `D_v = max(32, round(1.7√C/32)·32)`,
    /// `D_g = max(32, round(5√C/32)·32)`, FFN 4C).
    pub fn with_defaults(n_layer: usize, n_embd: usize, head_size: usize, vocab: usize) -> Config {
        let lw = |k: f64| {
            let d = ((k * (n_embd as f64).sqrt() / 32.0).round() * 32.0) as usize;
            d.max(32)
        };
        Config {
            n_layer,
            n_embd,
            n_head: n_embd / head_size.max(1),
            head_size,
            vocab,
            d_w: lw(2.5),
            d_a: lw(2.5),
            d_v: lw(1.7),
            d_g: lw(5.0),
            d_ffn: 4 * n_embd,
        }
    }
}
