//! Entry points of the kernels compiled for the CPU under
//! `kernels/emu/cuda_emu.h` (see build.rs), looked up by kernel name.
//!
//! Each entry runs a whole grid on the calling thread (one block at a time,
//! one user-space fiber per CUDA thread, see docs/emulation.md) and returns
//! 0, or non-zero when a barrier diverged (the watchdog), the launch geometry
//! was invalid or the fiber stacks could not be mapped.
use crate::error::{Error, Result};
use crate::params::{EmuTestParams, MmaTestParams, Wkv7Params};

/// Signature of an emulated kernel entry: grid xyz, block xyz, dynamic shared memory, params.
pub type EmuFn<P> = unsafe extern "C" fn(u32, u32, u32, u32, u32, u32, u32, *const P) -> i32;

macro_rules! emu_table {
    ($table:ident, $P:ty; $($kernel:literal => $sym:ident),* $(,)?) => {
        extern "C" {
            $( fn $sym(gx: u32, gy: u32, gz: u32, bx: u32, by: u32, bz: u32, smem: u32, p: *const $P) -> i32; )*
        }
        static $table: &[(&str, EmuFn<$P>)] = &[ $( ($kernel, $sym) ),* ];
    };
}

emu_table!(WKV7_V1, Wkv7Params;
    "wkv7_fwd_v1_f32_n32" => emu_wkv7_fwd_v1_f32_n32,
    "wkv7_fwd_v1_f32_n64" => emu_wkv7_fwd_v1_f32_n64,
    "wkv7_fwd_v1_f32_n128" => emu_wkv7_fwd_v1_f32_n128,
    "wkv7_fwd_v1_bf16_n32" => emu_wkv7_fwd_v1_bf16_n32,
    "wkv7_fwd_v1_bf16_n64" => emu_wkv7_fwd_v1_bf16_n64,
    "wkv7_fwd_v1_bf16_n128" => emu_wkv7_fwd_v1_bf16_n128,
    "wkv7_bwd_v1_f32_n32" => emu_wkv7_bwd_v1_f32_n32,
    "wkv7_bwd_v1_f32_n64" => emu_wkv7_bwd_v1_f32_n64,
    "wkv7_bwd_v1_f32_n128" => emu_wkv7_bwd_v1_f32_n128,
    "wkv7_bwd_v1_bf16_n32" => emu_wkv7_bwd_v1_bf16_n32,
    "wkv7_bwd_v1_bf16_n64" => emu_wkv7_bwd_v1_bf16_n64,
    "wkv7_bwd_v1_bf16_n128" => emu_wkv7_bwd_v1_bf16_n128,
);

emu_table!(WKV7_V2, Wkv7Params;
    "wkv7_fwd_v2_f32_n32" => emu_wkv7_fwd_v2_f32_n32,
    "wkv7_fwd_v2_f32_n64" => emu_wkv7_fwd_v2_f32_n64,
    "wkv7_fwd_v2_bf16_n32" => emu_wkv7_fwd_v2_bf16_n32,
    "wkv7_fwd_v2_bf16_n64" => emu_wkv7_fwd_v2_bf16_n64,
    "wkv7_bwd_v2_f32_n32" => emu_wkv7_bwd_v2_f32_n32,
    "wkv7_bwd_v2_f32_n64" => emu_wkv7_bwd_v2_f32_n64,
    "wkv7_bwd_v2_bf16_n32" => emu_wkv7_bwd_v2_bf16_n32,
    "wkv7_bwd_v2_bf16_n64" => emu_wkv7_bwd_v2_bf16_n64,
);

emu_table!(WKV7_V3, Wkv7Params;
    "wkv7_fwd_v3_bf16_n32" => emu_wkv7_fwd_v3_bf16_n32,
    "wkv7_fwd_v3_bf16_n64" => emu_wkv7_fwd_v3_bf16_n64,
    "wkv7_bwd_v3_bf16_n32" => emu_wkv7_bwd_v3_bf16_n32,
    "wkv7_bwd_v3_bf16_n64" => emu_wkv7_bwd_v3_bf16_n64,
);

emu_table!(WKV7_V3X, Wkv7Params;
    "wkv7_fwd_v3x_bf16_n32" => emu_wkv7_fwd_v3x_bf16_n32,
    "wkv7_fwd_v3x_bf16_n64" => emu_wkv7_fwd_v3x_bf16_n64,
    "wkv7_bwd_v3x_bf16_n32" => emu_wkv7_bwd_v3x_bf16_n32,
    "wkv7_bwd_v3x_bf16_n64" => emu_wkv7_bwd_v3x_bf16_n64,
);

emu_table!(MMA_SELFTEST, MmaTestParams;
    "mma_selftest" => emu_mma_selftest,
);

emu_table!(SELFTEST, EmuTestParams;
    "emu_selftest_reduce" => emu_emu_selftest_reduce,
    "emu_selftest_divergent" => emu_emu_selftest_divergent,
    "emu_selftest_divergent_shfl" => emu_emu_selftest_divergent_shfl,
);

extern "C" {
    fn emu_set_watchdog_ms(ms: std::os::raw::c_long);
    fn emu_last_counters(out: *mut u64, n: i32) -> i32;
    fn emu_wkv7_v3_bwd_smem(n: i32) -> i32;
}

