//! The check build of the emulated GPU (memcheck, initcheck, racecheck: kernels/emulator/
//! sanitizer.cpp) against one deliberately broken kernel per class of bug. Every kernel here gives
//! plausible numbers on the fast emulator's fixed schedule; the check build must fail each one
//! with a message that names the check, the kernel, the thread and the source line.
//!
//! This binary always runs with `DISTILL_EMU_CHECK=all` (set before the device is opened).
mod common;

use common::selftest::{launch, Output};
use distill_kernels::cuda::CudaKernels;
use std::sync::OnceLock;

fn checked() -> &'static CudaKernels {
    static DEV: OnceLock<CudaKernels> = OnceLock::new();
    DEV.get_or_init(|| {
        // Before the emulator library is loaded: it decides which build to load from this.
        std::env::set_var("DISTILL_EMU_CHECK", "all");
        CudaKernels::emulated().expect("the emulated device opens")
    })
}

/// Runs a broken kernel and returns the error text, which must name the kernel.
fn failure(name: &str, grid: u32, threads: u32, output: Output) -> String {
    let dev = checked();
    let e = launch(dev, name, grid, threads, output)
        .expect_err(&format!("{name} must fail under the check build"))
        .to_string();
    assert!(e.contains(name), "{e}");
    e
}

#[test]
fn correct_kernels_pass_every_check() {
    let dev = checked();
    for threads in [32, 96, 1024] {
        let out = launch(dev, "dk_selftest_ok", 1, threads, Output::Zeroed).unwrap();
        assert!(out.iter().all(|&v| v == threads as f32), "{out:?}");
    }
    // Written before read: a fresh output is fine for a kernel that only writes it.
    let out = launch(dev, "dk_selftest_global_race", 1, 64, Output::Fresh).unwrap();
    assert!(out.iter().all(|&v| v == 1.0));
}

/// Thread-block clusters: a correct cluster kernel passes every check; a block barrier in place of
/// cluster.sync() around distributed shared memory is a race; shared memory of a block that has
/// exited is gone; static __shared__ is refused in a cluster launch (the emulator cannot give each
/// block of a cluster its own copy).
#[test]
fn cluster_kernels_are_checked() {
    use common::selftest::launch_in_clusters;
    let dev = checked();
    let out = launch_in_clusters(dev, "dk_selftest_cluster_ok", 8, 64, 4, Output::Zeroed).unwrap();
    // Two clusters add their sums (atomically: no race between them).
    assert!(
        out.iter()
            .enumerate()
            .all(|(t, &v)| v == 2.0 * (6000.0 + 4.0 * t as f32)),
        "{out:?}"
    );
    let fails = |name: &str| {
        let e = launch_in_clusters(dev, name, 2, 64, 2, Output::Zeroed)
            .expect_err(&format!("{name} must fail under the check build"))
            .to_string();
        assert!(e.contains(name), "{e}");
        e
    };
    let e = fails("dk_selftest_cluster_race");
    assert!(
        e.contains("racecheck") && e.contains("cluster block rank 0"),
        "{e}"
    );
    assert!(e.contains("selftest.cu:"), "source line missing: {e}");
    // On the default schedule block 1 has exited when block 0 maps its memory (selftest.cu): the
    // mapping is refused, in either build.
    let e = fails("dk_selftest_cluster_exited");
    assert!(e.contains("rank 1 of the cluster, which has exited"), "{e}");
    let e = fails("dk_selftest_async_into_peer");
    assert!(
        e.contains("cp.async") && e.contains("cluster block rank 1, not its own"),
        "{e}"
    );
    let e = fails("dk_selftest_cluster_static_shared");
    assert!(
        e.contains("static __shared__ memory in a cluster launch"),
        "{e}"
    );
}

/// A read of a cp.async destination before the wait that retires its copy reads bytes that have
/// not landed: initcheck names it, as the GPU would return whatever shared memory held. And the
/// source is in use from the issue to the wait.
#[test]
fn initcheck_finds_a_read_before_an_asynchronous_copy_lands() {
    use common::selftest::launch_in_clusters;
    let dev = checked();
    let out = launch_in_clusters(dev, "dk_selftest_async_ok", 1, 64, 1, Output::Zeroed).unwrap();
    assert!(
        out.iter().enumerate().all(|(t, &v)| v == t as f32 + 1.0),
        "{out:?}"
    );
    let fails = |name: &str| {
        launch_in_clusters(dev, name, 1, 64, 1, Output::Zeroed)
            .expect_err(&format!("{name} must fail under the check build"))
            .to_string()
    };
    let e = fails("dk_selftest_async_unwaited");
    assert!(e.contains("initcheck") && e.contains("selftest.cu:"), "{e}");
    // A write to the source that a barrier orders after the copy's issue but not after its
    // wait: the copy may read either value.
    let e = fails("dk_selftest_async_source_race");
    assert!(e.contains("racecheck") && e.contains("selftest.cu:"), "{e}");
    // And a read of the destination that only a barrier after the issue orders.
    let e = fails("dk_selftest_async_destination_race");
    assert!(e.contains("racecheck") && e.contains("selftest.cu:"), "{e}");
}

