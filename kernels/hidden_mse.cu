// Hidden-state MSE between student and teacher, forward and backward in one pass, with the same
// row mask as the logits loss. Adds weight * mean_h (s - t)^2 into row_loss (written by the KD
// kernel before it on the same stream). One block per row.
#include "common.cuh"

template <typename S, typename T, typename G>
__device__ void hidden_row(const DkHiddenParams& p) {
    __shared__ float red_f[DK_MAX_WARPS];
    if (p.scalars->bad_label_row >= 0) return;  // the call fails; leave every output untouched
    const int64_t row = blockIdx.x, H = p.hidden;
    const S* s = static_cast<const S*>(p.student) + row * H;
    const T* t = static_cast<const T*>(p.teacher) + row * H;
    G* g = p.grad ? static_cast<G*>(p.grad) + row * H : nullptr;
    const bool valid = !p.labels || p.labels[row] != p.ignore_index;
    // d/ds of weight * mean (s - t)^2 = weight * 2 (s - t) / H, times the reduction's scale.
    const float w_grad = valid ? p.scalars->grad_scale * p.weight * 2.0f / (float)H : 0.0f;
    float acc = 0.0f;
    dk_row_pass(H, s, t, [&](int64_t j, float sv, float tv) {
        const float d = sv - tv;
        if (valid) acc += d * d;
        if (g) dk_store(g + j, valid ? w_grad * d : 0.0f);
    });
    acc = dk_block_reduce(acc, DkSum{}, red_f);
    if (threadIdx.x == 0 && valid && p.weight != 0.0f) p.row_loss[row] += p.weight * (acc / (float)H);
}

#define DK_HIDDEN(name, S, T, G)                                                                    \
    extern "C" __global__ void __launch_bounds__(1024) name(DkHiddenParams p) { hidden_row<S, T, G>(p); } \
    DK_REGISTER_KERNEL(name, DkHiddenParams)

DK_HIDDEN(dk_hidden_mse_f32_f32_f32, float, float, float)
DK_HIDDEN(dk_hidden_mse_f32_f16_f32, float, __half, float)
DK_HIDDEN(dk_hidden_mse_f32_bf16_f32, float, __nv_bfloat16, float)
DK_HIDDEN(dk_hidden_mse_f16_f32_f32, __half, float, float)
DK_HIDDEN(dk_hidden_mse_f16_f16_f32, __half, __half, float)
DK_HIDDEN(dk_hidden_mse_f16_bf16_f32, __half, __nv_bfloat16, float)
DK_HIDDEN(dk_hidden_mse_bf16_f32_f32, __nv_bfloat16, float, float)
DK_HIDDEN(dk_hidden_mse_bf16_f16_f32, __nv_bfloat16, __half, float)
DK_HIDDEN(dk_hidden_mse_bf16_bf16_f32, __nv_bfloat16, __nv_bfloat16, float)
DK_HIDDEN(dk_hidden_mse_f16_f32_f16, __half, float, __half)
DK_HIDDEN(dk_hidden_mse_f16_f16_f16, __half, __half, __half)
DK_HIDDEN(dk_hidden_mse_f16_bf16_f16, __half, __nv_bfloat16, __half)
DK_HIDDEN(dk_hidden_mse_bf16_f32_bf16, __nv_bfloat16, float, __nv_bfloat16)
DK_HIDDEN(dk_hidden_mse_bf16_f16_bf16, __nv_bfloat16, __half, __nv_bfloat16)
DK_HIDDEN(dk_hidden_mse_bf16_bf16_bf16, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16)
