//! The library's one typed error enum. Every public function that can fail on
//! user input returns `Result<T, Error>`; none panics on bad shapes or dtypes.
use std::path::PathBuf;

/// Errors of the rwkv-tune library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor has the wrong shape (or length for its declared shape).
    #[error("shape mismatch for `{name}`: expected {expected:?}, got {got:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A tensor has the wrong dtype.
    #[error("dtype mismatch for `{name}`: expected {expected}, got {got}")]
    DType {
        name: String,
        expected: String,
        got: String,
    },
    /// A required tensor is absent.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// An argument is out of its valid range.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The kernels support head sizes 32, 64 and 128 only.
    #[error("unsupported head size N={0} (the kernels support 32, 64 and 128)")]
    UnsupportedHeadSize(usize),
    /// No CUDA driver or device.
    #[error("CUDA is not available: {0}")]
    CudaUnavailable(String),
    /// nvcc was not found when the crate was compiled.
    #[error(
        "the CUDA kernels were not built: nvcc was not found when rwkv-tune was compiled. \
         Run `.ci/setup-nvcc` (installs the pinned nvcc 13.0 into ./.venv-cuda) or set \
         NVCC=/path/to/nvcc, then rebuild"
    )]
    KernelsNotBuilt,
    /// An error reported by the CUDA driver or cuBLAS.
    #[error("CUDA error: {0}")]
    Cuda(String),
    /// An emulated kernel launch failed (watchdog, divergent barrier, bad launch).
    #[error("emulated kernel `{kernel}` failed: {reason}")]
    Emu { kernel: String, reason: String },
    /// File-system error, with the path involved.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file could not be read or written.
    #[error("safetensors file {path}: {msg}")]
    SafeTensors { path: PathBuf, msg: String },
    /// A PyTorch `.pth` file could not be read (or was refused: the restricted
    /// unpickler names what it would not run).
    #[error("PyTorch file {path}: {msg}")]
    PyTorch { path: PathBuf, msg: String },
    /// Model / checkpoint problems (config inference, names).
    #[error("model: {0}")]
    Model(String),
    /// Tokenizer problems.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Training / state-tuning problems.
    #[error("tune: {0}")]
    Tune(String),
    /// Options of a run that cannot be used (together, or with this model);
    /// the message names them as the command line does.
    #[error("{0}")]
    Options(String),
    /// A NaN or infinite value where finite numbers are required (a loaded
    /// or exported tensor; `--allow-nonfinite` lets them through).
    #[error(
        "{what} holds a non-finite value ({value} at element {index}); refusing it          (--allow-nonfinite overrides)"
    )]
    NonFinite {
        what: String,
        index: usize,
        value: f32,
    },
    /// What was being done when `source` happened (e.g. `loading observer
    /// big.safetensors`).
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        source: Box<Error>,
    },
}

/// `Result` with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps this error with what was being done ([`Error::Context`]).
    pub fn context(self, what: impl Into<String>) -> Self {
        Error::Context {
            what: what.into(),
            source: Box::new(self),
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
