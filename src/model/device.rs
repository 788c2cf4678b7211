//! The RWKV-7 forward pass on a device: [`DeviceModel`] keeps the weights in
//! the buffers of a [`DeviceOps`] backend (uploaded once) and runs sequence
//! mode (T tokens) and the one-token step from/to the full recurrent state,
//! with one forward body generic over the backend:
//!
//! - `DeviceModel<EmuOps>`: GEMMs in Rust on the CPU, element-wise ops through
//!   the emulated `kernels/model_ops.cu`, WKV through the emulated `wkv7_v1`;
//! - `DeviceModel<CudaOps>`: cuBLAS sgemm (f32), the `model_ops` kernels and
//!   `wkv7::cuda::forward_dev` on a GPU;
//! - `DeviceModel<CpuOps>`: the Rust twins (a third, independent check).
//!
//! The math is the one of [`super::Model`] (same formulas, same order of
//! element-wise operations); results agree to float rounding. The weight
//! matrices (projections, LoRA factors, head) go through
//! [`DeviceOps::upload_mat`] / [`DeviceOps::matmul_w`], so the backend's
//! [`crate::ops::GemmPrecision`] applies: with bf16 (emu, cuda) they are
//! stored as bf16 and multiplied with bf16-rounded activations, accumulating
//! in f32 (logits then differ from the f32 model by a few 1e-3 relative).
use super::forward::Logits;
use super::state::{LayerState, State};
use super::weights::{Config, Weights};
use crate::error::{Error, Result};
use crate::ops::{Act, BonusBufs, DeviceOps, LN_EPS};

/// Longest run of tokens processed at once (the state carries over).
const SEQ_CHUNK: usize = 512;

/// One layer's weights on a device: vectors `B`, matrices `M` (`[out, in]`).
pub(crate) struct DevLayer<B, M> {
    pub(crate) ln1: (B, B),
    pub(crate) ln2: (B, B),
    /// `[6, C]`: x_r | x_w | x_k | x_v | x_a | x_g
    pub(crate) mu6: B,
    pub(crate) w0: B,
    pub(crate) a0: B,
    /// v0, v1ᵀ `[d_v, C]`, v2ᵀ `[C, d_v]` (layers ≥ 1 only)
    pub(crate) vres: Option<(B, M, M)>,
    pub(crate) k_k: B,
    pub(crate) k_a: B,
    pub(crate) r_k: B,
    pub(crate) ln_x: (B, B),
    /// `[out, in]` matrices: receptance, key, value, output.
    pub(crate) r: M,
    pub(crate) k: M,
    pub(crate) v: M,
    pub(crate) o: M,
    /// LoRA factors transposed to `[out, in]`.
    pub(crate) w1: M,
    pub(crate) w2: M,
    pub(crate) a1: M,
    pub(crate) a2: M,
    pub(crate) g1: M,
    pub(crate) g2: M,
    pub(crate) ffn_mu: B,
    pub(crate) fk: M,
    pub(crate) fv: M,
}

/// The recurrent state on the device, per layer: att_x `[C]`, ffn_x `[C]`,
/// wkv `[H, N, N]` (value-major), like [`State`].
pub struct DeviceState<B> {
    pub layers: Vec<(B, B, B)>,
}

/// An RWKV-7 model whose weights live on a [`DeviceOps`] backend.
pub struct DeviceModel<D: DeviceOps> {
    ops: D,
    cfg: Config,
    /// `ln0(emb)`, `[V, C]`
    emb_ln: D::Buf,
    layers: Vec<DevLayer<D::Buf, D::Mat>>,
    ln_out: (D::Buf, D::Buf),
    head: D::Mat,
}

/// `w [k, n]` (input-major) → `[n, k]` (output-major).
pub(crate) fn transpose(w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let mut t = vec![0.0; w.len()];
    for i in 0..k {
        for j in 0..n {
            t[j * k + i] = w[i * n + j];
        }
    }
    t
}

impl<D: DeviceOps> DeviceModel<D> {
    /// Checks the weights and uploads them to `ops`' device (once).
    pub fn new(ops: D, w: &Weights) -> Result<Self> {
        w.check()?;
        let cfg = w.config.clone();
        let up = |v: &[f32]| ops.upload(v);
        let emb_ln = upload_emb_ln(&ops, w)?;
        let layers = upload_layers(w, up, |v: &[f32]| ops.upload_mat(v))?;
        let ln_out = (up(&w.ln_out.weight)?, up(&w.ln_out.bias)?);
        let head = ops.upload_mat(&w.head)?;
        ops.sync()?;
        Ok(DeviceModel {
            ops,
            cfg,
            emb_ln,
            layers,
            ln_out,
            head,
        })
    }