#[doc(hidden)] // for tests/wkv7_v2.rs
/// `sizeof` the v3 backward's shared memory at head size `n` (32, 64; else
/// 0), as the kernel file compiles it.
pub fn wkv7_v3_bwd_smem(n: usize) -> u32 {
    // SAFETY: a pure function of its argument, no memory touched.
    unsafe { emu_wkv7_v3_bwd_smem(n as i32) as u32 }
}

/// Execution counters of one emulated launch, counted by the emulator
/// (`kernels/emu/cuda_emu.h`; docs/emulation.md, "Counters").
///
/// Exact for what each field names, for the launch as run (every CTA of its
/// grid): warp-level instructions are counted once per warp, barriers once
/// per completion per CTA. Shared-memory wavefronts and global bytes are not
/// counted yet (docs/emulation.md says what is missing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmuCounters {
    /// Blocks (CTAs) run.
    pub ctas: u64,
    /// Threads per block.
    pub threads_per_cta: u64,
    /// Completed `__syncthreads()`, summed over the CTAs.
    pub block_barriers: u64,
    /// Completed `__syncwarp()` called by kernel code, per warp.
    pub warp_syncs: u64,
    /// `__shfl_*_sync` warp instructions.
    pub shuffles: u64,
    /// `mma.sync.m16n8k16` (bf16) warp instructions (kernels/mma.cuh).
    pub mma_m16n8k16: u64,
    /// Fiber switches the emulator made (its own cost, not a GPU quantity).
    pub fiber_switches: u64,
}

/// The counters of the last emulated launch made by the calling thread
/// (all zero before its first launch).
pub fn last_counters() -> EmuCounters {
    let mut v = [0u64; 7];
    // SAFETY: the emulator writes at most `v.len()` values into `v`, a live
    // local array; it reads only a thread-local copy.
    unsafe { emu_last_counters(v.as_mut_ptr(), v.len() as i32) };
    EmuCounters {
        ctas: v[0],
        threads_per_cta: v[1],
        block_barriers: v[2],
        warp_syncs: v[3],
        shuffles: v[4],
        mma_m16n8k16: v[5],
        fiber_switches: v[6],
    }
}

/// Sets the emulator's watchdog time (default 20 s, or env
/// `RWKV_EMU_WATCHDOG_MS`). A barrier that can never complete fails the
/// launch at once; an emulated thread that runs for max(this, 5 s) without
/// reaching a barrier or its end (a spin-wait) aborts the process with a
/// message instead of hanging it.
pub fn set_watchdog_ms(ms: u32) {
    // SAFETY: stores into an atomic inside the emulator; no other effect.
    unsafe { emu_set_watchdog_ms(ms.max(1) as std::os::raw::c_long) }
}

/// Runs the emulated WKV-7 kernel `kernel` over `grid` × `block`.
///
/// # Safety
/// Every non-null pointer in `p` must point to host memory of the size its
/// field documents in `kernels/params.h` for the sizes in `p`, valid for the
/// duration of the call, with output buffers not aliased by anything else.
pub unsafe fn launch_wkv7(
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    p: &Wkv7Params,
) -> Result<()> {
    let table = if kernel.contains("_v2_") {
        WKV7_V2
    } else if kernel.contains("_v3_") {
        WKV7_V3
    } else if kernel.contains("_v3x_") {
        WKV7_V3X
    } else {
        WKV7_V1
    };
    // SAFETY: forwarded from the caller.
    unsafe { launch(table, kernel, grid, block, p) }
}

#[doc(hidden)] // for tests/mma_emu.rs and tests/emu_selftest.rs only
/// Runs the tensor-core helper self-test kernel (`kernels/mma_selftest.cu`)
/// on one warp.
///
/// # Safety
/// `p.a` must hold 256 floats, `p.b` 128 (modes 0, 1) or 384 (mode 2),
/// `p.c` and `p.out` 128 floats each, alive for the call.
pub unsafe fn launch_mma_selftest(p: &MmaTestParams) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { launch(MMA_SELFTEST, "mma_selftest", (1, 1, 1), (32, 1, 1), p) }
}

#[doc(hidden)] // for tests/mma_emu.rs and tests/emu_selftest.rs only
/// Runs an emulator self-test kernel (`kernels/emu_selftest.cu`).
///
/// # Safety
/// As for [`launch_wkv7`]: `p.x` must hold `p.n` floats and `p.out` 3 floats.
pub unsafe fn launch_selftest(
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    p: &EmuTestParams,
) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { launch(SELFTEST, kernel, grid, block, p) }
}

/// # Safety
/// The buffers behind `p` must match what `kernel` reads and writes.
unsafe fn launch<P>(
    table: &[(&str, EmuFn<P>)],
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    p: &P,
) -> Result<()> {
    let f = table
        .iter()
        .find(|(n, _)| *n == kernel)
        .map(|(_, f)| *f)
        .ok_or_else(|| Error::Emu {
            kernel: kernel.to_string(),
            reason: "no such emulated kernel".into(),
        })?;
    // SAFETY: the caller guarantees the buffers behind `p`; `p` itself is a
    // valid reference that outlives the synchronous call.
    let rc = unsafe { f(grid.0, grid.1, grid.2, block.0, block.1, block.2, 0, p) };
    match rc {
        0 => Ok(()),
        1 => Err(Error::Emu {
            kernel: kernel.into(),
            reason: "watchdog: a barrier timed out or diverged (kernel hang)".into(),
        }),
        2 => Err(Error::Emu {
            kernel: kernel.into(),
            reason: "invalid launch configuration".into(),
        }),
        4 => Err(Error::Emu {
            kernel: kernel.into(),
            reason: "could not map the emulator's fiber stacks".into(),
        }),
        c => Err(Error::Emu {
            kernel: kernel.into(),
            reason: format!("kernel raised an exception (code {c})"),
        }),
    }
}

