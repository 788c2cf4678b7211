//! One RWKV-7 layer, written once: its forward and its backward (towards
//! the activations and the initial state; no weight gradient) over `b`
//! sequences of `t` tokens, generic over the ops backend ([`BackwardOps`]:
//! the CPU twins, the emulator, CUDA). The device model's inference
//! ([`super::device::DeviceModel`]) and the device tuner
//! (`tune::device::DeviceTuner`) both run [`Layer::forward`]; the tuner
//! runs [`Layer::backward`]. Also owns the layer's weights on a device
//! ([`DevLayer`], `upload_layers`), its initial state ([`LStart`]) and
//! the buffers a forward / backward writes ([`Tape`], [`FwdWs`], [`BwdWs`]),
//! so a caller allocates them once and no op allocates.
//!
//! Shapes: activations `[B·T, C]` row-major (sequence-major), `C = H·N`;
//! per-sequence states `[B, C]` (token shift) and `[B, H, N, N]` (WKV,
//! value-major); matrices `[out, in]` applied as `y = x Wᵀ`.
use super::lora::LoraTarget;
use super::weights::{Config, Weights};
use crate::error::{Error, Result};
use crate::ops::backward::{BackwardOps, GnBwdBufs, GnBwdGrads, KkBwdBufs, SdtBwdBufs, UpBufs};
use crate::ops::{Act, BonusBufs, LN_EPS};

/// One layer's weights on a device: vectors in `B`, matrices in `M`
/// (`B` for the tuner's f32 GEMMs; the backend's `Mat` for inference,
/// which may be bf16).
pub struct DevLayer<B, M> {
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

/// A layer's initial state on the device: att_x `[C]`, ffn_x `[C]`, wkv
/// `[H, N, N]` (or `[B, C]`, `[B, C]`, `[B, H, N, N]` per sequence), and
/// with the kernel-upscaled read-out its `U` `[H, N, M]`.
pub struct LStart<B> {
    /// Token-shift state of the time mix (`att_x`).
    pub sa: B,
    /// Token-shift state of the channel mix (`ffn_x`).
    pub sf: B,
    /// The WKV state `[H, N, N]`, value-major.
    pub wkv: B,
    /// The upscaled state `U` (value-major), when the tuner has a kernel.
    pub u: Option<B>,
}

/// A borrowed view of a layer's initial state ([`LStart`], or a device
/// model's state buffers), what [`Layer::forward`] / [`Layer::backward`]
/// read.
pub struct StartRef<'a, B> {
    /// Token-shift state of the time mix (`att_x`).
    pub sa: &'a B,
    /// Token-shift state of the channel mix (`ffn_x`).
    pub sf: &'a B,
    /// The WKV state `[H, N, N]`, value-major.
    pub wkv: &'a B,
    /// The upscaled state `U`, when the tuner has a kernel.
    pub u: Option<&'a B>,
}

// Only references inside: copyable whatever B is (a derive would ask B: Copy).
impl<B> Clone for StartRef<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for StartRef<'_, B> {}

impl<B> LStart<B> {
    /// The borrowed view.
    pub fn view(&self) -> StartRef<'_, B> {
        StartRef {
            sa: &self.sa,
            sf: &self.sf,
            wkv: &self.wkv,
            u: self.u.as_ref(),
        }
    }
}

/// `y[m, n] = x[m, k]·Wᵀ` with a layer matrix of type `M` (the forward's
/// GEMM: `matmul` on f32 buffers, `matmul_w` on the backend's matrices).
pub type MatMul<O, M> = fn(
    &O,
    &<O as crate::ops::DeviceOps>::Buf,
    usize,
    usize,
    usize,
    &M,
    usize,
    usize,
    &mut <O as crate::ops::DeviceOps>::Buf,
) -> Result<()>;

/// `dx[m, k] = dy[m, n]·W` (the backward's GEMM).
pub type MatMulT<O, M> = fn(
    &O,
    &<O as crate::ops::DeviceOps>::Buf,
    usize,
    &M,
    usize,
    usize,
    &mut <O as crate::ops::DeviceOps>::Buf,
) -> Result<()>;

/// The f32 forward GEMM ([`crate::ops::DeviceOps::matmul`]).
#[allow(clippy::too_many_arguments)]
pub fn matmul_buf<O: BackwardOps>(
    o: &O,
    x: &O::Buf,
    off: usize,
    ldx: usize,
    m: usize,
    w: &O::Buf,
    n: usize,
    k: usize,
    y: &mut O::Buf,
) -> Result<()> {
    o.matmul(x, off, ldx, m, w, n, k, y)
}

/// The backend-matrix forward GEMM ([`crate::ops::DeviceOps::matmul_w`]).
#[allow(clippy::too_many_arguments)]
pub fn matmul_mat<O: BackwardOps>(
    o: &O,
    x: &O::Buf,
    off: usize,
    ldx: usize,
    m: usize,
    w: &O::Mat,
    n: usize,
    k: usize,
    y: &mut O::Buf,
) -> Result<()> {
    o.matmul_w(x, off, ldx, m, w, n, k, y)
}

/// The f32 backward GEMM ([`BackwardOps::matmul_t`]).
pub fn matmul_t_buf<O: BackwardOps>(
    o: &O,
    dy: &O::Buf,
    m: usize,
    w: &O::Buf,
    n: usize,
    k: usize,
    dx: &mut O::Buf,
) -> Result<()> {
    o.matmul_t(dy, m, w, n, k, dx)
}

