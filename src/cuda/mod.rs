//! The CUDA backend: the kernels of `kernels/` launched through cudarc, on a real GPU or on the
//! emulated one (the same code path, with the fake driver of `kernels/emulator` loaded first).

mod attention;
mod blas;
mod cluster;
#[cfg(feature = "emulator")]
mod emulator;
mod host;
mod nn;
mod ops;
mod row_schedule;
mod span;
mod tensor;
mod topk;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};

use crate::error::{Error, Result};

pub use attention::MAX_HEAD_DIM as MAX_ATTENTION_HEAD_DIM;
pub use cluster::launch_cluster;
pub use ops::{DeviceHidden, DeviceInputs, LossWorkspace, RowStrides, Student};
pub use row_schedule::RowSchedule;
pub use span::DeviceSpan;
pub use topk::{DeviceTopK, DeviceTopKInputs};

/// The storage types of the model's device tensors (activations, their gradients, the working
/// copy of the weights): f32 or bf16, named by the suffix of the kernels that take them. Sealed:
/// the kernels exist for these two only.
pub trait Storage:
    cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + crate::dtype::Element
    + Unpin
    + storage::Sealed
{
    /// The dtype's kernel suffix (`f32`, `bf16`).
    const SUFFIX: &'static str;
}

impl Storage for f32 {
    const SUFFIX: &'static str = "f32";
}

impl Storage for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

mod storage {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

pub use tensor::{DeviceLabels, DeviceTensor, DeviceTensorMut, DeviceVec};

/// The kernels compiled by nvcc at build time (empty when nvcc was not found).
pub const FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

/// ptxas's report for every kernel and architecture: a TSV with the columns
/// `arch kernel registers spill_stores spill_loads stack_bytes smem_bytes` (empty without nvcc).
pub const PTXAS_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/ptxas.tsv"));

/// The emulator's message for its last failed launch (barrier divergence, trap, bad shuffle).
#[cfg(feature = "emulator")]
pub fn emulator_last_error() -> Option<String> {
    emulator::last_error()
}

/// Whether the emulated driver has been loaded into this process.
fn emulator_loaded() -> bool {
    #[cfg(feature = "emulator")]
    return emulator::is_loaded();
    #[cfg(not(feature = "emulator"))]
    false
}

/// A driver error as the crate's error: out-of-memory is its own variant, every other code
/// keeps the driver's error as its source.
fn driver_error(during: &str, detail: String, source: DriverError) -> Error {
    use cudarc::driver::sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY;
    let during = during.to_string();
    if source.0 == CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory { during, source }
    } else {
        Error::Cuda {
            during,
            detail,
            source,
        }
    }
}

/// The emulator-only module when running on the emulator (it stands in for a missing fatbin).
fn emulator_image(emulated: bool) -> Option<&'static [u8]> {
    #[cfg(feature = "emulator")]
    if emulated {
        return Some(emulator::MODULE_IMAGE);
    }
    let _ = emulated;
    None
}

/// The name the emulated driver gives its device (kernels/emulator/driver.cpp, cuDeviceGetName):
/// asking the driver cudarc actually resolved is the one test that holds however it was linked.
const EMULATED_DEVICE_NAME: &str = "distill-kernels emulated GPU";

fn driver_is_emulator(ctx: &CudaContext) -> bool {
    ctx.name()
        .is_ok_and(|n| n.starts_with(EMULATED_DEVICE_NAME))
}

/// Whether a CUDA driver library can be loaded (cudarc would panic inside `CudaContext::new`
/// without one when it loads the driver at run time; when the application links it, it is
/// loaded already and this finds it).
fn driver_library_present() -> bool {
    let names: &[&str] = if cfg!(windows) {
        &["nvcuda.dll"]
    } else {
        &["libcuda.so.1", "libcuda.so"]
    };
    names.iter().any(|name| {
        // SAFETY: loads the system's CUDA driver library (or finds it loaded); its initializers
        // are the driver's own, which cudarc would run next anyway.
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

/// Whether this build carries compiled kernels for real GPUs.
pub const HAS_FATBIN: bool = cfg!(dk_fatbin);

/// The emulator-only module image. Loaded on the emulated device (e.g. with
/// `context().load_module(Ptx::from_binary(EMULATOR_ONLY_MODULE.to_vec()))`), it is a module with
/// every kernel compiled into the emulator, including its deliberately broken self-test kernels
/// (kernels/emulator/selftest.cu). The real fatbin holds only the crate's kernels, and a real
/// driver rejects this image.
#[cfg(feature = "emulator")]
pub const EMULATOR_ONLY_MODULE: &[u8] = emulator::MODULE_IMAGE;

/// A CUDA device with the kernel module loaded, and the stream every call is issued on.
pub struct CudaKernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    emulated: bool,
    /// How the fused loss lays out its rows ([`RowSchedule::Auto`] unless set), and the layout
    /// the last loss call ran.
    row_schedule: Mutex<(RowSchedule, Option<RowSchedule>)>,
    /// cuBLAS on `stream`, made at the first matmul (or why it could not be).
    blas: std::sync::OnceLock<std::result::Result<cudarc::cublas::CudaBlas, String>>,
}

impl std::fmt::Debug for CudaKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKernels")
            .field("ordinal", &self.ctx.ordinal())
            .field("emulated", &self.emulated)
            .finish()
    }
}