// ---- model element-wise / normalisation kernels (kernels/model_ops.cu) ----

/// A kernel parameter struct whose emulated kernels are listed in a table.
pub trait EmuParams: Sized + 'static {
    /// (kernel name, emulated entry) for every kernel taking `Self`.
    fn table() -> &'static [(&'static str, EmuFn<Self>)];
}

macro_rules! emu_ops_table {
    ($table:ident, $P:ty; $($kernel:literal => $sym:ident),* $(,)?) => {
        emu_table!($table, $P; $($kernel => $sym),*);
        impl EmuParams for $P {
            fn table() -> &'static [(&'static str, EmuFn<Self>)] {
                $table
            }
        }
    };
}

emu_ops_table!(OPS_LAYER_NORM, crate::params::LayerNormParams;
    "ops_layer_norm_f32" => emu_ops_layer_norm_f32);
emu_ops_table!(OPS_GROUP_NORM, crate::params::GroupNormParams;
    "ops_group_norm_f32" => emu_ops_group_norm_f32);
emu_ops_table!(OPS_KK_PREP, crate::params::KkPrepParams;
    "ops_kk_prep_f32" => emu_ops_kk_prep_f32);
emu_ops_table!(OPS_TOKEN_SHIFT, crate::params::TokenShiftParams;
    "ops_token_shift_f32" => emu_ops_token_shift_f32);
emu_ops_table!(OPS_ACT, crate::params::ActParams;
    "ops_act_f32" => emu_ops_act_f32);
emu_ops_table!(OPS_VALUE_RESIDUAL, crate::params::ValueResidualParams;
    "ops_value_residual_f32" => emu_ops_value_residual_f32);
emu_ops_table!(OPS_ADD, crate::params::AddParams;
    "ops_add_f32" => emu_ops_add_f32);
emu_ops_table!(OPS_EMBED, crate::params::EmbedParams;
    "ops_embed_f32" => emu_ops_embed_f32);
emu_ops_table!(OPS_F32_TO_BF16, crate::params::F32ToBf16Params;
    "ops_f32_to_bf16" => emu_ops_f32_to_bf16);

// backward / optimizer kernels of state tuning (kernels/tune_ops.cu)
emu_ops_table!(TUNE_LAYER_NORM_BWD, crate::params::LayerNormBwdParams;
    "tune_layer_norm_bwd_f32" => emu_tune_layer_norm_bwd_f32);
emu_ops_table!(TUNE_TOKEN_SHIFT_BWD, crate::params::TokenShiftBwdParams;
    "tune_token_shift_bwd_f32" => emu_tune_token_shift_bwd_f32);
emu_ops_table!(TUNE_ACT_BWD, crate::params::ActBwdParams;
    "tune_act_bwd_f32" => emu_tune_act_bwd_f32);
emu_ops_table!(TUNE_KK_PREP_BWD, crate::params::KkPrepBwdParams;
    "tune_kk_prep_bwd_f32" => emu_tune_kk_prep_bwd_f32);
emu_ops_table!(TUNE_VALUE_RESIDUAL_BWD, crate::params::ValueResidualBwdParams;
    "tune_value_residual_bwd_f32" => emu_tune_value_residual_bwd_f32);
emu_ops_table!(TUNE_GROUP_NORM_BWD, crate::params::GroupNormBwdParams;
    "tune_group_norm_bwd_f32" => emu_tune_group_norm_bwd_f32);
emu_ops_table!(TUNE_XENT, crate::params::XentParams;
    "tune_xent_f32" => emu_tune_xent_f32);
emu_ops_table!(TUNE_SOFTMAX, crate::params::SoftmaxParams;
    "tune_softmax_f32" => emu_tune_softmax_f32);
emu_ops_table!(TUNE_OUTER_ACC, crate::params::OuterAccParams;
    "tune_outer_acc_f32" => emu_tune_outer_acc_f32);
emu_ops_table!(TUNE_UP_FWD, crate::params::UpFwdParams;
    "tune_up_fwd_f32" => emu_tune_up_fwd_f32);
emu_ops_table!(TUNE_UP_BWD, crate::params::UpBwdParams;
    "tune_up_bwd_dr_f32" => emu_tune_up_bwd_dr_f32,
    "tune_up_bwd_du_f32" => emu_tune_up_bwd_du_f32);
emu_ops_table!(TUNE_BATCHED_MATMUL, crate::params::BatchedMatmulParams;
    "tune_batched_matmul_f32" => emu_tune_batched_matmul_f32);
emu_ops_table!(TUNE_ADAM, crate::params::AdamParams;
    "tune_adam_f32" => emu_tune_adam_f32);
emu_ops_table!(TUNE_SUMSQ, crate::params::SumsqParams;
    "tune_sumsq_f32" => emu_tune_sumsq_f32);
