//! Decorrelated backpropagation (DBP) for the tuned WKV state.
//!
//! Each head's state is parametrised as `S = S′·R` with a per-(layer, head)
//! matrix `R ∈ R^{N×N}` acting on the **key side** (the state multiplies
//! key-space vectors: `y_t = S_t r_t`, `sa_t = S_{t−1} a_t`). The optimiser
//! trains `S′`; `R` is not trained by gradients but by the local DBP rule
//!
//! ```text
//!   z = R x,   Z = ⟨z zᵀ⟩ = R ⟨x xᵀ⟩ Rᵀ
//!   Δ = (1−κ)·offdiag(Z) + κ·diag(diag(Z) − 1)
//!   R ← (I − η Δ) R
//! ```
//!
//! where `x` are the key-space inputs the state reads, collected by the
//! forward of [`super::grad::loss_and_grad_dbp`] (the receptances `r_t` of each head, all positions that can affect the
//! loss; see [`DbpStats`]). The chain rule gives `dS′ = dS·Rᵀ`
//! ([`Dbp::grad_to_prime`]); `S` itself is [`Dbp::effective_state`].
//! When `R` changes, [`Dbp::update_keep_state`] re-solves `S′ ← S′(I − ηΔ)⁻¹`
//! so that the effective state `S` (and so the model's behaviour) is unchanged;
//! [`Dbp::update`] only changes `R` (the state jumps). Rationale and the open
//! choices are in `docs/dbp.md`.
pub use super::state::DbpStats;
use super::state::TunedStateOf;
use crate::error::{Error, Result};
use crate::model::weights::Config;
use crate::real::Real;

/// What one [`Dbp::update`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DbpReport {
    /// Mean over heads of `((1−κ)‖offdiag Z‖²_F + κ‖diag Z − 1‖²) / N²` before the update.
    pub loss: f64,
    /// Mean over heads of the RMS off-diagonal *correlation* of `z` before the update.
    pub offdiag_corr: f64,
    /// Heads whose step was shrunk to keep `‖ηΔ‖∞ ≤ 0.5`.
    pub clipped: usize,
}

/// Decorrelation matrices, one `[N, N]` per layer and head (row-major, f64).
#[derive(Clone, Debug, PartialEq)]
pub struct Dbp {
    /// Layers.
    pub n_layer: usize,
    /// Heads per layer.
    pub n_head: usize,
    /// Head size N.
    pub head_size: usize,
    /// Learning rate of the decorrelation rule.
    pub eta: f64,
    /// Whitening weight κ ∈ [0, 1] (0: decorrelate only).
    pub kappa: f64,
    /// `[L, H, N, N]`, initialised to identities.
    pub r: Vec<f64>,
}

/// Largest allowed `‖ηΔ‖∞` (row-sum norm) of one step; keeps `I − ηΔ` well
/// conditioned (invertible, ‖(I−ηΔ)⁻¹‖∞ ≤ 2).
pub const MAX_STEP_NORM: f64 = 0.5;

impl Dbp {
    /// Identity decorrelators for `cfg`. `eta > 0`, `kappa ∈ [0, 1]`.
    pub fn new(cfg: &Config, eta: f64, kappa: f64) -> Result<Self> {
        if !(eta.is_finite() && eta > 0.0) {
            return Err(Error::Tune(format!(
                "DBP eta = {eta} (must be finite and > 0)"
            )));
        }
        if !(0.0..=1.0).contains(&kappa) {
            return Err(Error::Tune(format!(
                "DBP kappa = {kappa} (must be in [0, 1])"
            )));
        }
        let (l, h, n) = (cfg.n_layer, cfg.n_head, cfg.head_size);
        let mut r = vec![0.0; l * h * n * n];
        for b in 0..l * h {
            for i in 0..n {
                r[b * n * n + i * n + i] = 1.0;
            }
        }
        Ok(Dbp {
            n_layer: l,
            n_head: h,
            head_size: n,
            eta,
            kappa,
            r,
        })
    }

    fn check_state<R>(&self, s: &TunedStateOf<R>, name: &str) -> Result<()> {
        let hnn = self.n_head * self.head_size * self.head_size;
        if s.wkv.len() != self.n_layer || s.wkv.iter().any(|v| v.len() != hnn) {
            return Err(Error::Shape {
                name: format!("{name}.wkv"),
                expected: vec![self.n_layer, hnn],
                got: vec![s.wkv.len(), s.wkv.first().map_or(0, |v| v.len())],
            });
        }
        Ok(())
    }

    /// Per head `out = s · M` (`transpose`: `s · Mᵀ`), `M` = this head's R.
    fn right_mul<R: Real>(&self, s: &TunedStateOf<R>, transpose: bool) -> TunedStateOf<R> {
        let n = self.head_size;
        let nn = n * n;
        let mut out = s.clone();
        for (l, (src, dst)) in s.wkv.iter().zip(out.wkv.iter_mut()).enumerate() {
            for h in 0..self.n_head {
                let m = &self.r[(l * self.n_head + h) * nn..(l * self.n_head + h + 1) * nn];
                let a = &src[h * nn..(h + 1) * nn];
                let o = &mut dst[h * nn..(h + 1) * nn];
                for i in 0..n {
                    for j in 0..n {
                        let mut acc = 0.0f64;
                        for q in 0..n {
                            let mq = if transpose {
                                m[j * n + q]
                            } else {
                                m[q * n + j]
                            };
                            acc += a[i * n + q].to_f64() * mq;
                        }
                        o[i * n + j] = R::from_f64(acc);
                    }
                }
            }
        }
        out
    }

