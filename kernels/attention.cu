// Causal softmax attention with grouped-query heads, f32, the device twin of
// attention_forward/attention_backward in src/model/ops.rs, in the flash style: the T x T
// probabilities are never stored. The forward keeps one log-sum-exp per query row; the backward
// recomputes each probability from it.
//
// One warp per row (query row in the forward and dQ pass, key/value row in the dK/dV pass): lane
// l holds elements l, l + 32, ... of the row (head sizes up to 32 * DK_ATT_CHUNKS), dot products
// end in a butterfly reduction so every lane holds the same score. Each gradient row is summed by
// the one warp that owns it, in a fixed order: no atomics, the same bits on every run.
//
// Why this shape (not llm.c's batched GEMMs plus a masked softmax): the [B, NH, T, T] scores
// would be 151 MB per sequence per layer for the 135M student at T = 2048, and GQA's head
// mapping does not fit one strided batch. This first version uses no tensor cores (see
// BENCHMARKS.md for what that costs and the tiled successor).
#include "common.cuh"

#define DK_ATT_CHUNKS 4  // head_dim <= 128

// The score of query row `qrow` against key row `krow` with the query in registers.
__device__ __forceinline__ float dk_att_dot(const float (&a)[DK_ATT_CHUNKS], const float* b, int lane, int64_t D) {
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < DK_ATT_CHUNKS; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < D) s = fmaf(a[c], b[d], s);
    }
    return dk_warp_reduce(s, DkSum{});
}

// Same as dk_att_dot with the operands' roles swapped in registers, the same products in the
// same order: the dK/dV pass recomputes exactly the scores of the dQ pass.
__device__ __forceinline__ float dk_att_dot_rev(const float* a, const float (&b)[DK_ATT_CHUNKS], int lane, int64_t D) {
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < DK_ATT_CHUNKS; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < D) s = fmaf(a[d], b[c], s);
    }
    return dk_warp_reduce(s, DkSum{});
}

__device__ __forceinline__ void dk_att_load(float (&r)[DK_ATT_CHUNKS], const float* row, int lane, int64_t D) {
#pragma unroll
    for (int c = 0; c < DK_ATT_CHUNKS; ++c) {
        const int64_t d = lane + 32 * c;
        r[c] = d < D ? row[d] : 0.0f;
    }
}

extern "C" __global__ void __launch_bounds__(256) dk_attention_fwd(DkAttentionParams p) {
    const int lane = threadIdx.x & 31;
    const int64_t NH = p.n_heads, T = p.seq, D = p.head_dim, NKV = p.n_kv_heads;
    const int64_t r = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (r >= p.batch * T * NH) return;  // whole warps leave together
    const int64_t h = r % NH, t = (r / NH) % T, b = r / NH / T, g = h / (NH / NKV);
    float q[DK_ATT_CHUNKS], o[DK_ATT_CHUNKS];
    dk_att_load(q, p.q + r * D, lane, D);
#pragma unroll
    for (int c = 0; c < DK_ATT_CHUNKS; ++c) o[c] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int64_t j = 0; j <= t; ++j) {
        const int64_t kv = ((b * T + j) * NKV + g) * D;
        const float s = dk_att_dot(q, p.k + kv, lane, D) * p.scale;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);  // 0 at the first key (m = -inf)
        const float e = expf(s - m_new);
        l = fmaf(l, corr, e);
#pragma unroll
        for (int c = 0; c < DK_ATT_CHUNKS; ++c) {
            const int64_t d = lane + 32 * c;
            if (d < D) o[c] = fmaf(o[c], corr, e * p.v[kv + d]);
        }
        m = m_new;
    }
    const float inv = 1.0f / l;
#pragma unroll
    for (int c = 0; c < DK_ATT_CHUNKS; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < D) p.out_w[r * D + d] = o[c] * inv;
    }
    if (lane == 0) p.lse[r] = m + logf(l);
}
DK_REGISTER_KERNEL(dk_attention_fwd, DkAttentionParams)

