// Shared device helpers: dtype loads/stores, warp and block reductions, online softmax state.
// Compiled twice: by nvcc for the GPU, and by the host C++ compiler against emulator/simt.h.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define DK_REGISTER_KERNEL(name, P)
// The launch's dynamic shared memory (the emulator's simt.h defines its own).
#define DK_DYNAMIC_SHARED(T, name)                                   \
    extern __shared__ __align__(16) unsigned char dk_dynamic_smem[]; \
    T* name = reinterpret_cast<T*>(dk_dynamic_smem)
#else
#include "emulator/simt.h"
#endif

#include "abi.h"

// The emulator compiles some kernel files in parts (build.rs: EMU_PARTS), one translation unit
// per part with DK_EMU_PART defined; DK_EMU_IN_PART(i) selects a part's instantiations. nvcc, and
// the emulator's other files, see every part.
#ifdef DK_EMU_PART
#define DK_EMU_IN_PART(i) (DK_EMU_PART == (i))
#else
#define DK_EMU_IN_PART(i) 1
#endif

#define DK_WARP 32
#define DK_MAX_WARPS 32  // 1024 threads per block at most

// ---- element loads and stores: every dtype is widened to f32, stored with round-to-nearest-even.
__device__ __forceinline__ float dk_load(const float* p) { return *p; }
__device__ __forceinline__ float dk_load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float dk_load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void dk_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void dk_store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void dk_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// A gradient element: written, or added to what the buffer holds (accumulate mode: several
// losses into one gradient), rounded once to the buffer's dtype.
template <typename G>
__device__ __forceinline__ void dk_put(G* p, float v, bool accumulate) {
    dk_store(p, accumulate ? dk_load(p) + v : v);
}

// ---- reductions. Every block size used is a multiple of 32, so warps are always full.

