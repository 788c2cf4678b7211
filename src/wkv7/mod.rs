//! The WKV-7 recurrence: the public API with its shape checks, and one
//! implementation per backend.
//!
//! | backend | module | what runs |
//! |---|---|---|
//! | [`Backend::Cpu`] | [`reference`](mod@reference) | Rust loops (f32 here; f64 available for tests) |
//! | `Backend::Emu` (feature `emu`) | `emu` | `kernels/wkv7_v1.cu` compiled for the CPU (emulation header) |
//! | `Backend::Cuda` (feature `cuda`) | `cuda` | `kernels/wkv7_v1.cu` on an NVIDIA GPU through cudarc |
//!
//! Shapes and layouts (every backend):
//!
//! ```text
//! r, w, k, v, a, b, y, dy, dr, dw, dk, dv, da, db : [B, T, H, N]  dtype X (f32 | bf16)
//! h0, h_t, dh_t, dh0                              : [B, H, N, N]  f32, value-major
//!                                                   (row = value index i, column = key index j)
//! S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_tᵀ + v_t k_tᵀ,   y_t = S_t r_t
//! ```
//!
//! w is the per-step decay in (0, 1] (not a log or logit). The v1 kernels and
//! the reference never divide by w, so no lower bound on w is needed.
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "emu")]
pub mod emu;
#[cfg(feature = "model")]
pub mod fast;
pub mod reference;
#[doc(hidden)]
pub mod testdata;
pub mod v2;
pub mod v3;

use crate::dtype::IoType;
use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use std::sync::Arc;

/// Problem sizes: batch B, sequence length T, heads H, head size N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Batch size B.
    pub b: usize,
    /// Sequence length T.
    pub t: usize,
    /// Number of heads H.
    pub h: usize,
    /// Head size N (the kernels take 32, 64 or 128).
    pub n: usize,
}

impl Dims {
    /// `[B, T, H, N]`
    pub fn seq_shape(&self) -> Vec<usize> {
        vec![self.b, self.t, self.h, self.n]
    }
    /// `[B, H, N, N]`
    pub fn state_shape(&self) -> Vec<usize> {
        vec![self.b, self.h, self.n, self.n]
    }
    /// Elements of a `[B, T, H, N]` tensor.
    pub fn seq_len(&self) -> usize {
        self.b * self.t * self.h * self.n
    }
    /// Elements of a `[B, H, N, N]` tensor.
    pub fn state_len(&self) -> usize {
        self.b * self.h * self.n * self.n
    }
    /// All sizes ≥ 1 and small enough for the kernels' 32-bit sizes.
    pub fn validate(&self) -> Result<()> {
        if self.b == 0 || self.t == 0 || self.h == 0 || self.n == 0 {
            return Err(Error::Invalid(format!(
                "WKV-7 sizes must all be at least 1, got B={} T={} H={} N={}",
                self.b, self.t, self.h, self.n
            )));
        }
        let big = [self.b, self.t, self.h, self.n]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x));
        match big {
            Some(e)
                if e <= (1usize << 40)
                    && self.t <= i32::MAX as usize
                    && self.b * self.h <= 65535 * 65535 =>
            {
                Ok(())
            }
            _ => Err(Error::Invalid(format!(
                "WKV-7 problem too large: B={} T={} H={} N={}",
                self.b, self.t, self.h, self.n
            ))),
        }
    }
}

/// Checks that `data` has exactly the elements of `shape`, naming the tensor.
pub(crate) fn check_len<T>(name: &str, data: &[T], shape: &[usize]) -> Result<()> {
    let want: usize = shape.iter().product();
    if data.len() != want {
        return Err(Error::Shape {
            name: name.to_string(),
            expected: shape.to_vec(),
            got: vec![data.len()],
        });
    }
    Ok(())
}

/// Forward inputs. r … b `[B, T, H, N]`; h0 `[B, H, N, N]` (None = zero state).
#[derive(Clone, Copy)]
pub struct Inputs<'a, X> {
    /// Receptance `[B, T, H, N]`.
    pub r: &'a [X],
    /// Per-step decay in (0, 1] `[B, T, H, N]`.
    pub w: &'a [X],
    /// Key `[B, T, H, N]`.
    pub k: &'a [X],
    /// Value `[B, T, H, N]`.
    pub v: &'a [X],
    /// In-context learning term `a` (the model passes −κ̂) `[B, T, H, N]`.
    pub a: &'a [X],
    /// In-context learning term `b` (the model passes κ̂ ⊙ α) `[B, T, H, N]`.
    pub b: &'a [X],
    /// Initial state `[B, H, N, N]` (None = zero).
    pub h0: Option<&'a [f32]>,
}

