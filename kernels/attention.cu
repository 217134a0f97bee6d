// Causal softmax attention with grouped-query heads, the device twin of
// attention_forward/attention_backward in src/model/ops.rs, in the flash style: the T x T
// probabilities are never stored. The forward keeps one log-sum-exp per query row; the backward
// recomputes each probability from it.
//
// One warp per row (query row in the forward and dQ pass, key/value row in the dK/dV pass), the
// row in shared memory. The other side is taken 32 rows at a time, one per lane: each lane forms
// its own score with a plain dot product (no shuffles), the chunk's softmax statistics are two warp
// reductions, and the accumulation into the warp's output row (lane l holds elements l, l + 32, ...,
// head sizes up to 32 * DK_ATT_CHUNKS) reads the chunk's 32 weights from the warp's slot of shared
// memory. Per 32 keys that is two warp reductions and two warp barriers in the forward and two
// barriers in the backward passes, against 5 shuffles per key for a warp-wide dot product. Each gradient row is summed by the one warp that owns it, in a fixed
// order: no atomics, the same bits on every run.
//
// Why this shape (not llm.c's batched GEMMs plus a masked softmax): the [B, NH, T, T] scores
// would be 151 MB per sequence per layer for the 135M student at T = 2048, and GQA's head
// mapping does not fit one strided batch. This version uses no tensor cores and no K/V reuse
// across query rows (see BENCHMARKS.md for what that costs and the tiled successor).
//
// Storage type S (suffix _f32, _bf16) for q, k, v, the output and every gradient; f32 arithmetic,
// rows staged in shared memory as f32, and the log-sum-exps and deltas f32 in both.
#include "common.cuh"

#define DK_ATT_CHUNKS 4  // head_dim <= 128
#define DK_ATT_MAX_D (32 * DK_ATT_CHUNKS)
#define DK_ATT_WARPS 8   // warps (rows) per 256-thread block

struct DkAttMax {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// a . b over D elements in order, one fused multiply-add per term (the same bits wherever both
// sides of a score are computed).
template <typename A, typename B>
__device__ __forceinline__ float dk_att_dot(const A* a, const B* b, int64_t D) {
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s = fmaf(dk_load(a + d), dk_load(b + d), s);
    return s;
}

// Copies a row into the warp's shared slot; the caller syncs the warp before reading it.
template <typename S>
__device__ __forceinline__ void dk_att_stage(float* dst, const S* row, int lane, int64_t D) {
    for (int64_t d = lane; d < D; d += 32) dst[d] = dk_load(row + d);
}

// dst += x, in the storage type.
template <typename S>
__device__ __forceinline__ void dk_att_add(S* dst, float x) { dk_store(dst, dk_load(dst) + x); }

template <typename S>
__device__ __forceinline__ void attention_fwd(const DkAttentionParams& p) {
    const S* pq = static_cast<const S*>(p.q);
    const S* pk = static_cast<const S*>(p.k);
    const S* pv = static_cast<const S*>(p.v);
    __shared__ float qs[DK_ATT_WARPS][DK_ATT_MAX_D];
    __shared__ float ws[DK_ATT_WARPS][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t NH = p.n_heads, T = p.seq, D = p.head_dim, NKV = p.n_kv_heads;
    const int64_t r = (int64_t)blockIdx.x * DK_ATT_WARPS + warp;
    if (r >= p.batch * T * NH) return;  // whole warps leave together
    const int64_t h = r % NH, t = (r / NH) % T, b = r / NH / T, g = h / (NH / NKV);
    float* q = qs[warp];
    dk_att_stage(q, pq + r * D, lane, D);
    __syncwarp();
    float o[DK_ATT_CHUNKS];
#pragma unroll
    for (int c = 0; c < DK_ATT_CHUNKS; ++c) o[c] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int64_t j0 = 0; j0 <= t; j0 += 32) {
        const int64_t j = j0 + lane;
        const bool live = j <= t;
        const float s = live ? dk_att_dot(q, pk + ((b * T + j) * NKV + g) * D, D) * p.scale : -INFINITY;
        const float m_new = fmaxf(m, dk_warp_reduce(s, DkAttMax{}));
        const float corr = expf(m - m_new);  // 0 at the first chunk (m = -inf)
        const float e = live ? expf(s - m_new) : 0.0f;
        l = fmaf(l, corr, dk_warp_reduce(e, DkSum{}));
#pragma unroll
        for (int c = 0; c < DK_ATT_CHUNKS; ++c) o[c] *= corr;
        const int n = (int)min((int64_t)32, t + 1 - j0);  // the same in every lane
        float* w = ws[warp];
        w[lane] = e;
        __syncwarp();
        for (int jj = 0; jj < n; ++jj) {
            const float pj = w[jj];
            const S* v = pv + ((b * T + j0 + jj) * NKV + g) * D;
#pragma unroll
            for (int c = 0; c < DK_ATT_CHUNKS; ++c) {
                const int64_t d = lane + 32 * c;
                if (d < D) o[c] = fmaf(pj, dk_load(v + d), o[c]);
            }
        }
        m = m_new;
        __syncwarp();  // every lane has read w before the next chunk writes it
    }
    const float inv = 1.0f / l;
#pragma unroll
    for (int c = 0; c < DK_ATT_CHUNKS; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < D) dk_store(static_cast<S*>(p.out_w) + r * D + d, o[c] * inv);
    }
    if (lane == 0) p.lse[r] = m + logf(l);
}