// dQ += scale sum_j dS_ij K_j with dS_ij = P_ij (dO_i . V_j - delta_i), delta_i = dO_i . O_i
// (written for the dK/dV pass).
extern "C" __global__ void __launch_bounds__(256) dk_attention_bwd_dq(DkAttentionParams p) {
    const int lane = threadIdx.x & 31;
    const int64_t NH = p.n_heads, T = p.seq, D = p.head_dim, NKV = p.n_kv_heads;
    const int64_t r = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (r >= p.batch * T * NH) return;
    const int64_t h = r % NH, t = (r / NH) % T, b = r / NH / T, g = h / (NH / NKV);
    float q[DK_ATT_CHUNKS], dout[DK_ATT_CHUNKS], acc[DK_ATT_CHUNKS];
    dk_att_load(q, p.q + r * D, lane, D);
    dk_att_load(dout, p.dout + r * D, lane, D);
    const float delta = dk_att_dot(dout, p.out + r * D, lane, D);
    if (lane == 0) p.delta[r] = delta;
    const float lse = p.lse[r];
#pragma unroll
    for (int c = 0; c < DK_ATT_CHUNKS; ++c) acc[c] = 0.0f;
    for (int64_t j = 0; j <= t; ++j) {
        const int64_t kv = ((b * T + j) * NKV + g) * D;
        const float pr = expf(dk_att_dot(q, p.k + kv, lane, D) * p.scale - lse);
        const float ds = pr * (dk_att_dot(dout, p.v + kv, lane, D) - delta);
#pragma unroll
        for (int c = 0; c < DK_ATT_CHUNKS; ++c) {
            const int64_t d = lane + 32 * c;
            if (d < D) acc[c] = fmaf(ds, p.k[kv + d], acc[c]);
        }
    }
#pragma unroll
    for (int c = 0; c < DK_ATT_CHUNKS; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < D) p.dq[r * D + d] += p.scale * acc[c];
    }
}
DK_REGISTER_KERNEL(dk_attention_bwd_dq, DkAttentionParams)

// One warp per key/value row (b, j, g): dK_j += scale sum dS_ij Q_i and dV_j += sum P_ij dO_i
// over the group's query heads in head order and the rows i >= j in order. Runs after
// dk_attention_bwd_dq (it reads delta).
extern "C" __global__ void __launch_bounds__(256) dk_attention_bwd_dkv(DkAttentionParams p) {
    const int lane = threadIdx.x & 31;
    const int64_t NH = p.n_heads, T = p.seq, D = p.head_dim, NKV = p.n_kv_heads, rep = NH / NKV;
    const int64_t r = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (r >= p.batch * T * NKV) return;
    const int64_t g = r % NKV, j = (r / NKV) % T, b = r / NKV / T;
    float k[DK_ATT_CHUNKS], v[DK_ATT_CHUNKS], dk[DK_ATT_CHUNKS], dv[DK_ATT_CHUNKS];
    dk_att_load(k, p.k + r * D, lane, D);
    dk_att_load(v, p.v + r * D, lane, D);
#pragma unroll
    for (int c = 0; c < DK_ATT_CHUNKS; ++c) dk[c] = dv[c] = 0.0f;
    for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
        for (int64_t i = j; i < T; ++i) {
            const int64_t qr = (b * T + i) * NH + h;
            const float* q = p.q + qr * D;
            const float* dout = p.dout + qr * D;
            const float pr = expf(dk_att_dot_rev(q, k, lane, D) * p.scale - p.lse[qr]);
            const float ds = pr * (dk_att_dot_rev(dout, v, lane, D) - p.delta[qr]);
#pragma unroll
            for (int c = 0; c < DK_ATT_CHUNKS; ++c) {
                const int64_t d = lane + 32 * c;
                if (d < D) {
                    dk[c] = fmaf(ds, q[d], dk[c]);
                    dv[c] = fmaf(pr, dout[d], dv[c]);
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < DK_ATT_CHUNKS; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < D) {
            p.dk[r * D + d] += p.scale * dk[c];
            p.dv[r * D + d] += dv[c];
        }
    }
}
DK_REGISTER_KERNEL(dk_attention_bwd_dkv, DkAttentionParams)
