//! The CUDA backend: the kernels of `kernels/` launched through cudarc, on a real GPU or on the
//! emulated one (the same code path, with the fake driver of `kernels/emulator` loaded first).

mod emulator;
mod host;
mod ops;
mod tensor;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};

use crate::error::{Error, Result};

pub use ops::{DeviceHidden, DeviceInputs, Student};
pub use tensor::{DeviceTensor, DeviceTensorMut, DeviceVec};

/// The kernels compiled by nvcc at build time (empty when nvcc was not found).
pub const FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

/// ptxas's report for every kernel and architecture: a TSV with the columns
/// `arch kernel registers spill_stores spill_loads stack_bytes smem_bytes` (empty without nvcc).
pub const PTXAS_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/ptxas.tsv"));

/// The emulator's message for its last failed launch (barrier divergence, trap, bad shuffle).
pub fn emulator_last_error() -> Option<String> {
    emulator::last_error()
}

/// Whether this build carries compiled kernels for real GPUs.
pub const HAS_FATBIN: bool = cfg!(dk_fatbin);

/// The emulator-only module image. Loaded on the emulated device (e.g. with
/// `context().load_module(Ptx::from_binary(EMULATOR_ONLY_MODULE.to_vec()))`), it is a module with
/// every kernel compiled into the emulator, including its deliberately broken self-test kernels
/// (kernels/emulator/selftest.cu). The real fatbin holds only the crate's kernels, and a real
/// driver rejects this image.
pub const EMULATOR_ONLY_MODULE: &[u8] = emulator::MODULE_IMAGE;

/// A CUDA device with the kernel module loaded, and the stream every call is issued on.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    emulated: bool,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ctx.ordinal())
            .field("emulated", &self.emulated)
            .finish()
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal` of the installed driver. Returns [`Error::DeviceUnavailable`], never a
    /// panic, when the crate was built without nvcc, no driver is installed, or no GPU is present.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !HAS_FATBIN {
            return Err(Error::DeviceUnavailable(
                "this build has no compiled CUDA kernels: nvcc was not found when the crate was \
                 built (set NVCC or CUDA_HOME and rebuild)"
                    .into(),
            ));
        }
        if emulator::is_loaded() {
            return Err(Error::DeviceUnavailable(
                "the emulated CUDA driver is loaded in this process; a real GPU cannot be opened \
                 beside it (use the emulated device, or a separate process)"
                    .into(),
            ));
        }
        // SAFETY: only probes whether a library of the driver's name can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::DeviceUnavailable(
                "no CUDA driver found (libcuda.so could not be loaded)".into(),
            ));
        }
        Self::open(ordinal, FATBIN.to_vec(), false)
    }

    /// The emulated GPU: the kernels compiled for the host, behind a fake CUDA driver, driven by
    /// exactly the same cudarc calls as a real device.
    pub fn emulated() -> Result<Self> {
        emulator::load()?;
        // The fake driver reads the real fatbin like a GPU's driver does: a kernel missing from
        // it is not found. Without nvcc there is none, and the emulator-only module stands in.
        let image = if FATBIN.is_empty() {
            EMULATOR_ONLY_MODULE.to_vec()
        } else {
            FATBIN.to_vec()
        };
        // Registers and shared memory from ptxas limit launches as on an H100.
        emulator::set_kernel_limits(PTXAS_REPORT)?;
        let device = Self::open(0, image, true)?;
        if !emulator::driver_in_use_is_emulator() {
            return Err(Error::DeviceUnavailable(
                "cudarc resolved a real CUDA driver instead of the emulator (a libcuda.so is \
                 installed and was loaded first); run the emulated device in a separate process"
                    .into(),
            ));
        }
        Ok(device)
    }

    /// Issues every call on the caller's `stream` (and loads the kernels into its context), for
    /// trainers that own their CUDA context and streams. Works on a real GPU and on the emulated
    /// one, whichever driver created the stream.
    pub fn on_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let emulated = emulator::is_loaded() && emulator::driver_in_use_is_emulator();
        if emulated {
            emulator::set_kernel_limits(PTXAS_REPORT)?;
        }
        let image = if !FATBIN.is_empty() {
            FATBIN.to_vec()
        } else if emulated {
            EMULATOR_ONLY_MODULE.to_vec()
        } else {
            return Err(Error::DeviceUnavailable(
                "this build has no compiled CUDA kernels: nvcc was not found when the crate was \
                 built (set NVCC or CUDA_HOME and rebuild)"
                    .into(),
            ));
        };
        let ctx = stream.context().clone();
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(image))
            .map_err(|e| Error::Cuda(format!("cannot load the kernel module: {e}")))?;
        Ok(CudaDevice {
            ctx,
            stream,
            module,
            functions: Mutex::new(HashMap::new()),
            emulated,
        })
    }

    fn open(ordinal: usize, image: Vec<u8>, emulated: bool) -> Result<Self> {
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| Error::DeviceUnavailable("the CUDA driver could not be loaded".into()))?
            .map_err(|e| {
                Error::DeviceUnavailable(format!("cannot open CUDA device {ordinal}: {e}"))
            })?;
        let stream = ctx.default_stream();
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(image))
            .map_err(|e| Error::Cuda(format!("cannot load the kernel module: {e}")))?;
        Ok(CudaDevice {
            ctx,
            stream,
            module,
            functions: Mutex::new(HashMap::new()),
            emulated,
        })
    }

    /// Whether this is the emulated device.
    pub fn is_emulated(&self) -> bool {
        self.emulated
    }

    /// The stream every call of this device is issued on. Buffers passed to the device-buffer
    /// methods may live on other streams of the same context: cudarc's events order the work.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> Result<String> {
        self.ctx
            .name()
            .map_err(|e| self.cuda_error("cuDeviceGetName", e))
    }

    fn function(&self, name: &str) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let f = self
            .module
            .load_function(name)
            .map_err(|e| self.cuda_error(name, e))?;
        cache.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// A driver error, with the emulator's own message (barrier divergence, trap, ...) attached.
    fn cuda_error(&self, during: &str, e: DriverError) -> Error {
        let detail = if self.emulated {
            emulator::last_error()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Error::Cuda(format!("{during}: {e}{detail}"))
    }
}