    /// `S = S′·R` per head; the token-shift parts are copied unchanged.
    pub fn effective_state<R: Real>(&self, s_prime: &TunedStateOf<R>) -> Result<TunedStateOf<R>> {
        self.check_state(s_prime, "s_prime")?;
        Ok(self.right_mul(s_prime, false))
    }

    /// `dS′ = dS·Rᵀ` per head; the token-shift gradients are copied unchanged.
    pub fn grad_to_prime<R: Real>(&self, g: &TunedStateOf<R>) -> Result<TunedStateOf<R>> {
        self.check_state(g, "grad")?;
        Ok(self.right_mul(g, true))
    }

    fn check_stats(&self, st: &DbpStats) -> Result<()> {
        if (st.n_layer, st.n_head, st.head_size) != (self.n_layer, self.n_head, self.head_size)
            || st.second_moment.len() != self.r.len()
        {
            return Err(Error::Shape {
                name: "DbpStats".into(),
                expected: vec![self.n_layer, self.n_head, self.head_size, self.head_size],
                got: vec![st.n_layer, st.n_head, st.head_size, st.second_moment.len()],
            });
        }
        Ok(())
    }

    /// The step matrices `ηΔ` (per head) and the report, without applying them.
    fn steps(&self, st: &DbpStats) -> Result<(Vec<f64>, DbpReport)> {
        self.check_stats(st)?;
        let n = self.head_size;
        let nn = n * n;
        let nh = self.n_layer * self.n_head;
        let mut steps = vec![0.0; nh * nn];
        let mut rep = DbpReport::default();
        if st.count <= 0.0 {
            return Ok((steps, rep));
        }
        for b in 0..nh {
            let (l, h) = (b / self.n_head, b % self.n_head);
            let cx = st.mean(l, h);
            let r = &self.r[b * nn..(b + 1) * nn];
            let z = sandwich(r, &cx, n); // R Cx Rᵀ
            let mut off2 = 0.0;
            let mut var2 = 0.0;
            let mut corr2 = 0.0;
            let step = &mut steps[b * nn..(b + 1) * nn];
            for i in 0..n {
                for j in 0..n {
                    let zij = z[i * n + j];
                    if i == j {
                        let v = zij - 1.0;
                        var2 += v * v;
                        step[i * n + j] = self.eta * self.kappa * v;
                    } else {
                        off2 += zij * zij;
                        let den = (z[i * n + i] * z[j * n + j]).sqrt();
                        if den > 0.0 {
                            corr2 += (zij / den) * (zij / den);
                        }
                        step[i * n + j] = self.eta * (1.0 - self.kappa) * zij;
                    }
                }
            }
            rep.loss += ((1.0 - self.kappa) * off2 + self.kappa * var2) / nn as f64;
            if n > 1 {
                rep.offdiag_corr += (corr2 / (n * (n - 1)) as f64).sqrt();
            }
            let norm = (0..n)
                .map(|i| {
                    step[i * n..(i + 1) * n]
                        .iter()
                        .map(|v| v.abs())
                        .sum::<f64>()
                })
                .fold(0.0, f64::max);
            if norm > MAX_STEP_NORM {
                let f = MAX_STEP_NORM / norm;
                step.iter_mut().for_each(|v| *v *= f);
                rep.clipped += 1;
            }
        }
        rep.loss /= nh as f64;
        rep.offdiag_corr /= nh as f64;
        Ok((steps, rep))
    }

    /// One DBP step from the statistics: `R ← (I − ηΔ)R`. The tuned `S′` is
    /// not touched, so the effective state `S′R` changes.
    pub fn update(&mut self, st: &DbpStats) -> Result<DbpReport> {
        let (steps, rep) = self.steps(st)?;
        self.apply(&steps);
        Ok(rep)
    }

    /// [`update`](Self::update), returning per layer and head the matrix
    /// `(I − ηΔ)⁻¹` `[L, H, N, N]` that keeps `S = S′R` unchanged when
    /// applied as `S′ ← S′·(I − ηΔ)⁻¹` (what [`Self::update_keep_state`]
    /// does on the host; the device engine applies it on the device).
    pub fn update_transfer(&mut self, st: &DbpStats) -> Result<(Vec<f64>, DbpReport)> {
        let (steps, rep) = self.steps(st)?;
        let n = self.head_size;
        let nn = n * n;
        let mut out = vec![0.0; steps.len()];
        for b in 0..self.n_layer * self.n_head {
            let mut m = vec![0.0; nn];
            for i in 0..n {
                for j in 0..n {
                    m[i * n + j] = if i == j { 1.0 } else { 0.0 } - steps[b * nn + i * n + j];
                }
            }
            let inv = invert(&m, n).ok_or_else(|| {
                Error::Tune(format!(
                    "DBP: I − ηΔ is singular at layer {} head {}",
                    b / self.n_head,
                    b % self.n_head
                ))
            })?;
            out[b * nn..(b + 1) * nn].copy_from_slice(&inv);
        }
        self.apply(&steps);
        Ok((out, rep))
    }

