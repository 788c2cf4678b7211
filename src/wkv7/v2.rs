//! WKV-7 version 2: the chunked tensor-core kernels of `kernels/wkv7_v2.cu`
//! (bf16 `mma.sync` with hi/lo-split operands, fp32 accumulation and state,
//! 16-token chunks), on the emulated backend and on a GPU.
//!
//! Same tensors, [`crate::params::Wkv7Params`] and checkpoint layout as v1; the backward
//! workspace (`scratch`) is only `[B, H, N, N]` f32. Head sizes 32 and 64.
//!
//! **Decay bound.** The chunked form divides by cumulative decay products
//! within a chunk, so v2 needs `w ≥` [`W_MIN`] (1/∏w ≤ 2¹⁶ over a chunk).
//! The x070 model guarantees `w ≥ e^{−e^{−0.5}} ≈ 0.5452`. Policy: the
//! host-data entry points ([`Backend::forward_v`](super::Backend::forward_v))
//! check the bound on the w they are given and run v1 when it does not hold
//! (or the head size is not 32/64); the device-buffer entry points
//! (`super::cuda::forward_dev_v`, `super::cuda::launch_raw_v`) trust the
//! caller. Launching is the shared code of `super::emu` and `super::cuda`,
//! parameterised by [`super::Version`].
use super::{Dims, Dir};
use crate::dtype::{DType, IoType};
use crate::error::{Error, Result};

/// Tokens per chunk of the v2 kernels (`WKV7_V2_CHUNK` in kernels/wkv7_v2.cu).
pub const CHUNK: usize = 16;

/// Smallest decay v2 accepts (the model's bound is ≈ 0.5452).
pub const W_MIN: f32 = 0.5;

/// Whether v2 can run this problem: head size 32 or 64 and every decay in
/// `[W_MIN, 1]` (NaN fails).
pub fn supports<X: IoType>(d: &Dims, w: &[X]) -> bool {
    matches!(d.n, 32 | 64)
        && w.iter().all(|e| {
            let x = e.to_f32();
            (W_MIN..=1.0).contains(&x)
        })
}

/// Kernel symbol: `wkv7_fwd_v2_bf16_n64`.
pub fn kernel_name(dir: Dir, dtype: DType, n: usize) -> Result<String> {
    if !matches!(n, 32 | 64) {
        return Err(Error::UnsupportedHeadSize(n));
    }
    let d = match dir {
        Dir::Fwd => "fwd",
        Dir::Bwd => "bwd",
    };
    Ok(format!("wkv7_{d}_v2_{}_n{n}", dtype.kernel_name()))
}

/// Launch geometry: grid (H, B), block 2N threads (N/16 warps).
pub fn launch_dims(d: &Dims) -> ((u32, u32, u32), (u32, u32, u32)) {
    ((d.h as u32, d.b as u32, 1), (2 * d.n as u32, 1, 1))
}

/// Elements of the backward workspace: `[B, H, N, N]` f32.
pub fn scratch_len(d: &Dims) -> usize {
    d.b * d.h * d.n * d.n
}