struct DkSum {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

__device__ __forceinline__ float dk_shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ int dk_shfl_xor(int v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ long long dk_shfl_xor(long long v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
__device__ __forceinline__ double dk_shfl_xor(double v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }

// Butterfly reduction: every lane ends with the warp's result.
template <typename T, typename Op>
__device__ __forceinline__ T dk_warp_reduce(T v, Op op) {
#pragma unroll
    for (int m = DK_WARP / 2; m > 0; m >>= 1) v = op(v, dk_shfl_xor(v, m));
    return v;
}

// Block-wide reduction, result in every thread. The warps' partials are combined by every thread
// in warp order, so the result is deterministic and broadcast without another barrier. `smem`
// holds DK_MAX_WARPS values; the leading barrier makes back-to-back calls on one buffer safe.
template <typename T, typename Op>
__device__ __forceinline__ T dk_block_reduce(T v, Op op, T* smem) {
    v = dk_warp_reduce(v, op);
    const int lane = threadIdx.x % DK_WARP, warp = threadIdx.x / DK_WARP;
    const int warps = blockDim.x / DK_WARP;
    __syncthreads();
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    T r = smem[0];
    for (int w = 1; w < warps; ++w) r = op(r, smem[w]);
    return r;
}

// One warp finishes the reduction: the warps' partials go to shared memory, warp 0 combines
// them in a fixed tree (deterministic) and broadcasts through one slot. `empty` is the identity
// of `op`; `smem` holds DK_MAX_WARPS + 1 values and serves this one reduction of the block
// (no leading barrier: give each reduction its own buffer). Two barriers, whatever the block size.
template <typename T, typename Op>
__device__ __forceinline__ T dk_block_reduce_warp0(T v, Op op, T empty, T* smem) {
    v = dk_warp_reduce(v, op);
    const int lane = threadIdx.x % DK_WARP, warp = threadIdx.x / DK_WARP;
    const int warps = blockDim.x / DK_WARP;
    if (lane == 0) {
        smem[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        T w = lane < warps ? smem[lane] : empty;
        w = dk_warp_reduce(w, op);
        if (lane == 0) smem[DK_MAX_WARPS] = w;
    }
    __syncthreads();
    return smem[DK_MAX_WARPS];
}

// ---- base-2 exponential and logarithm on the MUFU (PTX ex2.approx.ftz.f32, lg2.approx.ftz.f32:
// one MUFU each; nvcc's exp2f and __log2f are the non-ftz forms, three instructions more on
// sm_90). Accuracy, from the CUDA C++ Programming Guide's tables (exp2f is ex2.approx, __log2f is
// lg2.approx): 2^x within 2 ulp; log2 x within 2^-22 absolute for x in [0.5, 2], 2 ulp elsewhere.
// ftz: a subnormal input reads as 0 (2^x = 1, log2 x = -inf), a subnormal result is +0. The
// emulator models both, bounds and flushes (kernels/emulator/simt.h, DISTILL_EMU_APPROX).
#ifdef __CUDACC__
__device__ __forceinline__ float dk_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float dk_lg2(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#else
__device__ __forceinline__ float dk_ex2(float x) { return ::dk_emu::ex2_approx_ftz(x); }
__device__ __forceinline__ float dk_lg2(float x) { return ::dk_emu::lg2_approx_ftz(x); }
#endif

// ---- asynchronous copies of 16 bytes from global to shared memory (cp.async.cg, sm_80+): the
// bytes are in flight without occupying registers, so a thread can keep several chunks coming
// while it computes. A copy lands in shared memory only once a dk_cp_async_wait<N> retires its
// commit group (all but the newest N groups); the emulator performs it exactly then (simt.h).
// Both addresses 16-byte aligned.
#ifdef __CUDACC__
__device__ __forceinline__ void dk_cp_async16(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(smem))),
                 "l"(__cvta_generic_to_global(gmem))
                 : "memory");
}
__device__ __forceinline__ void dk_cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void dk_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
#else
__device__ __forceinline__ void dk_cp_async16(void* smem, const void* gmem) { ::dk_emu::cp_async(smem, gmem, 16); }
__device__ __forceinline__ void dk_cp_async_commit() { ::dk_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void dk_cp_async_wait() {
    ::dk_emu::cp_async_wait(N);
}
#endif

// ---- online softmax: running max m and sum of exp((x - m) * scale) over the values seen.
// `-inf` entries contribute nothing (guarding exp(-inf - -inf) = NaN); NaN propagates into z.
struct DkMaxSum {
    float m;
    float z;
};

__device__ __forceinline__ DkMaxSum dk_maxsum_empty() { return DkMaxSum{-INFINITY, 0.0f}; }

__device__ __forceinline__ void dk_maxsum_add(DkMaxSum& st, float x, float scale) {
    if (x > st.m) {
        st.z = st.z * expf((st.m - x) * scale) + 1.0f;  // st.z == 0 when st.m == -inf
        st.m = x;
    } else if (x != -INFINITY) {
        st.z += expf((x - st.m) * scale);  // NaN x lands here and poisons z
    }
}

__device__ __forceinline__ DkMaxSum dk_maxsum_merge(DkMaxSum a, DkMaxSum b, float scale) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return DkMaxSum{m, a.z + b.z};  // both empty (or NaN sums carried along)
    const float za = a.z == 0.0f ? 0.0f : a.z * expf((a.m - m) * scale);
    const float zb = b.z == 0.0f ? 0.0f : b.z * expf((b.m - m) * scale);
    return DkMaxSum{m, za + zb};
}

__device__ __forceinline__ DkMaxSum dk_shfl_xor(DkMaxSum v, int mask) {
    return DkMaxSum{dk_shfl_xor(v.m, mask), dk_shfl_xor(v.z, mask)};
}

struct DkMaxSumOp {
    float scale;
    __device__ __forceinline__ DkMaxSum operator()(DkMaxSum a, DkMaxSum b) const {
        return dk_maxsum_merge(a, b, scale);
    }
};

// ---- the row loop every kernel uses: thread `tid` visits j = tid, tid + nt, ... (coalesced). The
// main part loads DK_UNROLL elements of each input before using any, so a thread keeps several
// independent loads in flight (Little's law: bandwidth needs bytes in flight, and the compiler
// may not hoist loads above stores that could alias them, as in-place gradients do).
#define DK_UNROLL 4

template <typename A, typename B, typename F>
__device__ __forceinline__ void dk_row_pass(int64_t n, const A* a, const B* b, F&& f) {
    const int64_t nt = blockDim.x;
    int64_t j = threadIdx.x;
    for (; j + (DK_UNROLL - 1) * nt < n; j += DK_UNROLL * nt) {
        float av[DK_UNROLL], bv[DK_UNROLL];
#pragma unroll
        for (int u = 0; u < DK_UNROLL; ++u) {
            av[u] = dk_load(a + j + u * nt);
            bv[u] = b ? dk_load(b + j + u * nt) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < DK_UNROLL; ++u) f(j + u * nt, av[u], bv[u]);
    }
    for (; j < n; j += nt) f(j, dk_load(a + j), b ? dk_load(b + j) : 0.0f);
}

// 0 * anything = 0: a term whose weighting probability is zero is absent, even against log 0.
__device__ __forceinline__ float dk_xlogy_term(float w, float d) { return w == 0.0f ? 0.0f : w * d; }
