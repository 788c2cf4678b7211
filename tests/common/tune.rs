//! Random models, states and examples shared by the state-tuning tests.
use rwkv_tune::model::weights::Config;
use rwkv_tune::tune::grad::{Example, TunedState};

/// Tiny deterministic generator (splitmix64) for the tests.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [−s, s).
    pub fn sym(&mut self, s: f64) -> f64 {
        (2.0 * self.uniform() - 1.0) * s
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// 3 layers, C = 64, two heads of 32, vocab 50.
pub fn small_config() -> Config {
    Config {
        n_layer: 3,
        n_embd: 64,
        n_head: 2,
        head_size: 32,
        vocab: 50,
        d_w: 16,
        d_a: 16,
        d_v: 8,
        d_g: 16,
        d_ffn: 128,
    }
}

/// 2 layers, C = 32, two heads of 16, vocab 40.
pub fn tiny_config() -> Config {
    Config {
        n_layer: 2,
        n_embd: 32,
        n_head: 2,
        head_size: 16,
        vocab: 40,
        d_w: 8,
        d_a: 8,
        d_v: 8,
        d_g: 8,
        d_ffn: 64,
    }
}

/// A state with every trained value uniform in [−scale, scale).
pub fn random_state(cfg: &Config, with_shift: bool, scale: f64, rng: &mut Rng) -> TunedState {
    let mut s = TunedState::zeros(cfg, with_shift);
    for p in s.params_mut() {
        for v in p.iter_mut() {
            *v = rng.sym(scale) as f32;
        }
    }
    s
}

/// Random tokens and targets; mask weights in [0.5, 1.5) (with `partial`,
/// 0 on the first three and the last position); with `soft`, random
/// observer distributions `[T, V]`.
pub fn random_example(t: usize, vocab: usize, partial: bool, soft: bool, rng: &mut Rng) -> Example {
    let tokens: Vec<u32> = (0..t).map(|_| rng.below(vocab) as u32).collect();
    let targets: Vec<u32> = (0..t).map(|_| rng.below(vocab) as u32).collect();
    let mask: Vec<f32> = (0..t)
        .map(|i| {
            if partial && (i < 3 || i == t - 1) {
                0.0
            } else {
                (0.5 + rng.uniform()) as f32
            }
        })
        .collect();
    let soft = soft.then(|| {
        let mut p = Vec::with_capacity(t * vocab);
        for _ in 0..t {
            let row: Vec<f64> = (0..vocab).map(|_| (2.0 * rng.sym(1.0)).exp()).collect();
            let z: f64 = row.iter().sum();
            p.extend(row.iter().map(|v| (v / z) as f32));
        }
        p
    });
    Example {
        tokens,
        targets,
        mask,
        soft,
    }
}

/// ‖a − b‖₂ / ‖b‖₂
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-300)
}

/// The reference optimiser step the engines are checked against, on the
/// host: the summed gradient divided by the target-token count `n`,
/// clipped to global norm `clip` (0 = off), one host Adam step
/// (`tune::optim`) at `lr`. Returns the norm before clipping; a non-finite
/// norm is an error and nothing changes.
#[allow(dead_code)]
pub fn host_update(
    adam: &mut rwkv_tune::tune::optim::Adam,
    mut params: Vec<&mut [f32]>,
    mut grads: Vec<&mut [f32]>,
    n: f64,
    clip: f64,
    lr: f64,
) -> rwkv_tune::Result<f64> {
    let inv = (1.0 / n.max(1.0)) as f32;
    for t in grads.iter_mut() {
        t.iter_mut().for_each(|x| *x *= inv);
    }
    let norm = rwkv_tune::tune::optim::clip_global_norm(&mut grads, clip);
    if !norm.is_finite() {
        return Err(rwkv_tune::Error::Tune(format!(
            "the gradient norm is {norm}: not applied"
        )));
    }
    let g: Vec<&[f32]> = grads.iter().map(|t| &**t).collect();
    adam.step(&mut params, &g, lr)?;
    Ok(norm)
}

/// The reference engine of the plain state: the gradient from the host
/// entry points (`tune::grad`), Adam, clipping and DBP (`tune::dbp::Dbp`,
/// f64 matrices) on the host, as the engine did before it moved to the
/// device. The device engine's step logic is checked against it.
#[allow(dead_code)]
pub struct RefEngine<'w> {
    pub w: &'w rwkv_tune::model::Weights,
    pub opts: rwkv_tune::tune::grad::GradOpts,
    /// The trained parameters (`S′` under DBP).
    pub state: TunedState,
    pub adam: rwkv_tune::tune::optim::Adam,
    pub dbp: Option<rwkv_tune::tune::dbp::Dbp>,
}

#[allow(dead_code)]
impl<'w> RefEngine<'w> {
    pub fn new(
        w: &'w rwkv_tune::model::Weights,
        init: TunedState,
        adam: rwkv_tune::tune::optim::AdamConfig,
        dbp: Option<(f64, f64)>,
        opts: rwkv_tune::tune::grad::GradOpts,
    ) -> Self {
        let sizes: Vec<usize> = init.params().iter().map(|p| p.len()).collect();
        RefEngine {
            w,
            opts,
            state: init,
            adam: rwkv_tune::tune::optim::Adam::new(adam, &sizes),
            dbp: dbp.map(|(e, k)| rwkv_tune::tune::dbp::Dbp::new(&w.config, e, k).unwrap()),
        }
    }

    /// One step: `(loss sum, tokens, gradient norm)`.
    pub fn step(
        &mut self,
        batch: &[Example],
        lr: f64,
        clip: f64,
    ) -> rwkv_tune::Result<(f64, f64, f64)> {
        use rwkv_tune::tune::grad;
        let mut stats = None;
        let (loss, n, mut g) = match &self.dbp {
            Some(d) => {
                let eff = d.effective_state(&self.state)?;
                let o = grad::loss_and_grad_dbp(self.w, &eff, batch, &self.opts)?;
                stats = o.dbp_stats;
                (o.loss, o.n_tokens, d.grad_to_prime(&o.grad)?)
            }
            None => {
                let o = grad::loss_and_grad(self.w, &self.state, batch, &self.opts)?;
                (o.loss, o.n_tokens, o.grad)
            }
        };
        let norm = host_update(
            &mut self.adam,
            self.state.params_mut(),
            g.params_mut(),
            n,
            clip,
            lr,
        )?;
        if let (Some(d), Some(st)) = (self.dbp.as_mut(), stats.as_ref()) {
            d.update_keep_state(st, &mut self.state)?;
        }
        Ok((loss, n, norm))
    }

    /// The state the model runs with (`S′·R` under DBP).
    pub fn tuned(&self) -> TunedState {
        match &self.dbp {
            Some(d) => d.effective_state(&self.state).unwrap(),
            None => self.state.clone(),
        }
    }
}
