//! The CUDA device: checks for a driver before touching cudarc (whose
//! constructors panic when `libcuda` is missing), owns the context, the
//! stream and the loaded kernel modules (fatbins embedded by build.rs).
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

mod fatbins {
    include!(concat!(env!("OUT_DIR"), "/fatbins.rs"));
}

/// Whether build.rs found nvcc and embedded the kernel fatbins.
pub fn kernels_built() -> bool {
    cfg!(kernels_built) && fatbins::FATBINS.iter().all(|(_, b)| !b.is_empty())
}

/// The embedded fatbin of `kernels/<stem>.cu`.
pub fn fatbin(stem: &str) -> Result<&'static [u8]> {
    if !kernels_built() {
        return Err(Error::KernelsNotBuilt);
    }
    fatbins::FATBINS
        .iter()
        .find(|(s, _)| *s == stem)
        .map(|(_, b)| *b)
        .ok_or_else(|| Error::Invalid(format!("no kernel file kernels/{stem}.cu")))
}

/// Whether the NVIDIA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library under its known names
    // and reports whether that worked; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether `RWKV_TUNE_REQUIRE_GPU=1` is set: tests and checks that would
/// skip for want of a GPU (no driver, no device, kernels not built) fail
/// instead (the GPU check runs with it).
pub fn require_gpu() -> bool {
    std::env::var("RWKV_TUNE_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Reports a GPU test that cannot run: panics when [`require_gpu`], else
/// prints `SKIPPED: <what>: <why>` to stderr.
pub fn skip_gpu(what: &str, why: &dyn std::fmt::Display) {
    assert!(
        !require_gpu(),
        "RWKV_TUNE_REQUIRE_GPU=1 but {what} cannot run: {why}"
    );
    eprintln!("SKIPPED: {what}: {why}");
}

/// An error of a CUDA library that [`Error`] keeps as its source.
pub(crate) trait CudaFailure {
    /// The [`Error`] for this failure while doing `what`.
    fn while_doing(self, what: String) -> Error;
}

impl CudaFailure for DriverError {
    fn while_doing(self, what: String) -> Error {
        Error::Cuda { what, source: self }
    }
}

#[cfg(feature = "model")]
impl CudaFailure for cudarc::cublas::result::CublasError {
    fn while_doing(self, what: String) -> Error {
        Error::Cublas { what, source: self }
    }
}

/// A CUDA failure of a call the caller did not describe further.
pub(crate) fn cuda_err(e: impl CudaFailure) -> Error {
    e.while_doing("calling the CUDA driver".into())
}

/// A CUDA failure while doing `what` (for `map_err`).
pub(crate) fn cuda_ctx<E: CudaFailure>(what: impl Into<String>) -> impl FnOnce(E) -> Error {
    move |e| e.while_doing(what.into())
}

/// Loads the embedded fatbin of `kernels/<stem>.cu` into `ctx`.
pub(crate) fn load_module(ctx: &Arc<CudaContext>, stem: &str) -> Result<Arc<CudaModule>> {
    let bin = fatbin(stem)?;
    ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bin.to_vec()))
        .map_err(cuda_ctx(format!("loading the kernels/{stem}.cu fatbin")))
}

/// The WKV-7 kernels loaded for one CUDA stream (the caller's own, or a
/// [`Gpu`]'s): both kernel versions, both directions, both I/O dtypes and
/// every head size, each function resolved once when this is built
/// (`Wkv7Kernels::new`, in `wkv7::cuda` with the launch methods). Every
/// launch is queued on [`Wkv7Kernels::stream`]; nothing runs on the
/// context's legacy default stream, and no launch formats a kernel name or
/// takes a lock.
///
/// The buffers given to `forward` and `backward` may have been allocated on
/// any stream of the same context: cudarc orders the launch after their
/// pending work.
pub struct Wkv7Kernels {
    pub(crate) stream: Arc<CudaStream>,
    /// Indexed by `wkv7::cuda::slot`.
    pub(crate) funcs: Vec<Option<CudaFunction>>,
}

impl Wkv7Kernels {
    /// The stream every launch is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl std::fmt::Debug for Wkv7Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wkv7Kernels")
            .field("kernels", &self.funcs.iter().flatten().count())
            .finish_non_exhaustive()
    }
}

