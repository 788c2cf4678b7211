//! Where an optimiser step runs: the [`Engine`] trait that the tuning loop
//! ([`super::train`]) drives, and [`HostEngine`], the CPU engine (gradients
//! from [`super::grad`], Adam on the host, DBP with host matrices).
//!
//! An engine owns the trained parameters and the optimiser state; the loop
//! owns everything else (data order, schedule, validation, metrics,
//! checkpoints). The on-device engine is [`super::device::DeviceEngine`].
use super::data::Dataset;
use super::dbp::Dbp;
use super::eval::{evaluate, EvalResult};
use super::grad::{self, GradOpts};
use super::optim::{clip_global_norm, Adam, AdamConfig};
use super::state::{Example, TunedState};
use crate::error::{Error, Result};
use crate::model::{Model, Weights};

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

/// The host optimiser update shared by the CPU engines: the summed gradient
/// divided by the target-token count `n`, clipped to global norm `clip`
/// (0 = off), one Adam step at `lr`. Returns the norm before clipping.
pub(crate) fn host_update(
    adam: &mut Adam,
    mut params: Vec<&mut [f32]>,
    mut grads: Vec<&mut [f32]>,
    n: f64,
    clip: f64,
    lr: f64,
) -> Result<f64> {
    let inv = (1.0 / n.max(1.0)) as f32;
    for t in grads.iter_mut() {
        t.iter_mut().for_each(|x| *x *= inv);
    }
    let grad_norm = clip_global_norm(&mut grads, clip);
    check_grad_norm(grad_norm)?;
    let g: Vec<&[f32]> = grads.iter().map(|t| &**t).collect();
    adam.step(&mut params, &g, lr)?;
    Ok(grad_norm)
}

/// The CPU engine: [`grad::loss_and_grad`] (or its DBP variant), host Adam.
pub struct HostEngine<'w> {
    weights: &'w Weights,
    opts: GradOpts,
    /// The trained parameters (`S′` under DBP).
    pub state: TunedState,
    pub adam: Adam,
    pub dbp: Option<Dbp>,
}

impl<'w> HostEngine<'w> {
    /// Starts from `init`; `dbp = Some((eta, kappa))` turns DBP on.
    pub fn new(
        weights: &'w Weights,
        init: TunedState,
        adam: AdamConfig,
        dbp: Option<(f64, f64)>,
        opts: GradOpts,
    ) -> Result<Self> {
        init.check(&weights.config)?;
        let sizes: Vec<usize> = init.params().iter().map(|p| p.len()).collect();
        let dbp = match dbp {
            Some((eta, kappa)) => Some(Dbp::new(&weights.config, eta, kappa)?),
            None => None,
        };
        Ok(HostEngine {
            weights,
            opts,
            state: init,
            adam: Adam::new(adam, &sizes),
            dbp,
        })
    }
}

impl Engine for HostEngine<'_> {
    fn device(&self) -> &'static str {
        "cpu"
    }
    fn sizes(&self) -> Vec<usize> {
        self.state.params().iter().map(|p| p.len()).collect()
    }
    fn step(&mut self, batch: &[Example], lr: f64, clip: f64) -> Result<StepOut> {
        let mut dbp_stats = None;
        let (loss, n, mut g) = match &self.dbp {
            Some(d) => {
                let eff = d.effective_state(&self.state)?;
                let o = grad::loss_and_grad_dbp(self.weights, &eff, batch, &self.opts)?;
                let g = d.grad_to_prime(&o.grad)?;
                dbp_stats = o.dbp_stats;
                (o.loss, o.n_tokens, g)
            }
            None => {
                let o = grad::loss_and_grad(self.weights, &self.state, batch, &self.opts)?;
                (o.loss, o.n_tokens, o.grad)
            }
        };
        let grad_norm = host_update(
            &mut self.adam,
            self.state.params_mut(),
            g.params_mut(),
            n,
            clip,
            lr,
        )?;
        if let (Some(d), Some(st)) = (self.dbp.as_mut(), dbp_stats.as_ref()) {
            d.update_keep_state(st, &mut self.state)?;
        }
        Ok(StepOut {
            loss_sum: loss,
            n_tokens: n,
            grad_norm,
        })
    }
    fn save(&self) -> Result<EngineState> {
        Ok(EngineState {
            params: self.state.params().iter().map(|p| p.to_vec()).collect(),
            adam_m: self.adam.m.clone(),
            adam_v: self.adam.v.clone(),
            adam_t: self.adam.t,
            dbp_r: self.dbp.as_ref().map(|d| d.r.clone()),
        })
    }
    fn load(&mut self, s: EngineState) -> Result<()> {
        check_engine_state(&s, &self.sizes(), "the checkpoint")?;
        if let Some(d) = self.dbp.as_mut() {
            match s.dbp_r {
                Some(r) if r.len() == d.r.len() => d.r = r,
                _ => {
                    return Err(Error::Tune(
                        "the checkpoint lacks the DBP matrices of this run".into(),
                    ))
                }
            }
        }
        for (dst, src) in self.state.params_mut().into_iter().zip(&s.params) {
            dst.copy_from_slice(src);
        }
        self.adam.m = s.adam_m;
        self.adam.v = s.adam_v;
        self.adam.t = s.adam_t;
        Ok(())
    }
    fn tuned(&self) -> Result<TunedState> {
        match &self.dbp {
            Some(d) => d.effective_state(&self.state),
            None => Ok(self.state.clone()),
        }
    }
}
