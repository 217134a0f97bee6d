/*
 * A deliberately broken kernel for the AddressSanitizer check (asan_check.sh): thread 0 of the
 * last block reads one element past the end of its input. The correct variant stays in bounds.
 * Device buffers are exact-size heap blocks, so ASan reports heap-buffer-overflow at the read.
 */
#include "emulator/simt.h"

struct AsanParams {
    const float* x; /* [n] */
    float* out;     /* [gridDim.x] */
    int n;
    int overrun; /* 1: read x[n] */
};

/* Per block: sum of x over the block's chunk, via shuffles and shared memory. */
__device__ float asan_block_sum(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? partial[threadIdx.x] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void dk_asan_sum(AsanParams p) {
    const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    float v = i < p.n ? p.x[i] : 0.0f;
    if (p.overrun && blockIdx.x == gridDim.x - 1 && threadIdx.x == 0) v += p.x[p.n]; /* the bug */
    v = asan_block_sum(v);
    if (threadIdx.x == 0) p.out[blockIdx.x] = v;
}
DK_REGISTER_KERNEL(dk_asan_sum, AsanParams)
