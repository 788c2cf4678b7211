//! State tuning on a device: the gradient of the initial states and the
//! optimiser step run where the weights live, through [`BackwardOps`]
//! (`CudaOps` on a GPU: the project's kernels and cuBLAS; `EmuOps`: the same
//! kernel source on the CPU emulator; `CpuOps`: the Rust twins).
//!
//! - [`DeviceTuner`] keeps the frozen weights on the device (f32) and
//!   computes loss and state gradients for a batch. Per example it runs the
//!   whole sequence layer by layer, keeps only each layer's input `[T, C]`,
//!   and in the backward recomputes one layer's forward at a time (its
//!   activations are freed after that layer's backward); the WKV kernels
//!   keep their own per-chunk state checkpoints. The head runs in blocks of
//!   [`HEAD_ROWS`] rows so `[T, V]` logits never exist at once. No gradient
//!   of a frozen weight is ever formed: every weight GEMM in the backward is
//!   `dx = dy·W` ([`BackwardOps::matmul_t`]).
//! - [`DeviceEngine`] is the [`Engine`] that holds the tuned tensors and
//!   Adam's moments on the device: clipping (a device sum of squares), Adam
//!   ([`BackwardOps::adam`]) and DBP's `S = S′·R`, `g′ = g·Rᵀ` and
//!   `S′ ← S′(I − ηΔ)⁻¹` ([`BackwardOps::batched_matmul`]) run on the device;
//!   DBP's second moments are summed on the device ([`BackwardOps::outer_acc`])
//!   and only the `N×N`-per-head matrix algebra of the update (`Δ` and its
//!   inverse, f64) runs on the host, once per step.
//!
//! - The kernel-upscaled read-out (docs/upscale.md) is optional: a tuner
//!   made by [`DeviceTuner::new_upscaled`] holds the fixed support vectors
//!   and widths of a [`Kernel`]; each layer's `U` travels with its initial
//!   state ([`LStart::u`]). `y += U φ(r)` runs right after the WKV forward
//!   ([`BackwardOps::up_fwd`]) and its backward right after the WKV
//!   backward ([`BackwardOps::up_bwd`]: `dU`, and `dr` into the receptance
//!   gradient). [`DeviceEngine::new_upscaled`] trains `S_0` and `U` (the
//!   parameter order of [`UpscaledStateOf::params`], so checkpoints are
//!   interchangeable with [`super::upscale::UpscaleEngine`]'s); without DBP.
//!
//! The math is the one of [`super::grad`] (the CPU engine); the tests in
//! `tests/tune_device.rs` compare the two on random and real models.
use super::data::Dataset;
use super::dbp::{Dbp, DbpStats};
use super::engine::{check_engine_state, Engine, EngineState, StepOut};
use super::grad::{check_batch, effective_len, Example, GradOpts, TunedState};
use super::optim::AdamConfig;
use super::train::{evaluate_with, EvalResult};
use super::upscale::{Kernel, UpscaledState, UpscaledStateOf};
use crate::error::{Error, Result};
use crate::model::device::{upload_emb_ln, upload_layers, DevLayer};
use crate::model::{Config, Model, Weights};
use crate::ops::backward::{BackwardOps, GnBwdBufs, GnBwdGrads, KkBwdBufs, UpBufs};
use crate::ops::backward_ref::AdamStep;
use crate::ops::{Act, BonusBufs, LN_EPS};

/// Rows of the head (`ln_out`, logits, loss) processed at once.
pub const HEAD_ROWS: usize = 128;

/// One layer's weights: every matrix f32 (`[out, in]`) in a plain buffer.
type TLayer<B> = DevLayer<B, B>;

/// The activations of one layer's forward that its backward reads, each
/// `[T, C]` unless noted.
struct Tape<B> {
    r: B,
    k: B,
    vraw: B,
    v: B,
    kt: B,
    a: B,
    b: B,
    wdec: B,
    /// pre-activation of the decay (`w0` is added by the op)
    wpre: B,
    /// `[T, d_w]` pre-tanh
    hw_pre: B,
    /// α LoRA output (pre-sigmoid, without a0)
    dapre: B,
    /// value-residual LoRA output (layers with a value residual)
    dvpre: Option<B>,
    /// `[T, d_g]` pre-sigmoid
    hg_pre: B,
    g: B,
    /// WKV output (before GroupNorm)
    y: B,
    /// residual stream after the time mix (input of ln2)
    x_mid: B,
    /// `[T, F]` pre-relu²
    hpre: B,
    /// `[T, H, M]` the upscaled read-out's features (when upscaled)
    phi: Option<B>,
    /// the WKV forward's state checkpoints, read by the WKV backward
    ckpt: B,
}

/// What the tuner keeps between the forward and the backward of a step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Recompute {
    /// Every layer's activations (its tape, the WKV checkpoints included)
    /// from the forward to its backward: one WKV forward per layer per
    /// step, the most memory.
    #[default]
    KeepAll,
    /// Only every layer's input; each layer's forward runs again right
    /// before its backward: two WKV forwards per layer per step, one
    /// layer's activations at a time.
    PerLayer,
}

impl Recompute {
    /// `keep` or `layer`.
    pub fn name(self) -> &'static str {
        match self {
            Recompute::KeepAll => "keep",
            Recompute::PerLayer => "layer",
        }
    }
}

impl std::str::FromStr for Recompute {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "keep" | "keep-all" | "all" => Ok(Recompute::KeepAll),
            "layer" | "per-layer" => Ok(Recompute::PerLayer),
            _ => Err(Error::Invalid(format!(
                "unknown recompute policy {s:?} (expected keep or layer)"
            ))),
        }
    }
}

/// A layer's initial state on the device: att_x `[C]`, ffn_x `[C]`, wkv
/// `[H, N, N]`, and with the kernel-upscaled read-out its `U` `[H, N, M]`.
pub struct LStart<B> {
    pub sa: B,
    pub sf: B,
    pub wkv: B,
    /// The upscaled state `U` (value-major); `Some` exactly when the tuner
    /// has a kernel ([`DeviceTuner::new_upscaled`]).
    pub u: Option<B>,
}

/// The fixed part of the kernel-upscaled read-out on the device: per layer
/// the support vectors `[H, M, N]` and widths `[H]` (f32).
struct DevUp<B> {
    m: usize,
    centres: Vec<B>,
    gamma: Vec<B>,
}

/// The frozen model on a device, for state-gradient computations.
pub struct DeviceTuner<O: BackwardOps> {
    ops: O,
    cfg: Config,
    /// `ln0(emb)` `[V, C]`
    emb_ln: O::Buf,
    layers: Vec<TLayer<O::Buf>>,
    ln_out: (O::Buf, O::Buf),
    /// `[V, C]`
    head: O::Buf,
    /// The kernel of the upscaled read-out, when there is one.
    up: Option<DevUp<O::Buf>>,
    /// What the backward recomputes.
    recompute: Recompute,
}