emu_ops_table!(TUNE_DBP_STEP, crate::params::DbpStepParams;
    "tune_dbp_step_f32" => emu_tune_dbp_step_f32);
emu_ops_table!(TUNE_EYE_AXPY, crate::params::EyeAxpyParams;
    "tune_eye_axpy_f32" => emu_tune_eye_axpy_f32);
emu_ops_table!(TUNE_LORA_IN, crate::params::LoraInParams;
    "tune_lora_in_f32" => emu_tune_lora_in_f32);
emu_ops_table!(TUNE_SDT_BWD, crate::params::SdtBwdParams;
    "tune_sdt_bwd_f32" => emu_tune_sdt_bwd_f32);
emu_ops_table!(TUNE_MASK_MUL, crate::params::MaskMulParams;
    "tune_mask_mul_f32" => emu_tune_mask_mul_f32);
emu_ops_table!(TUNE_REDUCE, crate::params::ReduceParams;
    "tune_reduce_f32" => emu_tune_reduce_f32);
emu_ops_table!(TUNE_SUM_BATCH, crate::params::SumBatchParams;
    "tune_sum_batch_f32" => emu_tune_sum_batch_f32);

// token reduction (kernels/reduce_ops.cu)
emu_ops_table!(RED_SCORE, crate::params::TokScoreParams;
    "red_score_f32" => emu_red_score_f32);
emu_ops_table!(RED_MATCH, crate::params::TokMatchParams;
    "red_match_f32" => emu_red_match_f32);
emu_ops_table!(RED_GATHER, crate::params::TokGatherParams;
    "red_gather_f32" => emu_red_gather_f32);

/// Runs the emulated model-op kernel `kernel` (kernels/model_ops.cu) over
/// `grid` × `block`.
///
/// # Safety
/// Every non-null pointer in `p` must point to host memory of the size its
/// field documents in `kernels/params.h` for the sizes in `p`, valid for the
/// duration of the call; outputs may alias only where params.h allows it.
pub unsafe fn launch_ops<P: EmuParams>(
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    p: &P,
) -> Result<()> {
    // SAFETY: forwarded from the caller.
    unsafe { launch(P::table(), kernel, grid, block, p) }
}

// ---- performance counters of the WKV-7 kernels (issue 16 item 1) ----------
//
// The counting build (kernels/emu/count_wkv7.cpp, docs/emulation.md "Memory
// counters") runs one CTA of a WKV-7 kernel with every load and store
// classified and grouped into warp-level accesses. `profile_wkv7` turns two
// such runs into per-chunk and fixed counts; `estimate` is the documented
// time model; `counters_report` is what `rwkv-tune bench --backend emu
// --counters` prints.

#[cfg(emu_counting)]
extern "C" {
    fn emu_cnt_wkv7_profile(kernel: i32, bf16: i32, chunks: i32, out: *mut u64, n: i32) -> i32;
    fn emu_cnt_wkv7_ckpt_tokens(kernel: i32) -> i32;
    fn emu_cnt_selftest_banks(stride: i32, out: *mut u64, n: i32) -> i32;
}

/// Number of counters the counting build reports (enum `emu::Counter`).
const N_COUNTERS: usize = 17;

/// Counts of one CTA of a kernel (per chunk, or its fixed part), from the
/// counting build. Warp-level accesses are grouped as docs/emulation.md
/// describes; shared wavefronts follow the 32-bank / 4-byte rule.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CtaCounts {
    /// Completed `__syncthreads`.
    pub block_barriers: f64,
    /// `__shfl_*_sync` warp instructions.
    pub shuffles: f64,
    /// bf16 `mma.sync.m16n8k16` warp instructions.
    pub mma_m16n8k16: f64,
    /// Warp-level shared-memory accesses.
    pub smem_requests: f64,
    /// Their wavefronts (bank conflicts included).
    pub smem_wavefronts: f64,
    /// Global bytes read, as the threads asked for them.
    pub gmem_read_bytes: f64,
    /// Global bytes written.
    pub gmem_write_bytes: f64,
    /// Distinct 32-byte sectors per warp-level global read, summed.
    pub gmem_read_sectors: f64,
    /// The same for writes.
    pub gmem_write_sectors: f64,
    /// Accesses the counting build could not classify (should be 0).
    pub other_accesses: f64,
    /// Of `gmem_read_bytes`: bytes read from the checkpoint and scratch
    /// buffers (the kernels' workspace; the rest is the I/O tensors).
    pub gmem_aux_read_bytes: f64,
    /// Of `gmem_write_bytes`: bytes written to the checkpoint and scratch buffers.
    pub gmem_aux_write_bytes: f64,
}