impl<X> Inputs<'_, X> {
    /// Checks every length against `d`, naming the first tensor that is wrong.
    pub fn check(&self, d: &Dims) -> Result<()> {
        d.validate()?;
        let s = d.seq_shape();
        for (name, t) in [
            ("r", self.r),
            ("w", self.w),
            ("k", self.k),
            ("v", self.v),
            ("a", self.a),
            ("b", self.b),
        ] {
            check_len(name, t, &s)?;
        }
        if let Some(h0) = self.h0 {
            check_len("h0", h0, &d.state_shape())?;
        }
        Ok(())
    }
}

/// Backward inputs: dy `[B, T, H, N]`; dh_t `[B, H, N, N]` (None = zero).
#[derive(Clone, Copy)]
pub struct GradInputs<'a, X> {
    /// Gradient of the loss with respect to y `[B, T, H, N]`.
    pub dy: &'a [X],
    /// Gradient on the final state `[B, H, N, N]` (None = zero).
    pub dh_t: Option<&'a [f32]>,
}

impl<X> GradInputs<'_, X> {
    /// Checks every length against `d`.
    pub fn check(&self, d: &Dims) -> Result<()> {
        check_len("dy", self.dy, &d.seq_shape())?;
        if let Some(g) = self.dh_t {
            check_len("dh_t", g, &d.state_shape())?;
        }
        Ok(())
    }
}

/// Forward outputs: y `[B, T, H, N]`, h_t `[B, H, N, N]`.
#[derive(Clone, Debug)]
pub struct Outputs<X> {
    /// Output `[B, T, H, N]`.
    pub y: Vec<X>,
    /// Final state `[B, H, N, N]`.
    pub h_t: Vec<f32>,
}

/// Gradients: dr … db `[B, T, H, N]`, dh0 `[B, H, N, N]`.
#[derive(Clone, Debug)]
pub struct Grads<X> {
    /// Gradient of r.
    pub dr: Vec<X>,
    /// Gradient of w.
    pub dw: Vec<X>,
    /// Gradient of k.
    pub dk: Vec<X>,
    /// Gradient of v.
    pub dv: Vec<X>,
    /// Gradient of a.
    pub da: Vec<X>,
    /// Gradient of b.
    pub db: Vec<X>,
    /// Gradient of the initial state `[B, H, N, N]`.
    pub dh0: Vec<f32>,
}

/// Where the recurrence runs.
#[derive(Clone)]
pub enum Backend {
    /// The Rust reference in f32 (multi-threaded over (b, h)).
    Cpu,
    /// The CUDA kernel source run on the CPU under the emulation header.
    #[cfg(feature = "emu")]
    Emu,
    /// The CUDA kernels on a GPU.
    #[cfg(feature = "cuda")]
    Cuda(Arc<crate::cuda::Gpu>),
}

impl Backend {
    /// Parses `cpu`, `emu` or `cuda` (GPU 0).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "cpu" => Ok(Backend::Cpu),
            #[cfg(feature = "emu")]
            "emu" => Ok(Backend::Emu),
            #[cfg(feature = "cuda")]
            "cuda" => Ok(Backend::Cuda(Arc::new(crate::cuda::Gpu::new(0)?))),
            other => Err(Error::Invalid(format!(
                "unknown backend `{other}` (expected cpu, emu or cuda)"
            ))),
        }
    }

    /// Short name of the backend.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            #[cfg(feature = "emu")]
            Backend::Emu => "emu",
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => "cuda",
        }
    }

    /// Forward pass on host data.
    pub fn forward<X: IoType>(&self, d: &Dims, x: &Inputs<X>) -> Result<Outputs<X>> {
        x.check(d)?;
        match self {
            Backend::Cpu => {
                let f = widen(x);
                let (y, h_t) = reference::forward(d, &f.as_ref())?;
                Ok(Outputs {
                    y: y.into_iter().map(X::from_f32).collect(),
                    h_t,
                })
            }
            #[cfg(feature = "emu")]
            Backend::Emu => emu::forward(Version::V1, d, x),
            #[cfg(feature = "cuda")]
            Backend::Cuda(gpu) => cuda::forward_host(gpu, Version::V1, d, x),
        }
    }

    /// Forward and backward on host data.
    pub fn forward_backward<X: IoType>(
        &self,
        d: &Dims,
        x: &Inputs<X>,
        g: &GradInputs<X>,
    ) -> Result<(Outputs<X>, Grads<X>)> {
        x.check(d)?;
        g.check(d)?;
        match self {
            Backend::Cpu => {
                let f = widen(x);
                let fr = f.as_ref();
                let (y, h_t) = reference::forward(d, &fr)?;
                let dy: Vec<f32> = g.dy.iter().map(|e| e.to_f32()).collect();
                let gr = reference::backward(d, &fr, &dy, g.dh_t)?;
                let n = |v: Vec<f32>| v.into_iter().map(X::from_f32).collect::<Vec<X>>();
                Ok((
                    Outputs { y: n(y), h_t },
                    Grads {
                        dr: n(gr.dr),
                        dw: n(gr.dw),
                        dk: n(gr.dk),
                        dv: n(gr.dv),
                        da: n(gr.da),
                        db: n(gr.db),
                        dh0: gr.dh0,
                    },
                ))
            }
            #[cfg(feature = "emu")]
            Backend::Emu => emu::forward_backward(Version::V1, d, x, g),
            #[cfg(feature = "cuda")]
            Backend::Cuda(gpu) => cuda::forward_backward_host(gpu, Version::V1, d, x, g),
        }
    }
}

