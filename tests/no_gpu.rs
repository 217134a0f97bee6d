//! Its own test binary: the emulated driver must not be loaded in this process, so the real
//! CUDA device's "no driver / no GPU / no kernels" paths are the ones exercised.
use distill_kernels::{DeviceKind, Error};

/// Without a GPU (and here without a driver) the real CUDA device is an error, never a panic.
#[test]
fn cuda_device_without_gpu_is_an_error() {
    match distill_kernels::open(DeviceKind::Cuda) {
        Ok(dev) => eprintln!("a real GPU is present: {}", dev.name()),
        Err(e) => assert!(matches!(e, Error::DeviceUnavailable(_)), "{e}"),
    }
}