impl CtaCounts {
    fn from_raw(v: &[u64; N_COUNTERS]) -> Self {
        let f = |i: usize| v[i] as f64;
        CtaCounts {
            block_barriers: f(2),
            shuffles: f(4),
            mma_m16n8k16: f(5),
            smem_requests: f(7),
            smem_wavefronts: f(8),
            gmem_read_bytes: f(10),
            gmem_write_bytes: f(11),
            gmem_read_sectors: f(12),
            gmem_write_sectors: f(13),
            other_accesses: f(14),
            gmem_aux_read_bytes: f(15),
            gmem_aux_write_bytes: f(16),
        }
    }
    fn zip(a: &Self, b: &Self, f: impl Fn(f64, f64) -> f64) -> Self {
        CtaCounts {
            block_barriers: f(a.block_barriers, b.block_barriers),
            shuffles: f(a.shuffles, b.shuffles),
            mma_m16n8k16: f(a.mma_m16n8k16, b.mma_m16n8k16),
            smem_requests: f(a.smem_requests, b.smem_requests),
            smem_wavefronts: f(a.smem_wavefronts, b.smem_wavefronts),
            gmem_read_bytes: f(a.gmem_read_bytes, b.gmem_read_bytes),
            gmem_write_bytes: f(a.gmem_write_bytes, b.gmem_write_bytes),
            gmem_read_sectors: f(a.gmem_read_sectors, b.gmem_read_sectors),
            gmem_write_sectors: f(a.gmem_write_sectors, b.gmem_write_sectors),
            other_accesses: f(a.other_accesses, b.other_accesses),
            gmem_aux_read_bytes: f(a.gmem_aux_read_bytes, b.gmem_aux_read_bytes),
            gmem_aux_write_bytes: f(a.gmem_aux_write_bytes, b.gmem_aux_write_bytes),
        }
    }
}

/// The WKV-7 kernels the counting build can profile (N = 64).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CountedKernel {
    /// `wkv7_fwd_v1_*_n64` (64 threads per CTA).
    FwdV1,
    /// `wkv7_bwd_v1_*_n64` (64 threads; run after its forward).
    BwdV1,
    /// `wkv7_fwd_v2_*_n64` (128 threads).
    FwdV2,
    /// `wkv7_bwd_v2_*_n64` (128 threads; run after its forward).
    BwdV2,
    /// `wkv7_fwd_v3_*_n64` (v3, mixed precision; 128 threads).
    FwdV3,
    /// `wkv7_bwd_v3_*_n64` (128 threads; run after its forward).
    BwdV3,
    /// `wkv7_fwd_v3x_*_n64` (v3, exact precision; 128 threads).
    FwdV3x,
    /// `wkv7_bwd_v3x_*_n64` (128 threads; run after its forward).
    BwdV3x,
}

/// The versions the counting build profiles, in report order.
const VERSION_NAMES: [&str; 4] = ["v1", "v2", "v3", "v3x"];

impl CountedKernel {
    /// All of them, in report order (the counting build's numbering).
    pub const ALL: [CountedKernel; 8] = [
        Self::FwdV1,
        Self::BwdV1,
        Self::FwdV2,
        Self::BwdV2,
        Self::FwdV3,
        Self::BwdV3,
        Self::FwdV3x,
        Self::BwdV3x,
    ];
    /// The kernel version's name (`Version::name` of `rwkv_tune::wkv7`:
    /// `v1`, `v2`, `v3`, `v3x`; this module sits below `wkv7`).
    pub fn version_name(self) -> &'static str {
        VERSION_NAMES[self.version_index()]
    }
    /// 0 (v1), 1 (v2), 2 (v3), 3 (v3x).
    fn version_index(self) -> usize {
        match self {
            Self::FwdV1 | Self::BwdV1 => 0,
            Self::FwdV2 | Self::BwdV2 => 1,
            Self::FwdV3 | Self::BwdV3 => 2,
            Self::FwdV3x | Self::BwdV3x => 3,
        }
    }
    /// Whether this is a backward kernel.
    pub fn is_backward(self) -> bool {
        matches!(self, Self::BwdV1 | Self::BwdV2 | Self::BwdV3 | Self::BwdV3x)
    }
    /// Kernel symbol for dtype `bf16` / f32 at N = 64.
    pub fn symbol(self, bf16: bool) -> String {
        let dir = if self.is_backward() { "bwd" } else { "fwd" };
        format!(
            "wkv7_{dir}_{}_{}_n64",
            self.version_name(),
            if bf16 { "bf16" } else { "f32" }
        )
    }
    /// Threads per CTA at N = 64.
    pub fn threads(self) -> u32 {
        match self {
            Self::FwdV1 | Self::BwdV1 => 64,
            _ => 128,
        }
    }
    fn index(self) -> i32 {
        Self::ALL.iter().position(|&x| x == self).unwrap_or(0) as i32
    }
}

/// Tokens per saved state (`p.chunk`) the counting build uses for `kernel`
/// (`WKV7_V3_CKPT` in kernels/emu/count_wkv7.cpp for v3; it must equal
/// `Version::chunk` of `rwkv_tune::wkv7`).
pub fn counted_ckpt_tokens(kernel: CountedKernel) -> Result<usize> {
    #[cfg(emu_counting)]
    {
        // SAFETY: a pure function of its argument in the counting build.
        let n = unsafe { emu_cnt_wkv7_ckpt_tokens(kernel.index()) };
        usize::try_from(n).map_err(|_| Error::Emu {
            kernel: kernel.symbol(false),
            reason: "the counting build does not know this kernel".into(),
        })
    }
    #[cfg(not(emu_counting))]
    {
        count_raw(kernel, false, 1).map(|_| 0)
    }
}

/// Counts of one WKV-7 kernel per CTA: a fixed part plus a part per chunk
/// of 16 tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Wkv7Profile {
    /// The kernel.
    pub kernel: CountedKernel,
    /// Counts per chunk of 16 tokens.
    pub per_chunk: CtaCounts,
    /// Counts independent of the sequence length (prologue, final state).
    pub fixed: CtaCounts,
}

