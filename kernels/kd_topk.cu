// The fused loss against a top-k teacher (semantics::TopKTeacher): the student's full softmax at
// T summed into the teacher's k + 1 buckets (its top ids and one tail), forward or reverse KL
// between the bucket distributions, the hard-label cross-entropy at T = 1 in the same pass, the
// per-row loss and the gradient w.r.t. the student logits. One block per row; the student row is
// read twice (pass 1 statistics, pass 2 gradient), the k top entries once more (a gather).
//
// The tail's sum must be taken over the tail itself: `z - sum_i e_i` cancels when the top ids hold
// nearly all of the student's mass. So each element asks whether it is a top id, through a hash
// table of the row's ids in shared memory (open addressing, at most half full: about one probe).
// Pass 2 needs no such test: it writes every element with the tail's formula, and after a barrier
// the threads that own the top ids (and the label) overwrite those k + 1 elements with their own
// values, from student logits gathered before pass 2 (the gradient may overwrite the logits).
#include "common.cuh"

#define DK_TOPK_HASH (2 * DK_MAX_TOP_K)  // slots: a power of two, load factor at most 1/2
#define DK_TOPK_EMPTY 0xffffffffu

struct DkTopKTable {
    unsigned key[DK_TOPK_HASH];
    short bucket[DK_TOPK_HASH];
};

__device__ __forceinline__ unsigned dk_topk_slot(unsigned id, unsigned mask) {
    return (id * 2654435761u >> 7) & mask;  // Knuth's multiplicative hash; low bits are weak
}

// Slots for k ids: the smallest power of two >= 2k (at least 32), so a probe sequence is short.
__device__ __forceinline__ unsigned dk_topk_mask(int k) {
    unsigned n = 32;
    while (n < 2u * (unsigned)k) n *= 2;
    return n - 1;
}

// Inserts the row's ids (each thread a share); returns the smallest id this thread found out of
// range or twice, INT64_MAX when none. Ends with a barrier: the table is complete afterwards.
__device__ __forceinline__ long long dk_topk_build(DkTopKTable& t, const uint32_t* ids, int k, int64_t vocab, unsigned mask) {
    for (unsigned h = threadIdx.x; h <= mask; h += blockDim.x) t.key[h] = DK_TOPK_EMPTY;
    __syncthreads();
    long long bad = INT64_MAX;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        const unsigned id = ids[i];
        if ((int64_t)id >= vocab) {
            bad = bad < (long long)id ? bad : (long long)id;
            continue;
        }
        for (unsigned h = dk_topk_slot(id, mask);; h = (h + 1) & mask) {
            const unsigned old = atomicCAS(&t.key[h], DK_TOPK_EMPTY, id);
            if (old == DK_TOPK_EMPTY) {
                t.bucket[h] = (short)i;
                break;
            }
            if (old == id) {
                bad = bad < (long long)id ? bad : (long long)id;
                break;
            }
        }
    }
    __syncthreads();
    return bad;
}

// The bucket of `id` (its index among the row's ids), or -1 for the tail.
__device__ __forceinline__ int dk_topk_find(const DkTopKTable& t, unsigned id, unsigned mask) {
    for (unsigned h = dk_topk_slot(id, mask);; h = (h + 1) & mask) {
        const unsigned key = t.key[h];
        if (key == id) return t.bucket[h];
        if (key == DK_TOPK_EMPTY) return -1;
    }
}

struct DkTopKMin {
    __device__ __forceinline__ long long operator()(long long a, long long b) const { return a < b ? a : b; }
};

extern "C" __global__ void __launch_bounds__(1024) dk_topk_check(DkTopKCheckParams p) {
    __shared__ DkTopKTable table;
    __shared__ long long red_i[DK_MAX_WARPS];
    const int64_t row = blockIdx.x;
    long long bad = dk_topk_build(table, p.ids + row * p.k, p.k, p.vocab, dk_topk_mask(p.k));
    bad = dk_block_reduce(bad, DkTopKMin{}, red_i);
    if (threadIdx.x == 0 && bad != INT64_MAX) atomicMin((long long*)&p.scalars->bad_topk, (long long)(row << 32 | bad));
}
DK_REGISTER_KERNEL(dk_topk_check, DkTopKCheckParams)

// Online max and sum where `member` elements raise the max but add nothing to the sum: the
// reference point covers every element (so the top entries' exponentials cannot overflow later),
// the sum is the tail's alone.
__device__ __forceinline__ void dk_maxsum_add_tail(DkMaxSum& st, float x, float scale, bool member) {
    if (x > st.m) {
        st.z = st.z * expf((st.m - x) * scale) + (member ? 0.0f : 1.0f);
        st.m = x;
    } else if (!member && x != -INFINITY) {
        st.z += expf((x - st.m) * scale);  // NaN x lands here and poisons z
    }
}