// dQ += scale sum_j dS_ij K_j with dS_ij = P_ij (dO_i . V_j - delta_i), delta_i = dO_i . O_i
// (written for the dK/dV pass).
template <typename S>
__device__ __forceinline__ void attention_bwd_dq(const DkAttentionParams& p) {
    const S* pq = static_cast<const S*>(p.q);
    const S* pk = static_cast<const S*>(p.k);
    const S* pv = static_cast<const S*>(p.v);
    const S* pdout = static_cast<const S*>(p.dout);
    __shared__ float rows[DK_ATT_WARPS][2][DK_ATT_MAX_D];
    __shared__ float ws[DK_ATT_WARPS][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t NH = p.n_heads, T = p.seq, D = p.head_dim, NKV = p.n_kv_heads;
    const int64_t r = (int64_t)blockIdx.x * DK_ATT_WARPS + warp;
    if (r >= p.batch * T * NH) return;
    const int64_t h = r % NH, t = (r / NH) % T, b = r / NH / T, g = h / (NH / NKV);
    float* q = rows[warp][0];
    float* dout = rows[warp][1];
    dk_att_stage(q, pq + r * D, lane, D);
    dk_att_stage(dout, pdout + r * D, lane, D);
    __syncwarp();
    // Summed like dO . V below, so that a row whose output is one value row (a single key) gets
    // dS = 0 exactly, as in exact arithmetic.
    const float delta = dk_att_dot(dout, static_cast<const S*>(p.out) + r * D, D);
    if (lane == 0) p.delta[r] = delta;
    const float lse = p.lse[r];
    float acc[DK_ATT_CHUNKS];
#pragma unroll
    for (int c = 0; c < DK_ATT_CHUNKS; ++c) acc[c] = 0.0f;
    for (int64_t j0 = 0; j0 <= t; j0 += 32) {
        const int64_t j = j0 + lane;
        float ds = 0.0f;
        if (j <= t) {
            const int64_t kv = ((b * T + j) * NKV + g) * D;
            const float pr = expf(dk_att_dot(q, pk + kv, D) * p.scale - lse);
            ds = pr * (dk_att_dot(dout, pv + kv, D) - delta);
        }
        const int n = (int)min((int64_t)32, t + 1 - j0);
        float* w = ws[warp];
        w[lane] = ds;
        __syncwarp();
        for (int jj = 0; jj < n; ++jj) {
            const float dsj = w[jj];
            const S* k = pk + ((b * T + j0 + jj) * NKV + g) * D;
#pragma unroll
            for (int c = 0; c < DK_ATT_CHUNKS; ++c) {
                const int64_t d = lane + 32 * c;
                if (d < D) acc[c] = fmaf(dsj, dk_load(k + d), acc[c]);
            }
        }
        __syncwarp();
    }
#pragma unroll
    for (int c = 0; c < DK_ATT_CHUNKS; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < D) dk_att_add(static_cast<S*>(p.dq) + r * D + d, p.scale * acc[c]);
    }
}

