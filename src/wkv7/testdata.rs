//! Seeded random WKV-7 problems shaped like the model's (never zeros), shared
//! by the tests, the benches and `rwkv-tune bench`.
use super::{Dims, GradInputs, Inputs};
use crate::rng::Rng;

/// A random problem: r … b `[B, T, H, N]`, h0 `[B, H, N, N]`, dy `[B, T, H, N]`,
/// dh_t `[B, H, N, N]`, all f32.
#[derive(Clone, Debug)]
pub struct Problem {
    pub dims: Dims,
    pub r: Vec<f32>,
    pub w: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub h0: Vec<f32>,
    pub dy: Vec<f32>,
    pub dh_t: Vec<f32>,
}

impl Problem {
    /// The problem's f32 inputs, with h0.
    pub fn inputs(&self) -> Inputs<'_, f32> {
        Inputs {
            r: &self.r,
            w: &self.w,
            k: &self.k,
            v: &self.v,
            a: &self.a,
            b: &self.b,
            h0: Some(&self.h0),
        }
    }

    /// The problem's output gradients, with dh_t.
    pub fn grad_inputs(&self) -> GradInputs<'_, f32> {
        GradInputs {
            dy: &self.dy,
            dh_t: Some(&self.dh_t),
        }
    }
}

/// Builds a problem like the model produces: w uniform in `[w_lo, w_hi)`,
/// a = −κ̂ and b = κ̂⊙α with κ̂ a unit vector per (token, head) and
/// α ∈ (0, 1), r, k, v ~ N(0, 1)·0.5, h0 ~ N(0, 1)·0.3, dy, dh_t ~ N(0, 1).
pub fn random_problem(dims: Dims, seed: u64, w_lo: f64, w_hi: f64) -> Problem {
    let mut g = Rng::new(seed);
    let (sl, n) = (dims.seq_len(), dims.n);
    let r = g.normal_vec(sl, 0.5);
    let k = g.normal_vec(sl, 0.5);
    let v = g.normal_vec(sl, 0.5);
    let w: Vec<f32> = (0..sl).map(|_| g.range(w_lo, w_hi) as f32).collect();
    let mut a = vec![0f32; sl];
    let mut b = vec![0f32; sl];
    for o in (0..sl).step_by(n) {
        let kap: Vec<f64> = (0..n).map(|_| g.normal()).collect();
        let norm = kap.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        for j in 0..n {
            let kh = kap[j] / norm;
            let alpha = g.range(0.05, 0.95);
            a[o + j] = (-kh) as f32;
            b[o + j] = (kh * alpha) as f32;
        }
    }
    let h0 = g.normal_vec(dims.state_len(), 0.3);
    let dy = g.normal_vec(sl, 1.0);
    let dh_t = g.normal_vec(dims.state_len(), 1.0);
    Problem {
        dims,
        r,
        w,
        k,
        v,
        a,
        b,
        h0,
        dy,
        dh_t,
    }
}