/// The kernel-upscaled read-out's fixed part for one layer: support
/// vectors `[H, M, N]` and widths `[H]`.
pub struct UpKernel<'a, B> {
    /// Support vectors per head (M).
    pub m: usize,
    /// State-offset tuning: `φ = r` (M = N; `centres` and `gamma` are
    /// `None`, the ops read neither).
    pub linear: bool,
    /// Support vectors `[H, M, N]` (`None` for the linear read-out).
    pub centres: Option<&'a B>,
    /// RBF widths `[H]` (γ = 1/(2σ²); `None` for the linear read-out).
    pub gamma: Option<&'a B>,
}

/// The tensors of a layer that sparse dimension tuning trains (docs/sdt.md),
/// in this order: `w0`, `a0`, `k_k`, `k_a`, `r_k` (`[C]` each), `w2` and
/// `a2` (`[C, d]`: one row per output channel, the device layout); on a
/// device as values, deltas, masks or gradients.
pub type SdtTensors<B> = [B; 7];

/// One LoRA factor pair on a device: `A [r, in]`, `B [out, r]`.
pub type LoraPair<B> = (B, B);

/// A layer's LoRA adapters on a device, indexed by
/// [`LoraTarget::index`] (`None`: not adapted): the factors, or their
/// gradients (summed, `+=`).
pub type LoraPairs<B> = Vec<Option<LoraPair<B>>>;

/// What a layer's forward and backward read of its LoRA adapters: rank,
/// `α/r`, the keep probability of the dropout on the branch input (1: no
/// dropout, as in evaluation) and the step's dropout seed.
pub struct LoraRef<'a, B> {
    /// Rank r.
    pub rank: usize,
    /// `α/r`.
    pub scale: f32,
    /// `1 − dropout` (1 outside training).
    pub keep: f32,
    /// The step's seed (mixed with the layer and target per matrix).
    pub seed: u32,
    /// The batch index of the first sequence this layer runs (a part of a
    /// split batch starts past 0), so dropout masks do not depend on the
    /// split.
    pub seq0: usize,
    /// The factors of this layer.
    pub ab: &'a [Option<LoraPair<B>>],
}

/// The LoRA branch's temporaries (reused by every adapted matrix):
/// `xs [rows, max in]` the scaled, dropped-out input, `t`, `g` `[rows, r]`,
/// `y [rows, max(in, out)]`, `d [rows, max in]`.
pub struct LoraWs<B> {
    xs: B,
    t: B,
    g: B,
    y: B,
    d: B,
}

impl<B> LoraWs<B> {
    /// The temporaries for `rows` rows at rank `r`.
    pub fn new<O: BackwardOps<Buf = B>>(
        o: &O,
        cfg: &Config,
        rows: usize,
        r: usize,
    ) -> Result<Self> {
        let w = LoraTarget::ALL
            .iter()
            .map(|t| {
                let (a, b) = t.dims(cfg);
                a.max(b)
            })
            .max()
            .unwrap_or(1);
        let z = |k: usize| o.zeros(k.max(1));
        Ok(LoraWs {
            xs: z(rows * w)?,
            t: z(rows * r)?,
            g: z(rows * r)?,
            y: z(rows * w)?,
            d: z(rows * w)?,
        })
    }

    /// Bytes of [`Self::new`].
    pub fn bytes(cfg: &Config, rows: usize, r: usize) -> usize {
        let w = cfg.d_ffn.max(cfg.n_embd);
        4 * rows * (3 * w + 2 * r)
    }
}

/// Where the backward of one adapted GEMM reads and writes: `dy [rows,
/// out]`, the forward input `x` (rows at `x_off + i·ldx`), `dx [rows, in]`
/// (already `dy·W`; the branch adds its part).
struct LinBwd<'x, B> {
    dy: &'x B,
    x: &'x B,
    x_off: usize,
    ldx: usize,
    out: usize,
    inp: usize,
}

/// A [`LinBwd`] from its fields.
fn lb<'x, B>(
    dy: &'x B,
    x: &'x B,
    x_off: usize,
    ldx: usize,
    out: usize,
    inp: usize,
) -> LinBwd<'x, B> {
    LinBwd {
        dy,
        x,
        x_off,
        ldx,
        out,
        inp,
    }
}

/// One layer, bound to its backend, weights and GEMMs.
pub struct Layer<'a, O: BackwardOps, M> {
    /// The backend.
    pub ops: &'a O,
    /// The model configuration.
    pub cfg: &'a Config,
    /// Layer index (0 writes v_first; the others read it).
    pub l: usize,
    /// This layer's weights on the backend.
    pub ly: &'a DevLayer<O::Buf, M>,
    /// The forward's weight GEMMs.
    pub mm: MatMul<O, M>,
    /// The backward's GEMM (`None`: forward only).
    pub mt: Option<MatMulT<O, M>>,
    /// The upscaled read-out's kernel, when the state has a `U`.
    pub up: Option<UpKernel<'a, O::Buf>>,
    /// The layer's LoRA adapters (then [`FwdWs`] must have LoRA
    /// temporaries: [`FwdWs::with_lora`]).
    pub lora: Option<LoraRef<'a, O::Buf>>,
}

