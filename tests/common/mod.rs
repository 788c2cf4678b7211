//! Error measures and dtype helpers shared by the kernel tests.
#![allow(dead_code)]
use rwkv_tune::dtype::IoType;

/// ‖x − r‖∞ / ‖r‖∞
pub fn rel_inf(x: &[f64], r: &[f64]) -> f64 {
    let m = r.iter().fold(0f64, |a, b| a.max(b.abs())).max(1e-30);
    x.iter().zip(r).fold(0f64, |a, (p, q)| a.max((p - q).abs())) / m
}

/// ‖x − r‖₂ / ‖r‖₂
pub fn rel_fro(x: &[f64], r: &[f64]) -> f64 {
    let num: f64 = x.iter().zip(r).map(|(p, q)| (p - q) * (p - q)).sum();
    let den: f64 = r.iter().map(|q| q * q).sum::<f64>().max(1e-60);
    (num / den).sqrt()
}

/// Widens kernel I/O values to f64.
pub fn to64<X: IoType>(v: &[X]) -> Vec<f64> {
    v.iter().map(|e| e.to_f32() as f64).collect()
}

/// Rounds f32 values to the kernel I/O dtype X.
pub fn cast<X: IoType>(v: &[f32]) -> Vec<X> {
    v.iter().map(|&e| X::from_f32(e)).collect()
}
pub mod tune;
