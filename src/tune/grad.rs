//! Host entry points of the CPU tuning engine: loss, state gradients,
//! logits and per-head inputs of a frozen model from a tuned initial state,
//! computed by the one engine ([`DeviceTuner`]: the layer forward and
//! backward of `model::layer`, batched) over the CPU ops backend
//! ([`CpuOps`]): in `f32` for training and evaluation, in `f64` for the
//! finite-difference checks (the same code path, another float type).
//!
//! No model maths lives here. Each call uploads the weights into a fresh
//! CPU tuner (a copy); loops that call many times hold a
//! [`DeviceTuner`] / `DeviceEngine` over [`CpuOps`] themselves.
//!
//! # What is computed
//!
//! Each example starts from the tuned state (WKV state per layer; token-shift
//! vectors `shift_att` / `shift_ffn` when present, else zeros; the shift
//! states are the *normalised* inputs of the previous token, `ln1(x)` and
//! `ln2(x)`, as in the RNN form). For every position `t` with `mask[t] > 0`
//! the loss is `mask[t] · (CE(logits_t, targets[t]) + λ · KL(p_t ‖ softmax(logits_t)))`
//! where `p_t = soft[t]` (when given) and `λ = observer_weight`. Loss and
//! gradients are sums over positions and examples; positions after an
//! example's last masked one cannot change the loss and are not run. Only
//! activation gradients are formed; weights are never differentiated.
use super::device::DeviceTuner;
use crate::error::Result;
use crate::model::weights::Weights;
use crate::ops::cpu::{CpuOps, CpuReal};

pub use super::state::{DbpStats, Example, GradOpts, HeadVector, TunedState, TunedStateOf};
pub use crate::real::Real;

/// Result of [`loss_and_grad`].
#[derive(Clone, Debug)]
pub struct GradOut {
    /// Σ over masked positions of `mask · (CE + λ·KL)`, summed over the batch.
    pub loss: f64,
    /// Σ mask over the batch.
    pub n_tokens: f64,
    /// d(loss)/d(state), same layout as the input state.
    pub grad: TunedState,
    /// Bytes of activations the step planned to hold at once.
    pub peak_bytes: usize,
    /// Key-space input statistics for DBP (from [`loss_and_grad_dbp`] only).
    pub dbp_stats: Option<DbpStats>,
}

/// A CPU tuner of `w` in float type `R`.
pub fn cpu_tuner<R: CpuReal>(w: &Weights) -> Result<DeviceTuner<CpuOps<R>>> {
    DeviceTuner::new(CpuOps::<R>::default(), w)
}

fn grad_out(
    w: &Weights,
    s: &TunedState,
    batch: &[Example],
    o: &GradOpts,
    dbp: bool,
) -> Result<GradOut> {
    let (loss, n_tokens, grad, dbp_stats, peak_bytes) =
        cpu_tuner::<f32>(w)?.loss_and_grad(s, batch, o, dbp)?;
    Ok(GradOut {
        loss,
        n_tokens,
        grad,
        peak_bytes,
        dbp_stats,
    })
}

/// Loss, token count and gradient of the state, summed over the batch.
pub fn loss_and_grad(
    w: &Weights,
    s: &TunedState,
    batch: &[Example],
    o: &GradOpts,
) -> Result<GradOut> {
    grad_out(w, s, batch, o, false)
}

/// [`loss_and_grad`] that also returns the DBP statistics (`dbp_stats`): the
/// second moments of the receptances of every head at every position that
/// can affect the loss.
pub fn loss_and_grad_dbp(
    w: &Weights,
    s: &TunedState,
    batch: &[Example],
    o: &GradOpts,
) -> Result<GradOut> {
    grad_out(w, s, batch, o, true)
}

/// `(Σ loss, Σ mask)` over the batch, without gradients (observer weight 0:
/// plain masked cross-entropy).
pub fn loss_only(w: &Weights, s: &TunedState, batch: &[Example]) -> Result<(f64, f64)> {
    loss_only_with(w, s, batch, &GradOpts::default())
}

/// [`loss_only`] with options (observer weight).
pub fn loss_only_with(
    w: &Weights,
    s: &TunedState,
    batch: &[Example],
    o: &GradOpts,
) -> Result<(f64, f64)> {
    cpu_tuner::<f32>(w)?.loss_only(s, batch, o)
}

/// The same engine in `f64` (weights widened): `(Σ loss, Σ mask, gradient)`.
/// For finite-difference checks; slow on big models.
pub fn loss_and_grad_f64(
    w: &Weights,
    s: &TunedStateOf<f64>,
    batch: &[Example],
    o: &GradOpts,
) -> Result<(f64, f64, TunedStateOf<f64>)> {
    let (loss, n, g, _, _) = cpu_tuner::<f64>(w)?.loss_and_grad(s, batch, o, false)?;
    Ok((loss, n, g))
}

/// `(Σ loss, Σ mask)` in `f64` (with the options' observer weight).
pub fn loss_only_f64(
    w: &Weights,
    s: &TunedStateOf<f64>,
    batch: &[Example],
    o: &GradOpts,
) -> Result<(f64, f64)> {
    cpu_tuner::<f64>(w)?.loss_only(s, batch, o)
}

/// Logits `[T, V]` after every token of `tokens`, starting from `s` (no
/// state is returned). Same engine as the gradient; for checks.
pub fn forward_logits(w: &Weights, s: &TunedState, tokens: &[u32]) -> Result<Vec<f32>> {
    let t = cpu_tuner::<f32>(w)?;
    t.logits(&t.upload_state(s)?, tokens)
}

/// The per-head vectors (`[L][H]`, each a flat list of length-N rows) that
/// the model produces at every position of `batch` that can affect the loss
/// (up to the last masked one), starting from state `s`. Used to place the
/// support vectors of the kernel-upscaled state (`super::upscale`).
pub fn head_inputs(
    w: &Weights,
    s: &TunedState,
    batch: &[Example],
    which: HeadVector,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let t = cpu_tuner::<f32>(w)?;
    t.head_inputs(&t.upload_state(s)?, batch, which)
}