/// Every activation of one layer's forward that its backward reads, each
/// `[B·T, C]` unless noted (allocated once: [`Tape::new`]).
pub struct Tape<B> {
    pub(crate) r: B,
    pub(crate) k: B,
    pub(crate) vraw: B,
    pub(crate) v: B,
    pub(crate) kt: B,
    pub(crate) a: B,
    pub(crate) b: B,
    pub(crate) wdec: B,
    /// pre-activation of the decay (`w0` is added by the op)
    pub(crate) wpre: B,
    /// `[B·T, d_w]` pre-tanh
    pub(crate) hw_pre: B,
    /// α LoRA output (pre-sigmoid, without a0)
    pub(crate) dapre: B,
    /// value-residual LoRA output (layers with a value residual)
    pub(crate) dvpre: Option<B>,
    /// `[B·T, d_g]` pre-sigmoid
    pub(crate) hg_pre: B,
    pub(crate) g: B,
    /// WKV output (before GroupNorm)
    pub(crate) y: B,
    /// residual stream after the time mix (input of ln2)
    pub(crate) x_mid: B,
    /// `[B·T, F]` pre-relu²
    pub(crate) hpre: B,
    /// `[B·T, H, M]` the upscaled read-out's features (when upscaled)
    pub(crate) phi: Option<B>,
    /// the WKV forward's state checkpoints, read by the WKV backward
    pub(crate) ckpt: B,
}

/// A layer forward's temporaries (reused by every layer).
pub struct FwdWs<B> {
    pub(crate) xa: B,
    pub(crate) mix: B,
    pub(crate) hw: B,
    pub(crate) ha: B,
    pub(crate) hv: B,
    pub(crate) hg: B,
    pub(crate) out: B,
    pub(crate) att: B,
    pub(crate) xf: B,
    pub(crate) kx: B,
    pub(crate) hid: B,
    pub(crate) ffn: B,
    /// `[B, C]`: the token-shift states (the final ones after a forward)
    pub(crate) sa: B,
    pub(crate) sf: B,
    /// the LoRA branch's temporaries (layers with adapters)
    pub(crate) lora: Option<LoraWs<B>>,
}

/// A layer backward's temporaries (reused by every layer).
pub struct BwdWs<B> {
    pub(crate) dh: B,
    pub(crate) dkx: B,
    pub(crate) dsf: B,
    pub(crate) dxf: B,
    pub(crate) dout: B,
    pub(crate) dy: B,
    pub(crate) dr: B,
    pub(crate) dkt: B,
    pub(crate) dv: B,
    pub(crate) dg: B,
    pub(crate) dhg: B,
    /// the gradients of the six token-shift mixes
    pub(crate) dmix: [B; 6],
    /// the WKV backward's dr … db
    pub(crate) wg: [B; 6],
    pub(crate) dh0: B,
    pub(crate) scratch: B,
    pub(crate) dk: B,
    pub(crate) ddapre: B,
    pub(crate) dha: B,
    pub(crate) dhw: B,
    pub(crate) ddv: B,
    pub(crate) dhv: B,
    pub(crate) dres: B,
    pub(crate) dsa: B,
    pub(crate) dxa: B,
}

impl<B> Tape<B> {
    /// A tape for `b` sequences of `t` tokens (`vres`: a buffer for the
    /// value residual; `m`: the upscaled read-out's M).
    pub fn new<O: BackwardOps<Buf = B>>(
        o: &O,
        cfg: &Config,
        b: usize,
        t: usize,
        vres: bool,
        m: Option<usize>,
    ) -> Result<Self> {
        let (rows, c, h, n) = (b * t, cfg.n_embd, cfg.n_head, cfg.head_size);
        let tc = rows * c;
        let z = |k: usize| o.zeros(k.max(1));
        let (ck, _) = o.wkv_ws_len(b, t, h, n);
        Ok(Tape {
            r: z(tc)?,
            k: z(tc)?,
            vraw: z(tc)?,
            v: z(tc)?,
            kt: z(tc)?,
            a: z(tc)?,
            b: z(tc)?,
            wdec: z(tc)?,
            wpre: z(tc)?,
            hw_pre: z(rows * cfg.d_w)?,
            dapre: z(tc)?,
            dvpre: if vres { Some(z(tc)?) } else { None },
            hg_pre: z(rows * cfg.d_g)?,
            g: z(tc)?,
            y: z(tc)?,
            x_mid: z(tc)?,
            hpre: z(rows * cfg.d_ffn)?,
            phi: match m {
                Some(m) => Some(z(rows * h * m)?),
                None => None,
            },
            ckpt: z(ck)?,
        })
    }

    /// Bytes of a tape for `b` × `t` (the WKV checkpoints included).
    pub fn bytes<O: BackwardOps>(
        o: &O,
        cfg: &Config,
        b: usize,
        t: usize,
        m: Option<usize>,
    ) -> usize {
        let rows = b * t;
        let (ck, _) = o.wkv_ws_len(b, t, cfg.n_head, cfg.head_size);
        let m = m.unwrap_or(0);
        4 * (rows * (15 * cfg.n_embd + cfg.d_w + cfg.d_g + cfg.d_ffn + cfg.n_head * m) + ck)
    }
}

impl<B> FwdWs<B> {
    /// The forward temporaries for `b` sequences of `t` tokens.
    pub fn new<O: BackwardOps<Buf = B>>(o: &O, cfg: &Config, b: usize, t: usize) -> Result<Self> {
        let (rows, c) = (b * t, cfg.n_embd);
        let tc = rows * c;
        let z = |k: usize| o.zeros(k.max(1));
        Ok(FwdWs {
            xa: z(tc)?,
            mix: z(6 * tc)?,
            hw: z(rows * cfg.d_w)?,
            ha: z(rows * cfg.d_a)?,
            hv: z(rows * cfg.d_v)?,
            hg: z(rows * cfg.d_g)?,
            out: z(tc)?,
            att: z(tc)?,
            xf: z(tc)?,
            kx: z(tc)?,
            hid: z(rows * cfg.d_ffn)?,
            ffn: z(tc)?,
            sa: z(b * c)?,
            sf: z(b * c)?,
            lora: None,
        })
    }