    /// The backend.
    pub fn ops(&self) -> &D {
        &self.ops
    }

    /// The precision of the weight GEMMs (the backend's, at upload).
    pub fn gemm_precision(&self) -> crate::ops::GemmPrecision {
        self.ops.gemm_precision()
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// A zero state on the device.
    pub fn new_state(&self) -> Result<DeviceState<D::Buf>> {
        self.upload_state(&State::zeros(&self.cfg))
    }

    /// Copies a host state to the device.
    pub fn upload_state(&self, s: &State) -> Result<DeviceState<D::Buf>> {
        s.check(&self.cfg)?;
        let layers = s
            .layers
            .iter()
            .map(|l| {
                Ok((
                    self.ops.upload(&l.att_x)?,
                    self.ops.upload(&l.ffn_x)?,
                    self.ops.upload(&l.wkv)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceState { layers })
    }

    /// Copies a device state to the host.
    pub fn download_state(&self, s: &DeviceState<D::Buf>) -> Result<State> {
        let c = self.cfg.n_embd;
        let nn = self.cfg.n_head * self.cfg.head_size * self.cfg.head_size;
        let layers = s
            .layers
            .iter()
            .map(|(a, f, w)| {
                let mut l = LayerState {
                    att_x: self.ops.download(a)?,
                    ffn_x: self.ops.download(f)?,
                    wkv: self.ops.download(w)?,
                };
                l.att_x.truncate(c);
                l.ffn_x.truncate(c);
                l.wkv.truncate(nn);
                Ok(l)
            })
            .collect::<Result<Vec<_>>>()?;
        let st = State { layers };
        st.check(&self.cfg)?;
        Ok(st)
    }

    fn check_state(&self, s: &DeviceState<D::Buf>) -> Result<()> {
        let c = self.cfg.n_embd;
        let nn = self.cfg.n_head * self.cfg.head_size * self.cfg.head_size;
        if s.layers.len() != self.cfg.n_layer {
            return Err(Error::Shape {
                name: "state.layers".into(),
                expected: vec![self.cfg.n_layer],
                got: vec![s.layers.len()],
            });
        }
        for (l, (a, f, w)) in s.layers.iter().enumerate() {
            for (what, b, want) in [("att_x", a, c), ("ffn_x", f, c), ("wkv", w, nn)] {
                if self.ops.len(b) != want {
                    return Err(Error::Shape {
                        name: format!("state.layers[{l}].{what}"),
                        expected: vec![want],
                        got: vec![self.ops.len(b)],
                    });
                }
            }
        }
        Ok(())
    }

    /// Runs `tokens` from the device state `state` (updated in place) and
    /// returns the logits `which` asks for: `[T, V]`, `[V]` (last token) or
    /// nothing, on the host.
    pub fn forward_dev(
        &self,
        tokens: &[u32],
        state: &mut DeviceState<D::Buf>,
        which: Logits,
    ) -> Result<Vec<f32>> {
        self.check_state(state)?;
        let (v, c) = (self.cfg.vocab, self.cfg.n_embd);
        if let Some((i, &t)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= v) {
            return Err(Error::Invalid(format!(
                "token {t} at position {i} is out of range (vocab {v})"
            )));
        }
        let mut out = Vec::new();
        let n_chunks = tokens.len().div_ceil(SEQ_CHUNK);
        for (i, chunk) in tokens.chunks(SEQ_CHUNK).enumerate() {
            let t = chunk.len();
            let x = self.run(chunk, state)?;
            match which {
                Logits::All => out.extend(self.logits(&x, 0, t)?),
                Logits::Last if i + 1 == n_chunks => out = self.logits(&x, (t - 1) * c, 1)?,
                _ => {}
            }
        }
        Ok(out)
    }

    /// Sequence mode with a host state (uploaded, run, downloaded):
    /// logits `[T, V]`.
    pub fn forward_seq(&self, tokens: &[u32], state: &mut State) -> Result<Vec<f32>> {
        self.forward(tokens, state, Logits::All)
    }

    /// One-token mode with a host state: logits `[V]`.
    pub fn step(&self, token: u32, state: &mut State) -> Result<Vec<f32>> {
        self.forward(&[token], state, Logits::All)
    }

    /// [`Self::forward_dev`] with a host state (uploaded, run, downloaded).
    pub fn forward(&self, tokens: &[u32], state: &mut State, which: Logits) -> Result<Vec<f32>> {
        let mut ds = self.upload_state(state)?;
        let out = self.forward_dev(tokens, &mut ds, which)?;
        *state = self.download_state(&ds)?;
        Ok(out)
    }

    /// `ln_out` + head on `rows` rows of x from element `off`; to the host.
    fn logits(&self, x: &D::Buf, off: usize, rows: usize) -> Result<Vec<f32>> {
        let (c, v) = (self.cfg.n_embd, self.cfg.vocab);
        let o = &self.ops;
        let mut xn = o.zeros(rows * c)?;
        o.layer_norm(
            x,
            off,
            rows,
            c,
            &self.ln_out.0,
            &self.ln_out.1,
            LN_EPS,
            &mut xn,
        )?;
        let mut y = o.zeros(rows * v)?;
        o.matmul_w(&xn, 0, c, rows, &self.head, v, c, &mut y)?;
        let mut h = o.download(&y)?;
        h.truncate(rows * v);
        Ok(h)
    }

    /// All layers over one chunk of tokens; returns the residual stream `[T, C]`.
    fn run(&self, tokens: &[u32], state: &mut DeviceState<D::Buf>) -> Result<D::Buf> {
        let cfg = &self.cfg;
        let (c, h, n) = (cfg.n_embd, cfg.n_head, cfg.head_size);
        let t = tokens.len();
        let tc = t * c;
        let o = &self.ops;
        let mut x = o.zeros(tc)?;
        o.embed(tokens, &self.emb_ln, c, &mut x)?;
        let mut v_first = o.zeros(tc)?;
        for (l, ly) in self.layers.iter().enumerate() {
            let (att_x, ffn_x, wkv) = &mut state.layers[l];
            // ---- time mix ----
            let mut xa = o.zeros(tc)?;
            o.layer_norm(&x, 0, t, c, &ly.ln1.0, &ly.ln1.1, LN_EPS, &mut xa)?;
            let mut mix = o.zeros(6 * tc)?;
            o.token_shift(t, c, &xa, att_x, &ly.mu6, 6, &mut mix)?;
            drop(xa);
            let ld = 6 * c;
            let mm = |off: usize, ldx: usize, src: &D::Buf, w: &D::Mat, nout: usize, k: usize| {
                let mut y = o.zeros(t * nout)?;
                o.matmul_w(src, off, ldx, t, w, nout, k, &mut y)?;
                Ok::<_, Error>(y)
            };
            let r = mm(0, ld, &mix, &ly.r, c, c)?;
            let k = mm(2 * c, ld, &mix, &ly.k, c, c)?;
            let mut v = mm(3 * c, ld, &mix, &ly.v, c, c)?;
            let mut hw = mm(c, ld, &mix, &ly.w1, cfg.d_w, c)?;
            o.act(Act::Tanh, &mut hw, cfg.d_w, None)?;
            let mut w = mm(0, cfg.d_w, &hw, &ly.w2, c, cfg.d_w)?;
            o.act(Act::Decay, &mut w, c, Some(&ly.w0))?;
            let ha = mm(4 * c, ld, &mix, &ly.a1, cfg.d_a, c)?;
            let da = mm(0, cfg.d_a, &ha, &ly.a2, c, cfg.d_a)?;
            if l == 0 {
                o.copy(&v, 0, &mut v_first, 0, tc)?;
            } else if let Some((v0, v1, v2)) = &ly.vres {
                let hv = mm(3 * c, ld, &mix, v1, cfg.d_v, c)?;
                let dv = mm(0, cfg.d_v, &hv, v2, c, cfg.d_v)?;
                o.value_residual(c, &mut v, &v_first, v0, &dv)?;
            }
            let mut hg = mm(5 * c, ld, &mix, &ly.g1, cfg.d_g, c)?;
            o.act(Act::Sigmoid, &mut hg, cfg.d_g, None)?;
            let g = mm(0, cfg.d_g, &hg, &ly.g2, c, cfg.d_g)?;
            drop(mix);
            let (mut kt, mut a, mut b) = (o.zeros(tc)?, o.zeros(tc)?, o.zeros(tc)?);
            o.kk_prep(
                t, h, n, &k, &da, &ly.a0, &ly.k_k, &ly.k_a, &mut kt, &mut a, &mut b,
            )?;
            let mut y = o.zeros(tc)?;
            o.wkv(t, h, n, [&r, &w, &kt, &v, &a, &b], wkv, &mut y)?;
            let bonus = BonusBufs {
                r: &r,
                k: &kt,
                v: &v,
                r_k: &ly.r_k,
            };
            o.group_norm(
                t,
                h,
                n,
                LN_EPS * n as f32,
                &mut y,
                &ly.ln_x.0,
                &ly.ln_x.1,
                Some(bonus),
                Some(&g),
            )?;
            let att = mm(0, c, &y, &ly.o, c, c)?;
            o.add(&mut x, &att)?;

            // ---- channel mix ----
            let mut xf = o.zeros(tc)?;
            o.layer_norm(&x, 0, t, c, &ly.ln2.0, &ly.ln2.1, LN_EPS, &mut xf)?;
            let mut kx = o.zeros(tc)?;
            o.token_shift(t, c, &xf, ffn_x, &ly.ffn_mu, 1, &mut kx)?;
            let mut hid = mm(0, c, &kx, &ly.fk, cfg.d_ffn, c)?;
            o.act(Act::ReluSq, &mut hid, cfg.d_ffn, None)?;
            let ffn = mm(0, cfg.d_ffn, &hid, &ly.fv, c, cfg.d_ffn)?;
            o.add(&mut x, &ffn)?;
        }
        Ok(x)
    }
}

/// `ln0(emb)` `[V, C]` on the device (the embedding LayerNorm is folded in once).
pub(crate) fn upload_emb_ln<D: DeviceOps>(ops: &D, w: &Weights) -> Result<D::Buf> {
    let cfg = &w.config;
    let c = cfg.n_embd;
    let up = |v: &[f32]| ops.upload(v);
    let ln0 = w.blocks[0]
        .ln0
        .as_ref()
        .ok_or_else(|| Error::MissingTensor("blocks.0.ln0.weight".into()))?;
    let emb = up(&w.emb)?;
    let mut emb_ln = ops.zeros(cfg.vocab * c)?;
    ops.layer_norm(
        &emb,
        0,
        cfg.vocab,
        c,
        &up(&ln0.weight)?,
        &up(&ln0.bias)?,
        LN_EPS,
        &mut emb_ln,
    )?;
    drop(emb);
    Ok(emb_ln)
}

/// Every layer's weights, vectors through `up` and matrices (`[out, in]`,
/// LoRA factors transposed) through `upm`.
pub(crate) fn upload_layers<B, M>(
    w: &Weights,
    up: impl Fn(&[f32]) -> Result<B>,
    upm: impl Fn(&[f32]) -> Result<M>,
) -> Result<Vec<DevLayer<B, M>>> {
    let cfg = &w.config;
    let c = cfg.n_embd;
    let mut layers = Vec::with_capacity(cfg.n_layer);
    for (l, b) in w.blocks.iter().enumerate() {
        let a = &b.att;
        let mu6: Vec<f32> = [&a.x_r, &a.x_w, &a.x_k, &a.x_v, &a.x_a, &a.x_g]
            .iter()
            .flat_map(|m| m.iter().copied())
            .collect();
        let vres = match (l, &a.v0, &a.v1, &a.v2) {
            (1.., Some(v0), Some(v1), Some(v2)) => Some((
                up(v0)?,
                upm(&transpose(v1, c, cfg.d_v))?,
                upm(&transpose(v2, cfg.d_v, c))?,
            )),
            _ => None,
        };
        layers.push(DevLayer {
            ln1: (up(&b.ln1.weight)?, up(&b.ln1.bias)?),
            ln2: (up(&b.ln2.weight)?, up(&b.ln2.bias)?),
            mu6: up(&mu6)?,
            w0: up(&a.w0)?,
            a0: up(&a.a0)?,
            vres,
            k_k: up(&a.k_k)?,
            k_a: up(&a.k_a)?,
            r_k: up(&a.r_k)?,
            ln_x: (up(&a.ln_x.weight)?, up(&a.ln_x.bias)?),
            r: upm(&a.receptance)?,
            k: upm(&a.key)?,
            v: upm(&a.value)?,
            o: upm(&a.output)?,
            w1: upm(&transpose(&a.w1, c, cfg.d_w))?,
            w2: upm(&transpose(&a.w2, cfg.d_w, c))?,
            a1: upm(&transpose(&a.a1, c, cfg.d_a))?,
            a2: upm(&transpose(&a.a2, cfg.d_a, c))?,
            g1: upm(&transpose(&a.g1, c, cfg.d_g))?,
            g2: upm(&transpose(&a.g2, cfg.d_g, c))?,
            ffn_mu: up(&b.ffn.x_k)?,
            fk: upm(&b.ffn.key)?,
            fv: upm(&b.ffn.value)?,
        });
    }
    Ok(layers)
}
