// The fused distillation loss (DESIGN section 4): softmax with temperature of student and teacher,
// forward KL / reverse KL / generalized JSD, hard-label cross-entropy at T = 1 in the same pass,
// the per-row loss and the gradient w.r.t. the student logits. One block per row.
//
// Memory traffic per row: pass 1 reads student and teacher once for the online statistics (running
// max and sum of exponentials); pass 2 reads them again and writes the gradient. Probabilities are
// recomputed, never stored. JSD is the one exception: its gradient needs sum_k p_s(k) g_k, which
// depends on both normalizers, so it takes a third read (pass 2 reduces that sum, pass 3 writes).
#include "common.cuh"

// Reverse KL needs its row value before the gradient (d KL_r / d a_j = p_s(j) (log p_s(j) -
// log p_t(j) - KL_r)), so pass 1 also accumulates r = sum_j exp((s_j - m_s)/T) * d_j with
// d_j = (s_j - m_s)/T - (t_j - m_t)/T, kept relative to the running maxima m_s, m_t and shifted
// whenever one of them grows. Then KL_r = r / z_s - log z_s + log z_t, in centered quantities
// only, so logits of magnitude 1e4 lose nothing to cancellation.
struct DkRkl {
    DkMaxSum s, t;
    float r;
};

__device__ __forceinline__ DkRkl dk_rkl_empty() { return DkRkl{dk_maxsum_empty(), dk_maxsum_empty(), 0.0f}; }

__device__ __forceinline__ void dk_rkl_add(DkRkl& st, float sv, float tv, float inv_t) {
    // A larger teacher max lowers every recorded (t - m_t): each weighted term grows by the shift.
    if (tv > st.t.m && st.s.z != 0.0f) st.r += (tv - st.t.m) * inv_t * st.s.z;
    dk_maxsum_add(st.t, tv, inv_t);
    // A larger student max rescales the weights and lowers every recorded (s - m_s).
    if (sv > st.s.m && st.s.z != 0.0f && !isinf(st.r)) {
        const float shift = (st.s.m - sv) * inv_t;
        st.r = expf(shift) * (st.r + shift * st.s.z);
    }
    dk_maxsum_add(st.s, sv, inv_t);
    if (sv != -INFINITY) {
        const float w = expf((sv - st.s.m) * inv_t);
        // A student term against a zero teacher probability is +inf, as the math says.
        // One product of the difference: with FMA contraction (nvcc's default) two products
        // would leave d != 0 for identical student and teacher rows.
        const float d = tv == -INFINITY ? INFINITY : ((sv - st.s.m) - (tv - st.t.m)) * inv_t;
        st.r += dk_xlogy_term(w, d);
    }
}

__device__ __forceinline__ float dk_rkl_rebase(const DkRkl& x, float ms, float mt, float inv_t) {
    if (x.s.z == 0.0f || isinf(x.r)) return x.r;
    const float shift = (x.s.m - ms) * inv_t;
    return expf(shift) * (x.r + (shift + (mt - x.t.m) * inv_t) * x.s.z);
}

struct DkRklOp {
    float inv_t;
    __device__ __forceinline__ DkRkl operator()(DkRkl a, DkRkl b) const {
        const float ms = fmaxf(a.s.m, b.s.m), mt = fmaxf(a.t.m, b.t.m);
        const float r = dk_rkl_rebase(a, ms, mt, inv_t) + dk_rkl_rebase(b, ms, mt, inv_t);
        return DkRkl{dk_maxsum_merge(a.s, b.s, inv_t), dk_maxsum_merge(a.t, b.t, inv_t), r};
    }
};

__device__ __forceinline__ DkRkl dk_shfl_xor(DkRkl v, int m) {
    return DkRkl{dk_shfl_xor(v.s, m), dk_shfl_xor(v.t, m), dk_shfl_xor(v.r, m)};
}

// log(exp(x) + exp(y)) without overflow; -inf when both are -inf.
__device__ __forceinline__ float dk_logaddexp(float x, float y) {
    const float m = fmaxf(x, y);
    if (m == -INFINITY) return m;
    return m + log1pf(expf(-fabsf(x - y)));
}

