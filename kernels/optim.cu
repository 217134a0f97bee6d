// The optimizer step on the device: the global gradient norm (a deterministic two-stage f64
// reduction over fixed chunks) with its clipping factor, and AdamW with decoupled weight decay.
// The clipping factor stays on the device: AdamW multiplies each gradient by it as it reads it,
// so clipping costs no pass of its own and no copy to the host.
#include "common.cuh"

struct DkSumD {
    __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};

extern "C" __global__ void __launch_bounds__(256) dk_sumsq_partial(DkSumSqParams p) {
    __shared__ double red[DK_MAX_WARPS];
    const int64_t begin = (int64_t)blockIdx.x * DK_NORM_CHUNK;
    const int64_t end = begin + DK_NORM_CHUNK < p.n ? begin + DK_NORM_CHUNK : p.n;
    double acc = 0.0;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const double g = p.grads[i];
        acc += g * g;
    }
    acc = dk_block_reduce(acc, DkSumD{}, red);
    if (threadIdx.x == 0) p.partials[blockIdx.x] = acc;
}
DK_REGISTER_KERNEL(dk_sumsq_partial, DkSumSqParams)

extern "C" __global__ void __launch_bounds__(1024) dk_clip_finish(DkClipParams p) {
    __shared__ double red[DK_MAX_WARPS];
    double acc = 0.0;
    for (int64_t b = threadIdx.x; b < p.blocks; b += blockDim.x) acc += p.partials[b];
    acc = dk_block_reduce(acc, DkSumD{}, red);
    if (threadIdx.x == 0) {
        const double norm = sqrt(acc);
        DkClipResult r;
        r.sum_sq = acc;
        r.norm = (float)norm;
        r.finite = isfinite(norm) ? 1 : 0;
        // As the CPU optimizer: clip only a finite norm above a usable max_norm.
        const bool clip = r.finite && p.max_norm >= 0.0f && norm > (double)p.max_norm;
        r.scale = clip ? (float)((double)p.max_norm / norm) : 1.0f;
        r.reserved = 0;
        *p.result = r;
    }
}
DK_REGISTER_KERNEL(dk_clip_finish, DkClipParams)

// Each operation rounded on its own (__fmul_rn and friends are never contracted into an FMA), in
// the order of src/train/optim.rs, so that the device and the CPU agree to the bit.
extern "C" __global__ void __launch_bounds__(256) dk_adamw_f32(DkAdamWParams p) {
    if (p.clip && !p.clip->finite) return;  // the caller stops the run; nothing is written
    const float scale = p.clip ? p.clip->scale : 1.0f;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = p.begin + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.end; i += stride) {
        const float g = __fmul_rn(p.grads[i], scale);
        const float m = __fadd_rn(__fmul_rn(p.beta1, p.m[i]), __fmul_rn(p.one_minus_beta1, g));
        const float v = __fadd_rn(__fmul_rn(p.beta2, p.v[i]), __fmul_rn(__fmul_rn(p.one_minus_beta2, g), g));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), p.bc2_sqrt), p.eps);
        p.m[i] = m;
        p.v[i] = v;
        const float param = __fsub_rn(__fmul_rn(p.params[i], p.shrink), __fmul_rn(p.step_size, __fdiv_rn(m, denom)));
        p.params[i] = param;
        if (p.bf16_copy) dk_store(static_cast<__nv_bfloat16*>(p.bf16_copy) + i, param);
    }
}
DK_REGISTER_KERNEL(dk_adamw_f32, DkAdamWParams)