// One warp per key/value row (b, j, g): dK_j += scale sum dS_ij Q_i and dV_j += sum P_ij dO_i
// over the group's query heads in head order and the rows i >= j in order. Runs after
// dk_attention_bwd_dq (it reads delta).
template <typename S>
__device__ __forceinline__ void attention_bwd_dkv(const DkAttentionParams& p) {
    const S* pq = static_cast<const S*>(p.q);
    const S* pk = static_cast<const S*>(p.k);
    const S* pv = static_cast<const S*>(p.v);
    const S* pdout = static_cast<const S*>(p.dout);
    __shared__ float rows[DK_ATT_WARPS][2][DK_ATT_MAX_D];
    __shared__ float ws[DK_ATT_WARPS][2][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t NH = p.n_heads, T = p.seq, D = p.head_dim, NKV = p.n_kv_heads, rep = NH / NKV;
    const int64_t r = (int64_t)blockIdx.x * DK_ATT_WARPS + warp;
    if (r >= p.batch * T * NKV) return;
    const int64_t g = r % NKV, j = (r / NKV) % T, b = r / NKV / T;
    float* k = rows[warp][0];
    float* v = rows[warp][1];
    dk_att_stage(k, pk + r * D, lane, D);
    dk_att_stage(v, pv + r * D, lane, D);
    __syncwarp();
    float dk[DK_ATT_CHUNKS], dv[DK_ATT_CHUNKS];
#pragma unroll
    for (int c = 0; c < DK_ATT_CHUNKS; ++c) dk[c] = dv[c] = 0.0f;
    for (int64_t h = g * rep; h < (g + 1) * rep; ++h) {
        for (int64_t i0 = j; i0 < T; i0 += 32) {
            const int64_t i = i0 + lane;
            float ds = 0.0f, pr = 0.0f;
            if (i < T) {
                const int64_t qr = (b * T + i) * NH + h;
                pr = expf(dk_att_dot(pq + qr * D, k, D) * p.scale - p.lse[qr]);
                ds = pr * (dk_att_dot(pdout + qr * D, v, D) - p.delta[qr]);
            }
            const int n = (int)min((int64_t)32, T - i0);
            float* wds = ws[warp][0];
            float* wp = ws[warp][1];
            wds[lane] = ds;
            wp[lane] = pr;
            __syncwarp();
            for (int ii = 0; ii < n; ++ii) {
                const float dsi = wds[ii];
                const float pi = wp[ii];
                const int64_t qr = (b * T + i0 + ii) * NH + h;
                const S* q = pq + qr * D;
                const S* dout = pdout + qr * D;
#pragma unroll
                for (int c = 0; c < DK_ATT_CHUNKS; ++c) {
                    const int64_t d = lane + 32 * c;
                    if (d < D) {
                        dk[c] = fmaf(dsi, dk_load(q + d), dk[c]);
                        dv[c] = fmaf(pi, dk_load(dout + d), dv[c]);
                    }
                }
            }
            __syncwarp();
        }
    }
#pragma unroll
    for (int c = 0; c < DK_ATT_CHUNKS; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < D) {
            dk_att_add(static_cast<S*>(p.dk) + r * D + d, p.scale * dk[c]);
            dk_att_add(static_cast<S*>(p.dv) + r * D + d, dv[c]);
        }
    }
}

#define DK_ATTENTION(name, dt, S)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) dk_##name##_##dt(DkAttentionParams p) { name<S>(p); } \
    DK_REGISTER_KERNEL(dk_##name##_##dt, DkAttentionParams)
#define DK_ATTENTION_ALL(dt, S)            \
    DK_ATTENTION(attention_fwd, dt, S)     \
    DK_ATTENTION(attention_bwd_dq, dt, S)  \
    DK_ATTENTION(attention_bwd_dkv, dt, S)

DK_ATTENTION_ALL(f32, float)
DK_ATTENTION_ALL(bf16, __nv_bfloat16)
