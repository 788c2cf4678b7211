//! rwkv-tune: RWKV-7 ("Goose", x070) WKV kernels, models and state tuning,
//! with hand-written CUDA kernels that also run on the CPU under emulation.
//!
//! # Three entry points
//!
//! **1. The WKV-7 kernels** ([`wkv7`]), for embedding in another runtime.
//! With `rwkv-tune = { version = "0.1", default-features = false, features
//! = ["cuda"] }` the crate builds only the kernels and their API (its
//! dependencies: cudarc, half, thiserror). On a GPU,
//! `wkv7::cuda::Wkv7Kernels` runs them on your own `CudaStream` with your
//! own `CudaSlice` buffers (see `examples/wkv7_cuda.rs`); the same recurrence
//! runs on the CPU reference ([`wkv7::reference`], always built) and on the
//! kernel source emulated on the CPU (`wkv7::Backend::Emu`, feature `emu`):
//!
//! ```
//! use rwkv_tune::rng::Rng;
//! use rwkv_tune::wkv7::{Backend, Dims, GradInputs, Inputs};
//!
//! let d = Dims { b: 1, t: 8, h: 1, n: 32 };
//! let mut g = Rng::new(1);
//! let [r, k, v, dy] = [(); 4].map(|_| g.normal_vec(d.seq_len(), 0.5));
//! let w: Vec<f32> = (0..d.seq_len()).map(|_| g.range(0.6, 0.99) as f32).collect();
//! let a: Vec<f32> = (0..d.seq_len()).map(|_| -g.range(0.0, 0.2) as f32).collect();
//! let b: Vec<f32> = a.iter().map(|x| -0.5 * x).collect();
//! let x = Inputs { r: &r, w: &w, k: &k, v: &v, a: &a, b: &b, h0: None };
//! let gi = GradInputs { dy: &dy, dh_t: None };
//! let (out, grads) = Backend::Cpu.forward_backward(&d, &x, &gi)?;
//! assert_eq!(out.y.len(), d.seq_len());
//! assert_eq!(grads.dh0.len(), d.state_len());
//! # #[cfg(feature = "emu")]
//! # {
//! let (emu, _) = Backend::Emu.forward_backward(&d, &x, &gi)?;
//! let err = emu.y.iter().zip(&out.y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
//! assert!(err < 1e-4);
//! # }
//! # Ok::<(), rwkv_tune::Error>(())
//! ```
//!
//! **2. The model** (`model`, feature `model`): RWKV-7 weights (safetensors,
//! `.pth`), the CPU forward pass, the recurrent state, sampling; the same
//! layers on the emulated kernels or a GPU (`model::device`). Here on the
//! seeded random demo model (2 layers, width 128, byte vocabulary):
//!
//! ```
//! # #[cfg(feature = "tune")]
//! # {
//! use rwkv_tune::model::{Logits, Model};
//! use rwkv_tune::tune::demo;
//!
//! let model = Model::new(demo::demo_weights(demo::DEMO_MODEL_SEED)?)?;
//! let mut state = model.new_state();
//! let tokens: Vec<u32> = "Hello".bytes().map(u32::from).collect();
//! let logits = model.forward(&tokens, &mut state, Logits::Last)?;
//! assert_eq!(logits.len(), model.config().vocab);
//! # }
//! # Ok::<(), rwkv_tune::Error>(())
//! ```
//!
//! **3. State tuning** (`tune`, feature `tune`): train only the per-layer
//! initial states of a frozen model (arXiv 2504.05097), on the CPU, the
//! emulator or a GPU. Two steps on the demo model and its synthetic task:
//!
//! ```
//! # #[cfg(feature = "tune")]
//! # {
//! use rwkv_tune::model::Model;
//! use rwkv_tune::tune::{data::ByteTokenizer, demo, train::{train, TrainConfig}};
//!
//! let model = Model::new(demo::demo_weights(demo::DEMO_MODEL_SEED)?)?;
//! let (train_set, valid_set) = demo::synthetic_datasets(8, 4, 1, &ByteTokenizer)?;
//! let mut cfg = TrainConfig::new(2);
//! cfg.batch = 2;
//! let report = train(&model, &train_set, Some(&valid_set), &cfg, None)?;
//! assert_eq!(report.steps, 2);
//! assert!(report.after.is_some_and(|e| e.loss.is_finite()));
//! # }
//! # Ok::<(), rwkv_tune::Error>(())
//! ```
//!
//! # Features
//!
//! | feature | what it adds | dependencies |
//! |---|---|---|
//! | (none) | the CPU reference ([`wkv7::reference`]), shapes, errors | half, thiserror |
//! | `cuda` | the CUDA kernels (fatbins, when nvcc is found) and their device API | cudarc |
//! | `emu` | the kernels compiled for the CPU (C++ build) | — |
//! | `model` | the model, its ops on every backend, checkpoints, the benchmark suite | safetensors, serde, serde_json, rayon, zip, flate2, cuBLAS (cudarc) |
//! | `tune` | state tuning and the tokenizers | tokenizers, indicatif |
//! | `cli` (default) | the `rwkv-tune` binary | clap, anyhow |
//!
//! # Module map (one job each)
//!
//! - [`wkv7`]: the WKV-7 recurrence: API with shape checks, CPU reference,
//!   emulated kernels, CUDA kernels.
//! - [`params`]: kernel parameter structs generated from `kernels/params.h`.
//! - [`dtype`]: the I/O element types (f32, bf16).
//! - [`rng`]: a small seeded RNG for tests, benches and initialisation.
//! - [`error`]: the library's error type.
//! - `cuda` (feature `cuda`): the CUDA device (driver check, context,
//!   stream, modules, the loaded WKV-7 kernels).
//! - `emu` (feature `emu`): the CPU-emulated kernel entry points.
//! - `model`, `ops` (feature `model`): the RWKV-7 model, and the ops its
//!   layers run on each backend (forward and backward).
//! - `bench`, `real`, `tensors`, `pth`, `convert`, `guard` (feature
//!   `model`): the WKV-7 benchmark suite, the float trait of the CPU code,
//!   safetensors maps, PyTorch `.pth` checkpoints, converting models and
//!   states between formats, and the input guards (regular-file reads,
//!   output-vs-input identity, NaN/Inf and memory checks: what the CLI
//!   promises in the README).
//! - `tune`, `tokenizer` (feature `tune`): state tuning, and the World /
//!   Hugging Face tokenizers.
#![warn(missing_docs)]

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
pub mod guard;
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