    /// The same workspace with LoRA temporaries of rank `r` (`None`: none).
    pub fn with_lora<O: BackwardOps<Buf = B>>(
        mut self,
        o: &O,
        cfg: &Config,
        rows: usize,
        r: Option<usize>,
    ) -> Result<Self> {
        self.lora = match r {
            Some(r) => Some(LoraWs::new(o, cfg, rows, r)?),
            None => None,
        };
        Ok(self)
    }
}

impl<B> BwdWs<B> {
    /// The backward temporaries for `b` sequences of `t` tokens.
    pub fn new<O: BackwardOps<Buf = B>>(o: &O, cfg: &Config, b: usize, t: usize) -> Result<Self> {
        let (rows, c, h, n) = (b * t, cfg.n_embd, cfg.n_head, cfg.head_size);
        let tc = rows * c;
        let z = |k: usize| o.zeros(k.max(1));
        let (_, sc) = o.wkv_ws_len(b, t, h, n);
        Ok(BwdWs {
            dh: z(rows * cfg.d_ffn)?,
            dkx: z(tc)?,
            dsf: z(b * c)?,
            dxf: z(tc)?,
            dout: z(tc)?,
            dy: z(tc)?,
            dr: z(tc)?,
            dkt: z(tc)?,
            dv: z(tc)?,
            dg: z(tc)?,
            dhg: z(rows * cfg.d_g)?,
            dmix: [z(tc)?, z(tc)?, z(tc)?, z(tc)?, z(tc)?, z(tc)?],
            wg: [z(tc)?, z(tc)?, z(tc)?, z(tc)?, z(tc)?, z(tc)?],
            dh0: z(b * h * n * n)?,
            scratch: z(sc)?,
            dk: z(tc)?,
            ddapre: z(tc)?,
            dha: z(rows * cfg.d_a)?,
            dhw: z(rows * cfg.d_w)?,
            ddv: z(tc)?,
            dhv: z(rows * cfg.d_v)?,
            dres: z(tc)?,
            dsa: z(b * c)?,
            dxa: z(tc)?,
        })
    }
}

impl<'a, O: BackwardOps, M> Layer<'a, O, M> {
    /// The adapter of `tg` and its dropout seed, when adapted.
    fn lora_of(&self, tg: LoraTarget) -> Option<(&'a LoraPair<O::Buf>, u32)> {
        let lr = self.lora.as_ref()?;
        let ab = lr.ab.get(tg.index())?.as_ref()?;
        let mix = (self.l as u32)
            .wrapping_mul(64)
            .wrapping_add(tg.index() as u32);
        Some((ab, crate::ops::backward_ref::lora_hash(lr.seed, mix)))
    }

    /// `y = x Wᵀ` through the layer's GEMM, plus the LoRA branch
    /// `(α/r)·(drop(x) Aᵀ) Bᵀ` when `tg` is adapted.
    #[allow(clippy::too_many_arguments)]
    fn lin(
        &self,
        tg: LoraTarget,
        (x, off, ld): (&O::Buf, usize, usize),
        (rows, t): (usize, usize),
        w: &M,
        n: usize,
        k: usize,
        y: &mut O::Buf,
        lw: &mut Option<LoraWs<O::Buf>>,
    ) -> Result<()> {
        let o = self.ops;
        (self.mm)(o, x, off, ld, rows, w, n, k, y)?;
        let (Some(lr), Some(((a, b), seed))) = (self.lora.as_ref(), self.lora_of(tg)) else {
            return Ok(());
        };
        let ws = lw
            .as_mut()
            .ok_or_else(|| Error::Tune("internal: no LoRA workspace".into()))?;
        let r = lr.rank;
        let sq = (t, lr.seq0);
        o.lora_in(rows, k, x, off, ld, sq, seed, lr.keep, lr.scale, &mut ws.xs)?;
        o.matmul(&ws.xs, 0, k, rows, a, r, k, &mut ws.t)?;
        o.matmul(&ws.t, 0, r, rows, b, n, r, &mut ws.y)?;
        o.add_n(y, &ws.y, rows * n)
    }

    /// The LoRA part of the backward of [`Self::lin`] (the base `dy·W` is
    /// already in `dx`): `dB += dyᵀ t`, `dA += (dy B)ᵀ xs` into `grads`
    /// and `dx += drop((dy B) A)·α/r`.
    fn lin_bwd(
        &self,
        tg: LoraTarget,
        (rows, t): (usize, usize),
        p: LinBwd<'_, O::Buf>,
        dx: &mut O::Buf,
        lw: &mut Option<LoraWs<O::Buf>>,
        grads: &mut Option<&mut LoraPairs<O::Buf>>,
    ) -> Result<()> {
        let o = self.ops;
        let (Some(lr), Some(((a, b), seed))) = (self.lora.as_ref(), self.lora_of(tg)) else {
            return Ok(());
        };
        let internal = |w: &str| Error::Tune(format!("internal: no LoRA {w}"));
        let ws = lw.as_mut().ok_or_else(|| internal("workspace"))?;
        let (ga, gb) = grads
            .as_mut()
            .and_then(|g| g.get_mut(tg.index()))
            .and_then(|g| g.as_mut())
            .ok_or_else(|| internal("gradient"))?;
        let (r, k, n) = (lr.rank, p.inp, p.out);
        let sq = (t, lr.seq0);
        o.lora_in(
            rows, k, p.x, p.x_off, p.ldx, sq, seed, lr.keep, lr.scale, &mut ws.xs,
        )?;
        o.matmul(&ws.xs, 0, k, rows, a, r, k, &mut ws.t)?;
        o.matmul_tn(p.dy, rows, n, &ws.t, 0, r, r, gb, true)?;
        o.matmul_t(p.dy, rows, b, n, r, &mut ws.g)?;
        o.matmul_tn(&ws.g, rows, r, &ws.xs, 0, k, k, ga, true)?;
        o.matmul_t(&ws.g, rows, a, r, k, &mut ws.y)?;
        o.lora_in(rows, k, &ws.y, 0, k, sq, seed, lr.keep, lr.scale, &mut ws.d)?;
        o.add_n(dx, &ws.d, rows * k)
    }

