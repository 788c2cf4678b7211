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
//! - [`convert`]: converting models and states between safetensors, `.pth`
//!   and the RWKV-PEFT state layout.
#[cfg(feature = "model")]
pub mod bench;
#[cfg(feature = "model")]
pub mod convert;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
#[cfg(feature = "emu")]
pub mod emu;
pub mod error;
#[cfg(feature = "model")]
pub mod model;
#[cfg(feature = "model")]
pub mod ops;
pub mod params;
#[cfg(feature = "model")]
pub mod pth;
#[cfg(feature = "model")]
pub mod real;
pub mod rng;
#[cfg(feature = "model")]
pub mod tensors;
#[cfg(feature = "tune")]
pub mod tokenizer;
#[cfg(feature = "tune")]
pub mod tune;
pub mod wkv7;

pub use error::{Error, Result};

/// The cudarc this crate is built against (0.19): use its types
/// (`CudaContext`, `CudaStream`, `CudaSlice`) to hand the kernels your own
/// stream and buffers.
#[cfg(feature = "cuda")]
pub use cudarc;
