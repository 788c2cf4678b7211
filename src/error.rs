//! The library's one typed error enum. Every public function that can fail on
//! user input returns `Result<T, Error>`; none panics on bad shapes or dtypes.
use std::path::PathBuf;

/// Errors of the rwkv-tune library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor has the wrong shape (or length for its declared shape).
    #[error("shape mismatch for `{name}`: expected {expected:?}, got {got:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// The shape it must have.
        expected: Vec<usize>,
        /// The shape (or length) it has.
        got: Vec<usize>,
    },
    /// A tensor has the wrong dtype.
    #[error("dtype mismatch for `{name}`: expected {expected}, got {got}")]
    DType {
        /// The tensor.
        name: String,
        /// The dtype it must have.
        expected: String,
        /// The dtype it has.
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
    /// An error reported by the CUDA driver, with what was being done.
    /// Match `source` to tell, e.g., out of memory
    /// (`CUDA_ERROR_OUT_OF_MEMORY`, see [`Error::is_out_of_memory`]) from a
    /// bad launch.
    #[cfg(feature = "cuda")]
    #[error("CUDA error while {what}: {source}")]
    Cuda {
        /// What was being done (`launching wkv7_fwd_v1_f32_n64`).
        what: String,
        /// The driver's error code.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// An error reported by cuBLAS, with what was being done.
    #[cfg(feature = "model")]
    #[error("cuBLAS error while {what}: {source}")]
    Cublas {
        /// What was being done.
        what: String,
        /// cuBLAS's status code.
        #[source]
        source: cudarc::cublas::result::CublasError,
    },
    /// An emulated kernel launch failed (watchdog, divergent barrier, bad launch).
    #[error("emulated kernel `{kernel}` failed: {reason}")]
    Emu {
        /// The kernel symbol.
        kernel: String,
        /// What went wrong.
        reason: String,
    },
    /// File-system error, with the path involved.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file could not be read or written.
    #[error("safetensors file {path}: {msg}")]
    SafeTensors {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A PyTorch `.pth` file could not be read (or was refused: the restricted
    /// unpickler names what it would not run).
    #[error("PyTorch file {path}: {msg}")]
    PyTorch {
        /// The file.
        path: PathBuf,
        /// What is wrong with it, or what was refused.
        msg: String,
    },
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
        "{what} holds a non-finite value ({value} at element {index}); refusing it (--allow-nonfinite overrides)"
    )]
    NonFinite {
        /// The tensor (file and name).
        what: String,
        /// The first non-finite element.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// Token-reduction options that cannot be used (see [`ReduceError`]).
    #[error("token reduction: {0}")]
    Reduce(ReduceError),
    /// What was being done when `source` happened (e.g. `loading observer
    /// big.safetensors`).
    #[error("{what}")]
    Context {
        /// What was being done.
        what: String,
        /// The error it ran into.
        #[source]
        source: Box<Error>,
    },
}

/// Why a token-reduction setting (`model::reduce`) was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReduceError {
    /// A reduction ratio outside `[0, 1)` (or not finite).
    #[error("ratio {0} is outside [0, 1): give a fraction such as 0.2")]
    Ratio(f64),
    /// An anchor layer the model does not have.
    #[error("layer {layer} does not exist (the model has layers 0..{n_layer})")]
    UnknownLayer {
        /// The layer asked for.
        layer: usize,
        /// Layers of the model.
        n_layer: usize,
    },
    /// The same anchor layer given twice.
    #[error("layer {0} is given twice")]
    DuplicateLayer(usize),
    /// The prune fraction `q` of the hybrid outside `[0, 1]`.
    #[error("prune fraction q = {0} is outside [0, 1]")]
    PruneFraction(f64),
    /// A target saving that the anchor layers cannot reach (each anchor
    /// removes at most half of its tokens).
    #[error("a saving of {target} is out of reach with anchors {layers:?} (at most {max:.3})")]
    Unreachable {
        /// The saving asked for.
        target: f64,
        /// The anchor layers.
        layers: Vec<usize>,
        /// The most these anchors can save.
        max: f64,
    },
    /// An unknown name for a method, score or similarity option.
    #[error("unknown {what} {got:?} (expected one of {expected})")]
    UnknownName {
        /// Which option.
        what: &'static str,
        /// The name given.
        got: String,
        /// The names accepted.
        expected: &'static str,
    },
    /// A gather map that is not a valid order-preserving CSR map.
    #[error("invalid gather map: {0}")]
    Map(String),
}

// By hand, not `#[from]`: the message already includes the inner one, and a
// `source` would print it twice in an error chain.
impl From<ReduceError> for Error {
    fn from(e: ReduceError) -> Self {
        Error::Reduce(e)
    }
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

    /// Whether this error (or the one it wraps, see [`Error::Context`]) is
    /// the CUDA driver (or cuBLAS) running out of device memory.
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            #[cfg(feature = "cuda")]
            Error::Cuda { source, .. } => {
                source.0 == cudarc::driver::sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY
            }
            #[cfg(feature = "model")]
            Error::Cublas { source, .. } => {
                source.0 == cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED
            }
            Error::Context { source, .. } => source.is_out_of_memory(),
            _ => false,
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
