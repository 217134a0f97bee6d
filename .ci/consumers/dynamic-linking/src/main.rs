//! Opens the CUDA device through distill-kernels in a binary whose cudarc links libcuda.
fn main() {
    // cudarc's own call, resolved by the dynamic linker (no dlopen under `dynamic-linking`).
    println!("cuInit: {:?}", cudarc::driver::result::init());
    match distill_kernels::cuda::CudaKernels::new(0) {
        Ok(dev) => println!("opened {:?}", dev.name()),
        Err(e) => println!("no CUDA device: {e}"),
    }
}