/// f32 copies of the inputs, for the reference.
struct Widened<'a> {
    t: [Vec<f32>; 6],
    h0: Option<&'a [f32]>,
}
impl Widened<'_> {
    fn as_ref(&self) -> reference::RefInputs<'_, f32> {
        reference::RefInputs {
            r: &self.t[0],
            w: &self.t[1],
            k: &self.t[2],
            v: &self.t[3],
            a: &self.t[4],
            b: &self.t[5],
            h0: self.h0,
        }
    }
}
fn widen<'a, X: IoType>(x: &Inputs<'a, X>) -> Widened<'a> {
    let f = |s: &[X]| s.iter().map(|e| e.to_f32()).collect::<Vec<f32>>();
    Widened {
        t: [f(x.r), f(x.w), f(x.k), f(x.v), f(x.a), f(x.b)],
        h0: x.h0,
    }
}

/// Kernel version for the emu / cuda backends (the cpu backend ignores it).
///
/// `V1`: FMA kernels, any w in (0, 1]. `V2`: chunked tensor-core kernels
/// ([`v2`]), used when the head size is 32/64 and every w ≥ [`v2::W_MIN`]
/// (checked on the host data); otherwise V1 runs (see [`Version::effective`]).
/// `V3` / `V3Exact`: the kernels of `kernels/wkv7_v3.cu` ([`v3`]) in their
/// two precisions, with v2's bound and fallback.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Version {
    #[default]
    /// FMA kernels, one thread per value row, any w in (0, 1], N = 32, 64, 128.
    V1,
    /// Chunked tensor-core kernels (N = 32, 64, w ≥ `v2::W_MIN`).
    V2,
    /// The v3 kernels, default ("mixed") precision (N = 32, 64, w ≥ `v2::W_MIN`).
    V3,
    /// The v3 kernels, "exact" precision (3-term hi/lo split everywhere).
    V3Exact,
}

impl Version {
    /// Every version, in order.
    pub const ALL: [Version; 4] = [Version::V1, Version::V2, Version::V3, Version::V3Exact];

    /// `RWKV_WKV7_VERSION` = `1` / `v1` / `2` / `v2` / `3` / `v3` / `v3x`;
    /// unset = V1.
    pub fn from_env() -> Result<Self> {
        match std::env::var("RWKV_WKV7_VERSION") {
            Err(_) => Ok(Version::V1),
            Ok(s) if s.trim().is_empty() => Ok(Version::V1),
            Ok(s) => Self::parse(s.trim()).map_err(|_| {
                Error::Invalid(format!(
                    "RWKV_WKV7_VERSION={} (expected 1, 2, 3 or v3x)",
                    s.trim()
                ))
            }),
        }
    }