#[cfg(emu_counting)]
fn count_raw(kernel: CountedKernel, bf16: bool, chunks: i32) -> Result<[u64; N_COUNTERS]> {
    let mut v = [0u64; N_COUNTERS];
    let k = kernel.index();
    // SAFETY: the counting build allocates and frees every buffer the kernel
    // touches itself and writes at most `v.len()` counters into `v`.
    let rc =
        unsafe { emu_cnt_wkv7_profile(k, i32::from(bf16), chunks, v.as_mut_ptr(), v.len() as i32) };
    if rc != 0 {
        return Err(Error::Emu {
            kernel: kernel.symbol(bf16),
            reason: format!("counting launch failed (code {rc})"),
        });
    }
    Ok(v)
}

#[cfg(not(emu_counting))]
fn count_raw(kernel: CountedKernel, bf16: bool, _chunks: i32) -> Result<[u64; N_COUNTERS]> {
    Err(Error::Emu {
        kernel: kernel.symbol(bf16),
        reason: "the emulator's counting build was not built (x86-64 Linux with g++, GNU ld and objcopy)".into(),
    })
}

/// Profiles `kernel` on the counting build: one CTA (h0 and dh_t given,
/// random inputs, decays in [0.6, 1)) over `c` and over `2c` chunks of 16
/// tokens, `c` = 2 or one checkpoint interval if longer (4 for v3's 64
/// tokens), so both lengths are whole checkpoint intervals; per chunk of
/// 16 tokens = the difference / `c`, fixed = the rest.
pub fn profile_wkv7(kernel: CountedKernel, bf16: bool) -> Result<Wkv7Profile> {
    let c = (counted_ckpt_tokens(kernel)? / 16).max(2);
    let ca = CtaCounts::from_raw(&count_raw(kernel, bf16, c as i32)?);
    let cb = CtaCounts::from_raw(&count_raw(kernel, bf16, 2 * c as i32)?);
    let c = c as f64;
    let per_chunk = CtaCounts::zip(&cb, &ca, |a, b| (a - b) / c);
    let fixed = CtaCounts::zip(&ca, &per_chunk, |a, p| a - c * p);
    Ok(Wkv7Profile {
        kernel,
        per_chunk,
        fixed,
    })
}

#[doc(hidden)] // for tests/emu_counters.rs
/// Shared-memory (requests, wavefronts) of `emu_selftest_banks` (one warp,
/// one store and one load at word lane × `stride`) on the counting build.
pub fn selftest_banks(stride: i32) -> Result<(u64, u64)> {
    #[cfg(emu_counting)]
    {
        let mut v = [0u64; N_COUNTERS];
        // SAFETY: the entry owns its buffers and writes at most v.len() values.
        let rc = unsafe { emu_cnt_selftest_banks(stride, v.as_mut_ptr(), v.len() as i32) };
        if rc != 0 {
            return Err(Error::Emu {
                kernel: "emu_selftest_banks".into(),
                reason: format!("counting launch failed (code {rc})"),
            });
        }
        Ok((v[7], v[8]))
    }
    #[cfg(not(emu_counting))]
    {
        let _ = stride;
        count_raw(CountedKernel::FwdV1, false, 1).map(|_| (0, 0))
    }
}

/// A GPU for the time model, with the model's per-SM rates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuModel {
    /// Name in reports.
    pub name: &'static str,
    /// Streaming multiprocessors.
    pub sms: u32,
    /// SM clock in GHz.
    pub ghz: f64,
    /// HBM bandwidth in GB/s.
    pub hbm_gbs: f64,
    /// bf16 m16n8k16 `mma.sync` per SM per clock (an assumption).
    pub mma_per_clk: f64,
    /// Shared-memory wavefronts per SM per clock.
    pub wavefronts_per_clk: f64,
    /// Warp instructions issued per SM per clock.
    pub issue_per_clk: f64,
    /// Exposed cycles per `__syncthreads` per CTA (an assumption).
    pub barrier_clk: f64,
}

/// H100 SXM: 132 SMs at 1.755 GHz, 3.35 TB/s (rates: docs/emulation.md).
pub const H100_SXM: GpuModel = GpuModel {
    name: "H100 SXM",
    sms: 132,
    ghz: 1.755,
    hbm_gbs: 3350.0,
    mma_per_clk: 0.5,
    wavefronts_per_clk: 1.0,
    issue_per_clk: 4.0,
    barrier_clk: 40.0,
};

/// H200: the H100's SMs with 4.8 TB/s.
pub const H200: GpuModel = GpuModel {
    name: "H200",
    hbm_gbs: 4800.0,
    ..H100_SXM
};

/// Registers per thread and static shared memory per CTA of a kernel, from
/// `.ci/ptxas-report`'s output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    /// Registers per thread.
    pub regs: u32,
    /// Shared memory per CTA in bytes.
    pub smem: u32,
}

