//! The CUDA device: checks for a driver before touching cudarc (whose
//! constructors panic when `libcuda` is missing), owns the context, the
//! stream and the loaded kernel modules (fatbins embedded by build.rs).
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

pub(crate) fn cuda_err(e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{e:?}"))
}

/// One GPU: context, stream, and the kernel modules loaded on it. Every
/// launch and copy of the project runs on `stream`: a stream of its own
/// ([`Gpu::new`]) or the caller's ([`Gpu::on_stream`]), never the context's
/// legacy default stream.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
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
        let stream = ctx.new_stream().map_err(cuda_err)?;
        Ok(Gpu {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
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
        ctx.bind_to_thread().map_err(cuda_err)?;
        Ok(Gpu {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
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
        let key = format!("{stem}/{name}");
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(f.clone());
        }
        let module = {
            let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match mods.get(stem) {
                Some(m) => m.clone(),
                None => {
                    let bin = fatbin(stem)?;
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_binary(bin.to_vec()))
                        .map_err(|e| {
                            Error::Cuda(format!("loading kernels/{stem}.cu fatbin: {e:?}"))
                        })?;
                    mods.insert(stem, m.clone());
                    m
                }
            }
        };
        let f = module
            .load_function(name)
            .map_err(|e| Error::Cuda(format!("kernel {name}: {e:?}")))?;
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, f.clone());
        Ok(f)
    }

    /// Waits for all queued work.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err)
    }
}