    /// [`update`](Self::update), then `S′ ← S′(I − ηΔ)⁻¹` so that the
    /// effective state `S = S′R` is unchanged by the step.
    pub fn update_keep_state<R: Real>(
        &mut self,
        st: &DbpStats,
        s_prime: &mut TunedStateOf<R>,
    ) -> Result<DbpReport> {
        self.check_state(s_prime, "s_prime")?;
        let (tr, rep) = self.update_transfer(st)?;
        let n = self.head_size;
        let nn = n * n;
        for (l, s) in s_prime.wkv.iter_mut().enumerate() {
            for h in 0..self.n_head {
                let b = l * self.n_head + h;
                let inv = &tr[b * nn..(b + 1) * nn];
                let blk = &mut s[h * nn..(h + 1) * nn];
                let old: Vec<f64> = blk.iter().map(|v| v.to_f64()).collect();
                for i in 0..n {
                    for j in 0..n {
                        let mut acc = 0.0;
                        for q in 0..n {
                            acc += old[i * n + q] * inv[q * n + j];
                        }
                        blk[i * n + j] = R::from_f64(acc);
                    }
                }
            }
        }
        Ok(rep)
    }

    fn apply(&mut self, steps: &[f64]) {
        let n = self.head_size;
        let nn = n * n;
        for b in 0..self.n_layer * self.n_head {
            let r = &mut self.r[b * nn..(b + 1) * nn];
            let s = &steps[b * nn..(b + 1) * nn];
            let mut nr = r.to_vec();
            for i in 0..n {
                for j in 0..n {
                    let mut acc = 0.0;
                    for q in 0..n {
                        acc += s[i * n + q] * r[q * n + j];
                    }
                    nr[i * n + j] -= acc;
                }
            }
            r.copy_from_slice(&nr);
        }
    }

    /// `⟨z zᵀ⟩ = R⟨x xᵀ⟩Rᵀ` for layer `l`, head `h` under the current R.
    pub fn z_moment(&self, st: &DbpStats, l: usize, h: usize) -> Result<Vec<f64>> {
        self.check_stats(st)?;
        let n = self.head_size;
        let b = l * self.n_head + h;
        Ok(sandwich(
            &self.r[b * n * n..(b + 1) * n * n],
            &st.mean(l, h),
            n,
        ))
    }
}

/// RMS off-diagonal correlation of a second-moment matrix `[N, N]`.
pub fn offdiag_correlation(z: &[f64], n: usize) -> f64 {
    let mut s = 0.0;
    for i in 0..n {
        for j in 0..n {
            if i != j {
                let den = (z[i * n + i] * z[j * n + j]).sqrt();
                if den > 0.0 {
                    s += (z[i * n + j] / den).powi(2);
                }
            }
        }
    }
    if n > 1 {
        (s / (n * (n - 1)) as f64).sqrt()
    } else {
        0.0
    }
}

/// `R C Rᵀ` for `[N, N]` row-major matrices.
fn sandwich(r: &[f64], c: &[f64], n: usize) -> Vec<f64> {
    let mut rc = vec![0.0; n * n];
    for i in 0..n {
        for q in 0..n {
            let a = r[i * n + q];
            if a != 0.0 {
                for j in 0..n {
                    rc[i * n + j] += a * c[q * n + j];
                }
            }
        }
    }
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            let mut acc = 0.0;
            for q in 0..n {
                acc += rc[i * n + q] * r[j * n + q];
            }
            out[i * n + j] = acc;
        }
    }
    out
}

/// Gauss–Jordan inverse with partial pivoting; `None` if singular.
fn invert(m: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut a = m.to_vec();
    let mut inv = vec![0.0; n * n];
    for i in 0..n {
        inv[i * n + i] = 1.0;
    }
    for col in 0..n {
        let piv =
            (col..n).max_by(|&x, &y| a[x * n + col].abs().total_cmp(&a[y * n + col].abs()))?;
        if a[piv * n + col].abs() < 1e-300 {
            return None;
        }
        if piv != col {
            for j in 0..n {
                a.swap(piv * n + j, col * n + j);
                inv.swap(piv * n + j, col * n + j);
            }
        }
        let p = 1.0 / a[col * n + col];
        for j in 0..n {
            a[col * n + j] *= p;
            inv[col * n + j] *= p;
        }
        for i in 0..n {
            if i != col {
                let f = a[i * n + col];
                if f != 0.0 {
                    for j in 0..n {
                        a[i * n + j] -= f * a[col * n + j];
                        inv[i * n + j] -= f * inv[col * n + j];
                    }
                }
            }
        }
    }
    Some(inv)
}
