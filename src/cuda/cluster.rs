//! Thread-block cluster launches (sm_90): `cuLaunchKernelEx` with a cluster dimension, which
//! cudarc's launch builder does not expose. One place for the FFI call; the row-on-chip loss and
//! the emulator's cluster tests launch through it.

use std::ffi::c_void;

use cudarc::driver::sys;
use cudarc::driver::{CudaFunction, CudaStream, DriverError, LaunchConfig};

/// Launches `f` on `stream` in clusters of `cluster` blocks along x (`cfg.grid_dim.0` must be a
/// multiple of it), with `params` as the kernel's argument array.
///
/// # Safety
/// `params` must match the kernel's parameters, and every device pointer in them must stay valid
/// until the kernel has run (the caller orders that on `stream`, as for any raw launch).
pub unsafe fn launch_cluster(
    stream: &CudaStream,
    f: &CudaFunction,
    cfg: LaunchConfig,
    cluster: u32,
    params: &mut [*mut c_void],
) -> Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    // SAFETY: plain data; the union's cluster member is the one written.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_1 {
        x: cluster,
        y: 1,
        z: 1,
    };
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: the config and attribute outlive the call; the caller vouches for `params`.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
}
