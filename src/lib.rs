//! rwkv-tune: RWKV-7 ("Goose", x070) WKV kernels, models and state tuning,
//! with hand-written CUDA kernels that also run on the CPU under emulation.
//!
//! Module map (one job each):
//! - [`mod@bench`]: the WKV-7 benchmark suite (bytes, FLOPs, timing, tables).
//! - [`wkv7`]: the WKV-7 recurrence — API with shape checks, CPU reference,
//!   emulated kernels, CUDA kernels.
//! - [`params`]: kernel parameter structs generated from `kernels/params.h`.
//! - [`cuda`]: the CUDA device (driver check, context, stream, modules).
//! - [`emu`]: the CPU-emulated kernel entry points.
//! - [`dtype`]: the I/O element types (f32, bf16).
//! - [`real`]: the float trait (f32 / f64) of the CPU code.
//! - [`rng`]: a small seeded RNG for tests, benches and initialisation.
//! - [`tensors`]: reading and writing f32 safetensors maps.
//! - [`pth`]: PyTorch `.pth` checkpoints (zip + restricted unpickler), read
//!   and written.
//! - [`guard`]: regular-file reads, output-vs-input identity, NaN/Inf and
//!   memory checks (what the CLI promises in the README).
//! - [`convert`]: converting models and states between safetensors, `.pth`
//!   and the RWKV-PEFT state layout.
pub mod bench;
pub mod convert;
pub mod cuda;
pub mod dtype;
pub mod emu;
pub mod error;
pub mod guard;
pub mod model;
pub mod params;
pub mod pth;
pub mod real;
pub mod rng;
pub mod tensors;
pub mod tokenizer;
pub mod wkv7;

pub use error::{Error, Result};
pub mod ops;
pub mod tune;
