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
use super::layer::{matmul_mat, upload_layers, DevLayer, FwdWs, Layer, StartRef, Tape, UpKernel};
use super::state::{LayerState, State};
use super::weights::{Config, Weights};
use crate::error::{Error, Result};
use crate::ops::backward::BackwardOps;
use crate::ops::{DeviceOps, LN_EPS};

/// Longest run of tokens processed at once (the state carries over).
const SEQ_CHUNK: usize = 512;

/// One layer's weights on a device: vectors `B`, matrices `M` (`[out, in]`).
/// The recurrent state on the device, per layer: att_x `[C]`, ffn_x `[C]`,
/// wkv `[H, N, N]` (value-major), like [`State`].
pub struct DeviceState<B> {
    /// Per layer: att_x `[C]`, ffn_x `[C]`, wkv `[H, N, N]`.
    pub layers: Vec<(B, B, B)>,
}

/// An RWKV-7 model whose weights live on a [`DeviceOps`] backend.
pub struct DeviceModel<D: BackwardOps> {
    ops: D,
    cfg: Config,
    /// `ln0(emb)`, `[V, C]`
    emb_ln: D::Buf,
    layers: Vec<DevLayer<D::Buf, D::Mat>>,
    ln_out: (D::Buf, D::Buf),
    head: D::Mat,
    /// State-offset tuning's read-out offsets (docs/state-offset.md).
    offsets: Option<DevOffsets<D::Buf>>,
}

/// Per layer `S_off` `[H, N, N]` on the device.
struct DevOffsets<B> {
    u: Vec<B>,
}

impl<D: BackwardOps> DeviceModel<D> {
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
            offsets: None,
        })
    }

    /// Adds state-offset tuning's read-out offsets (per layer `[H, N, N]`,
    /// value-major; `None` removes them): after every layer's WKV,
    /// `y_t += S_off r_t` per head (the `up_fwd` op in its linear mode),
    /// as the CPU model's [`super::Model::set_state_offsets`].
    pub fn set_state_offsets(&mut self, off: Option<&[Vec<f32>]>) -> Result<()> {
        let cfg = &self.cfg;
        let (h, n) = (cfg.n_head, cfg.head_size);
        self.offsets = match off {
            None => None,
            Some(o) => {
                if o.len() != cfg.n_layer || o.iter().any(|x| x.len() != h * n * n) {
                    return Err(Error::Shape {
                        name: "state offsets".into(),
                        expected: vec![cfg.n_layer, h * n * n],
                        got: vec![o.len(), o.first().map_or(0, |x| x.len())],
                    });
                }
                let ops = &self.ops;
                Some(DevOffsets {
                    u: o.iter().map(|x| ops.upload(x)).collect::<Result<_>>()?,
                })
            }
        };
        Ok(())
    }

    /// Whether state offsets are set ([`Self::set_state_offsets`]).
    pub fn has_state_offsets(&self) -> bool {
        self.offsets.is_some()
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

    /// The `ln0(emb)` table (for the reduced forward of `super::reduce`).
    pub(crate) fn emb_ln(&self) -> &D::Buf {
        &self.emb_ln
    }

    /// The layers' weights (for the reduced forward of `super::reduce`).
    pub(crate) fn dev_layers(&self) -> &[DevLayer<D::Buf, D::Mat>] {
        &self.layers
    }

    /// Checks a device state against this model.
    pub(crate) fn check_dev_state(&self, s: &DeviceState<D::Buf>) -> Result<()> {
        self.check_state(s)
    }

    /// `ln_out` + head on `rows` rows of x from element `off`; to the host.
    pub(crate) fn logits(&self, x: &D::Buf, off: usize, rows: usize) -> Result<Vec<f32>> {
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

    /// All layers over one chunk of tokens ([`Layer::forward`], the layer
    /// the tuner runs too); returns the residual stream `[T, C]`.
    fn run(&self, tokens: &[u32], state: &mut DeviceState<D::Buf>) -> Result<D::Buf> {
        let cfg = &self.cfg;
        let (c, h, n) = (cfg.n_embd, cfg.n_head, cfg.head_size);
        let t = tokens.len();
        let tc = t * c;
        let o = &self.ops;
        let mut x = o.zeros(tc)?;
        o.embed(tokens, &self.emb_ln, c, &mut x)?;
        let mut v_first = o.zeros(tc)?;
        let vres = self.layers.iter().any(|l| l.vres.is_some());
        let off = self.offsets.as_ref();
        let mut tape = Tape::new(o, cfg, 1, t, vres, off.map(|_| n))?;
        let mut fw = FwdWs::new(o, cfg, 1, t)?;
        let mut h_t = o.zeros(h * n * n)?;
        for (l, ly) in self.layers.iter().enumerate() {
            let layer = Layer {
                ops: o,
                cfg,
                l,
                ly,
                mm: matmul_mat::<D>,
                mt: None,
                up: off.map(|_| UpKernel {
                    m: n,
                    linear: true,
                    centres: None,
                    gamma: None,
                }),
                lora: None,
            };
            let (att_x, ffn_x, wkv) = &mut state.layers[l];
            let st = StartRef {
                sa: &*att_x,
                sf: &*ffn_x,
                wkv: &*wkv,
                u: off.map(|f| &f.u[l]),
            };
            layer.forward(
                &mut x,
                1,
                t,
                st,
                &mut v_first,
                &mut tape,
                &mut fw,
                None,
                Some(&mut h_t),
            )?;
            // the final states: token shifts left in fw, the WKV in h_t
            o.copy(&fw.sa, 0, att_x, 0, c)?;
            o.copy(&fw.sf, 0, ffn_x, 0, c)?;
            o.copy(&h_t, 0, wkv, 0, h * n * n)?;
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
