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

/* ---- One kernel per class of bug the check build (DISTILL_EMU_CHECK) must report. Each is
 * correct on the fast emulator's fixed schedule, or at least gives the "right" numbers there:
 * that is the point. Launch them with one block unless a comment says otherwise. */

/* Reads a neighbour's shared value with no barrier between its write and the read. */
extern "C" __global__ void dk_selftest_shared_race(DkSelftestParams p) {
    __shared__ float s[1024];
    s[threadIdx.x] = 0.0f;
    __syncthreads();
    s[threadIdx.x] = static_cast<float>(threadIdx.x);
    const float v = s[(threadIdx.x + 1) % blockDim.x]; /* missing __syncthreads above */
    p.out[threadIdx.x] = v;
}
DK_REGISTER_KERNEL(dk_selftest_shared_race, DkSelftestParams)

/* Two block reductions back to back on one shared buffer, shaped like dk_block_reduce (warp
 * shuffles, one slot per warp), without the barrier that must come before the second one's
 * writes: a warp that runs ahead overwrites a slot another warp has not read yet. On the default
 * schedule every thread reads before any warp finishes its shuffles, so out = 3 * blockDim.x. */
__device__ float dk_selftest_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
extern "C" __global__ void dk_selftest_reuse_without_barrier(DkSelftestParams p) {
    __shared__ float s[32];
    const unsigned warp = threadIdx.x / 32, warps = blockDim.x / 32;
    float v = dk_selftest_warp_sum(1.0f);
    if (threadIdx.x % 32 == 0) s[warp] = v;
    __syncthreads();
    float a = 0.0f;
    for (unsigned w = 0; w < warps; ++w) a += s[w];
    v = dk_selftest_warp_sum(2.0f);
    if (threadIdx.x % 32 == 0) s[warp] = v; /* needs a __syncthreads before it */
    __syncthreads();
    float b = 0.0f;
    for (unsigned w = 0; w < warps; ++w) b += s[w];
    p.out[threadIdx.x] = a + b;
}
DK_REGISTER_KERNEL(dk_selftest_reuse_without_barrier, DkSelftestParams)

/* Every block writes the same output elements: a race between blocks (launch with 2 blocks). */
extern "C" __global__ void dk_selftest_global_race(DkSelftestParams p) { p.out[threadIdx.x] = 1.0f; }
DK_REGISTER_KERNEL(dk_selftest_global_race, DkSelftestParams)

/* Reads shared memory that no thread of this block wrote (the previous block did). */
extern "C" __global__ void dk_selftest_uninit_shared(DkSelftestParams p) {
    __shared__ float s[1024];
    const float v = s[threadIdx.x];
    __syncthreads();
    s[threadIdx.x] = 5.0f;
    p.out[threadIdx.x] = v * 0.0f + 5.0f;
}
DK_REGISTER_KERNEL(dk_selftest_uninit_shared, DkSelftestParams)

/* Reads the output before writing it: uninitialised when the buffer is fresh from cuMemAlloc. */
extern "C" __global__ void dk_selftest_uninit_global(DkSelftestParams p) {
    const float v = p.out[threadIdx.x];
    p.out[threadIdx.x] = v + 1.0f;
}
DK_REGISTER_KERNEL(dk_selftest_uninit_global, DkSelftestParams)

/* A float4 load from an address that is 4 but not 16 bytes aligned (out[1..5)). */
extern "C" __global__ void dk_selftest_misaligned(DkSelftestParams p) {
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (threadIdx.x == 0) v = *reinterpret_cast<const float4*>(p.out + 1);
    __syncthreads();
    p.out[threadIdx.x] = v.x * 0.0f + 7.0f;
}
DK_REGISTER_KERNEL(dk_selftest_misaligned, DkSelftestParams)

/* Indexes a static shared array one past its end. */
extern "C" __global__ void dk_selftest_shared_oob(DkSelftestParams p) {
    __shared__ float s[32];
    __shared__ float t[32];
    const unsigned i = threadIdx.x % 33; /* 32 for thread 32 */
    if (threadIdx.x < 32) s[threadIdx.x] = 1.0f;
    if (threadIdx.x < 32) t[threadIdx.x] = 0.0f;
    __syncthreads();
    p.out[threadIdx.x] = s[i] + t[0];
}
DK_REGISTER_KERNEL(dk_selftest_shared_oob, DkSelftestParams)

/* Thread 0 waits for a flag that thread 1 sets: fine on sm_70+ (independent thread scheduling),
 * a hang on the emulator, whose threads are not preemptive; the watchdog must end it. */