    /// Parses `1` / `v1`, `2` / `v2`, `3` / `v3`, `v3x` (the CLI's and the
    /// environment's spelling).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "1" | "v1" => Ok(Version::V1),
            "2" | "v2" => Ok(Version::V2),
            "3" | "v3" => Ok(Version::V3),
            "v3x" => Ok(Version::V3Exact),
            other => Err(Error::Invalid(format!(
                "unknown WKV-7 kernel version `{other}` (expected v1, v2, v3 or v3x)"
            ))),
        }
    }

    /// The short name: `v1`, `v2`, `v3`, `v3x` (what [`Version::parse`] reads).
    pub fn name(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
            Version::V3 => "v3",
            Version::V3Exact => "v3x",
        }
    }

    /// Kernel file stem (`kernels/<stem>.cu`).
    pub fn stem(self) -> &'static str {
        match self {
            Version::V1 => "wkv7_v1",
            Version::V2 => "wkv7_v2",
            Version::V3 | Version::V3Exact => "wkv7_v3",
        }
    }

    /// Kernel symbol for a direction, dtype and head size.
    pub fn kernel_name(self, dir: Dir, dtype: crate::dtype::DType, n: usize) -> Result<String> {
        match self {
            Version::V1 => kernel_name(dir, dtype, n),
            Version::V2 => v2::kernel_name(dir, dtype, n),
            Version::V3 => v3::kernel_name(dir == Dir::Bwd, dtype, n, false),
            Version::V3Exact => v3::kernel_name(dir == Dir::Bwd, dtype, n, true),
        }
    }

    /// Launch geometry: grid (H, B); block N (v1) or 2N (v2, v3).
    pub fn launch_dims(self, d: &Dims) -> ((u32, u32, u32), (u32, u32, u32)) {
        match self {
            Version::V1 => launch_dims(d),
            Version::V2 => v2::launch_dims(d),
            Version::V3 | Version::V3Exact => v3::launch_dims(d.b, d.h, d.n),
        }
    }

    /// Elements of the backward workspace: `[B, H, 18, N, N]` (v1: 17 states
    /// of a chunk + one slot of dS rows), `[B, H, N, N]` (v2) f32, or
    /// [`v3::scratch_len`] (v3).
    pub fn scratch_len(self, d: &Dims) -> usize {
        match self {
            Version::V1 => d.b * d.h * (crate::params::WKV7_V1_CHUNK + 2) * d.n * d.n,
            Version::V2 => v2::scratch_len(d),
            Version::V3 | Version::V3Exact => v3::scratch_len(),
        }
    }

    /// Tokens per saved state (`p.chunk`): 16 for v1 and v2,
    /// [`v3::CKPT_TOKENS`] for v3.
    pub fn chunk(self) -> usize {
        match self {
            Version::V1 => crate::params::WKV7_V1_CHUNK,
            Version::V2 => v2::CHUNK,
            Version::V3 | Version::V3Exact => v3::CKPT_TOKENS,
        }
    }

    /// Parameters with sizes filled in and all pointers null.
    pub fn base_params(self, d: &Dims) -> crate::params::Wkv7Params {
        crate::params::Wkv7Params {
            B: d.b as i32,
            T: d.t as i32,
            H: d.h as i32,
            N: d.n as i32,
            chunk: self.chunk() as i32,
            n_chunks: d.t.div_ceil(self.chunk()) as i32,
            ..Default::default()
        }
    }

    /// Elements (f32) of the checkpoint buffer: `[B, H, ceil(T / chunk), N, N]`
    /// f32, or for v3 the same shape in bf16 ([`v3::ckpt_len`]).
    pub fn ckpt_len(self, d: &Dims) -> usize {
        match self {
            Version::V3 | Version::V3Exact => v3::ckpt_len(d.b, d.h, d.t, d.n),
            _ => d.b * d.h * d.t.div_ceil(self.chunk()) * d.n * d.n,
        }
    }

    /// The version that actually runs for these inputs: V3 and V3Exact
    /// need bf16 I/O and v2's bound ([`v2::supports`]) and fall back to V2
    /// for f32 I/O; V2
    /// falls back to V1 when it cannot run them (head size, or a decay below
    /// the bound, [`v2::supports`]).
    pub fn effective<X: IoType>(self, d: &Dims, w: &[X]) -> Version {
        match self {
            Version::V3 | Version::V3Exact
                if X::DTYPE == crate::dtype::DType::BF16 && v2::supports(d, w) =>
            {
                self
            }
            Version::V2 | Version::V3 | Version::V3Exact if v2::supports(d, w) => Version::V2,
            _ => Version::V1,
        }
    }
}

