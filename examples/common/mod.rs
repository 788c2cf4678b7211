//! Random WKV-7 inputs shaped like the model's (never zeros), shared by the
//! examples, and the error measure they report.
#![allow(dead_code)] // each example uses part of this

use rwkv_tune::rng::Rng;
use rwkv_tune::wkv7::Dims;

/// r, w, k, v, a, b `[B, T, H, N]`, h0 `[B, H, N, N]`, dy `[B, T, H, N]`,
/// all f32 on the host.
pub struct HostProblem {
    pub r: Vec<f32>,
    pub w: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub h0: Vec<f32>,
    pub dy: Vec<f32>,
}

/// r, k, v ~ N(0, 0.25), w uniform in [0.6, 0.99), a = −κ̂ and b = κ̂·α
/// (κ̂ a unit vector per token and head, α in (0.05, 0.95)), h0 ~ N(0, 0.09),
/// dy ~ N(0, 1): the magnitudes an RWKV-7 layer produces.
pub fn random_problem(d: &Dims, seed: u64) -> HostProblem {
    let mut g = Rng::new(seed);
    let sl = d.seq_len();
    let r = g.normal_vec(sl, 0.5);
    let k = g.normal_vec(sl, 0.5);
    let v = g.normal_vec(sl, 0.5);
    let w: Vec<f32> = (0..sl).map(|_| g.range(0.6, 0.99) as f32).collect();
    let (mut a, mut b) = (vec![0f32; sl], vec![0f32; sl]);
    for o in (0..sl).step_by(d.n) {
        let kap = g.normal_vec(d.n, 1.0);
        let norm = kap.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        for j in 0..d.n {
            a[o + j] = -kap[j] / norm;
            b[o + j] = kap[j] / norm * g.range(0.05, 0.95) as f32;
        }
    }
    HostProblem {
        r,
        w,
        k,
        v,
        a,
        b,
        h0: g.normal_vec(d.state_len(), 0.3),
        dy: g.normal_vec(sl, 1.0),
    }
}

/// `max |x − r| / max |r|` (0 when both are empty).
pub fn rel_inf(x: &[f32], r: &[f32]) -> f64 {
    let num = x
        .iter()
        .zip(r)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    let den = r.iter().map(|b| (*b as f64).abs()).fold(0.0, f64::max);
    if den == 0.0 {
        num
    } else {
        num / den
    }
}
