//! Entry points of the kernels compiled for the CPU under
//! `kernels/emu/cuda_emu.h` (see build.rs), looked up by kernel name.
//!
//! Each entry runs a whole grid (one block at a time, one OS thread per CUDA
//! thread) and returns 0, or non-zero when the watchdog fired, a barrier
//! diverged or the launch geometry was invalid.
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

emu_table!(MMA_SELFTEST, MmaTestParams;
    "mma_selftest" => emu_mma_selftest,
);

emu_table!(SELFTEST, EmuTestParams;
    "emu_selftest_reduce" => emu_emu_selftest_reduce,
    "emu_selftest_divergent" => emu_emu_selftest_divergent,
);

extern "C" {
    fn emu_set_watchdog_ms(ms: std::os::raw::c_long);
}

/// Sets how long an emulated barrier may wait before the launch is aborted
/// (default 20 s, or env `RWKV_EMU_WATCHDOG_MS`).
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