    /// The upscale ops' view of the kernel and `st.u` (`None`: plain).
    fn up_bufs<'b>(&'b self, st: StartRef<'b, O::Buf>) -> Result<Option<UpBufs<'b, O::Buf>>> {
        match (&self.up, st.u) {
            (None, _) => Ok(None),
            (Some(k), Some(u)) => Ok(Some(UpBufs {
                m: k.m,
                linear: k.linear,
                // the linear read-out reads neither: any buffer will do
                centres: k.centres.unwrap_or(u),
                gamma: k.gamma.unwrap_or(u),
                u,
            })),
            (Some(_), None) => Err(Error::Tune(format!(
                "layer {}: the layer is upscaled but the initial state has no U",
                self.l
            ))),
        }
    }

    /// One layer's forward over `b` sequences of `t` rows each (`x`
    /// `[B·T, C]`, updated in place) from the per-sequence states `st`
    /// (`sa`, `sf` `[B, C]`, `wkv` `[B, H, N, N]`), writing every
    /// activation the backward needs into `tp` (the WKV checkpoints
    /// included); `vf` is v_first (written by layer 0, read by the others);
    /// with `dbp`, adds `Σ r rᵀ` over the first `lens[i]` rows of each
    /// sequence `i`; with `h_t`, the final WKV state `[B, H, N, N]` goes
    /// there (the final token-shift states are left in `fw.sa` / `fw.sf`).
    /// No allocation: every buffer is the workspace's.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &mut O::Buf,
        b: usize,
        t: usize,
        st: StartRef<'_, O::Buf>,
        vf: &mut O::Buf,
        tp: &mut Tape<O::Buf>,
        fw: &mut FwdWs<O::Buf>,
        dbp: Option<(&mut O::Buf, &[usize])>,
        h_t: Option<&mut O::Buf>,
    ) -> Result<()> {
        self.forward_att(x, b, t, st, vf, tp, fw, dbp, h_t)?;
        let tc = b * t * self.cfg.n_embd;
        self.ops.add_n(x, &fw.att, tc)?;
        self.ops.copy(x, 0, &mut tp.x_mid, 0, tc)?;
        self.forward_ffn(x, b, t, st, tp, fw)
    }

    /// The time mix of [`Self::forward`]: leaves its output (what the layer
    /// adds to `x`, which is not modified) in `fw.att`, the WKV output
    /// before the GroupNorm in `tp.y`, the gated GroupNorm output in
    /// `fw.out` and the decay in `tp.wdec`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_att(
        &self,
        x: &O::Buf,
        b: usize,
        t: usize,
        st: StartRef<'_, O::Buf>,
        vf: &mut O::Buf,
        tp: &mut Tape<O::Buf>,
        fw: &mut FwdWs<O::Buf>,
        dbp: Option<(&mut O::Buf, &[usize])>,
        h_t: Option<&mut O::Buf>,
    ) -> Result<()> {
        use LoraTarget as T;
        let (cfg, o, ly, l) = (self.cfg, self.ops, self.ly, self.l);
        let (c, h, n) = (cfg.n_embd, cfg.n_head, cfg.head_size);
        let rows = b * t;
        let tc = rows * c;
        let (dw, da, dv, dg) = (cfg.d_w, cfg.d_a, cfg.d_v, cfg.d_g);
        // ---- time mix ----
        o.layer_norm(x, 0, rows, c, &ly.ln1.0, &ly.ln1.1, LN_EPS, &mut fw.xa)?;
        o.copy(st.sa, 0, &mut fw.sa, 0, b * c)?;
        o.token_shift_b(b, t, c, &fw.xa, &mut fw.sa, &ly.mu6, 6, &mut fw.mix)?;
        let ld = 6 * c;
        let mix = &fw.mix;
        self.lin(
            T::R,
            (mix, 0, ld),
            (rows, t),
            &ly.r,
            c,
            c,
            &mut tp.r,
            &mut fw.lora,
        )?;
        self.lin(
            T::K,
            (mix, 2 * c, ld),
            (rows, t),
            &ly.k,
            c,
            c,
            &mut tp.k,
            &mut fw.lora,
        )?;
        self.lin(
            T::V,
            (mix, 3 * c, ld),
            (rows, t),
            &ly.v,
            c,
            c,
            &mut tp.vraw,
            &mut fw.lora,
        )?;
        self.lin(
            T::W1,
            (mix, c, ld),
            (rows, t),
            &ly.w1,
            dw,
            c,
            &mut tp.hw_pre,
            &mut fw.lora,
        )?;
        o.copy(&tp.hw_pre, 0, &mut fw.hw, 0, rows * dw)?;
        o.act(Act::Tanh, &mut fw.hw, dw, None)?;
        self.lin(
            T::W2,
            (&fw.hw, 0, dw),
            (rows, t),
            &ly.w2,
            c,
            dw,
            &mut tp.wpre,
            &mut fw.lora,
        )?;
        o.copy(&tp.wpre, 0, &mut tp.wdec, 0, tc)?;
        o.act(Act::Decay, &mut tp.wdec, c, Some(&ly.w0))?;
        self.lin(
            T::A1,
            (mix, 4 * c, ld),
            (rows, t),
            &ly.a1,
            da,
            c,
            &mut fw.ha,
            &mut fw.lora,
        )?;
        self.lin(
            T::A2,
            (&fw.ha, 0, da),
            (rows, t),
            &ly.a2,
            c,
            da,
            &mut tp.dapre,
            &mut fw.lora,
        )?;
        o.copy(&tp.vraw, 0, &mut tp.v, 0, tc)?;
        if l == 0 {
            o.copy(&tp.vraw, 0, vf, 0, tc)?;
        } else if let Some((v0, v1, v2)) = &ly.vres {
            let dvpre = tp
                .dvpre
                .as_mut()
                .ok_or_else(|| Error::Tune("internal: no value-residual buffer".into()))?;
            self.lin(
                T::V1,
                (mix, 3 * c, ld),
                (rows, t),
                v1,
                dv,
                c,
                &mut fw.hv,
                &mut fw.lora,
            )?;
            self.lin(
                T::V2,
                (&fw.hv, 0, dv),
                (rows, t),
                v2,
                c,
                dv,
                dvpre,
                &mut fw.lora,
            )?;
            o.value_residual(c, &mut tp.v, vf, v0, dvpre)?;
        }
        self.lin(
            T::G1,
            (mix, 5 * c, ld),
            (rows, t),
            &ly.g1,
            dg,
            c,
            &mut tp.hg_pre,
            &mut fw.lora,
        )?;
        o.copy(&tp.hg_pre, 0, &mut fw.hg, 0, rows * dg)?;
        o.act(Act::Sigmoid, &mut fw.hg, dg, None)?;
        self.lin(
            T::G2,
            (&fw.hg, 0, dg),
            (rows, t),
            &ly.g2,
            c,
            dg,
            &mut tp.g,
            &mut fw.lora,
        )?;
        o.kk_prep(
            rows, h, n, &tp.k, &tp.dapre, &ly.a0, &ly.k_k, &ly.k_a, &mut tp.kt, &mut tp.a,
            &mut tp.b,
        )?;
        if let Some((acc, lens)) = dbp {
            for (i, &len) in lens.iter().enumerate().take(b) {
                if len > 0 {
                    o.outer_acc_rows(i * t, len.min(t), h, n, &tp.r, acc)?;
                }
            }
        }
        o.wkv_fwd_ckpt(
            b,
            t,
            h,
            n,
            [&tp.r, &tp.wdec, &tp.kt, &tp.v, &tp.a, &tp.b],
            st.wkv,
            &mut tp.y,
            &mut tp.ckpt,
            h_t,
        )?;
        // kernel-upscaled read-out: y += U φ(r)
        if let Some(ub) = self.up_bufs(st)? {
            let phi = tp
                .phi
                .as_mut()
                .ok_or_else(|| Error::Tune("internal: no upscale buffer".into()))?;
            o.up_fwd(rows, h, n, &ub, &tp.r, phi, &mut tp.y)?;
        }
        o.copy(&tp.y, 0, &mut fw.out, 0, tc)?;
        o.group_norm(
            rows,
            h,
            n,
            LN_EPS * n as f32,
            &mut fw.out,
            &ly.ln_x.0,
            &ly.ln_x.1,
            Some(BonusBufs {
                r: &tp.r,
                k: &tp.kt,
                v: &tp.v,
                r_k: &ly.r_k,
            }),
            Some(&tp.g),
        )?;
        self.lin(
            T::O,
            (&fw.out, 0, c),
            (rows, t),
            &ly.o,
            c,
            c,
            &mut fw.att,
            &mut fw.lora,
        )
    }

    /// The channel mix of [`Self::forward`] on `x` (in place), from the
    /// token-shift state `st.sf` (the final one is left in `fw.sf`).
    pub(crate) fn forward_ffn(
        &self,
        x: &mut O::Buf,
        b: usize,
        t: usize,
        st: StartRef<'_, O::Buf>,
        tp: &mut Tape<O::Buf>,
        fw: &mut FwdWs<O::Buf>,
    ) -> Result<()> {
        use LoraTarget as T;
        let (cfg, o, ly) = (self.cfg, self.ops, self.ly);
        let (c, df) = (cfg.n_embd, cfg.d_ffn);
        let rows = b * t;
        let tc = rows * c;
        // ---- channel mix ----
        o.layer_norm(x, 0, rows, c, &ly.ln2.0, &ly.ln2.1, LN_EPS, &mut fw.xf)?;
        o.copy(st.sf, 0, &mut fw.sf, 0, b * c)?;
        o.token_shift_b(b, t, c, &fw.xf, &mut fw.sf, &ly.ffn_mu, 1, &mut fw.kx)?;
        self.lin(
            T::FfnKey,
            (&fw.kx, 0, c),
            (rows, t),
            &ly.fk,
            df,
            c,
            &mut tp.hpre,
            &mut fw.lora,
        )?;
        o.copy(&tp.hpre, 0, &mut fw.hid, 0, rows * df)?;
        o.act(Act::ReluSq, &mut fw.hid, df, None)?;
        self.lin(
            T::FfnValue,
            (&fw.hid, 0, df),
            (rows, t),
            &ly.fv,
            c,
            df,
            &mut fw.ffn,
            &mut fw.lora,
        )?;
        o.add_n(x, &fw.ffn, tc)
    }

    /// Backward of [`Self::forward`] over `b` sequences of `t` rows:
    /// `dx` holds ∂L/∂(layer output) and becomes ∂L/∂(layer input); `xin`
    /// is the layer input; `dvf` accumulates ∂L/∂v_first (layers ≥ 1) and
    /// is consumed by layer 0. Writes the state gradients, summed over the
    /// batch, into `g` (`sa`, `sf` `[C]`, `wkv` `[H, N, N]`; `u` `+=`).
    /// `fw` must hold this layer's forward over the same batch (the GEMM
    /// inputs the LoRA gradients read); with adapters, their gradients are
    /// added into `lg`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        tp: &Tape<O::Buf>,
        xin: &O::Buf,
        st: StartRef<'_, O::Buf>,
        vf: &O::Buf,
        dx: &mut O::Buf,
        b: usize,
        t: usize,
        dvf: &mut O::Buf,
        g: &mut LStart<O::Buf>,
        w: &mut BwdWs<O::Buf>,
        fw: &mut FwdWs<O::Buf>,
        mut lg: Option<&mut LoraPairs<O::Buf>>,
        mut sg: Option<&mut SdtTensors<O::Buf>>,
    ) -> Result<()> {
        use LoraTarget as T;
        let (cfg, o, ly, l) = (self.cfg, self.ops, self.ly, self.l);
        let mt = self.mt.ok_or_else(|| {
            Error::Tune("internal: a layer without a transposed GEMM has no backward".into())
        })?;
        let (c, h, n) = (cfg.n_embd, cfg.n_head, cfg.head_size);
        let (dwd, dad, dvd, dgd, df) = (cfg.d_w, cfg.d_a, cfg.d_v, cfg.d_g, cfg.d_ffn);
        let rows = b * t;
        let tc = rows * c;
        let hnn = h * n * n;
        // ---- channel mix ----
        mt(o, dx, rows, &ly.fv, c, df, &mut w.dh)?;
        let p = lb(&*dx, &fw.hid, 0, df, c, df);
        self.lin_bwd(T::FfnValue, (rows, t), p, &mut w.dh, &mut fw.lora, &mut lg)?;
        o.act_bwd(Act::ReluSq, rows * df, df, &tp.hpre, None, &mut w.dh)?;
        mt(o, &w.dh, rows, &ly.fk, df, c, &mut w.dkx)?;
        let p = lb(&w.dh, &fw.kx, 0, c, df, c);
        self.lin_bwd(T::FfnKey, (rows, t), p, &mut w.dkx, &mut fw.lora, &mut lg)?;
        o.zero(&mut w.dsf)?;
        o.token_shift_bwd_b(b, t, c, &[&w.dkx], &ly.ffn_mu, &mut w.dsf, &mut w.dxf)?;
        o.sum_batch(b, c, &w.dsf, &mut g.sf, false)?;
        o.layer_norm_bwd(&tp.x_mid, 0, rows, c, &ly.ln2.0, LN_EPS, &w.dxf, dx)?;
        // ---- output projection, GroupNorm, bonus, gate ----
        mt(o, dx, rows, &ly.o, c, c, &mut w.dout)?;
        let p = lb(&*dx, &fw.out, 0, c, c, c);
        self.lin_bwd(T::O, (rows, t), p, &mut w.dout, &mut fw.lora, &mut lg)?;
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
                dout: &w.dout,
            },
            GnBwdGrads {
                dy: &mut w.dy,
                dr: &mut w.dr,
                dk: &mut w.dkt,
                dv: &mut w.dv,
                dg: &mut w.dg,
            },
        )?;
        let [dm0, dm1, dm2, dm3, dm4, dm5] = &mut w.dmix;
        mt(o, &w.dg, rows, &ly.g2, c, dgd, &mut w.dhg)?;
        let p = lb(&w.dg, &fw.hg, 0, dgd, c, dgd);
        self.lin_bwd(T::G2, (rows, t), p, &mut w.dhg, &mut fw.lora, &mut lg)?;
        o.act_bwd(Act::Sigmoid, rows * dgd, dgd, &tp.hg_pre, None, &mut w.dhg)?;
        mt(o, &w.dhg, rows, &ly.g1, dgd, c, dm5)?;
        let p = lb(&w.dhg, &fw.mix, 5 * c, 6 * c, dgd, c);
        self.lin_bwd(T::G1, (rows, t), p, dm5, &mut fw.lora, &mut lg)?;
        // ---- WKV (from the forward's checkpoints) ----
        {
            let [w_r, w_w, w_k, w_v, w_a, w_b] = &mut w.wg;
            o.wkv_bwd_ckpt(
                b,
                t,
                h,
                n,
                [&tp.r, &tp.wdec, &tp.kt, &tp.v, &tp.a, &tp.b],
                st.wkv,
                &tp.ckpt,
                &w.dy,
                [w_r, w_w, w_k, w_v, w_a, w_b],
                &mut w.dh0,
                &mut w.scratch,
            )?;
        }
        // the upscaled read-out: dU (+=), and its part of dr
        if let Some(ub) = self.up_bufs(st)? {
            match (&tp.phi, g.u.as_mut()) {
                (Some(phi), Some(du)) => {
                    o.up_bwd(rows, h, n, &ub, &tp.r, phi, &w.dy, du, &mut w.dr)?
                }
                _ => {
                    return Err(Error::Tune(
                        "internal: upscale tape or gradient missing".into(),
                    ))
                }
            }
        }
        o.sum_batch(b, hnn, &w.dh0, &mut g.wkv, false)?;
        let [w_r, w_w, w_k, w_v, w_a, w_b] = &mut w.wg;
        o.add_n(&mut w.dr, w_r, tc)?;
        o.add_n(&mut w.dkt, w_k, tc)?;
        o.add_n(&mut w.dv, w_v, tc)?;
        // ---- k̃, a, b → k, α ----
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
                d_kout: &w.dkt,
                d_a: &*w_a,
                d_b: &*w_b,
            },
            &mut w.dk,
            &mut w.ddapre,
        )?;
        if let Some(sg) = sg.as_deref_mut() {
            // sparse dimension tuning: a0, k_k, k_a, r_k and a2's rows
            o.sdt_bwd(
                rows,
                h,
                n,
                &SdtBwdBufs {
                    kk: KkBwdBufs {
                        k: &tp.k,
                        da: &tp.dapre,
                        a0: &ly.a0,
                        k_k: &ly.k_k,
                        k_a: &ly.k_a,
                        d_kout: &w.dkt,
                        d_a: &*w_a,
                        d_b: &*w_b,
                    },
                    r: &tp.r,
                    kt: &tp.kt,
                    v: &tp.v,
                    g: &tp.g,
                    dout: &w.dout,
                },
                &mut *dm0,
                &mut *dm2,
                &mut *dm3,
            )?;
            let [_, sa0, skk, ska, srk, _, sa2] = sg;
            o.sum_batch(rows, c, &w.ddapre, sa0, false)?;
            o.sum_batch(rows, c, dm0, skk, false)?;
            o.sum_batch(rows, c, dm2, ska, false)?;
            o.sum_batch(rows, c, dm3, srk, false)?;
            o.matmul_tn(&w.ddapre, rows, c, &fw.ha, 0, dad, dad, sa2, false)?;
        }
        mt(o, &w.ddapre, rows, &ly.a2, c, dad, &mut w.dha)?;
        let p = lb(&w.ddapre, &fw.ha, 0, dad, c, dad);
        self.lin_bwd(T::A2, (rows, t), p, &mut w.dha, &mut fw.lora, &mut lg)?;
        mt(o, &w.dha, rows, &ly.a1, dad, c, dm4)?;
        let p = lb(&w.dha, &fw.mix, 4 * c, 6 * c, dad, c);
        self.lin_bwd(T::A1, (rows, t), p, dm4, &mut fw.lora, &mut lg)?;
        // ---- decay ----
        o.act_bwd(Act::Decay, tc, c, &tp.wpre, Some(&ly.w0), w_w)?;
        if let Some(sg) = sg {
            // sparse dimension tuning: w0 and w2's rows
            let [sw0, _, _, _, _, sw2, _] = sg;
            o.sum_batch(rows, c, w_w, sw0, false)?;
            o.matmul_tn(w_w, rows, c, &fw.hw, 0, dwd, dwd, sw2, false)?;
        }
        mt(o, w_w, rows, &ly.w2, c, dwd, &mut w.dhw)?;
        let p = lb(&*w_w, &fw.hw, 0, dwd, c, dwd);
        self.lin_bwd(T::W2, (rows, t), p, &mut w.dhw, &mut fw.lora, &mut lg)?;
        o.act_bwd(Act::Tanh, rows * dwd, dwd, &tp.hw_pre, None, &mut w.dhw)?;
        mt(o, &w.dhw, rows, &ly.w1, dwd, c, dm1)?;
        let p = lb(&w.dhw, &fw.mix, c, 6 * c, dwd, c);
        self.lin_bwd(T::W1, (rows, t), p, dm1, &mut fw.lora, &mut lg)?;
        // ---- value residual ----
        let mut res = false;
        if l == 0 {
            o.add_n(&mut w.dv, dvf, tc)?;
        } else if let (Some((v0, v1, v2)), Some(dvpre)) = (&ly.vres, &tp.dvpre) {
            o.value_residual_bwd(tc, c, &tp.vraw, vf, v0, dvpre, &mut w.dv, dvf, &mut w.ddv)?;
            mt(o, &w.ddv, rows, v2, c, dvd, &mut w.dhv)?;
            let p = lb(&w.ddv, &fw.hv, 0, dvd, c, dvd);
            self.lin_bwd(T::V2, (rows, t), p, &mut w.dhv, &mut fw.lora, &mut lg)?;
            mt(o, &w.dhv, rows, v1, dvd, c, &mut w.dres)?;
            let p = lb(&w.dhv, &fw.mix, 3 * c, 6 * c, dvd, c);
            self.lin_bwd(T::V1, (rows, t), p, &mut w.dres, &mut fw.lora, &mut lg)?;
            res = true;
        }
        // ---- projections ----
        mt(o, &w.dr, rows, &ly.r, c, c, dm0)?;
        let p = lb(&w.dr, &fw.mix, 0, 6 * c, c, c);
        self.lin_bwd(T::R, (rows, t), p, dm0, &mut fw.lora, &mut lg)?;
        mt(o, &w.dk, rows, &ly.k, c, c, dm2)?;
        let p = lb(&w.dk, &fw.mix, 2 * c, 6 * c, c, c);
        self.lin_bwd(T::K, (rows, t), p, dm2, &mut fw.lora, &mut lg)?;
        mt(o, &w.dv, rows, &ly.v, c, c, dm3)?;
        let p = lb(&w.dv, &fw.mix, 3 * c, 6 * c, c, c);
        self.lin_bwd(T::V, (rows, t), p, dm3, &mut fw.lora, &mut lg)?;
        if res {
            o.add_n(dm3, &w.dres, tc)?;
        }
        o.zero(&mut w.dsa)?;
        o.token_shift_bwd_b(
            b,
            t,
            c,
            &[&*dm0, &*dm1, &*dm2, &*dm3, &*dm4, &*dm5],
            &ly.mu6,
            &mut w.dsa,
            &mut w.dxa,
        )?;
        o.sum_batch(b, c, &w.dsa, &mut g.sa, false)?;
        o.layer_norm_bwd(xin, 0, rows, c, &ly.ln1.0, LN_EPS, &w.dxa, dx)?;
        Ok(())
    }
}
