//! WKV-7 version 3: the kernels of `kernels/wkv7_v3.cu`, in two precisions
//! that share one kernel template:
//!
//! - [`Version::V3`](super::Version::V3) (`wkv7_{fwd,bwd}_v3_*`, the default
//!   "mixed" precision),
//! - [`Version::V3Exact`](super::Version::V3Exact) (`wkv7_{fwd,bwd}_v3x_*`,
//!   "exact": the 3-term hi/lo split everywhere).
//!
//! What this module owns: the kernel names, the launch geometry (grid
//! (H, B), block 2N threads, like v2), the checkpoint layout (the forward
//! saves the state at the start of every 16-token chunk as **bf16**: the
//! checkpoint buffer holds `[B, H, ceil(T / 16), N, N]` bf16, i.e.
//! [`ckpt_len`] f32 elements, half of v2's), the backward's dynamic shared
//! memory ([`bwd_smem_bytes`]) and the (unused) backward workspace
//! ([`scratch_len`]). Same tensors and [`crate::params::Wkv7Params`] as v1
//! and v2. Design and measurements: docs/kernels-v3.md.
//!
//! **What runs v3**: bf16 I/O, N ∈ {32, 64} and every w ≥
//! [`super::v2::W_MIN`] ([`supports`]). Otherwise [`super::Version::effective`]
//! picks v2 (f32 I/O with v2's bound) or v1.
use super::{Dims, Dir};
use crate::dtype::{DType, IoType};
use crate::error::{Error, Result};

/// Tokens per saved state (`p.chunk`): one bf16 state per 16-token chunk.
pub const CKPT_TOKENS: usize = 16;

/// Whether v3 can run this problem: bf16 I/O and the bound of v2
/// ([`super::v2::supports`]).
pub fn supports<X: IoType>(d: &Dims, w: &[X]) -> bool {
    X::DTYPE == DType::BF16 && super::v2::supports(d, w)
}

/// Elements (f32) of the checkpoint buffer: `[B, H, ceil(T / 16), N, N]` bf16.
pub fn ckpt_len(d: &Dims) -> usize {
    (d.b * d.h * d.t.div_ceil(CKPT_TOKENS) * d.n * d.n).div_ceil(2)
}

/// Dynamic shared memory of the backward kernels (`sizeof(Wkv7V3Bwd<N>)` in
/// kernels/wkv7_v3.cu; tests/wkv7_v2.rs compares it with the emulator's).
pub fn bwd_smem_bytes(n: usize) -> u32 {
    match n {
        64 => 51_008,
        32 => 26_304,
        _ => 0,
    }
}

/// Kernel symbol: `wkv7_fwd_v3_bf16_n64` (`exact`: `wkv7_fwd_v3x_bf16_n64`).
pub fn kernel_name(dir: Dir, dtype: DType, n: usize, exact: bool) -> Result<String> {
    if !matches!(n, 32 | 64) {
        return Err(Error::UnsupportedHeadSize(n));
    }
    if dtype != DType::BF16 {
        return Err(Error::Invalid(format!(
            "the v3 WKV-7 kernels take bf16 inputs only (got {dtype:?}; f32 runs v2)"
        )));
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

/// Elements of the backward workspace (`scratch`, f32): v3 does not use it;
/// 1 because a zero-byte device allocation fails.
pub fn scratch_len(_d: &Dims) -> usize {
    1
}