template <int KIND, typename S, typename T, typename G>
__device__ void kd_row(const DkKdParams& p) {
    __shared__ float red_f[DK_MAX_WARPS];
    __shared__ DkMaxSum red_ms[DK_MAX_WARPS];
    __shared__ DkRkl red_rkl[DK_MAX_WARPS];

    const int64_t row = blockIdx.x;
    const int64_t V = p.vocab;
    const int64_t tid = threadIdx.x, nt = blockDim.x;
    const S* s = static_cast<const S*>(p.student) + row * p.student_stride;
    const T* t = static_cast<const T*>(p.teacher) + row * p.teacher_stride;
    // No __restrict__: the gradient may be written in place over the student logits. Every
    // element is read and then written by the same thread, so aliasing is safe.
    G* g = p.grad ? static_cast<G*>(p.grad) + row * p.grad_stride : nullptr;

    // A bad label anywhere (found by dk_prepare) fails the whole call: write nothing, so an
    // in-place gradient does not destroy the logits of a call that returns an error.
    if (p.scalars->bad_label_row >= 0) return;

    int64_t y = -1;
    bool valid = true;
    if (p.labels) {
        y = p.labels[row];
        // Out-of-range labels are reported by dk_prepare; here they only must not be read.
        valid = y != p.ignore_index && y >= 0 && y < V;
    }
    const bool acc = p.accumulate != 0;
    if (!valid) {  // uniform across the block: no thread reaches a barrier below
        if (g && !acc)
            for (int64_t j = tid; j < V; j += nt) dk_store(g + j, 0.0f);
        if (tid == 0) p.row_loss[row] = 0.0f;
        return;
    }

    const bool soft = p.soft_weight != 0.0f;
    const bool hard = p.hard_weight != 0.0f && y >= 0;
    const float inv_t = p.inv_temperature;
    // The label's logit, read before any barrier: an in-place gradient overwrites it in pass 2.
    const float s_y = (tid == 0 && hard) ? dk_load(s + y) : 0.0f;

    // ---- pass 1: online statistics.
    DkMaxSum s1 = dk_maxsum_empty();  // student at T = 1 (hard loss)
    DkRkl st = dk_rkl_empty();        // student and teacher at T (and r for reverse KL)
    // The teacher is read only when the soft loss is on (alpha = 0 never touches it).
    const T* t_read = soft ? t : nullptr;
    dk_row_pass(V, s, t_read, [&](int64_t, float sv, float tv) {
        if (hard) dk_maxsum_add(s1, sv, 1.0f);
        if (soft) {
            if (KIND == DK_KIND_REVERSE_KL) {
                dk_rkl_add(st, sv, tv, inv_t);
            } else {
                dk_maxsum_add(st.s, sv, inv_t);
                dk_maxsum_add(st.t, tv, inv_t);
            }
        }
    });
    if (hard) s1 = dk_block_reduce(s1, DkMaxSumOp{1.0f}, red_ms);
    if (soft) {
        if (KIND == DK_KIND_REVERSE_KL) {
            st = dk_block_reduce(st, DkRklOp{inv_t}, red_rkl);
        } else {
            st.s = dk_block_reduce(st.s, DkMaxSumOp{inv_t}, red_ms);
            st.t = dk_block_reduce(st.t, DkMaxSumOp{inv_t}, red_ms);
        }
    }
    const float log_zs = logf(st.s.z), log_zt = logf(st.t.z), log_z1 = logf(s1.z);
    const float kl_rev = st.r / st.s.z - log_zs + log_zt;
    const float beta = p.beta;
    const float log_beta = logf(beta), log_1mbeta = log1pf(-beta);

    const float gs = p.scalars->grad_scale;
    const float w_soft = gs * p.soft_weight * inv_t;  // d a / d s = 1 / T
    const float w_hard = gs * p.hard_weight;
    const bool write_in_pass2 = g && KIND != DK_KIND_JSD;

    // ---- pass 2: per-element log-probabilities, loss terms, and (KL kinds) the gradient.
    float soft_acc = 0.0f;  // this thread's share of the soft loss
    float jsd_k = 0.0f;     // JSD: share of sum_k p_s(k) (log p_s(k) - log m(k))
    if (soft || write_in_pass2) {
        dk_row_pass(V, s, t_read, [&](int64_t j, float sv, float tv) {
            float grad = 0.0f;
            if (soft) {
                const float ls = (sv - st.s.m) * inv_t - log_zs;
                const float lt = (tv - st.t.m) * inv_t - log_zt;
                const float ps = expf(ls), pt = expf(lt);
                if (KIND == DK_KIND_FORWARD_KL) {
                    soft_acc += dk_xlogy_term(pt, lt - ls);
                    grad = w_soft * (ps - pt);
                } else if (KIND == DK_KIND_REVERSE_KL) {
                    soft_acc += dk_xlogy_term(ps, ls - lt);
                    grad = ps == 0.0f ? 0.0f : w_soft * ps * ((ls - lt) - kl_rev);
                } else {
                    const float lm = dk_logaddexp(lt + log_beta, ls + log_1mbeta);
                    soft_acc += beta * dk_xlogy_term(pt, lt - lm) + (1.0f - beta) * dk_xlogy_term(ps, ls - lm);
                    jsd_k += dk_xlogy_term(ps, ls - lm);
                }
            }
            if (write_in_pass2) {
                if (hard) grad += w_hard * (expf((sv - s1.m) - log_z1) - (j == y ? 1.0f : 0.0f));
                dk_put(g + j, grad, acc);
            }
        });
    }
    float soft_loss = 0.0f;
    if (soft) soft_loss = dk_block_reduce(soft_acc, DkSum{}, red_f);

    // ---- pass 3 (JSD with a gradient only).
    if (KIND == DK_KIND_JSD && g) {
        const float k = soft ? dk_block_reduce(jsd_k, DkSum{}, red_f) : 0.0f;
        dk_row_pass(V, s, t_read, [&](int64_t j, float sv, float tv) {
            float grad = 0.0f;
            if (soft) {
                const float ls = (sv - st.s.m) * inv_t - log_zs;
                const float lt = (tv - st.t.m) * inv_t - log_zt;
                const float ps = expf(ls);
                const float lm = dk_logaddexp(lt + log_beta, ls + log_1mbeta);
                grad = ps == 0.0f ? 0.0f : w_soft * (1.0f - beta) * ps * ((ls - lm) - k);
            }
            if (hard) grad += w_hard * (expf((sv - s1.m) - log_z1) - (j == y ? 1.0f : 0.0f));
            dk_put(g + j, grad, acc);
        });
    }

    if (tid == 0) {
        float loss = 0.0f;
        if (soft) loss += p.soft_weight * soft_loss;
        if (hard) loss += p.hard_weight * -((s_y - s1.m) - log_z1);
        p.row_loss[row] = loss;
    }
}

