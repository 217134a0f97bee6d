//! Launches the emulator's deliberately broken kernels (kernels/emulator/selftest.cu), which are
//! compiled into the emulator library only: every one takes `{ float* out }` with
//! `out[blockDim.x]`.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use distill_kernels::cuda::CudaKernels;
use distill_kernels::Error;

/// A launch's outcome; a driver failure keeps the driver's error as its source.
pub type Result<T> = std::result::Result<T, Error>;

fn cuda(during: &str, source: cudarc::driver::DriverError, detail: String) -> Error {
    Error::Cuda {
        during: during.to_string(),
        detail,
        source,
    }
}

/// How the output buffer starts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Output {
    /// `cuMemsetD8` to zero: initialised.
    Zeroed,
    /// Fresh from `cuMemAlloc`: uninitialised (0xFF bytes in the emulator).
    Fresh,
}

/// Runs `name` on `grid` blocks of `threads` threads and returns `out`, or the launch's error
/// with the emulator's message attached.
pub fn launch(
    dev: &CudaKernels,
    name: &str,
    grid: u32,
    threads: u32,
    output: Output,
) -> Result<Vec<f32>> {
    launch_in_clusters(dev, name, grid, threads, 0, output)
}

/// As [`launch`], in thread-block clusters of `cluster` blocks (`cuLaunchKernelEx`), each block
/// with `threads` floats of dynamic shared memory; `cluster` 0 is a plain launch.
pub fn launch_in_clusters(
    dev: &CudaKernels,
    name: &str,
    grid: u32,
    threads: u32,
    cluster: u32,
    output: Output,
) -> Result<Vec<f32>> {
    let module = dev
        .context()
        .load_module(cudarc::nvrtc::Ptx::from_binary(
            distill_kernels::cuda::EMULATOR_ONLY_MODULE.to_vec(),
        ))
        .map_err(|e| cuda("loading the emulator-only module", e, String::new()))?;
    let f = module
        .load_function(name)
        .map_err(|e| cuda(name, e, String::new()))?;
    let n = threads as usize;
    let mut out = match output {
        Output::Zeroed => dev.stream().alloc_zeros::<f32>(n),
        // SAFETY: the kernel under test decides what it reads; the emulator checks it.
        Output::Fresh => unsafe { dev.stream().alloc::<f32>(n) },
    }
    .map_err(|e| cuda("allocating the output", e, String::new()))?;
    let with_message = |e: cudarc::driver::DriverError| {
        let msg = distill_kernels::cuda::emulator_last_error().unwrap_or_default();
        cuda(name, e, format!(": {msg}"))
    };
    {
        let (ptr, _g) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut out, dev.stream());
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct P {
            out: u64,
        }
        // SAFETY: plain data, the layout of DkSelftestParams.
        unsafe impl cudarc::driver::DeviceRepr for P {}
        let p = P { out: ptr };
        let mut cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        if cluster == 0 {
            let mut b = dev.stream().launch_builder(&f);
            b.arg(&p);
            // SAFETY: the parameter struct matches the kernel's.
            unsafe { b.launch(cfg) }.map_err(with_message)?;
        } else {
            cfg.shared_mem_bytes = 4 * threads;
            let mut args = [&p as *const P as *mut std::ffi::c_void];
            // SAFETY: the parameter struct matches the kernel's; `out` outlives the launch (the
            // stream is synchronized below).
            unsafe {
                distill_kernels::cuda::launch_cluster(dev.stream(), &f, cfg, cluster, &mut args)
            }
            .map_err(with_message)?;
        }
    }
    dev.stream().synchronize().map_err(with_message)?;
    dev.stream().clone_dtoh(&out).map_err(with_message)
}
