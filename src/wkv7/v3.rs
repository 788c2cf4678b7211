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
//! ([`scratch_len`]). Same tensors and `Wkv7Params` as v1
//! and v2. Design and measurements: docs/kernels-v3.md.
//!
//! **What runs v3**: bf16 I/O and v2's bound (`v2::supports`: N ∈ {32, 64},
//! every w ≥ `v2::W_MIN`), checked by `Version::effective`, which otherwise
//! picks v2 (f32 I/O within v2's bound) or v1.
use crate::dtype::DType;
use crate::error::{Error, Result};

// This module takes plain sizes, not `wkv7`'s `Dims` / `Dir`: `wkv7` calls
// it, so it must not depend back on `wkv7` (tests/common/module_graph.rs).

/// Tokens per saved state (`p.chunk`): one bf16 state per 16-token chunk.
pub const CKPT_TOKENS: usize = 16;

/// Elements (f32) of the checkpoint buffer of `[b, h, ceil(t / 16), n, n]`
/// bf16 states.
pub fn ckpt_len(b: usize, h: usize, t: usize, n: usize) -> usize {
    (b * h * t.div_ceil(CKPT_TOKENS) * n * n).div_ceil(2)
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

/// Kernel symbol: `wkv7_fwd_v3_bf16_n64` (`exact`: `wkv7_fwd_v3x_bf16_n64`);
/// `backward` selects `wkv7_bwd_*`.
pub fn kernel_name(backward: bool, dtype: DType, n: usize, exact: bool) -> Result<String> {
    if !matches!(n, 32 | 64) {
        return Err(Error::UnsupportedHeadSize(n));
    }
    if dtype != DType::BF16 {
        return Err(Error::Invalid(format!(
            "the v3 WKV-7 kernels take bf16 inputs only (got {dtype:?}; f32 runs v2)"
        )));
    }
    let d = if backward { "bwd" } else { "fwd" };
    let v = if exact { "v3x" } else { "v3" };
    Ok(format!("wkv7_{d}_{v}_{}_n{n}", dtype.kernel_name()))
}

/// Launch geometry: grid (H, B), block 2N threads (N/16 warps), as v2.
pub fn launch_dims(b: usize, h: usize, n: usize) -> ((u32, u32, u32), (u32, u32, u32)) {
    ((h as u32, b as u32, 1), (2 * n as u32, 1, 1))
}

/// Elements of the backward workspace (`scratch`, f32): v3 does not use it;
/// 1 because a zero-byte device allocation fails.
pub fn scratch_len() -> usize {
    1
}
