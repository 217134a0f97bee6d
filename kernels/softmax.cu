// Softmax and log-softmax with temperature, forward and backward. One block per row, two reads
// of each input row, any V (no per-thread arrays sized by V).
#include "common.cuh"

template <typename X>
__device__ void softmax_fwd_row(const DkSoftmaxParams& p) {
    __shared__ DkMaxSum red_ms[DK_MAX_WARPS];
    const int64_t row = blockIdx.x, V = p.vocab;
    const X* x = static_cast<const X*>(p.input) + row * V;
    X* y = static_cast<X*>(p.output) + row * V;
    const float inv_t = p.inv_temperature;
    DkMaxSum st = dk_maxsum_empty();
    dk_row_pass(V, x, (const X*)nullptr, [&](int64_t, float xv, float) { dk_maxsum_add(st, xv, inv_t); });
    st = dk_block_reduce(st, DkMaxSumOp{inv_t}, red_ms);
    const float log_z = logf(st.z);
    dk_row_pass(V, x, (const X*)nullptr, [&](int64_t j, float xv, float) {
        const float l = (xv - st.m) * inv_t - log_z;
        dk_store(y + j, p.log_output ? l : expf(l));
    });
}

template <typename X>
__device__ void softmax_bwd_row(const DkSoftmaxBwdParams& p) {
    __shared__ float red_f[DK_MAX_WARPS];
    const int64_t row = blockIdx.x, V = p.vocab;
    const X* y = static_cast<const X*>(p.output) + row * V;
    const X* dy = static_cast<const X*>(p.grad_output) + row * V;
    X* dx = static_cast<X*>(p.grad_input) + row * V;  // may alias dy: same thread reads, then writes
    const float inv_t = p.inv_temperature;
    // softmax: dx = y (dy - <y, dy>) / T.   log_softmax: dx = (dy - exp(y) sum(dy)) / T.
    float acc = 0.0f;
    dk_row_pass(V, dy, p.log_output ? nullptr : y, [&](int64_t, float d, float yv) { acc += p.log_output ? d : d * yv; });
    const float dot = dk_block_reduce(acc, DkSum{}, red_f);
    dk_row_pass(V, y, dy, [&](int64_t j, float yv, float d) {
        const float v = p.log_output ? d - expf(yv) * dot : yv * (d - dot);
        dk_store(dx + j, v * inv_t);
    });
}

#define DK_SOFTMAX(suffix, X)                                                                         \
    extern "C" __global__ void __launch_bounds__(1024) dk_softmax_fwd_##suffix(DkSoftmaxParams p) {     \
        softmax_fwd_row<X>(p);                                                                        \
    }                                                                                                 \
    DK_REGISTER_KERNEL(dk_softmax_fwd_##suffix, DkSoftmaxParams)                                      \
    extern "C" __global__ void __launch_bounds__(1024) dk_softmax_bwd_##suffix(DkSoftmaxBwdParams p) {  \
        softmax_bwd_row<X>(p);                                                                        \
    }                                                                                                 \
    DK_REGISTER_KERNEL(dk_softmax_bwd_##suffix, DkSoftmaxBwdParams)

DK_SOFTMAX(f32, float)
DK_SOFTMAX(f16, __half)
DK_SOFTMAX(bf16, __nv_bfloat16)