__device__ __forceinline__ float dk_load_dtype(const void* p, int64_t i, int dtype) {
    if (dtype == DK_DTYPE_F16) return dk_load(static_cast<const __half*>(p) + i);
    if (dtype == DK_DTYPE_BF16) return dk_load(static_cast<const __nv_bfloat16*>(p) + i);
    return dk_load(static_cast<const float*>(p) + i);
}

template <int KIND, typename S, typename G>
__device__ void topk_row(const DkTopKParams& p) {
    __shared__ DkTopKTable table;
    __shared__ float s_top[DK_MAX_TOP_K];     // the student's logits at the top ids
    __shared__ float c_top[DK_MAX_TOP_K + 1];  // the teacher's bucket logits at T, the tail last
    __shared__ float red_f[DK_MAX_WARPS];
    __shared__ DkMaxSum red_ms[DK_MAX_WARPS];

    const int64_t row = blockIdx.x;
    const int64_t V = p.vocab;
    const int k = p.k;
    const int64_t tid = threadIdx.x, nt = blockDim.x;
    const S* s = static_cast<const S*>(p.student) + row * p.student_stride;
    const uint32_t* ids = p.ids + row * (int64_t)k;
    // No __restrict__: the gradient may be written in place over the student logits.
    G* g = p.grad ? static_cast<G*>(p.grad) + row * p.grad_stride : nullptr;

    // A bad label or id anywhere fails the whole call: write nothing.
    if (p.scalars->bad_label_row >= 0 || p.scalars->bad_topk != INT64_MAX) return;

    int64_t y = -1;
    bool valid = true;
    if (p.labels) {
        y = p.labels[row];
        valid = y != p.ignore_index && y >= 0 && y < V;
    }
    const bool acc = p.accumulate != 0;
    if (!valid) {  // uniform across the block
        if (g && !acc)
            for (int64_t j = tid; j < V; j += nt) dk_store(g + j, 0.0f);
        if (tid == 0) p.row_loss[row] = 0.0f;
        return;
    }

    const bool soft = p.soft_weight != 0.0f;
    const bool hard = p.hard_weight != 0.0f && y >= 0;
    const float inv_t = p.inv_temperature;
    const unsigned mask = dk_topk_mask(k);
    // Everything read before pass 2, which may overwrite the logits: the label's logit, the top
    // entries and the teacher's buckets.
    const float s_y = hard ? dk_load(s + y) : 0.0f;
    if (soft) {
        dk_topk_build(table, ids, k, V, mask);  // ids were checked by dk_topk_check
        for (int i = tid; i < k; i += nt) {
            s_top[i] = dk_load(s + ids[i]);
            c_top[i] = dk_load_dtype(p.values, row * (int64_t)k + i, p.values_dtype) * inv_t;
        }
        if (tid == 0) c_top[k] = p.tail[row];  // given at T already
        // dk_block_reduce's leading barrier orders these writes before any read of them.
    }

    // ---- pass 1: the max over the row, the tail's sum, the cross-entropy's statistics.
    DkMaxSum st = dk_maxsum_empty();  // student at T: max over all, sum over the tail
    DkMaxSum s1 = dk_maxsum_empty();  // student at T = 1
    dk_row_pass(V, s, (const float*)nullptr, [&](int64_t j, float sv, float) {
        if (hard) dk_maxsum_add(s1, sv, 1.0f);
        if (soft) dk_maxsum_add_tail(st, sv, inv_t, dk_topk_find(table, (unsigned)j, mask) >= 0);
    });
    if (hard) s1 = dk_block_reduce(s1, DkMaxSumOp{1.0f}, red_ms);
    const float log_z1 = logf(s1.z);

    float soft_loss = 0.0f, log_z = 0.0f, log_q_tail = 0.0f, mt = 0.0f, log_zt = 0.0f;
    float fkl_coef = 0.0f, rkl_tail = 0.0f, kl_rev = 0.0f;
    if (soft) {
        st = dk_block_reduce(st, DkMaxSumOp{inv_t}, red_ms);
        // The teacher's buckets: max and sum of exp over c (already divided by T).
        DkMaxSum tb = dk_maxsum_empty();
        float e_top = 0.0f;
        for (int i = tid; i <= k; i += nt) {
            dk_maxsum_add(tb, c_top[i], 1.0f);
            if (i < k && s_top[i] != -INFINITY) e_top += expf((s_top[i] - st.m) * inv_t);
        }
        tb = dk_block_reduce(tb, DkMaxSumOp{1.0f}, red_ms);
        e_top = dk_block_reduce(e_top, DkSum{}, red_f);
        mt = tb.m;
        log_zt = logf(tb.z);
        log_z = logf(st.z + e_top);
        log_q_tail = logf(st.z) - log_z;
        const float lp_tail = c_top[k] - mt - log_zt;
        const float p_tail = expf(lp_tail);
        float terms = 0.0f;  // this thread's share of the top buckets' divergence terms
        for (int i = tid; i < k; i += nt) {
            const float lq = (s_top[i] - st.m) * inv_t - log_z;
            const float lp = c_top[i] - mt - log_zt;
            terms += KIND == DK_KIND_FORWARD_KL ? dk_xlogy_term(expf(lp), lp - lq) : dk_xlogy_term(expf(lq), lq - lp);
        }
        soft_loss = dk_block_reduce(terms, DkSum{}, red_f);
        if (KIND == DK_KIND_FORWARD_KL) {
            soft_loss += dk_xlogy_term(p_tail, lp_tail - log_q_tail);
            // The tail's pull on each of its entries, per unit of exp((s - m) / T).
            fkl_coef = p_tail == 0.0f ? 0.0f : p_tail / st.z;
        } else {
            soft_loss += dk_xlogy_term(expf(log_q_tail), log_q_tail - lp_tail);
            kl_rev = soft_loss;
            rkl_tail = log_q_tail - lp_tail - kl_rev;
        }
    }

    const float gs = p.scalars->grad_scale;
    const float w_soft = gs * p.soft_weight * inv_t;
    const float w_hard = gs * p.hard_weight;
    // The gradient of one element from its logit and bucket (-1: the tail).
    auto entry = [&](float sv, int b, bool is_label) {
        float grad = 0.0f;
        if (soft) {
            const float e = sv == -INFINITY ? 0.0f : expf((sv - st.m) * inv_t);
            const float q = expf((sv - st.m) * inv_t - log_z);
            if (KIND == DK_KIND_FORWARD_KL) {
                grad = w_soft * (b >= 0 ? q - expf(c_top[b] - mt - log_zt) : q - fkl_coef * e);
            } else {
                const float c = b >= 0 ? ((sv - st.m) * inv_t - log_z) - (c_top[b] - mt - log_zt) - kl_rev : rkl_tail;
                grad = q == 0.0f ? 0.0f : w_soft * q * c;
            }
        }
        if (hard) grad += w_hard * (expf((sv - s1.m) - log_z1) - (is_label ? 1.0f : 0.0f));
        return grad;
    };

    // ---- pass 2: every element with the tail's formula, then the top ids and the label. The
    // tail's soft gradient is linear in e = exp((s - m) / T): one exponential per element.
    // Overwriting, pass 2 writes the top ids too and a barrier orders their overwrites after it;
    // accumulating, an element must be added to once, so pass 2 skips the top ids (one probe of
    // the table each) and applies the label's -1 itself.
    if (g) {
        const float inv_z = expf(-log_z);
        const float c_tail = KIND == DK_KIND_FORWARD_KL ? w_soft * (inv_z - fkl_coef) : w_soft * inv_z * rkl_tail;
        dk_row_pass(V, s, (const float*)nullptr, [&](int64_t j, float sv, float) {
            if (acc && soft && dk_topk_find(table, (unsigned)j, mask) >= 0) return;
            float grad = 0.0f;
            if (soft) {
                const float e = expf((sv - st.m) * inv_t);
                grad = e == 0.0f ? 0.0f : c_tail * e;
            }
            if (hard) grad += w_hard * (expf((sv - s1.m) - log_z1) - (acc && j == y ? 1.0f : 0.0f));
            dk_put(g + j, grad, acc);
        });
        __syncthreads();  // the overwrites below come after every pass-2 store of the block
        if (soft)
            for (int i = tid; i < k; i += nt) dk_put(g + ids[i], entry(s_top[i], i, (int64_t)ids[i] == y), acc);
        if (!acc && tid == 0 && hard && !(soft && dk_topk_find(table, (unsigned)y, mask) >= 0))
            dk_store(g + y, entry(s_y, -1, true));
    }

    if (tid == 0) {
        float loss = 0.0f;
        if (soft) loss += p.soft_weight * soft_loss;
        if (hard) loss += p.hard_weight * -((s_y - s1.m) - log_z1);
        p.row_loss[row] = loss;
    }
}

#define DK_TOPK_KIND(kind, KIND, s, g, S, G)                                                             \
    extern "C" __global__ void __launch_bounds__(1024, 1) dk_topk_##kind##_##s##_##g(DkTopKParams p) { \
        topk_row<KIND, S, G>(p);                                                                     \
    }                                                                                                \
    DK_REGISTER_KERNEL(dk_topk_##kind##_##s##_##g, DkTopKParams)
#define DK_TOPK(s, g, S, G)                               \
    DK_TOPK_KIND(fkl, DK_KIND_FORWARD_KL, s, g, S, G)     \
    DK_TOPK_KIND(rkl, DK_KIND_REVERSE_KL, s, g, S, G)

DK_TOPK(f32, f32, float, float)
DK_TOPK(f16, f32, __half, float)
DK_TOPK(bf16, f32, __nv_bfloat16, float)
DK_TOPK(f16, f16, __half, __half)
DK_TOPK(bf16, bf16, __nv_bfloat16, __nv_bfloat16)