/// One GPU: context, stream, and the kernel modules loaded on it. Every
/// launch and copy of the project runs on `stream`: a stream of its own
/// ([`Gpu::new`]) or the caller's ([`Gpu::on_stream`]), never the context's
/// legacy default stream.
///
/// The WKV-7 kernels are resolved once per `Gpu` ([`Gpu::wkv7`]); the model's
/// element-wise kernels ([`Gpu::function`]) are looked up by name in a
/// read-locked table (no key is formatted).
pub struct Gpu {
    /// The CUDA context (device) everything runs in.
    pub ctx: Arc<CudaContext>,
    /// The stream every launch and copy of this `Gpu` is queued on.
    pub stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// stem → kernel name → function: looked up without building a key.
    functions: RwLock<HashMap<&'static str, HashMap<String, CudaFunction>>>,
    wkv7: OnceLock<Wkv7Kernels>,
}

impl Gpu {
    /// Opens GPU `ordinal`. Errors (never panics) when there is no driver, no
    /// device, or the kernels were not compiled into this build.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(Error::CudaUnavailable(
                "no NVIDIA driver (libcuda.so) on this machine".into(),
            ));
        }
        if !kernels_built() {
            return Err(Error::KernelsNotBuilt);
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            Error::CudaUnavailable(format!("cannot open CUDA device {ordinal}: {e:?}"))
        })?;
        let stream = ctx.new_stream().map_err(cuda_ctx("creating a stream"))?;
        Ok(Gpu {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: RwLock::new(HashMap::new()),
            wkv7: OnceLock::new(),
        })
    }

    /// The GPU of the caller's `stream` (and its context): everything this
    /// `Gpu` and the ops built on it queue runs on that stream, ordered with
    /// the caller's own work there. Errors when the kernels were not
    /// compiled into this build.
    pub fn on_stream(stream: Arc<CudaStream>) -> Result<Self> {
        if !kernels_built() {
            return Err(Error::KernelsNotBuilt);
        }
        let ctx = stream.context().clone();
        ctx.bind_to_thread()
            .map_err(cuda_ctx("binding the stream's context to this thread"))?;
        Ok(Gpu {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: RwLock::new(HashMap::new()),
            wkv7: OnceLock::new(),
        })
    }

    /// Free and total device memory in bytes (`cuMemGetInfo`), for checks
    /// of a problem's size before it is allocated.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(cuda_err)
    }

    /// Refuses a plan that needs more device memory than is free; `what`
    /// names the plan in the message.
    pub fn check_memory(&self, what: &str, bytes: u64) -> Result<()> {
        let (free, _) = self.mem_info()?;
        if bytes > free as u64 {
            return Err(Error::Invalid(format!(
                "{what} needs {:.2} GiB of GPU memory but only {:.2} GiB is free on {}",
                bytes as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64,
                self.describe()
            )));
        }
        Ok(())
    }

    /// Device name and compute capability, e.g. `NVIDIA H100 80GB HBM3 (sm_90)`.
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        match self.ctx.compute_capability() {
            Ok((a, b)) => format!("{name} (sm_{a}{b})"),
            Err(_) => name,
        }
    }

    /// The kernel `name` from `kernels/<stem>.cu`, loading the module once.
    pub fn function(&self, stem: &'static str, name: &str) -> Result<CudaFunction> {
        if let Some(f) = self
            .functions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(stem)
            .and_then(|m| m.get(name))
        {
            return Ok(f.clone());
        }
        let module = {
            let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match mods.get(stem) {
                Some(m) => m.clone(),
                None => {
                    let m = load_module(&self.ctx, stem)?;
                    mods.insert(stem, m.clone());
                    m
                }
            }
        };
        let f = module
            .load_function(name)
            .map_err(cuda_ctx(format!("looking up kernel {name}")))?;
        self.functions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(stem)
            .or_default()
            .insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// The WKV-7 kernels on this GPU's stream, built by `load` on first
    /// use and kept (see `wkv7::cuda`, which defines `Gpu::wkv7` on top).
    pub(crate) fn wkv7_with(
        &self,
        load: impl FnOnce(Arc<CudaStream>) -> Result<Wkv7Kernels>,
    ) -> Result<&Wkv7Kernels> {
        if let Some(k) = self.wkv7.get() {
            return Ok(k);
        }
        let k = load(self.stream.clone())?;
        // Another thread may have won the race: either copy is equivalent.
        Ok(self.wkv7.get_or_init(|| k))
    }

    /// Waits for all queued work.
    pub fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(cuda_ctx("synchronizing the stream"))
    }
}