impl Backend {
    /// [`Backend::forward`] with a kernel version (emu and cuda backends).
    pub fn forward_v<X: IoType>(
        &self,
        version: Version,
        d: &Dims,
        x: &Inputs<X>,
    ) -> Result<Outputs<X>> {
        x.check(d)?;
        match (self, version.effective(d, x.w)) {
            (_, Version::V1) => self.forward(d, x),
            #[cfg(feature = "emu")]
            (Backend::Emu, v) => emu::forward(v, d, x),
            #[cfg(feature = "cuda")]
            (Backend::Cuda(gpu), v) => cuda::forward_host(gpu, v, d, x),
            _ => self.forward(d, x),
        }
    }

    /// [`Backend::forward_backward`] with a kernel version (emu and cuda backends).
    pub fn forward_backward_v<X: IoType>(
        &self,
        version: Version,
        d: &Dims,
        x: &Inputs<X>,
        g: &GradInputs<X>,
    ) -> Result<(Outputs<X>, Grads<X>)> {
        x.check(d)?;
        g.check(d)?;
        match (self, version.effective(d, x.w)) {
            (_, Version::V1) => self.forward_backward(d, x, g),
            #[cfg(feature = "emu")]
            (Backend::Emu, v) => emu::forward_backward(v, d, x, g),
            #[cfg(feature = "cuda")]
            (Backend::Cuda(gpu), v) => cuda::forward_backward_host(gpu, v, d, x, g),
            _ => self.forward_backward(d, x, g),
        }
    }
}

/// What a benchmark times (see `crate::bench`, feature `model`): the forward, the
/// backward, or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "model", derive(serde::Serialize))]
pub enum Pass {
    /// The forward alone.
    #[cfg_attr(feature = "model", serde(rename = "forward"))]
    Forward,
    /// The backward alone (after an untimed forward saved the checkpoints).
    #[cfg_attr(feature = "model", serde(rename = "backward"))]
    Backward,
    /// The forward then the backward.
    #[cfg_attr(feature = "model", serde(rename = "forward+backward"))]
    ForwardBackward,
}

impl Pass {
    /// The name used in benchmark tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Pass::Forward => "forward",
            Pass::Backward => "backward",
            Pass::ForwardBackward => "forward+backward",
        }
    }
}

/// Which kernel: forward or backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// The forward kernel.
    Fwd,
    /// The backward kernel.
    Bwd,
}

/// Kernel symbol for a direction, dtype and head size: `wkv7_fwd_v1_bf16_n64`.
pub fn kernel_name(dir: Dir, dtype: crate::dtype::DType, n: usize) -> Result<String> {
    if !matches!(n, 32 | 64 | 128) {
        return Err(Error::UnsupportedHeadSize(n));
    }
    let d = match dir {
        Dir::Fwd => "fwd",
        Dir::Bwd => "bwd",
    };
    Ok(format!("wkv7_{d}_v1_{}_n{n}", dtype.kernel_name()))
}

/// Launch geometry of the v1 kernels: grid (H, B), block N.
pub fn launch_dims(d: &Dims) -> ((u32, u32, u32), (u32, u32, u32)) {
    ((d.h as u32, d.b as u32, 1), (d.n as u32, 1, 1))
}

/// The sizes of a filled [`crate::params::Wkv7Params`] for version `ver`,
/// checked: every size valid ([`Dims::validate`]) and `chunk` / `n_chunks`
/// those of `ver` ([`Version::base_params`] fills them). Shared by the raw
/// launches of the emulated and CUDA backends.
pub fn raw_dims(ver: Version, p: &crate::params::Wkv7Params) -> Result<Dims> {
    let size = |name: &str, x: i32| {
        usize::try_from(x).map_err(|_| Error::Invalid(format!("Wkv7Params: {name} = {x} < 0")))
    };
    let d = Dims {
        b: size("B", p.B)?,
        t: size("T", p.T)?,
        h: size("H", p.H)?,
        n: size("N", p.N)?,
    };
    d.validate()?;
    let want = ver.base_params(&d);
    if p.chunk != want.chunk || p.n_chunks != want.n_chunks {
        return Err(Error::Invalid(format!(
            "Wkv7Params: chunk = {} / n_chunks = {} do not match the {ver:?} kernels ({} / {})",
            p.chunk, p.n_chunks, want.chunk, want.n_chunks
        )));
    }
    Ok(d)
}

/// Number of saved states (chunks of [`crate::params::WKV7_V1_CHUNK`] tokens).
pub fn n_chunks(d: &Dims) -> usize {
    d.t.div_ceil(crate::params::WKV7_V1_CHUNK)
}

/// Parameters with sizes filled in and all pointers null.
pub fn base_params(d: &Dims) -> crate::params::Wkv7Params {
    Version::V1.base_params(d)
}