/// Finds `kernel`'s line in `.ci/ptxas-report`'s output
/// (`  <name>  regs  <r>  smem  <s> B  stack ...`).
pub fn ptxas_resources(report: &str, kernel: &str) -> Option<KernelResources> {
    report.lines().find_map(|line| {
        let t: Vec<&str> = line.split_whitespace().collect();
        match t.as_slice() {
            [name, "regs", r, "smem", s, ..] if *name == kernel => Some(KernelResources {
                regs: r.parse().ok()?,
                smem: s.parse().ok()?,
            }),
            _ => None,
        }
    })
}

/// An ESTIMATED time of one kernel at a shape (each bound in ms; `ms` is the
/// largest). A model, not a measurement: docs/emulation.md.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// CTAs resident per SM.
    pub ctas_per_sm: u32,
    /// Waves of CTAs.
    pub waves: u32,
    /// Tensor-core bound.
    pub mma_ms: f64,
    /// Shared-memory wavefront bound.
    pub smem_ms: f64,
    /// Issue bound of the counted instructions (no ALU: a lower bound).
    pub issue_ms: f64,
    /// Barrier latency bound.
    pub barrier_ms: f64,
    /// HBM bound (each byte asked for moved once).
    pub hbm_ms: f64,
    /// The estimate: the largest bound.
    pub ms: f64,
}

/// Estimates `p` at batch `b`, length `t`, heads `h` (N = 64) on `gpu`.
/// Without `res` occupancy is limited by threads only.
pub fn estimate(
    p: &Wkv7Profile,
    (b, t, h): (usize, usize, usize),
    gpu: &GpuModel,
    res: Option<KernelResources>,
) -> Estimate {
    let threads = p.kernel.threads();
    let warps = threads.div_ceil(32);
    let mut per_sm = 32u32.min(2048 / threads);
    if let Some(r) = res {
        let warp_regs = (r.regs * 32).div_ceil(256) * 256;
        if warp_regs > 0 {
            per_sm = per_sm.min(65536 / (warp_regs * warps));
        }
        per_sm = per_sm.min(228 * 1024 / (r.smem + 1024));
    }
    let per_sm = per_sm.max(1);
    let ctas = (b * h) as f64;
    let chunks = t.div_ceil(16) as f64;
    let slots = f64::from(gpu.sms * per_sm);
    let waves = (ctas / slots).ceil().max(1.0);
    let resident = f64::from(per_sm).min((ctas / f64::from(gpu.sms)).ceil());
    // one CTA's totals over the whole sequence
    let cta = CtaCounts::zip(&p.fixed, &p.per_chunk, |f, c| f + chunks * c);
    let clk_ms = 1.0 / (gpu.ghz * 1e6);
    // the CTAs resident on one SM share its pipes, wave after wave
    let shared = |per_cta: f64, rate: f64| per_cta * resident / rate * clk_ms * waves;
    let mma_ms = shared(cta.mma_m16n8k16, gpu.mma_per_clk);
    let smem_ms = shared(cta.smem_wavefronts, gpu.wavefronts_per_clk);
    let instr = cta.mma_m16n8k16
        + cta.smem_requests
        + cta.shuffles
        + (cta.gmem_read_sectors + cta.gmem_write_sectors) / 4.0;
    let issue_ms = shared(instr, gpu.issue_per_clk);
    let barrier_ms = cta.block_barriers * gpu.barrier_clk * clk_ms * waves;
    let hbm_ms = ctas * (cta.gmem_read_bytes + cta.gmem_write_bytes) / (gpu.hbm_gbs * 1e6);
    let ms = mma_ms
        .max(smem_ms)
        .max(issue_ms)
        .max(barrier_ms)
        .max(hbm_ms);
    Estimate {
        ctas_per_sm: per_sm,
        waves: waves as u32,
        mma_ms,
        smem_ms,
        issue_ms,
        barrier_ms,
        hbm_ms,
        ms,
    }
}

