//! WKV-7 version 3: the kernels of `kernels/wkv7_v3.cu`, in two precisions
//! that share one kernel template:
//!
//! - [`Version::V3`](super::Version::V3) (`wkv7_{fwd,bwd}_v3_*`, the default
//!   "mixed" precision),
//! - [`Version::V3Exact`](super::Version::V3Exact) (`wkv7_{fwd,bwd}_v3x_*`,
//!   "exact": the 3-term hi/lo split everywhere).
//!
//! What this module owns: the kernel names, the launch geometry (grid
//! (H, B), block 2N threads, like v2), the checkpoint interval
//! ([`CKPT_TOKENS`]: the forward saves the fp32 state every `CKPT_TOKENS`
//! tokens, so the checkpoint buffer is `[B, H, ceil(T / CKPT_TOKENS), N, N]`
//! f32; [`super::Version::chunk`] returns it) and the size of the backward
//! workspace ([`scratch_len`]). Same tensors and [`crate::params::Wkv7Params`]
//! as v1 and v2.
//!
//! **Decay bound and head sizes**: those of v2 ([`super::v2::supports`]:
//! N ∈ {32, 64}, every w ≥ [`super::v2::W_MIN`]); otherwise V1 runs
//! ([`super::Version::effective`]), exactly as for V2.
use super::{Dims, Dir};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Tokens between two saved fp32 states (`p.chunk`; `WKV7_V3_CKPT` in the
/// kernel file / the counting build).
///
/// PLACEHOLDER: 16 while `kernels/wkv7_v3.cu` is the placeholder (a copy
/// of v2); the real v3 kernel checkpoints every 64 tokens.
pub const CKPT_TOKENS: usize = 16; // PLACEHOLDER: 64 with the real kernel

/// Whether v3 can run this problem (the bound of v2, [`super::v2::supports`]).
pub use super::v2::supports;

/// Kernel symbol: `wkv7_fwd_v3_bf16_n64` (`exact`: `wkv7_fwd_v3x_bf16_n64`).
pub fn kernel_name(dir: Dir, dtype: DType, n: usize, exact: bool) -> Result<String> {
    if !matches!(n, 32 | 64) {
        return Err(Error::UnsupportedHeadSize(n));
    }
    let d = match dir {
        Dir::Fwd => "fwd",
        Dir::Bwd => "bwd",
    };
    let v = if exact { "v3x" } else { "v3" };
    Ok(format!("wkv7_{d}_{v}_{}_n{n}", dtype.kernel_name()))
}

/// Launch geometry: grid (H, B), block 2N threads (N/16 warps), as v2.
pub fn launch_dims(d: &Dims) -> ((u32, u32, u32), (u32, u32, u32)) {
    super::v2::launch_dims(d)
}

/// Elements of the backward workspace (`scratch`, f32).
///
/// PLACEHOLDER: `[B, H, N, N]` like v2 (the placeholder kernel is v2's
/// code). The real v3 backward never reads or writes `scratch`: then this
/// returns 1 (one unused element: a zero-byte device allocation fails).
pub fn scratch_len(d: &Dims) -> usize {
    d.b * d.h * d.n * d.n // PLACEHOLDER: 1 with the real kernel
}