extern "C" __global__ void dk_selftest_spin(DkSelftestParams p) {
    __shared__ int flag;
    if (threadIdx.x == 0) flag = 0;
    __syncthreads();
    if (threadIdx.x == 0) {
        while (*static_cast<volatile int*>(&flag) == 0) {
        }
    }
    if (threadIdx.x == 1) *static_cast<volatile int*>(&flag) = 1;
    p.out[threadIdx.x] = 8.0f;
}
DK_REGISTER_KERNEL(dk_selftest_spin, DkSelftestParams)

/* ---- Thread-block clusters: launched with cuLaunchKernelEx and a cluster dimension, and
 * blockDim.x floats of dynamic shared memory per block. */

/* Correct: each block fills its shared memory with rank * 1000 + t; after cluster.sync() every
 * thread sums element t over the cluster's blocks through map_shared_rank, and rank 0 adds
 * 1000 * n (n - 1) / 2 + n t to out[t] (atomically: every cluster adds, so launch it on a zeroed
 * output). The second cluster.sync() keeps every block's memory alive until all have read it. */
extern "C" __global__ void dk_selftest_cluster_ok(DkSelftestParams p) {
    namespace cg = cooperative_groups;
    const cg::cluster_group cluster = cg::this_cluster();
    DK_DYNAMIC_SHARED(float, smem);
    const unsigned r = cluster.block_rank(), t = threadIdx.x;
    smem[t] = static_cast<float>(r * 1000 + t);
    cluster.sync();
    float sum = 0.0f;
    for (unsigned q = 0; q < cluster.num_blocks(); ++q) sum += cluster.map_shared_rank(smem, q)[t];
    cluster.sync();
    if (r == 0) atomicAdd(&p.out[t], sum);
}
DK_REGISTER_KERNEL(dk_selftest_cluster_ok, DkSelftestParams)

/* Barrier divergence across blocks: rank 1 returns before a cluster.sync() the others wait at. */
extern "C" __global__ void dk_selftest_cluster_divergence(DkSelftestParams p) {
    const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    if (cluster.block_rank() == 1) return;
    cluster.sync();
    p.out[threadIdx.x] = 1.0f;
}
DK_REGISTER_KERNEL(dk_selftest_cluster_divergence, DkSelftestParams)

/* Rank 1 exits while rank 0 still reads its shared memory (no cluster.sync() before the exit).
 * Two __syncthreads let rank 1 finish on the default schedule before rank 0 maps its memory. */
extern "C" __global__ void dk_selftest_cluster_exited(DkSelftestParams p) {
    const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    DK_DYNAMIC_SHARED(float, smem);
    smem[threadIdx.x] = 2.0f;
    if (cluster.block_rank() != 0) return;
    __syncthreads();
    __syncthreads();
    p.out[threadIdx.x] = cluster.map_shared_rank(smem, 1)[threadIdx.x];
}
DK_REGISTER_KERNEL(dk_selftest_cluster_exited, DkSelftestParams)

/* Rank 1 writes into rank 0's shared memory while rank 0 reads it: only each block's own
 * __syncthreads lies between, and a block barrier does not order another block's accesses. */
extern "C" __global__ void dk_selftest_cluster_race(DkSelftestParams p) {
    const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    DK_DYNAMIC_SHARED(float, smem);
    const unsigned r = cluster.block_rank(), t = threadIdx.x;
    smem[t] = 0.0f;
    cluster.sync();
    if (r == 1) cluster.map_shared_rank(smem, 0)[t] = 5.0f;
    __syncthreads();
    const float v = r == 0 ? smem[t] : 0.0f; /* needs a cluster.sync() above */
    cluster.sync();
    if (r == 0) p.out[t] = v;
}
DK_REGISTER_KERNEL(dk_selftest_cluster_race, DkSelftestParams)

/* Static __shared__ in a cluster kernel: one variable per OS thread in the emulator, so the
 * blocks of a cluster would share it; the check build refuses it. */
extern "C" __global__ void dk_selftest_cluster_static_shared(DkSelftestParams p) {
    const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    __shared__ float s[1024];
    s[threadIdx.x] = 3.0f;
    cluster.sync();
    if (cluster.block_rank() == 0) p.out[threadIdx.x] = s[threadIdx.x];
}
DK_REGISTER_KERNEL(dk_selftest_cluster_static_shared, DkSelftestParams)

/* ---- Asynchronous copies (cp.async), launched as clusters of one block for their dynamic shared
 * memory (blockDim.x a multiple of 8). */

/* Correct: every thread writes out[t] = t; every eighth thread copies out[t, t + 8) into shared
 * memory in two commit groups (16 bytes; then 8 + 4 + 4) and waits for both; then
 * out[t] = smem[t] + 1. */