/// Loss sum, mask sum and per-layer state gradients of a batch.
pub struct DevGrad<B> {
    /// `[2]` on the device: the loss sum in slot 0 (slot 1 is left 0 for
    /// the engine's gradient sum of squares); [`DevGrad::loss`] downloads it.
    pub stats: B,
    pub n_tokens: f64,
    /// Per layer: d/d(att_x), d/d(ffn_x), d/d(wkv), on the device.
    pub grads: Vec<LStart<B>>,
    /// Per layer `[H, N, N]` `Σ r rᵀ` (when asked for) and the vector count.
    pub dbp: Option<(Vec<B>, f64)>,
    /// Bytes of activations the step planned to hold at once
    /// ([`DeviceTuner::plan_bytes`]: computed from the buffer sizes; weights,
    /// the state and the optimiser's moments not included).
    pub peak_bytes: usize,
}

impl<B> DevGrad<B> {
    /// The loss sum (one download of the device scalars).
    pub fn loss<O: BackwardOps<Buf = B>>(&self, ops: &O) -> Result<f64> {
        Ok(ops.download(&self.stats)?[0] as f64)
    }
}

impl<O: BackwardOps> DeviceTuner<O> {
    /// Checks the weights and uploads them (f32) to `ops`' device.
    pub fn new(ops: O, w: &Weights) -> Result<Self> {
        w.check()?;
        let cfg = w.config.clone();
        let up = |v: &[f32]| ops.upload(v);
        let emb_ln = upload_emb_ln(&ops, w)?;
        let layers = upload_layers(w, up, up)?;
        let ln_out = (up(&w.ln_out.weight)?, up(&w.ln_out.bias)?);
        let head = up(&w.head)?;
        ops.sync()?;
        Ok(DeviceTuner {
            ops,
            cfg,
            emb_ln,
            layers,
            ln_out,
            head,
            up: None,
            recompute: Recompute::default(),
        })
    }

    /// [`Self::new`] plus the kernel of the upscaled read-out (support
    /// vectors and widths, uploaded as f32): every initial state given to
    /// this tuner must then carry its `U` ([`Self::upload_upscaled`]).
    pub fn new_upscaled(ops: O, w: &Weights, kernel: &Kernel) -> Result<Self> {
        kernel.check(&w.config)?;
        let mut t = Self::new(ops, w)?;
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let centres = kernel
            .centres
            .iter()
            .map(|c| t.ops.upload(&f32s(c)))
            .collect::<Result<Vec<_>>>()?;
        let gamma = kernel
            .gamma
            .iter()
            .map(|g| t.ops.upload(&f32s(g)))
            .collect::<Result<Vec<_>>>()?;
        t.ops.sync()?;
        t.up = Some(DevUp {
            m: kernel.m,
            centres,
            gamma,
        });
        Ok(t)
    }

    /// The same tuner with recompute policy `r`.
    pub fn with_recompute(mut self, r: Recompute) -> Self {
        self.recompute = r;
        self
    }

    /// The recompute policy.
    pub fn recompute(&self) -> Recompute {
        self.recompute
    }

    /// M of the upscaled read-out (`None`: a plain tuner).
    pub fn upscale_m(&self) -> Option<usize> {
        self.up.as_ref().map(|u| u.m)
    }

    /// Elements of one layer's `U` (0 for a plain tuner).
    fn u_len(&self) -> usize {
        self.up
            .as_ref()
            .map_or(0, |u| self.cfg.n_head * self.cfg.head_size * u.m)
    }

    /// The backend.
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Uploads a tuned state (token-shift states zero when not tuned).
    pub fn upload_state(&self, s: &TunedState) -> Result<Vec<LStart<O::Buf>>> {
        s.check(&self.cfg)?;
        let c = self.cfg.n_embd;
        let zero = vec![0.0f32; c];
        (0..self.cfg.n_layer)
            .map(|l| {
                Ok(LStart {
                    sa: self
                        .ops
                        .upload(s.shift_att.as_ref().map_or(&zero, |v| &v[l]))?,
                    sf: self
                        .ops
                        .upload(s.shift_ffn.as_ref().map_or(&zero, |v| &v[l]))?,
                    wkv: self.ops.upload(&s.wkv[l])?,
                    u: None,
                })
            })
            .collect()
    }

    /// Uploads an upscaled state (the tuner must have a kernel of the same M).
    pub fn upload_upscaled(&self, s: &UpscaledState) -> Result<Vec<LStart<O::Buf>>> {
        let ul = self.u_len();
        if self.up.is_none() {
            return Err(Error::Tune(
                "an upscaled state given to a device tuner without a kernel \
                 (DeviceTuner::new_upscaled)"
                    .into(),
            ));
        }
        if s.u.len() != self.cfg.n_layer || s.u.iter().any(|x| x.len() != ul) {
            return Err(Error::Shape {
                name: "upscaled.u".into(),
                expected: vec![self.cfg.n_layer, ul],
                got: vec![s.u.len(), s.u.first().map_or(0, |x| x.len())],
            });
        }
        let mut st = self.upload_state(&s.state)?;
        for (l, x) in st.iter_mut().zip(&s.u) {
            l.u = Some(self.ops.upload(x)?);
        }
        Ok(st)
    }