impl CudaKernels {
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
        if emulator_loaded() {
            return Err(Error::DeviceUnavailable(
                "the emulated CUDA driver is loaded in this process; a real GPU cannot be opened \
                 beside it (use the emulated device, or a separate process)"
                    .into(),
            ));
        }
        if !driver_library_present() {
            return Err(Error::DeviceUnavailable(
                "no CUDA driver found (libcuda.so could not be loaded)".into(),
            ));
        }
        Self::open(ordinal, FATBIN.to_vec(), false)
    }

    /// The CUDA device `kind` names: `cuda` is GPU 0, `emulated` the emulated GPU (an error
    /// naming the missing feature when this build has none). `cpu` and `reference` run on the
    /// host, not through CUDA: an error naming them. The one place a device kind becomes a
    /// `CudaKernels`, for every command that takes `--device`.
    pub fn open_kind(kind: crate::device::DeviceKind) -> Result<Self> {
        use crate::device::DeviceKind;
        match kind {
            DeviceKind::Cuda => Self::new(0),
            #[cfg(feature = "emulator")]
            DeviceKind::Emulated => Self::emulated(),
            #[cfg(not(feature = "emulator"))]
            DeviceKind::Emulated => Err(Error::DeviceUnavailable(
                "this build of distill-kernels has no emulated device (enable the `emulator` \
                 feature)"
                    .into(),
            )),
            DeviceKind::Cpu | DeviceKind::Reference => Err(Error::DeviceUnavailable(format!(
                "{kind:?} runs on the host, not on a CUDA device"
            ))),
        }
    }

    /// The emulated GPU: the kernels compiled for the host, behind a fake CUDA driver, driven by
    /// exactly the same cudarc calls as a real device.
    #[cfg(feature = "emulator")]
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
        if !driver_is_emulator(&device.ctx) {
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
        let emulated = emulator_loaded() && driver_is_emulator(stream.context());
        #[cfg(feature = "emulator")]
        if emulated {
            emulator::set_kernel_limits(PTXAS_REPORT)?;
        }
        let image = if !FATBIN.is_empty() {
            FATBIN.to_vec()
        } else if let Some(image) = emulator_image(emulated) {
            image.to_vec()
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
            .map_err(|e| driver_error("loading the kernel module", String::new(), e))?;
        Ok(CudaKernels {
            ctx,
            stream,
            module,
            functions: Mutex::new(HashMap::new()),
            emulated,
            row_schedule: Mutex::new((RowSchedule::Auto, None)),
            blas: std::sync::OnceLock::new(),
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
            .map_err(|e| driver_error("loading the kernel module", String::new(), e))?;
        Ok(CudaKernels {
            ctx,
            stream,
            module,
            functions: Mutex::new(HashMap::new()),
            emulated,
            row_schedule: Mutex::new((RowSchedule::Auto, None)),
            blas: std::sync::OnceLock::new(),
        })
    }

    /// Whether this is the emulated device.
    pub fn is_emulated(&self) -> bool {
        self.emulated
    }

    /// Sets how later loss calls lay out their rows (default [`RowSchedule::Auto`]). A forced
    /// schedule that cannot run a call makes that call return [`Error::InvalidOption`].
    pub fn set_row_schedule(&self, schedule: RowSchedule) {
        self.row_schedule
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0 = schedule;
    }

    /// The row schedule of loss calls.
    pub fn row_schedule(&self) -> RowSchedule {
        self.row_schedule
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
    }

    /// The layout the last loss call on this device ran (never `Auto`: what it resolved to), or
    /// `None` before the first.
    pub fn last_row_layout(&self) -> Option<RowSchedule> {
        self.row_schedule
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
    }

    pub(crate) fn note_row_layout(&self, layout: RowSchedule) {
        self.row_schedule
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1 = Some(layout);
    }

    /// The stream every call of this device is issued on. Buffers passed to the device-buffer
    /// methods may live on other streams of the same context: cudarc's events order the work.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The driver context the module and stream belong to (the emulator's on the emulated device),
    /// e.g. to create streams or load another module.
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
    pub(crate) fn cuda_error(&self, during: &str, e: DriverError) -> Error {
        #[cfg(feature = "emulator")]
        let detail = if self.emulated {
            emulator::last_error()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        } else {
            String::new()
        };
        #[cfg(not(feature = "emulator"))]
        let detail = String::new();
        driver_error(during, detail, e)
    }
}