/// The report of `rwkv-tune bench --backend emu --counters`: per kernel the
/// counters per CTA per chunk, then the ESTIMATED times at (b, t, h, N = 64)
/// on an H100 SXM and an H200. `ptxas_report` is `.ci/ptxas-report`'s
/// output (registers and shared memory; without it occupancy is limited by
/// threads only). Takes a few seconds.
pub fn counters_report(
    (b, t, h): (usize, usize, usize),
    bf16: bool,
    ptxas_report: Option<&str>,
) -> Result<String> {
    use std::fmt::Write as _;
    let dt = if bf16 { "bf16" } else { "f32" };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "WKV-7 counters from the CPU emulator's counting build, N = 64, {dt}, h0 and dh_t given.\n\
         Per CTA per chunk of 16 tokens (one CTA emulated over c and 2c chunks, c = 2 or one checkpoint interval; \
         the fixed part is in rwkv_tune::emu::profile_wkv7):"
    );
    let _ = writeln!(
        s,
        "{:<24} {:>9} {:>10} {:>6} {:>7} {:>8} {:>6} {:>9} {:>9} {:>10} {:>5}",
        "kernel",
        "smem_req",
        "smem_wave",
        "w/req",
        "mma",
        "barriers",
        "shfl",
        "g_read_B",
        "g_write_B",
        "sectors_B",
        "other"
    );
    let mut profiles = Vec::new();
    for k in CountedKernel::ALL {
        let p = profile_wkv7(k, bf16)?;
        let c = &p.per_chunk;
        let _ = writeln!(
            s,
            "{:<24} {:>9.0} {:>10.0} {:>6.2} {:>7.0} {:>8.0} {:>6.0} {:>9.0} {:>9.0} {:>10.0} {:>5.0}",
            k.symbol(bf16),
            c.smem_requests,
            c.smem_wavefronts,
            if c.smem_requests > 0.0 {
                c.smem_wavefronts / c.smem_requests
            } else {
                0.0
            },
            c.mma_m16n8k16,
            c.block_barriers,
            c.shuffles,
            c.gmem_read_bytes,
            c.gmem_write_bytes,
            32.0 * (c.gmem_read_sectors + c.gmem_write_sectors),
            c.other_accesses
        );
        profiles.push(p);
    }
    let _ = writeln!(
        s,
        "\nESTIMATED times (a model, not a measurement: docs/emulation.md) at B={b} T={t} H={h} N=64 {dt}:"
    );
    let _ = writeln!(
        s,
        "{:<24} {:>5} {:>6} {:>6} {:>5} {:<9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "kernel",
        "regs",
        "smem",
        "CTA/SM",
        "waves",
        "gpu",
        "mma",
        "smem",
        "issue",
        "barrier",
        "hbm",
        "EST ms"
    );
    let mut sums = [[0f64; VERSION_NAMES.len()]; 2];
    // waves at the shape (H100 SXM), when the ptxas report gives the resources
    let mut waves: Vec<Option<u32>> = Vec::new();
    for p in &profiles {
        let sym = p.kernel.symbol(bf16);
        // ptxas reports static shared memory; v3's backward also takes dynamic
        let dynamic = if p.kernel.is_backward() && p.kernel.version_index() >= 2 {
            wkv7_v3_bwd_smem(64)
        } else {
            0
        };
        let res = ptxas_report
            .and_then(|r| ptxas_resources(r, &sym))
            .map(|r| KernelResources {
                smem: r.smem + dynamic,
                ..r
            });
        waves.push(res.map(|r| estimate(p, (b, t, h), &H100_SXM, Some(r)).waves));
        for (gi, gpu) in [H100_SXM, H200].iter().enumerate() {
            let e = estimate(p, (b, t, h), gpu, res);
            sums[gi][p.kernel.version_index()] += e.ms;
            let _ = writeln!(
                s,
                "{:<24} {:>5} {:>6} {:>6} {:>5} {:<9} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>9.3}",
                sym,
                res.map_or("?".into(), |r| r.regs.to_string()),
                res.map_or("?".into(), |r| r.smem.to_string()),
                e.ctas_per_sm,
                e.waves,
                gpu.name,
                e.mma_ms,
                e.smem_ms,
                e.issue_ms,
                e.barrier_ms,
                e.hbm_ms,
                e.ms
            );
        }
    }
    // v3 / v3x against v2, forward + backward, per chunk of 16 tokens
    let pair = |v: usize| {
        let mut f = CtaCounts::default();
        let mut w = [None, None];
        for (p, wv) in profiles.iter().zip(&waves) {
            if p.kernel.version_index() == v {
                f = CtaCounts::zip(&f, &p.per_chunk, |a, b| a + b);
                w[usize::from(p.kernel.is_backward())] = *wv;
            }
        }
        (f, w)
    };
    let (c2, w2) = pair(1);
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.3}", a / b)
        } else {
            "n/a".to_string()
        }
    };
    let _ = writeln!(
        s,
        "\nv3 / v3x vs v2 (forward + backward, per CTA per chunk of 16 tokens; ckpt bytes = \
         bytes read + written to the checkpoint and scratch buffers; waves at B={b} T={t} H={h} on the H100 SXM):"
    );
    let _ = writeln!(
        s,
        "{:<8} {:>11} {:>7} {:>9} {:>7} {:>10} {:>7} {:>13} {:>13}",
        "version",
        "smem_wave",
        "ratio",
        "mma",
        "ratio",
        "ckpt_B",
        "ratio",
        "waves f/b",
        "v2 waves f/b"
    );
    let wv = |w: [Option<u32>; 2]| match w {
        [Some(f), Some(b)] => format!("{f}/{b}"),
        _ => "?".to_string(),
    };
    let aux = |c: &CtaCounts| c.gmem_aux_read_bytes + c.gmem_aux_write_bytes;
    for v in [1, 2, 3] {
        let (c, w) = pair(v);
        let _ = writeln!(
            s,
            "{:<8} {:>11.0} {:>7} {:>9.0} {:>7} {:>10.0} {:>7} {:>13} {:>13}",
            VERSION_NAMES[v],
            c.smem_wavefronts,
            ratio(c.smem_wavefronts, c2.smem_wavefronts),
            c.mma_m16n8k16,
            ratio(c.mma_m16n8k16, c2.mma_m16n8k16),
            aux(&c),
            ratio(aux(&c), aux(&c2)),
            wv(w),
            wv(w2)
        );
    }
    if ptxas_report.is_none() {
        let _ = writeln!(
            s,
            "(no ptxas report given: occupancy limited by threads only, waves unknown; pass --ptxas-report FILE from .ci/ptxas-report)"
        );
    }
    let est = VERSION_NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            format!(
                "{name} {:.2} ms (H100 SXM), {:.2} ms (H200)",
                sums[0][i], sums[1][i]
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let _ = writeln!(s, "ESTIMATED forward + backward: {est}");
    Ok(s)
}
