//! The fake CUDA driver behaves like the real one where the crate could get it wrong: modules
//! hold only the kernels of their image, launch limits come from ptxas, zero-byte allocations
//! fail, kernel faults surface at the next synchronisation (not at the launch) and, with
//! `DISTILL_EMU_STICKY=1`, poison their context. kernels/emulator/tests/test_fidelity.cpp checks
//! the driver's C API in detail; this checks what cudarc and the crate see.
//!
//! This binary runs with `DISTILL_EMU_STICKY=1` (set before the driver is first used); the tests
//! that make a kernel fault do it in a context of their own.
mod common;

use cudarc::driver::sys::{CUfunction_attribute, CUresult};
use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
use distill_kernels::cuda::{CudaKernels, EMULATOR_ONLY_MODULE, FATBIN, HAS_FATBIN, PTXAS_REPORT};
use distill_kernels::{DistillDevice, Error, HostSlice, HostSliceMut};
use std::sync::OnceLock;

/// The shared emulated device (primary context), opened once with sticky errors on.
fn device() -> &'static CudaKernels {
    static DEV: OnceLock<CudaKernels> = OnceLock::new();
    DEV.get_or_init(|| {
        // Read by the driver at its first use, which is this device's opening.
        std::env::set_var("DISTILL_EMU_STICKY", "1");
        CudaKernels::emulated().expect("the emulated device opens")
    })
}

fn driver_error(code: CUresult) -> cudarc::driver::DriverError {
    cudarc::driver::DriverError(code)
}

/// The real fatbin is read like a GPU driver reads it: the crate's kernels are there, the
/// emulator's self-test kernels (compiled into the emulator library only) are not. The
/// emulator-only module holds both.
#[test]
fn modules_hold_only_the_kernels_of_their_image() {
    let ctx = device().context();
    let only = ctx
        .load_module(cudarc::nvrtc::Ptx::from_binary(
            EMULATOR_ONLY_MODULE.to_vec(),
        ))
        .unwrap();
    assert!(only.load_function("dk_selftest_ok").is_ok());
    assert!(only.load_function("dk_reduce").is_ok());
    assert_eq!(
        only.load_function("dk_no_such_kernel").unwrap_err(),
        driver_error(CUresult::CUDA_ERROR_NOT_FOUND)
    );
    if !HAS_FATBIN {
        eprintln!("built without nvcc: no fatbin to check");
        return;
    }
    let real = ctx
        .load_module(cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec()))
        .unwrap();
    assert!(real.load_function("dk_reduce").is_ok());
    assert_eq!(
        real.load_function("dk_selftest_ok").unwrap_err(),
        driver_error(CUresult::CUDA_ERROR_NOT_FOUND)
    );
    let msg = distill_kernels::cuda::emulator_last_error().unwrap_or_default();
    assert!(
        msg.contains("dk_selftest_ok") && msg.contains("sm_90 cubin"),
        "{msg}"
    );
    // Not an image at all: a real driver's PTX JIT rejects text like this.
    assert_eq!(
        ctx.load_module(cudarc::nvrtc::Ptx::from_binary(b"selftest\0".to_vec()))
            .unwrap_err(),
        driver_error(CUresult::CUDA_ERROR_INVALID_PTX)
    );
}

/// Threads per block an sm_90 kernel with `regs` registers per thread can launch: 65536
/// registers per block, allocated per warp in units of 256 (the CUDA occupancy calculator).
fn threads_for_registers(regs: i32) -> i32 {
    let per_warp = (regs * 32 + 255) / 256 * 256;
    (65536 / per_warp * 32).min(1024)
}

/// The kernels built with `__launch_bounds__(256)` (element-wise and per-chunk work), the model
/// ops by their name without the storage suffix (`_f32`, `_bf16`); every other kernel is built
/// for 1024 threads.
const BOUNDED_256: [&str; 15] = [
    "dk_sumsq_partial",
    "dk_adamw_f32",
    "dk_embedding_bwd",
    "dk_rmsnorm_bwd_dw",
    "dk_swiglu_fwd",
    "dk_swiglu_bwd",
    "dk_residual_fwd",
    "dk_residual_bwd",
    "dk_bias_fwd",
    "dk_bias_bwd",
    "dk_rope",
    "dk_copy_rows",
    "dk_attention_fwd",
    "dk_attention_bwd_dq",
    "dk_attention_bwd_dkv",
];

/// The launch bound `kernel` was built with.
fn launch_bound(kernel: &str) -> i32 {
    let base = kernel
        .strip_suffix("_bf16")
        .or_else(|| kernel.strip_suffix("_f32"))
        .unwrap_or(kernel);
    if BOUNDED_256.contains(&kernel) || BOUNDED_256.contains(&base) {
        256
    } else {
        1024
    }
}

