//! Where an optimiser step runs: the [`Engine`] trait that the tuning loop
//! ([`super::train`]) drives, and the checkpointable [`EngineState`].
//!
//! An engine owns the trained parameters and the optimiser state; the loop
//! owns everything else (data order, schedule, validation, metrics,
//! checkpoints). The one implementation is [`super::device::DeviceEngine`],
//! on every backend (the CPU's included).
use super::data::Dataset;
use super::eval::{evaluate, EvalResult};
use super::state::{Example, TunedState};
use crate::error::{Error, Result};
use crate::model::Model;

/// What one step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOut {
    /// Sum of the masked per-token losses of the batch (nats).
    pub loss_sum: f64,
    /// Target tokens (sum of the mask).
    pub n_tokens: f64,
    /// Global gradient norm of the per-token mean gradient, before clipping.
    pub grad_norm: f64,
}

/// Everything a checkpoint needs from an engine, host-side and bit-exact.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineState {
    /// Trained tensors, in the engine's order ([`Engine::sizes`]).
    pub params: Vec<Vec<f32>>,
    pub adam_m: Vec<Vec<f32>>,
    pub adam_v: Vec<Vec<f32>>,
    pub adam_t: u64,
    /// DBP matrices `[L, H, N, N]` when DBP is on.
    pub dbp_r: Option<Vec<f64>>,
}

/// One optimiser step, wherever the parameters live.
pub trait Engine {
    /// `cpu`, `emu`, `cuda` (for messages).
    fn device(&self) -> &'static str;
    /// Lengths of the trained tensors (the checkpoint layout).
    fn sizes(&self) -> Vec<usize>;
    /// Loss and gradient on `batch`, gradient divided by the target-token
    /// count, clipped to global norm `clip` (0 = no clipping), one Adam step
    /// at learning rate `lr`, then the DBP update when DBP is on.
    fn step(&mut self, batch: &[Example], lr: f64, clip: f64) -> Result<StepOut>;
    /// Parameters and optimiser state, for a checkpoint.
    fn save(&self) -> Result<EngineState>;
    /// Restores what [`Engine::save`] returned (sizes checked).
    fn load(&mut self, s: EngineState) -> Result<()>;
    /// The tuned state the model sees (`S′·R` under DBP).
    fn tuned(&self) -> Result<TunedState>;
    /// The trained adapter (LoRA factors and / or sparse deltas), when the
    /// engine trains one (else `None`).
    fn adapter(&self) -> Result<Option<crate::model::lora::Adapter>> {
        Ok(None)
    }
    /// Whether the engine makes the observer's soft targets itself (a
    /// teacher on its device), so the loop fills none.
    fn has_teacher(&self) -> bool {
        false
    }
    /// Validation with the current parameters (default: the CPU model from
    /// [`Engine::tuned`]).
    fn evaluate(&self, model: &Model, ds: &Dataset, max: usize) -> Result<EvalResult> {
        evaluate(model, &self.tuned()?, ds, max)
    }
}

/// Checks that `s` has the tensor sizes `sizes` (params and both moments).
pub fn check_engine_state(s: &EngineState, sizes: &[usize], what: &str) -> Result<()> {
    let ok = |v: &Vec<Vec<f32>>| {
        v.len() == sizes.len() && v.iter().zip(sizes).all(|(p, &n)| p.len() == n)
    };
    if !ok(&s.params) || !ok(&s.adam_m) || !ok(&s.adam_v) {
        return Err(Error::Tune(format!(
            "{what} has tensors of the wrong sizes"
        )));
    }
    Ok(())
}

/// A non-finite gradient norm stops the run before the update, so the
/// parameters (and any checkpoint written later) stay finite.
pub(crate) fn check_grad_norm(norm: f64) -> Result<()> {
    if !norm.is_finite() {
        return Err(Error::Tune(format!(
            "the gradient norm is {norm}: the step was not applied (parameters unchanged); \
             lower --lr or check the data"
        )));
    }
    Ok(())
}