extern "C" __global__ void dk_selftest_async_ok(DkSelftestParams p) {
    DK_DYNAMIC_SHARED(float, smem);
    const unsigned t = threadIdx.x;
    p.out[t] = static_cast<float>(t);
    __syncthreads();
    if (t % 8 == 0) {
        ::dk_emu::cp_async(smem + t, p.out + t, 16);
        ::dk_emu::cp_async_commit();
        ::dk_emu::cp_async(smem + t + 4, p.out + t + 4, 8);
        ::dk_emu::cp_async(smem + t + 6, p.out + t + 6, 4);
        ::dk_emu::cp_async(smem + t + 7, p.out + t + 7, 4);
        ::dk_emu::cp_async_commit();
        ::dk_emu::cp_async_wait(1); /* the first group has landed */
        const float first = smem[t];
        ::dk_emu::cp_async_wait(0);
        smem[t] = first;
    }
    __syncthreads();
    const float v = smem[t] + 1.0f;
    __syncthreads();
    p.out[t] = v;
}
DK_REGISTER_KERNEL(dk_selftest_async_ok, DkSelftestParams)

/* Reads a copy's destination before waiting for it: the bytes have not landed (the fast build
 * reads the 0xFF fill, a NaN; initcheck reports the read). */
extern "C" __global__ void dk_selftest_async_unwaited(DkSelftestParams p) {
    DK_DYNAMIC_SHARED(float, smem);
    const unsigned t = threadIdx.x;
    if (t % 4 == 0) {
        ::dk_emu::cp_async(smem + t, p.out + t, 16);
        ::dk_emu::cp_async_commit();
        const float early = smem[t]; /* needs a cp.async.wait_group before */
        ::dk_emu::cp_async_wait(0);
        p.out[t] = early;
    }
}
DK_REGISTER_KERNEL(dk_selftest_async_unwaited, DkSelftestParams)

/* Exits with a committed copy never waited for. */
extern "C" __global__ void dk_selftest_async_pending(DkSelftestParams p) {
    DK_DYNAMIC_SHARED(float, smem);
    if (threadIdx.x % 4 == 0) {
        ::dk_emu::cp_async(smem + threadIdx.x, p.out + threadIdx.x, 16);
        ::dk_emu::cp_async_commit();
    }
}
DK_REGISTER_KERNEL(dk_selftest_async_pending, DkSelftestParams)

/* Thread 4 writes a word of the source while thread 0's copy of it is in flight: the barrier
 * orders the write before thread 0's wait but not after its issue, so the copy may read either
 * value (racecheck: the source is read at the issue and at the wait). */
extern "C" __global__ void dk_selftest_async_source_race(DkSelftestParams p) {
    DK_DYNAMIC_SHARED(float, smem);
    const unsigned t = threadIdx.x;
    if (t == 0) {
        ::dk_emu::cp_async(smem, p.out + 4, 16);
        ::dk_emu::cp_async_commit();
    }
    if (t == 4) p.out[4] = 1.0f; /* needs a barrier before thread 0's issue */
    __syncthreads();
    if (t == 0) {
        ::dk_emu::cp_async_wait(0);
        p.out[0] = smem[0];
    }
}
DK_REGISTER_KERNEL(dk_selftest_async_source_race, DkSelftestParams)

/* Thread 1 reads a word of the destination while thread 0's copy into it is in flight: the copy
 * may land right after its issue, and only a barrier after the issue orders them the other way
 * (racecheck: the destination counts as written at the issue as well as at the wait). */
extern "C" __global__ void dk_selftest_async_destination_race(DkSelftestParams p) {
    DK_DYNAMIC_SHARED(float, smem);
    const unsigned t = threadIdx.x;
    smem[t] = 0.0f;
    __syncthreads();
    if (t == 0) {
        ::dk_emu::cp_async(smem, p.out, 16);
        ::dk_emu::cp_async_commit();
    }
    const float v = t == 1 ? smem[1] : 0.0f; /* needs a barrier before thread 0's issue */
    __syncthreads();
    if (t == 0) ::dk_emu::cp_async_wait(0);
    __syncthreads();
    if (t == 1) p.out[1] = v;
}
DK_REGISTER_KERNEL(dk_selftest_async_destination_race, DkSelftestParams)

/* A copy into a cluster peer's shared memory (through map_shared_rank): cp.async writes the
 * block's own shared memory only (memcheck). */
extern "C" __global__ void dk_selftest_async_into_peer(DkSelftestParams p) {
    const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    DK_DYNAMIC_SHARED(float, smem);
    cluster.sync();
    if (cluster.block_rank() == 0 && threadIdx.x == 0) {
        ::dk_emu::cp_async(cluster.map_shared_rank(smem, 1), p.out, 16);
        ::dk_emu::cp_async_commit();
        ::dk_emu::cp_async_wait(0);
    }
    cluster.sync();
}
DK_REGISTER_KERNEL(dk_selftest_async_into_peer, DkSelftestParams)