// Instantiations: kind x student dtype x teacher dtype, gradient f32 or the student's dtype (in place).
// One kernel per kind: a runtime switch over the kinds makes ptxas keep all three bodies' state
// live at once and spill under the 64-register cap of 1024-thread blocks.
#define DK_KD_KIND(kind, KIND, s, t, g, S, T, G)                                                 \
    extern "C" __global__ void __launch_bounds__(1024) dk_kd_##kind##_##s##_##t##_##g(DkKdParams p) { \
        kd_row<KIND, S, T, G>(p);                                                                \
    }                                                                                            \
    DK_REGISTER_KERNEL(dk_kd_##kind##_##s##_##t##_##g, DkKdParams)
#define DK_KD(s, t, g, S, T, G)                                 \
    DK_KD_KIND(fkl, DK_KIND_FORWARD_KL, s, t, g, S, T, G)       \
    DK_KD_KIND(rkl, DK_KIND_REVERSE_KL, s, t, g, S, T, G)       \
    DK_KD_KIND(jsd, DK_KIND_JSD, s, t, g, S, T, G)

DK_KD(f32, f32, f32, float, float, float)
DK_KD(f32, f16, f32, float, __half, float)
DK_KD(f32, bf16, f32, float, __nv_bfloat16, float)
DK_KD(f16, f32, f32, __half, float, float)
DK_KD(f16, f16, f32, __half, __half, float)
DK_KD(f16, bf16, f32, __half, __nv_bfloat16, float)
DK_KD(bf16, f32, f32, __nv_bfloat16, float, float)
DK_KD(bf16, f16, f32, __nv_bfloat16, __half, float)
DK_KD(bf16, bf16, f32, __nv_bfloat16, __nv_bfloat16, float)
DK_KD(f16, f32, f16, __half, float, __half)
DK_KD(f16, f16, f16, __half, __half, __half)
DK_KD(f16, bf16, f16, __half, __nv_bfloat16, __half)
DK_KD(bf16, f32, bf16, __nv_bfloat16, float, __nv_bfloat16)
DK_KD(bf16, f16, bf16, __nv_bfloat16, __half, __nv_bfloat16)
DK_KD(bf16, bf16, bf16, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16)
