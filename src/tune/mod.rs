//! State tuning (arXiv 2504.05097): train only the per-layer initial states of
//! a frozen RWKV-7.
//!
//! - [`state`]: the plain data every other tuning module shares: the tuned
//!   state, a training example, the DBP statistics, tuned state ↔ model
//!   state / state file.
//! - [`grad`]: the gradient engine (loss and gradient w.r.t. the initial states).
//! - [`dbp`]: decorrelated backpropagation for the tuned states.
//! - [`data`]: JSONL / plain-text data, tokenising, examples, seeded batches.
//! - [`optim`]: Adam / AdamW, the lr schedule (RWKV-PEFT recipe), clipping.
//! - [`engine`]: where a step runs ([`engine::Engine`]; the CPU engine).
//! - [`device`]: the state gradient and the optimiser step on a device
//!   ([`device::DeviceEngine`], through `ops::backward::BackwardOps`).
//! - [`eval`]: validation (loss, bits per token, exact match).
//! - [`train`]: the tuning loop, metrics, checkpoints.
//! - [`builder`]: one engine builder for a run (device × upscale × DBP ×
//!   observer, from [`builder::EngineOptions`]); what `rwkv-tune tune` calls.
//! - [`checkpoint`]: atomic, exactly resumable checkpoints.
//! - [`plot`]: PNG loss curves without image dependencies.
//! - [`demo`]: the self-contained demo (a seeded random RWKV-7 and a
//!   synthetic task) and the tiny-model tinyshakespeare run.
//! - [`upscale`]: the kernel-upscaled state (RBF read-out over M support vectors).
//! - [`observer`]: soft targets from a stronger frozen model.
//! - [`compare`]: plain / DBP / upscaled / observer on one task, one budget.
pub mod grad;

pub mod builder;
pub mod checkpoint;
pub mod compare;
pub mod data;
pub mod dbp;
pub mod demo;
pub mod device;
// Per-field docs left out of issue 12: this module is being refactored in
// parallel; its structs document their fields in groups.
#[allow(missing_docs)]
pub mod engine;
pub mod eval;
pub mod observer;
pub mod optim;
pub mod peft_compare;
pub mod plot;
pub mod state;
pub mod train;
pub mod upscale;
