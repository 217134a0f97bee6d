/*
 * Kernels for the emulator's own checks from Rust (tests/device_api.rs). Compiled into the
 * emulator library only, never by nvcc: some are broken on purpose.
 *
 * All take DkSelftestParams { float* out } with out[blockDim.x], and are launched with any
 * grid; every block writes the same values.
 */
#include "emulator/simt.h"

struct DkSelftestParams {
    float* out; /* [blockDim.x] */
};

/* Correct: out[t] = number of threads in the block, via shuffles, shared memory and barriers
 * (block size a multiple of 32). */
extern "C" __global__ void dk_selftest_ok(DkSelftestParams p) {
    __shared__ float partial[32];
    float v = 1.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    float total = 0.0f;
    for (unsigned w = 0; w < (blockDim.x + 31) / 32; ++w) total += partial[w];
    p.out[threadIdx.x] = total;
}
DK_REGISTER_KERNEL(dk_selftest_ok, DkSelftestParams)

/* Barrier divergence: thread 1 returns before a __syncthreads the others wait at. */
extern "C" __global__ void dk_selftest_divergence(DkSelftestParams p) {
    if (threadIdx.x == 1) return;
    __syncthreads();
    p.out[threadIdx.x] = 1.0f;
}
DK_REGISTER_KERNEL(dk_selftest_divergence, DkSelftestParams)

/* A shuffle with a partial mask: unsupported by the emulator, reported as such. */
extern "C" __global__ void dk_selftest_partial_shuffle(DkSelftestParams p) {
    const float v = __shfl_xor_sync(0x0000ffffu, static_cast<float>(threadIdx.x), 1);
    p.out[threadIdx.x] = v;
}
DK_REGISTER_KERNEL(dk_selftest_partial_shuffle, DkSelftestParams)

/* __trap() in thread 0 of block 1. */
extern "C" __global__ void dk_selftest_trap(DkSelftestParams p) {
    if (blockIdx.x == 1 && threadIdx.x == 0) __trap();
    p.out[threadIdx.x] = 2.0f;
}
DK_REGISTER_KERNEL(dk_selftest_trap, DkSelftestParams)

/* Reads one element past the end of out (caught when the library is built with ASan). */
extern "C" __global__ void dk_selftest_oob_read(DkSelftestParams p) {
    const float past = threadIdx.x == 0 ? p.out[blockDim.x] : 0.0f;
    __syncthreads();
    p.out[threadIdx.x] = past * 0.0f + 3.0f;
}
DK_REGISTER_KERNEL(dk_selftest_oob_read, DkSelftestParams)