#[test]
fn racecheck_finds_a_missing_barrier_in_shared_memory() {
    let e = failure("dk_selftest_shared_race", 1, 64, Output::Zeroed);
    assert!(e.contains("racecheck") && e.contains("__shared__"), "{e}");
    assert!(e.contains("selftest.cu:"), "source line missing: {e}");
}

#[test]
fn racecheck_finds_buffer_reuse_without_a_leading_barrier() {
    // The bug of dk_block_reduce without its leading __syncthreads: invisible in the results
    // on the fast emulator, a write-after-read hazard here.
    let e = failure("dk_selftest_reuse_without_barrier", 1, 128, Output::Zeroed);
    assert!(e.contains("racecheck: write-after-read"), "{e}");
}

#[test]
fn racecheck_finds_blocks_writing_the_same_element() {
    let e = failure("dk_selftest_global_race", 2, 64, Output::Zeroed);
    assert!(
        e.contains("racecheck") && e.contains("another block"),
        "{e}"
    );
}

#[test]
fn initcheck_finds_uninitialised_shared_and_global_reads() {
    let e = failure("dk_selftest_uninit_shared", 1, 64, Output::Zeroed);
    assert!(e.contains("initcheck") && e.contains("shared"), "{e}");
    let e = failure("dk_selftest_uninit_global", 1, 64, Output::Fresh);
    assert!(e.contains("initcheck") && e.contains("__global__"), "{e}");
    // The same kernel on a zeroed buffer reads initialised memory.
    let out = launch(
        checked(),
        "dk_selftest_uninit_global",
        1,
        64,
        Output::Zeroed,
    )
    .unwrap();
    assert!(out.iter().all(|&v| v == 1.0));
}

#[test]
fn memcheck_finds_out_of_bounds_and_misaligned_accesses() {
    let e = failure("dk_selftest_oob_read", 1, 64, Output::Zeroed);
    assert!(
        e.contains("memcheck: out-of-bounds read") && e.contains("past its end"),
        "{e}"
    );
    assert!(e.contains("ILLEGAL_ADDRESS"), "{e}");
    let e = failure("dk_selftest_shared_oob", 1, 64, Output::Zeroed);
    assert!(e.contains("memcheck: index out of bounds"), "{e}");
    let e = failure("dk_selftest_misaligned", 1, 32, Output::Zeroed);
    assert!(e.contains("misaligned") && e.contains("MISALIGNED"), "{e}");
}

#[test]
fn the_device_keeps_working_after_findings() {
    let _ = failure("dk_selftest_shared_race", 1, 64, Output::Zeroed);
    let out = launch(checked(), "dk_selftest_ok", 1, 64, Output::Zeroed).unwrap();
    assert!(out.iter().all(|&v| v == 64.0));
}

/// The emulated cuBLAS is checked like a kernel: a GEMM that accumulates (`beta = 1`) into a
/// gradient buffer nothing wrote reads garbage on a GPU; initcheck names the call and operand.
#[test]
fn initcheck_finds_a_gemm_accumulating_into_unwritten_memory() {
    use cudarc::cublas::result as cublas;
    use cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N;
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    let dev = checked();
    let s = dev.stream();
    let blas = *dev.blas().unwrap().handle();
    let a = s.clone_htod(&[1.0f32; 16]).unwrap();
    let b = s.clone_htod(&[1.0f32; 16]).unwrap();
    // SAFETY: f32 has no invalid bit patterns; the point is that nothing writes it.
    let mut c = unsafe { s.alloc::<f32>(16) }.unwrap();
    {
        let ((pa, _ga), (pb, _gb)) = (a.device_ptr(s), b.device_ptr(s));
        let (pc, _gc) = c.device_ptr_mut(s);
        let (alpha, beta) = (1.0f32, 1.0f32);
        // SAFETY: 4 x 4 operands inside 16-element buffers.
        unsafe {
            cublas::sgemm(
                blas,
                CUBLAS_OP_N,
                CUBLAS_OP_N,
                4,
                4,
                4,
                &alpha,
                pa as *const f32,
                4,
                pb as *const f32,
                4,
                &beta,
                pc as *mut f32,
                4,
            )
        }
        .unwrap();
    }
    let e = s.synchronize().expect_err("initcheck must fail the GEMM");
    assert_eq!(
        e.0,
        cudarc::driver::sys::cudaError_enum::CUDA_ERROR_LAUNCH_FAILED
    );
    let msg = distill_kernels::cuda::emulator_last_error().unwrap_or_default();
    assert!(
        msg.contains("initcheck") && msg.contains("cublasSgemm operand C"),
        "{msg}"
    );
}
