//! The RWKV-7 (x070) model on the CPU: weights, loading, the forward pass,
//! the recurrent state, sampling and state files.
//!
//! What lives where:
//! - [`weights`]: the weights in memory (plain `Vec<f32>`, official BlinkDL
//!   layouts) and the [`Config`] read off their shapes.
//! - [`config`]: inferring and checking a [`Config`] from tensor shapes, and
//!   the list of tensors a config implies.
//! - [`load`]: reading safetensors checkpoints (official x070 names or the
//!   fla / Hugging Face names; f32, f16, bf16) and writing them back.
//! - [`init`]: seeded random weights with realistic magnitudes.
//! - [`forward`]: [`Model`], the multi-threaded CPU forward pass in sequence
//!   mode and one-token (RNN) mode.
//! - [`lora`]: LoRA adapters: targets, files, the exact merge.
//! - [`state`]: [`State`], the per-layer recurrent state, and state files in
//!   the ai00 / web-rwkv / RWKV-PEFT layout (`blocks.N.att.time_state`).
//! - [`reduce`]: training-free token reduction of the prefill (prune /
//!   merge / hybrid at anchor layers), for both forwards.
//! - [`sample`]: temperature / top-p sampling and greedy argmax.
//! - `linalg` (private): the packed f32 GEMM/GEMV and small vector helpers.
pub mod config;
pub mod device;
pub mod forward;
pub mod init;
pub mod layer;
pub mod load;
pub mod lora;
pub mod reduce;
pub mod sample;
pub mod state;
pub mod weights;

mod linalg;

pub use forward::{LayerTrace, Logits, Model};
pub use load::{Naming, StoreDType};
pub use sample::{argmax, Sampler};
pub use state::{LayerState, State};
pub use weights::{Block, ChannelMix, Config, LayerNorm, TimeMix, Weights};