/// Every kernel reports ptxas's registers and static shared memory for sm_90, and the block size
/// they allow: the registers' limit, capped by the kernel's launch bound.
#[test]
fn kernel_attributes_are_ptxas_numbers() {
    if !HAS_FATBIN {
        eprintln!("built without nvcc: no ptxas report");
        return;
    }
    let module = device()
        .context()
        .load_module(cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec()))
        .unwrap();
    let mut kernels = 0;
    for row in PTXAS_REPORT.lines().skip(1) {
        let f: Vec<&str> = row.split('\t').collect();
        if f[0] != "sm_90" {
            continue;
        }
        let (regs, smem): (i32, i32) = (f[2].parse().unwrap(), f[6].parse().unwrap());
        let func = module.load_function(f[1]).unwrap();
        let attr = |a| func.get_attribute(a).unwrap();
        assert_eq!(
            attr(CUfunction_attribute::CU_FUNC_ATTRIBUTE_NUM_REGS),
            regs,
            "{row}"
        );
        assert_eq!(
            attr(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES),
            smem,
            "{row}"
        );
        let threads = attr(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK);
        let bound = launch_bound(f[1]);
        assert_eq!(threads, threads_for_registers(regs).min(bound), "{row}");
        assert_eq!(
            threads, bound,
            "{} cannot launch {bound} threads: {row}",
            f[1]
        );
        assert_eq!(
            attr(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES),
            48 * 1024 - smem,
            "{row}"
        );
        kernels += 1;
    }
    assert_eq!(kernels, 123);
}

/// cudarc allocates `len * size_of::<T>()` bytes as asked, also zero; the CUDA driver refuses
/// zero-byte allocations, and so does the emulated one. The crate checks its inputs for emptiness
/// before it allocates anything.
#[test]
fn zero_byte_allocations_fail_and_the_crate_makes_none() {
    let dev = device();
    assert_eq!(
        dev.stream().alloc_zeros::<f32>(0).unwrap_err(),
        driver_error(CUresult::CUDA_ERROR_INVALID_VALUE)
    );
    let mut out: [f32; 0] = [];
    let e = dev
        .softmax(
            HostSlice::F32(&[]),
            0,
            8,
            1.0,
            false,
            HostSliceMut::F32(&mut out),
        )
        .unwrap_err();
    assert!(matches!(e, Error::Empty(_)), "{e}");
    // The device still works (the refused allocation did not break the context).
    let x = [0.0f32, 1.0, 2.0, 3.0];
    let mut y = [0.0f32; 4];
    dev.softmax(
        HostSlice::F32(&x),
        1,
        4,
        1.0,
        false,
        HostSliceMut::F32(&mut y),
    )
    .unwrap();
    assert!((y.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{y:?}");
}

/// A kernel fault is not reported by the launch (the kernel has not run yet) but by the next
/// synchronisation, with the emulator's message; with DISTILL_EMU_STICKY=1 the context is then
/// unusable, as on a GPU, while other contexts carry on.
#[test]
fn kernel_faults_surface_at_the_next_synchronize_and_stick() {
    let shared = device();
    let ctx = CudaContext::new_non_primary(0, 0).unwrap();
    let own = CudaKernels::on_stream(ctx.default_stream()).unwrap();
    let module = ctx
        .load_module(cudarc::nvrtc::Ptx::from_binary(
            EMULATOR_ONLY_MODULE.to_vec(),
        ))
        .unwrap();
    let f = module.load_function("dk_selftest_divergence").unwrap();
    let stream = own.stream();
    let mut out = stream.alloc_zeros::<f32>(64).unwrap();
    {
        let (ptr, _g) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut out, stream);
        let mut b = stream.launch_builder(&f);
        b.arg(&ptr);
        let cfg = LaunchConfig {
            grid_dim: (2, 1, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: DkSelftestParams is { float* out }, one pointer.
        unsafe { b.launch(cfg) }.expect("the launch itself succeeds: the fault comes later");
    }
    let failed = driver_error(CUresult::CUDA_ERROR_LAUNCH_FAILED);
    assert_eq!(stream.synchronize().unwrap_err(), failed);
    let msg = distill_kernels::cuda::emulator_last_error().unwrap_or_default();
    assert!(
        msg.contains("barrier divergence") && msg.contains("dk_selftest_divergence"),
        "{msg}"
    );
    // Sticky: every later call on this context fails the same way.
    assert_eq!(stream.synchronize().unwrap_err(), failed);
    assert_eq!(stream.alloc_zeros::<f32>(4).unwrap_err(), failed);
    let x = [0.0f32; 4];
    let mut y = [0.0f32; 4];
    let e = own
        .softmax(
            HostSlice::F32(&x),
            1,
            4,
            1.0,
            false,
            HostSliceMut::F32(&mut y),
        )
        .unwrap_err();
    assert!(e.to_string().contains("LAUNCH_FAILED"), "{e}");
    // The primary context (the shared device) is unaffected.
    shared
        .softmax(
            HostSlice::F32(&x),
            1,
            4,
            1.0,
            false,
            HostSliceMut::F32(&mut y),
        )
        .unwrap();
    assert_eq!(y, [0.25; 4]);
    // Dropping the context destroys it (cuCtxDestroy), which is the way out on CUDA too.
    drop((out, module, own, ctx));
}