    /// The kernel and `U` of layer `l` for the upscale ops (`None`: plain).
    fn up_bufs<'a>(
        &'a self,
        l: usize,
        st: &'a LStart<O::Buf>,
    ) -> Result<Option<UpBufs<'a, O::Buf>>> {
        match (&self.up, &st.u) {
            (None, _) => Ok(None),
            (Some(up), Some(u)) => Ok(Some(UpBufs {
                m: up.m,
                centres: &up.centres[l],
                gamma: &up.gamma[l],
                u,
            })),
            (Some(_), None) => Err(Error::Tune(format!(
                "layer {l}: the device tuner is upscaled but the initial state has no U"
            ))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn mm(
        &self,
        x: &O::Buf,
        off: usize,
        ldx: usize,
        rows: usize,
        w: &O::Buf,
        n: usize,
        k: usize,
    ) -> Result<O::Buf> {
        let mut y = self.ops.zeros(rows * n)?;
        self.ops.matmul(x, off, ldx, rows, w, n, k, &mut y)?;
        Ok(y)
    }

    fn mt(&self, dy: &O::Buf, rows: usize, w: &O::Buf, n: usize, k: usize) -> Result<O::Buf> {
        let mut dx = self.ops.zeros(rows * k)?;
        self.ops.matmul_t(dy, rows, w, n, k, &mut dx)?;
        Ok(dx)
    }

    fn dup(&self, x: &O::Buf, n: usize) -> Result<O::Buf> {
        let mut y = self.ops.zeros(n)?;
        self.ops.copy(x, 0, &mut y, 0, n)?;
        Ok(y)
    }

    /// Bytes of one layer's tape at `rows` rows (for the memory plan),
    /// the WKV checkpoints of `b` sequences of `t` tokens included.
    fn tape_bytes(&self, b: usize, t: usize) -> usize {
        let c = &self.cfg;
        let m = self.up.as_ref().map_or(0, |u| u.m);
        let rows = b * t;
        let (ck, _) = self.ops.wkv_ws_len(b, t, c.n_head, c.head_size);
        4 * (rows * (15 * c.n_embd + c.d_w + c.d_g + c.d_ffn + c.n_head * m) + ck)
    }

    /// Bytes of the temporaries one layer's forward or backward holds at
    /// once beyond its tape (an upper bound: the six WKV gradients, the
    /// `[rows, 6C]` mix and a few `[rows, C]` / `[rows, F]` buffers).
    fn work_bytes(&self, b: usize, t: usize) -> usize {
        let c = &self.cfg;
        let rows = b * t;
        let (_, sc) = self.ops.wkv_ws_len(b, t, c.n_head, c.head_size);
        4 * (rows * (16 * c.n_embd + c.d_ffn.max(6 * c.n_embd)) + sc)
    }

    /// The activation memory a step over `b` sequences of `t` tokens plans
    /// to hold at once under `policy` (bytes; weights, the tuned state and
    /// the optimiser's moments not included).
    pub fn plan_bytes(&self, b: usize, t: usize, policy: Recompute) -> usize {
        let c = &self.cfg;
        let (nl, rows, v) = (c.n_layer, b * t, c.vocab);
        let hnn = c.n_head * c.head_size * c.head_size;
        // layer inputs (+ the final residual), v_first, dx, dv_first
        let resid = 4 * rows * c.n_embd * (nl + 4);
        let states = 4 * b * (2 * c.n_embd + hnn) * nl;
        let head = 4 * HEAD_ROWS.min(rows) * (2 * v + 2 * c.n_embd);
        let tapes = match policy {
            Recompute::KeepAll => nl,
            Recompute::PerLayer => 1,
        } * self.tape_bytes(b, t);
        resid + states + head + tapes + self.work_bytes(b, t)
    }

    /// One layer's forward over `b` sequences of `t` rows each (`x`
    /// `[B·T, C]`, updated in place) from the per-sequence states `st`
    /// (`sa`, `sf` `[B, C]`, `wkv` `[B, H, N, N]`); `vf` is v_first
    /// (written by layer 0, read by the others). With `tape`, returns what
    /// the backward needs (the WKV checkpoints included); with `dbp`, adds
    /// `Σ r rᵀ` over the first `lens[i]` rows of each sequence `i`.
    #[allow(clippy::too_many_arguments)]
    fn layer_fwd(
        &self,
        l: usize,
        x: &mut O::Buf,
        b: usize,
        t: usize,
        st: &LStart<O::Buf>,
        vf: &mut O::Buf,
        tape: bool,
        dbp: Option<(&mut O::Buf, &[usize])>,
    ) -> Result<Option<Tape<O::Buf>>> {
        let cfg = &self.cfg;
        let (c, h, n) = (cfg.n_embd, cfg.n_head, cfg.head_size);
        let rows = b * t;
        let tc = rows * c;
        let o = &self.ops;
        let ly = &self.layers[l];
        // ---- time mix ----
        let mut xa = o.zeros(tc)?;
        o.layer_norm(x, 0, rows, c, &ly.ln1.0, &ly.ln1.1, LN_EPS, &mut xa)?;
        let mut mix = o.zeros(6 * tc)?;
        let mut sa = self.dup(&st.sa, b * c)?;
        o.token_shift_b(b, t, c, &xa, &mut sa, &ly.mu6, 6, &mut mix)?;
        drop(xa);
        let ld = 6 * c;
        let r = self.mm(&mix, 0, ld, rows, &ly.r, c, c)?;
        let k = self.mm(&mix, 2 * c, ld, rows, &ly.k, c, c)?;
        let vraw = self.mm(&mix, 3 * c, ld, rows, &ly.v, c, c)?;
        let hw_pre = self.mm(&mix, c, ld, rows, &ly.w1, cfg.d_w, c)?;
        let mut hw = self.dup(&hw_pre, rows * cfg.d_w)?;
        o.act(Act::Tanh, &mut hw, cfg.d_w, None)?;
        let wpre = self.mm(&hw, 0, cfg.d_w, rows, &ly.w2, c, cfg.d_w)?;
        drop(hw);
        let mut wdec = self.dup(&wpre, tc)?;
        o.act(Act::Decay, &mut wdec, c, Some(&ly.w0))?;
        let ha = self.mm(&mix, 4 * c, ld, rows, &ly.a1, cfg.d_a, c)?;
        let dapre = self.mm(&ha, 0, cfg.d_a, rows, &ly.a2, c, cfg.d_a)?;
        drop(ha);
        let mut v = self.dup(&vraw, tc)?;
        let mut dvpre = None;
        if l == 0 {
            o.copy(&vraw, 0, vf, 0, tc)?;
        } else if let Some((v0, v1, v2)) = &ly.vres {
            let hv = self.mm(&mix, 3 * c, ld, rows, v1, cfg.d_v, c)?;
            let dv = self.mm(&hv, 0, cfg.d_v, rows, v2, c, cfg.d_v)?;
            o.value_residual(c, &mut v, vf, v0, &dv)?;
            dvpre = Some(dv);
        }
        let hg_pre = self.mm(&mix, 5 * c, ld, rows, &ly.g1, cfg.d_g, c)?;
        let mut hg = self.dup(&hg_pre, rows * cfg.d_g)?;
        o.act(Act::Sigmoid, &mut hg, cfg.d_g, None)?;
        let g = self.mm(&hg, 0, cfg.d_g, rows, &ly.g2, c, cfg.d_g)?;
        drop(hg);
        drop(mix);
        let (mut kt, mut a, mut bb) = (o.zeros(tc)?, o.zeros(tc)?, o.zeros(tc)?);
        o.kk_prep(
            rows, h, n, &k, &dapre, &ly.a0, &ly.k_k, &ly.k_a, &mut kt, &mut a, &mut bb,
        )?;
        if let Some((acc, lens)) = dbp {
            for (i, &len) in lens.iter().enumerate().take(b) {
                if len > 0 {
                    o.outer_acc_rows(i * t, len.min(t), h, n, &r, acc)?;
                }
            }
        }
        let mut y = o.zeros(tc)?;
        let (ck, _) = o.wkv_ws_len(b, t, h, n);
        let mut ckpt = o.zeros(ck)?;
        o.wkv_fwd_ckpt(
            b,
            t,
            h,
            n,
            [&r, &wdec, &kt, &v, &a, &bb],
            &st.wkv,
            &mut y,
            &mut ckpt,
        )?;
        // kernel-upscaled read-out: y += U φ(r)
        let phi = match self.up_bufs(l, st)? {
            Some(ub) => {
                let mut phi = o.zeros(rows * h * ub.m)?;
                o.up_fwd(rows, h, n, &ub, &r, &mut phi, &mut y)?;
                Some(phi)
            }
            None => None,
        };
        let mut out = self.dup(&y, tc)?;
        o.group_norm(
            rows,
            h,
            n,
            LN_EPS * n as f32,
            &mut out,
            &ly.ln_x.0,
            &ly.ln_x.1,
            Some(BonusBufs {
                r: &r,
                k: &kt,
                v: &v,
                r_k: &ly.r_k,
            }),
            Some(&g),
        )?;
        let att = self.mm(&out, 0, c, rows, &ly.o, c, c)?;
        drop(out);
        o.add(x, &att)?;
        drop(att);
        let x_mid = if tape { Some(self.dup(x, tc)?) } else { None };
        // ---- channel mix ----
        let mut xf = o.zeros(tc)?;
        o.layer_norm(x, 0, rows, c, &ly.ln2.0, &ly.ln2.1, LN_EPS, &mut xf)?;
        let mut kx = o.zeros(tc)?;
        let mut sf = self.dup(&st.sf, b * c)?;
        o.token_shift_b(b, t, c, &xf, &mut sf, &ly.ffn_mu, 1, &mut kx)?;
        drop(xf);
        let hpre = self.mm(&kx, 0, c, rows, &ly.fk, cfg.d_ffn, c)?;
        drop(kx);
        let mut hid = self.dup(&hpre, rows * cfg.d_ffn)?;
        o.act(Act::ReluSq, &mut hid, cfg.d_ffn, None)?;
        let ffn = self.mm(&hid, 0, cfg.d_ffn, rows, &ly.fv, c, cfg.d_ffn)?;
        drop(hid);
        o.add(x, &ffn)?;
        Ok(x_mid.map(|x_mid| Tape {
            r,
            k,
            vraw,
            v,
            kt,
            a,
            b: bb,
            wdec,
            wpre,
            hw_pre,
            dapre,
            dvpre,
            hg_pre,
            g,
            y,
            x_mid,
            hpre,
            phi,
            ckpt,
        }))
    }

    /// Backward of [`Self::layer_fwd`] over `b` sequences of `t` rows:
    /// `dx` holds ∂L/∂(layer output) and becomes ∂L/∂(layer input); `xin`
    /// is the layer input; `dvf` accumulates ∂L/∂v_first (layers ≥ 1) and
    /// is consumed by layer 0. Adds the state gradients, summed over the
    /// batch, to `g` (`sa`, `sf` `[C]`, `wkv` `[H, N, N]`, `u`).
    #[allow(clippy::too_many_arguments)]
    fn layer_bwd(
        &self,
        l: usize,
        tp: &Tape<O::Buf>,
        xin: &O::Buf,
        st: &LStart<O::Buf>,
        vf: &O::Buf,
        dx: &mut O::Buf,
        b: usize,
        t: usize,
        dvf: &mut O::Buf,
        g: &mut LStart<O::Buf>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (c, h, n) = (cfg.n_embd, cfg.n_head, cfg.head_size);
        let rows = b * t;
        let tc = rows * c;
        let hnn = h * n * n;
        let o = &self.ops;
        let ly = &self.layers[l];
        // ---- channel mix ----
        let mut dh = self.mt(dx, rows, &ly.fv, c, cfg.d_ffn)?;
        o.act_bwd(
            Act::ReluSq,
            rows * cfg.d_ffn,
            cfg.d_ffn,
            &tp.hpre,
            None,
            &mut dh,
        )?;
        let dkx = self.mt(&dh, rows, &ly.fk, cfg.d_ffn, c)?;
        drop(dh);
        let mut dsf = o.zeros(b * c)?;
        let mut dxf = o.zeros(tc)?;
        o.token_shift_bwd_b(b, t, c, &[&dkx], &ly.ffn_mu, &mut dsf, &mut dxf)?;
        drop(dkx);
        o.sum_batch(b, c, &dsf, &mut g.sf, true)?;
        o.layer_norm_bwd(&tp.x_mid, 0, rows, c, &ly.ln2.0, LN_EPS, &dxf, dx)?;
        drop(dxf);
        // ---- output projection, GroupNorm, bonus, gate ----
        let dout = self.mt(dx, rows, &ly.o, c, c)?;
        let (mut dy, mut dr, mut dkt, mut dv, mut dg) = (
            o.zeros(tc)?,
            o.zeros(tc)?,
            o.zeros(tc)?,
            o.zeros(tc)?,
            o.zeros(tc)?,
        );
        o.group_norm_bwd(
            rows,
            h,
            n,
            LN_EPS * n as f32,
            &GnBwdBufs {
                y: &tp.y,
                weight: &ly.ln_x.0,
                bias: &ly.ln_x.1,
                r: &tp.r,
                k: &tp.kt,
                v: &tp.v,
                r_k: &ly.r_k,
                g: &tp.g,
                dout: &dout,
            },
            GnBwdGrads {
                dy: &mut dy,
                dr: &mut dr,
                dk: &mut dkt,
                dv: &mut dv,
                dg: &mut dg,
            },
        )?;
        drop(dout);
        let mut dhg = self.mt(&dg, rows, &ly.g2, c, cfg.d_g)?;
        drop(dg);
        o.act_bwd(
            Act::Sigmoid,
            rows * cfg.d_g,
            cfg.d_g,
            &tp.hg_pre,
            None,
            &mut dhg,
        )?;
        let dmix5 = self.mt(&dhg, rows, &ly.g1, cfg.d_g, c)?;
        drop(dhg);
        // ---- WKV (from the forward's checkpoints) ----
        let mut wg: [O::Buf; 6] = [
            o.zeros(tc)?,
            o.zeros(tc)?,
            o.zeros(tc)?,
            o.zeros(tc)?,
            o.zeros(tc)?,
            o.zeros(tc)?,
        ];
        let mut dh0 = o.zeros(b * hnn)?;
        {
            let (_, sc) = o.wkv_ws_len(b, t, h, n);
            let mut scratch = o.zeros(sc)?;
            let [w_r, w_w, w_k, w_v, w_a, w_b] = &mut wg;
            o.wkv_bwd_ckpt(
                b,
                t,
                h,
                n,
                [&tp.r, &tp.wdec, &tp.kt, &tp.v, &tp.a, &tp.b],
                &st.wkv,
                &tp.ckpt,
                &dy,
                [w_r, w_w, w_k, w_v, w_a, w_b],
                &mut dh0,
                &mut scratch,
            )?;
        }
        // the upscaled read-out: dU, and its part of dr
        if let Some(ub) = self.up_bufs(l, st)? {
            match (&tp.phi, g.u.as_mut()) {
                (Some(phi), Some(du)) => o.up_bwd(rows, h, n, &ub, &tp.r, phi, &dy, du, &mut dr)?,
                _ => {
                    return Err(Error::Tune(
                        "internal: upscale tape or gradient missing".into(),
                    ))
                }
            }
        }
        drop(dy);
        o.sum_batch(b, hnn, &dh0, &mut g.wkv, true)?;
        drop(dh0);
        let [w_r, mut w_w, w_k, w_v, w_a, w_b] = wg;
        o.add(&mut dr, &w_r)?;
        o.add(&mut dkt, &w_k)?;
        o.add(&mut dv, &w_v)?;
        drop((w_r, w_k, w_v));
        // ---- k̃, a, b → k, α ----
        let (mut dk, mut ddapre) = (o.zeros(tc)?, o.zeros(tc)?);
        o.kk_prep_bwd(
            rows,
            h,
            n,
            &KkBwdBufs {
                k: &tp.k,
                da: &tp.dapre,
                a0: &ly.a0,
                k_k: &ly.k_k,
                k_a: &ly.k_a,
                d_kout: &dkt,
                d_a: &w_a,
                d_b: &w_b,
            },
            &mut dk,
            &mut ddapre,
        )?;
        drop((dkt, w_a, w_b));
        let dha = self.mt(&ddapre, rows, &ly.a2, c, cfg.d_a)?;
        drop(ddapre);
        let dmix4 = self.mt(&dha, rows, &ly.a1, cfg.d_a, c)?;
        drop(dha);
        // ---- decay ----
        o.act_bwd(Act::Decay, tc, c, &tp.wpre, Some(&ly.w0), &mut w_w)?;
        let mut dhw = self.mt(&w_w, rows, &ly.w2, c, cfg.d_w)?;
        drop(w_w);
        o.act_bwd(
            Act::Tanh,
            rows * cfg.d_w,
            cfg.d_w,
            &tp.hw_pre,
            None,
            &mut dhw,
        )?;
        let dmix1 = self.mt(&dhw, rows, &ly.w1, cfg.d_w, c)?;
        drop(dhw);
        // ---- value residual ----
        let mut dmix3_res = None;
        if l == 0 {
            o.add(&mut dv, dvf)?;
        } else if let (Some((v0, v1, v2)), Some(dvpre)) = (&ly.vres, &tp.dvpre) {
            let mut ddv = o.zeros(tc)?;
            o.value_residual_bwd(tc, c, &tp.vraw, vf, v0, dvpre, &mut dv, dvf, &mut ddv)?;
            let dhv = self.mt(&ddv, rows, v2, c, cfg.d_v)?;
            drop(ddv);
            dmix3_res = Some(self.mt(&dhv, rows, v1, cfg.d_v, c)?);
        }
        // ---- projections ----
        let dmix0 = self.mt(&dr, rows, &ly.r, c, c)?;
        let dmix2 = self.mt(&dk, rows, &ly.k, c, c)?;
        let mut dmix3 = self.mt(&dv, rows, &ly.v, c, c)?;
        drop((dr, dk, dv));
        if let Some(d) = dmix3_res {
            o.add(&mut dmix3, &d)?;
        }
        let mut dsa = o.zeros(b * c)?;
        let mut dxa = o.zeros(tc)?;
        o.token_shift_bwd_b(
            b,
            t,
            c,
            &[&dmix0, &dmix1, &dmix2, &dmix3, &dmix4, &dmix5],
            &ly.mu6,
            &mut dsa,
            &mut dxa,
        )?;
        o.sum_batch(b, c, &dsa, &mut g.sa, true)?;
        o.layer_norm_bwd(xin, 0, rows, c, &ly.ln1.0, LN_EPS, &dxa, dx)?;
        Ok(())
    }

    /// The head on rows `[r0, r0 + rows)` of the final residual `x`:
    /// logits `[rows, V]` (on the device).
    fn head_logits(&self, x: &O::Buf, r0: usize, rows: usize) -> Result<O::Buf> {
        let (c, v) = (self.cfg.n_embd, self.cfg.vocab);
        let o = &self.ops;
        let mut xn = o.zeros(rows * c)?;
        o.layer_norm(
            x,
            r0 * c,
            rows,
            c,
            &self.ln_out.0,
            &self.ln_out.1,
            LN_EPS,
            &mut xn,
        )?;
        self.mm(&xn, 0, c, rows, &self.head, v, c)
    }

    /// Each layer's initial state repeated for `b` sequences (`sa`, `sf`
    /// `[B, C]`, `wkv` `[B, H, N, N]`; `U` shared, not copied).
    fn broadcast(&self, st: &[LStart<O::Buf>], b: usize) -> Result<Vec<LStart<O::Buf>>> {
        let c = self.cfg.n_embd;
        let hnn = self.cfg.n_head * self.cfg.head_size * self.cfg.head_size;
        let o = &self.ops;
        let rep = |x: &O::Buf, n: usize| -> Result<O::Buf> {
            let mut y = o.zeros(b * n)?;
            for i in 0..b {
                o.copy(x, 0, &mut y, i * n, n)?;
            }
            Ok(y)
        };
        st.iter()
            .map(|s| {
                Ok(LStart {
                    sa: rep(&s.sa, c)?,
                    sf: rep(&s.sf, c)?,
                    wkv: rep(&s.wkv, hnn)?,
                    u: match &s.u {
                        Some(u) => Some(self.dup(u, self.u_len())?),
                        None => None,
                    },
                })
            })
            .collect()
    }

    /// Logits `[T, V]` (host) of `tokens` from the initial state `st`.
    pub fn logits(&self, st: &[LStart<O::Buf>], tokens: &[u32]) -> Result<Vec<f32>> {
        let (c, v) = (self.cfg.n_embd, self.cfg.vocab);
        let t = tokens.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        let o = &self.ops;
        let mut x = o.zeros(t * c)?;
        o.embed(tokens, &self.emb_ln, c, &mut x)?;
        let mut vf = o.zeros(t * c)?;
        for (l, s) in st.iter().enumerate() {
            self.layer_fwd(l, &mut x, 1, t, s, &mut vf, false, None)?;
        }
        let mut out = Vec::with_capacity(t * v);
        for r0 in (0..t).step_by(HEAD_ROWS) {
            let rows = HEAD_ROWS.min(t - r0);
            let lg = self.head_logits(&x, r0, rows)?;
            let mut hst = o.download(&lg)?;
            hst.truncate(rows * v);
            out.extend(hst);
        }
        Ok(out)
    }

    /// Loss and state gradients of `batch` from the initial states `st`
    /// (per layer). With `dbp`, also the DBP second moments of r.
    ///
    /// The whole batch runs at once: the examples are padded to the longest
    /// effective length `T` (positions after an example's last masked one
    /// cannot change its loss, so they are cut, and padding has mask 0),
    /// every GEMM runs on `[B·T, ·]` rows, the WKV over `B × H` sequences,
    /// the head in blocks of [`HEAD_ROWS`] rows over the batch. The layer
    /// activations are kept for every layer ([`Recompute::KeepAll`]: one
    /// WKV forward per layer) or recomputed one layer at a time in the
    /// backward ([`Recompute::PerLayer`]: two); the WKV backward always
    /// reads the checkpoints of the forward that made its tape.
    pub fn grad(
        &self,
        st: &[LStart<O::Buf>],
        batch: &[Example],
        o: &GradOpts,
        dbp: bool,
    ) -> Result<DevGrad<O::Buf>> {
        let cfg = &self.cfg;
        let (c, nl, v) = (cfg.n_embd, cfg.n_layer, cfg.vocab);
        let hnn = cfg.n_head * cfg.head_size * cfg.head_size;
        if st.len() != nl {
            return Err(Error::Shape {
                name: "initial states".into(),
                expected: vec![nl],
                got: vec![st.len()],
            });
        }
        check_batch(batch, o, v)?;
        let ul = self.u_len();
        for (l, s) in st.iter().enumerate() {
            let got = s.u.as_ref().map(|u| self.ops.len(u));
            match (&self.up, got) {
                (None, None) => {}
                (Some(_), Some(len)) if len >= ul => {}
                (None, Some(_)) => {
                    return Err(Error::Tune(format!(
                        "layer {l}: the initial state has a U but the device tuner has no kernel"
                    )))
                }
                (Some(_), got) => {
                    return Err(Error::Shape {
                        name: format!("initial state {l}: u"),
                        expected: vec![ul],
                        got: vec![got.unwrap_or(0)],
                    })
                }
            }
        }
        let ops = &self.ops;
        let mut grads = (0..nl)
            .map(|_| {
                Ok(LStart {
                    sa: ops.zeros(c)?,
                    sf: ops.zeros(c)?,
                    wkv: ops.zeros(hnn)?,
                    u: match self.up {
                        Some(_) => Some(ops.zeros(ul)?),
                        None => None,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut acc = if dbp {
            Some(
                (0..nl)
                    .map(|_| ops.zeros(hnn))
                    .collect::<Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        let n_tokens: f64 = batch
            .iter()
            .flat_map(|e| e.mask.iter())
            .map(|&m| m as f64)
            .sum();
        // the examples that have a masked position, padded to the longest
        let live: Vec<(&Example, usize)> = batch
            .iter()
            .map(|e| (e, effective_len(e)))
            .filter(|&(_, te)| te > 0)
            .collect();
        let b = live.len();
        let t = live.iter().map(|&(_, te)| te).max().unwrap_or(0);
        let mut stats = ops.zeros(2)?;
        if b == 0 {
            return Ok(DevGrad {
                stats,
                n_tokens,
                grads,
                dbp: acc.map(|a| (a, 0.0)),
                peak_bytes: 0,
            });
        }
        let lens: Vec<usize> = live.iter().map(|&(_, te)| te).collect();
        let count = lens.iter().sum::<usize>() as f64;
        let rows = b * t;
        let tc = rows * c;
        let mut tokens = vec![0u32; rows];
        let mut targets = vec![0u32; rows];
        let mut mask = vec![0f32; rows];
        for (i, &(e, te)) in live.iter().enumerate() {
            tokens[i * t..i * t + te].copy_from_slice(&e.tokens[..te]);
            targets[i * t..i * t + te].copy_from_slice(&e.targets[..te]);
            mask[i * t..i * t + te].copy_from_slice(&e.mask[..te]);
        }
        let lam = o.observer_weight;
        let stb = self.broadcast(st, b)?;
        let keep = self.recompute == Recompute::KeepAll;
        // forward: keep every layer's input (and, under KeepAll, its tape)
        let mut x = ops.zeros(tc)?;
        ops.embed(&tokens, &self.emb_ln, c, &mut x)?;
        let mut vf = ops.zeros(tc)?;
        let mut xin = Vec::with_capacity(nl);
        let mut tapes = Vec::with_capacity(if keep { nl } else { 0 });
        for (l, s) in stb.iter().enumerate() {
            xin.push(self.dup(&x, tc)?);
            let a = acc.as_mut().map(|a| (&mut a[l], &lens[..]));
            let tp = self.layer_fwd(l, &mut x, b, t, s, &mut vf, keep, a)?;
            tapes.extend(tp);
        }
        // head: loss (summed on the device) and ∂L/∂x, in row blocks over
        // the batch
        let mut dx = ops.zeros(tc)?;
        let mut soft_h = Vec::new();
        for r0 in (0..rows).step_by(HEAD_ROWS) {
            let nr = HEAD_ROWS.min(rows - r0);
            let mut lg = self.head_logits(&x, r0, nr)?;
            let soft = if lam > 0.0 {
                soft_h.clear();
                soft_h.resize(nr * v, 0.0);
                for (j, row) in soft_h.chunks_mut(v).enumerate() {
                    let (i, p) = ((r0 + j) / t, (r0 + j) % t);
                    if let (Some(s), true) = (&live[i].0.soft, p < lens[i]) {
                        row.copy_from_slice(&s[p * v..(p + 1) * v]);
                    }
                }
                Some(ops.upload(&soft_h)?)
            } else {
                None
            };
            let mut lrow = ops.zeros(nr)?;
            ops.xent(
                nr,
                v,
                &mut lg,
                &targets[r0..r0 + nr],
                &mask[r0..r0 + nr],
                soft.as_ref(),
                lam,
                &mut lrow,
            )?;
            ops.reduce_acc(false, nr, &lrow, &mut stats, 0)?;
            let dxn = self.mt(&lg, nr, &self.head, v, c)?;
            ops.layer_norm_bwd(&x, r0 * c, nr, c, &self.ln_out.0, LN_EPS, &dxn, &mut dx)?;
        }
        drop(x);
        // backward, last layer first (recomputing the layer under PerLayer)
        let mut dvf = ops.zeros(tc)?;
        for l in (0..nl).rev() {
            let tape = match tapes.pop() {
                Some(tp) => tp,
                None => {
                    let mut xl = self.dup(&xin[l], tc)?;
                    self.layer_fwd(l, &mut xl, b, t, &stb[l], &mut vf, true, None)?
                        .ok_or_else(|| Error::Tune("internal: no tape".into()))?
                }
            };
            self.layer_bwd(
                l,
                &tape,
                &xin[l],
                &stb[l],
                &vf,
                &mut dx,
                b,
                t,
                &mut dvf,
                &mut grads[l],
            )?;
        }
        Ok(DevGrad {
            stats,
            n_tokens,
            grads,
            dbp: acc.map(|a| (a, count)),
            peak_bytes: self.plan_bytes(b, t, self.recompute),
        })
    }

    /// Host convenience: loss, token count and the gradient of a host
    /// tuned state (layout of `s`), plus DBP statistics when asked for.
    pub fn loss_and_grad(
        &self,
        s: &TunedState,
        batch: &[Example],
        o: &GradOpts,
        dbp: bool,
    ) -> Result<(f64, f64, TunedState, Option<DbpStats>, usize)> {
        let st = self.upload_state(s)?;
        let dg = self.grad(&st, batch, o, dbp)?;
        let cfg = &self.cfg;
        let (c, hnn) = (cfg.n_embd, cfg.n_head * cfg.head_size * cfg.head_size);
        let mut g = s.zeros_like();
        for (l, gl) in dg.grads.iter().enumerate() {
            g.wkv[l].copy_from_slice(&self.ops.download(&gl.wkv)?[..hnn]);
            if let Some(a) = g.shift_att.as_mut() {
                a[l].copy_from_slice(&self.ops.download(&gl.sa)?[..c]);
            }
            if let Some(f) = g.shift_ffn.as_mut() {
                f[l].copy_from_slice(&self.ops.download(&gl.sf)?[..c]);
            }
        }
        let stats = match &dg.dbp {
            Some((acc, count)) => Some(self.stats(acc, *count)?),
            None => None,
        };
        Ok((dg.loss(&self.ops)?, dg.n_tokens, g, stats, dg.peak_bytes))
    }

    /// Host convenience for the upscaled read-out: loss, token count, the
    /// gradient of `S_0` and `U` (layout of `s`) and the peak activation
    /// bytes. The tuner must have a kernel ([`Self::new_upscaled`]).
    pub fn loss_and_grad_upscaled(
        &self,
        s: &UpscaledState,
        batch: &[Example],
        o: &GradOpts,
    ) -> Result<(f64, f64, UpscaledState, usize)> {
        let st = self.upload_upscaled(s)?;
        let dg = self.grad(&st, batch, o, false)?;
        let cfg = &self.cfg;
        let (c, hnn, ul) = (
            cfg.n_embd,
            cfg.n_head * cfg.head_size * cfg.head_size,
            self.u_len(),
        );
        let mut g = s.zeros_like();
        for (l, gl) in dg.grads.iter().enumerate() {
            g.state.wkv[l].copy_from_slice(&self.ops.download(&gl.wkv)?[..hnn]);
            if let Some(a) = g.state.shift_att.as_mut() {
                a[l].copy_from_slice(&self.ops.download(&gl.sa)?[..c]);
            }
            if let Some(f) = g.state.shift_ffn.as_mut() {
                f[l].copy_from_slice(&self.ops.download(&gl.sf)?[..c]);
            }
            if let Some(du) = &gl.u {
                g.u[l].copy_from_slice(&self.ops.download(du)?[..ul]);
            }
        }
        Ok((dg.loss(&self.ops)?, dg.n_tokens, g, dg.peak_bytes))
    }

    fn stats(&self, acc: &[O::Buf], count: f64) -> Result<DbpStats> {
        let cfg = &self.cfg;
        let hnn = cfg.n_head * cfg.head_size * cfg.head_size;
        let mut s = DbpStats::zeros(cfg.n_layer, cfg.n_head, cfg.head_size);
        for (l, a) in acc.iter().enumerate() {
            let h = self.ops.download(a)?;
            for (d, &x) in s.second_moment[l * hnn..(l + 1) * hnn].iter_mut().zip(&h) {
                *d = x as f64;
            }
        }
        s.count = count;
        Ok(s)
    }
}

/// The [`Engine`] on a device: tuned tensors (in [`TunedState::params`]
/// order, then every layer's `U` when upscaled: [`UpscaledStateOf::params`]),
/// Adam's moments and the DBP matrices live on the device.
pub struct DeviceEngine<O: BackwardOps> {
    tuner: DeviceTuner<O>,
    opts: GradOpts,
    adam: AdamConfig,
    with_shift: bool,
    /// Tensors of the plain state at the front of `params` (the `U`s follow).
    n_state: usize,
    params: Vec<O::Buf>,
    m: Vec<O::Buf>,
    v: Vec<O::Buf>,
    t: u64,
    sizes: Vec<usize>,
    /// Host f64 matrices (the master copy) and their f32 device copy per layer.
    dbp: Option<(Dbp, Vec<O::Buf>)>,
    /// Peak activation bytes of the last step.
    pub last_peak_bytes: usize,
}

impl<O: BackwardOps> DeviceEngine<O> {
    /// Uploads the model and the starting state `init` to `ops`' device.
    pub fn new(
        ops: O,
        w: &Weights,
        init: &TunedState,
        adam: AdamConfig,
        dbp: Option<(f64, f64)>,
        opts: GradOpts,
    ) -> Result<Self> {
        let tuner = DeviceTuner::new(ops, w)?;
        init.check(tuner.config())?;
        Self::build(tuner, w, init, &init.params(), adam, dbp, opts)
    }

    /// The engine of the kernel-upscaled state (docs/upscale.md): uploads
    /// the model, `kernel` and the starting `S_0` and `U` of `init`, and
    /// trains both (the recipe of [`super::upscale::UpscaleEngine`], on the
    /// device). `dbp` must be `None`: DBP on the upscaled state is not
    /// supported (an [`Error::Tune`], as for `UpscaleEngine`).
    pub fn new_upscaled(
        ops: O,
        w: &Weights,
        kernel: &Kernel,
        init: &UpscaledState,
        adam: AdamConfig,
        dbp: Option<(f64, f64)>,
        opts: GradOpts,
    ) -> Result<Self> {
        super::upscale::refuse_dbp(dbp)?;
        let tuner = DeviceTuner::new_upscaled(ops, w, kernel)?;
        init.state.check(tuner.config())?;
        let ul = tuner.u_len();
        if init.u.len() != tuner.config().n_layer || init.u.iter().any(|x| x.len() != ul) {
            return Err(Error::Shape {
                name: "upscaled.u".into(),
                expected: vec![tuner.config().n_layer, ul],
                got: vec![init.u.len(), init.u.first().map_or(0, |x| x.len())],
            });
        }
        Self::build(tuner, w, &init.state, &init.params(), adam, None, opts)
    }

    /// Uploads `params` (the state's tensors, then any `U`s) and zero moments.
    fn build(
        tuner: DeviceTuner<O>,
        w: &Weights,
        init: &TunedState,
        init_params: &[&[f32]],
        adam: AdamConfig,
        dbp: Option<(f64, f64)>,
        opts: GradOpts,
    ) -> Result<Self> {
        let o = tuner.ops();
        let params = init_params
            .iter()
            .map(|p| o.upload(p))
            .collect::<Result<Vec<_>>>()?;
        let sizes: Vec<usize> = init_params.iter().map(|p| p.len()).collect();
        let m = sizes
            .iter()
            .map(|&n| o.zeros(n))
            .collect::<Result<Vec<_>>>()?;
        let v = sizes
            .iter()
            .map(|&n| o.zeros(n))
            .collect::<Result<Vec<_>>>()?;
        let mut e = DeviceEngine {
            with_shift: init.shift_att.is_some(),
            n_state: init.params().len(),
            tuner,
            opts,
            adam,
            params,
            m,
            v,
            t: 0,
            sizes,
            dbp: None,
            last_peak_bytes: 0,
        };
        if let Some((eta, kappa)) = dbp {
            let d = Dbp::new(&w.config, eta, kappa)?;
            let r = e.upload_r(&d)?;
            e.dbp = Some((d, r));
        }
        Ok(e)
    }

    /// Sets what the backward recomputes (default [`Recompute::KeepAll`]).
    pub fn set_recompute(&mut self, r: Recompute) {
        self.tuner.recompute = r;
    }

    /// The gradient engine.
    pub fn tuner(&self) -> &DeviceTuner<O> {
        &self.tuner
    }

    /// The trained `S_0` and `U` of an upscaled engine (downloaded), e.g.
    /// for [`super::upscale::save_upscaled`]; an [`Error::Tune`] for a
    /// plain engine.
    pub fn upscaled(&self) -> Result<UpscaledState> {
        if self.tuner.up.is_none() {
            return Err(Error::Tune(
                "the device engine has no upscaled read-out".into(),
            ));
        }
        let o = self.tuner.ops();
        let state = self.tuned()?;
        let u = (self.n_state..self.params.len())
            .map(|i| {
                let mut h = o.download(&self.params[i])?;
                h.truncate(self.sizes[i]);
                Ok(h)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(UpscaledStateOf { state, u })
    }

    fn nl(&self) -> usize {
        self.tuner.config().n_layer
    }

    fn hnn(&self) -> usize {
        let c = self.tuner.config();
        c.n_head * c.head_size * c.head_size
    }

    fn upload_r(&self, d: &Dbp) -> Result<Vec<O::Buf>> {
        let hnn = self.hnn();
        (0..self.nl())
            .map(|l| {
                let f: Vec<f32> = d.r[l * hnn..(l + 1) * hnn]
                    .iter()
                    .map(|&x| x as f32)
                    .collect();
                self.tuner.ops().upload(&f)
            })
            .collect()
    }

    /// The effective initial states on the device (`S′·R` under DBP).
    fn states(&self) -> Result<Vec<LStart<O::Buf>>> {
        let cfg = self.tuner.config();
        let (c, h, n, nl) = (cfg.n_embd, cfg.n_head, cfg.head_size, cfg.n_layer);
        let o = self.tuner.ops();
        (0..nl)
            .map(|l| {
                let wkv = match &self.dbp {
                    Some((_, r)) => {
                        let mut s = o.zeros(h * n * n)?;
                        o.batched_matmul(h, n, &self.params[l], &r[l], false, &mut s)?;
                        s
                    }
                    None => self.tuner.dup(&self.params[l], h * n * n)?,
                };
                let (sa, sf) = if self.with_shift {
                    (
                        self.tuner.dup(&self.params[nl + l], c)?,
                        self.tuner.dup(&self.params[2 * nl + l], c)?,
                    )
                } else {
                    (o.zeros(c)?, o.zeros(c)?)
                };
                let u = match self.params.get(self.n_state + l) {
                    Some(p) => Some(self.tuner.dup(p, self.sizes[self.n_state + l])?),
                    None => None,
                };
                Ok(LStart { sa, sf, wkv, u })
            })
            .collect()
    }
}

impl<O: BackwardOps> Engine for DeviceEngine<O> {
    fn device(&self) -> &'static str {
        self.tuner.ops().name()
    }
    fn sizes(&self) -> Vec<usize> {
        self.sizes.clone()
    }
    fn step(&mut self, batch: &[Example], lr: f64, clip: f64) -> Result<StepOut> {
        let cfg = self.tuner.config().clone();
        let (h, n, nl) = (cfg.n_head, cfg.head_size, cfg.n_layer);
        let st = self.states()?;
        let dg = self
            .tuner
            .grad(&st, batch, &self.opts, self.dbp.is_some())?;
        drop(st);
        self.last_peak_bytes = dg.peak_bytes;
        let o = self.tuner.ops();
        // gradients in params order; g′ = g·Rᵀ under DBP
        let mut grads: Vec<O::Buf> = Vec::with_capacity(self.params.len());
        let mut sas = Vec::new();
        let mut sfs = Vec::new();
        let mut us = Vec::new();
        for (l, g) in dg.grads.into_iter().enumerate() {
            let gw = match &self.dbp {
                Some((_, r)) => {
                    let mut out = o.zeros(h * n * n)?;
                    o.batched_matmul(h, n, &g.wkv, &r[l], true, &mut out)?;
                    out
                }
                None => g.wkv,
            };
            grads.push(gw);
            sas.push(g.sa);
            sfs.push(g.sf);
            us.extend(g.u);
        }
        if self.with_shift {
            grads.extend(sas);
            grads.extend(sfs);
        }
        grads.extend(us);
        if grads.len() != self.params.len() {
            return Err(Error::Tune(format!(
                "internal: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        // norm, clipping and Adam on the device: Σ g² into the step's
        // scalars, read there by every Adam launch
        let inv = 1.0 / dg.n_tokens.max(1.0);
        let mut stats = dg.stats;
        for (g, &len) in grads.iter().zip(&self.sizes) {
            o.reduce_acc(true, len, g, &mut stats, 1)?;
        }
        let t = self.t + 1;
        let a = self.adam;
        let s = AdamStep {
            lr: lr as f32,
            beta1: a.beta1 as f32,
            beta2: a.beta2 as f32,
            eps: a.eps as f32,
            weight_decay: a.weight_decay as f32,
            bc1: (1.0 - a.beta1.powi(t as i32)) as f32,
            bc2: (1.0 - a.beta2.powi(t as i32)) as f32,
            grad_scale: inv as f32,
        };
        for (i, g) in grads.iter().enumerate() {
            o.adam_clipped(
                self.sizes[i],
                &s,
                clip as f32,
                &stats,
                &mut self.params[i],
                g,
                &mut self.m[i],
                &mut self.v[i],
            )?;
        }
        // the step's one download: loss and Σ g²
        let host = o.download(&stats)?;
        let (loss, ss) = (host[0] as f64, host[1] as f64);
        let grad_norm = ss.sqrt() * inv;
        // a non-finite norm: the kernels left every parameter unchanged
        super::engine::check_grad_norm(grad_norm)?;
        self.t = t;
        if let (Some((acc, count)), true) = (&dg.dbp, self.dbp.is_some()) {
            let stats = self.tuner.stats(acc, *count)?;
            let hnn = self.hnn();
            let (tr, r_new) = {
                let (d, _) = self.dbp.as_mut().ok_or_else(|| Error::Tune("dbp".into()))?;
                let (tr, _rep) = d.update_transfer(&stats)?;
                let d = d.clone();
                (tr, self.upload_r(&d)?)
            };
            for l in 0..nl {
                let f: Vec<f32> = tr[l * hnn..(l + 1) * hnn]
                    .iter()
                    .map(|&x| x as f32)
                    .collect();
                let m = o.upload(&f)?;
                let mut out = o.zeros(hnn)?;
                o.batched_matmul(h, n, &self.params[l], &m, false, &mut out)?;
                self.params[l] = out;
            }
            if let Some((_, r)) = self.dbp.as_mut() {
                *r = r_new;
            }
        }
        o.sync()?;
        Ok(StepOut {
            loss_sum: loss,
            n_tokens: dg.n_tokens,
            grad_norm,
        })
    }
    fn save(&self) -> Result<EngineState> {
        let o = self.tuner.ops();
        let dl = |v: &[O::Buf]| -> Result<Vec<Vec<f32>>> {
            v.iter()
                .zip(&self.sizes)
                .map(|(b, &n)| {
                    let mut h = o.download(b)?;
                    h.truncate(n);
                    Ok(h)
                })
                .collect()
        };
        Ok(EngineState {
            params: dl(&self.params)?,
            adam_m: dl(&self.m)?,
            adam_v: dl(&self.v)?,
            adam_t: self.t,
            dbp_r: self.dbp.as_ref().map(|(d, _)| d.r.clone()),
        })
    }
    fn load(&mut self, s: EngineState) -> Result<()> {
        check_engine_state(&s, &self.sizes, "the checkpoint")?;
        if self.tuner.up.is_some() && s.dbp_r.is_some() {
            return Err(Error::Tune(
                "the checkpoint holds DBP matrices, but the upscaled state is trained without \
                 DBP"
                .into(),
            ));
        }
        let o = self.tuner.ops();
        let up = |v: &[Vec<f32>]| v.iter().map(|x| o.upload(x)).collect::<Result<Vec<_>>>();
        let (p, m, v) = (up(&s.params)?, up(&s.adam_m)?, up(&s.adam_v)?);
        if let Some((d, _)) = &self.dbp {
            match &s.dbp_r {
                Some(r) if r.len() == d.r.len() => {
                    let mut d = d.clone();
                    d.r = r.clone();
                    let rd = self.upload_r(&d)?;
                    self.dbp = Some((d, rd));
                }
                _ => {
                    return Err(Error::Tune(
                        "the checkpoint lacks the DBP matrices of this run".into(),
                    ))
                }
            }
        }
        self.params = p;
        self.m = m;
        self.v = v;
        self.t = s.adam_t;
        Ok(())
    }
    fn tuned(&self) -> Result<TunedState> {
        let cfg = self.tuner.config();
        let mut s = TunedState::zeros(cfg, self.with_shift);
        let o = self.tuner.ops();
        for (dst, (b, &n)) in s
            .params_mut()
            .into_iter()
            .zip(self.params.iter().zip(&self.sizes))
        {
            dst.copy_from_slice(&o.download(b)?[..n]);
        }
        match &self.dbp {
            Some((d, _)) => d.effective_state(&s),
            None => Ok(s),
        }
    }
    fn evaluate(&self, model: &Model, ds: &Dataset, max: usize) -> Result<EvalResult> {
        let st = self.states()?;
        evaluate_with(model.config().vocab, ds, max, |toks| {
            self.tuner.logits(&st, toks)
        })
    }
}
