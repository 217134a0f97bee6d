// The fused distillation loss (DESIGN section 4): softmax with temperature of student and teacher,
// forward KL / reverse KL / generalized JSD, hard-label cross-entropy at T = 1 in the same pass,
// the per-row loss and the gradient w.r.t. the student logits. One block per row, a row split over
// blocks (few long rows), or on sm_90 a row's blocks as one thread-block cluster that keeps the row
// in shared memory (the row-on-chip kernels dk_kdc_*, further down).
//
// Memory traffic per row: pass 1 reads student and teacher once for the online statistics (running
// max and sum of exponentials); pass 2 reads them again and writes the gradient. Probabilities are
// recomputed, never stored. JSD is the one exception: its gradient needs sum_k p_s(k) g_k, which
// depends on both normalizers, so it takes a third read (pass 2 reduces that sum, pass 3 writes).
//
// Why it is written the way it is: at bf16 the loss moves 10 bytes per element, and an H100 issues
// about 100 instructions in the time HBM3 delivers them, so the hot loops are written against an
// instruction budget (BENCHMARKS.md, "Static SASS counts"; benches/sass_report.py gates it):
// - Exponentials and logarithms run on the MUFU in base 2 (dk_ex2, dk_lg2): a log-probability is
//   l2(x) = fma(x, k, -c) - log2 z with k = log2(e) / T, so each costs one FFMA, one FADD and one
//   MUFU. Losses and gradients convert back to nats with one ln 2 per row.
// - The running max is taken once per chunk of 4 or 8 elements (FMNMX), not per element with a
//   branch, and the sum is rescaled once per chunk.
// - A row is read in 16-byte vectors; a scalar head and tail cover rows whose start is not 16-byte
//   aligned. Reading passes load the next chunk before computing the current one.
// - Soft-only, hard-only and both are separate instantiations: no per-element flags. The label's
//   `- 1` is applied once, by thread 0, after the loop.
// - The statistics of student-at-T, teacher-at-T and student-at-1 are merged in one block
//   reduction that one warp finishes.
// Offsets within a row are 32-bit (the host refuses rows of 2^31 elements or more).
#include "common.cuh"
#ifdef __CUDACC__
#include <cooperative_groups.h>
#endif

#define DK_LOG2E 1.44269504088896341f
#define DK_LN2 0.693147180559945309f
#define DK_FLT_MIN 1.17549435e-38f

// ---- vectorised row access. A chunk is 16 bytes of the wider input: 8 elements of a 16-bit
// pair, 4 when either input is f32 (the 16-bit side then moves 8 bytes per load; a warp still
// reads whole 32-byte sectors). Bigger chunks of an f32 row cost registers that spill.
template <typename S, typename T>
struct DkChunk {
    static constexpr int kLen = 16 / (sizeof(S) > sizeof(T) ? sizeof(S) : sizeof(T));
};

template <int N>
__device__ __forceinline__ void dk_widen(const unsigned* w, float (&v)[N], float*) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = __uint_as_float(w[i]);
}
template <int N>
__device__ __forceinline__ void dk_widen(const unsigned* w, float (&v)[N], __half*) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
        const unsigned u = w[i];
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&u));
        v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
}
// bf16 is the top half of an f32: widening is a shift or a mask, exact.
template <int N>
__device__ __forceinline__ void dk_widen(const unsigned* w, float (&v)[N], __nv_bfloat16*) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
template <int N>
__device__ __forceinline__ void dk_narrow(const float (&v)[N], unsigned* w, float*) {
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = __float_as_uint(v[i]);
}
template <int N>
__device__ __forceinline__ void dk_narrow(const float (&v)[N], unsigned* w, __half*) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
        const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
        w[i] = *reinterpret_cast<const unsigned*>(&h);
    }
}
template <int N>
__device__ __forceinline__ void dk_narrow(const float (&v)[N], unsigned* w, __nv_bfloat16*) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
        w[i] = *reinterpret_cast<const unsigned*>(&h);
    }
}

// Elements from `p` to the next `bytes` boundary, or -1 when `p` is not even element-aligned.
template <typename X>
__device__ __forceinline__ int dk_head_residue(const X* p, int bytes) {
    const unsigned long long a = reinterpret_cast<unsigned long long>(p);
    if (a % sizeof(X) != 0) return -1;
    return static_cast<int>((bytes - a % bytes) % bytes / sizeof(X));
}

// Does a scalar head of h elements put p's chunks (N elements each) on their vector boundary
// (16 bytes at most: a 32-byte chunk is two 16-byte accesses)?
template <int N, typename X>
__device__ __forceinline__ bool dk_head_fits(int h, const X* p) {
    const int bytes = N * static_cast<int>(sizeof(X)) > 16 ? 16 : N * static_cast<int>(sizeof(X));
    const int r = dk_head_residue(p, bytes);
    return r >= 0 && h % (bytes / static_cast<int>(sizeof(X))) == r;
}

// A row split into a scalar head [0, head), vector chunks [head, body_end) and a scalar tail.
struct DkRowSplit {
    int head, body_end, n;
};

// The smallest head that aligns every vector-accessed row at once; a row whose pointers
// disagree (say, student and gradient rows of different parity) is read scalar.
template <int N, typename S, typename T, typename G>
__device__ __forceinline__ DkRowSplit dk_row_split(int n, const S* s, const T* t, const G* g) {
    for (int h = 0; h < N && h < n; ++h)
        if (dk_head_fits<N>(h, s) && (!t || dk_head_fits<N>(h, t)) && (!g || dk_head_fits<N>(h, g)))
            return DkRowSplit{h, h + (n - h) / N * N, n};
    return DkRowSplit{n, n, n};
}

// N elements of X as memory holds them (8, 16 or 32 bytes: an f32 gradient of a 16-bit pair
// takes two 16-byte stores), widened to f32 at use, so a chunk's loads can be in flight while
// the previous chunk is computed.
template <typename X, int N>
struct DkVec {
    static constexpr int kWords = N * static_cast<int>(sizeof(X)) / 4;
    static_assert(kWords == 2 || kWords == 4 || kWords == 8, "chunks are 8, 16 or 32 bytes");
    struct Raw {
        unsigned w[kWords];
    };
    static __device__ __forceinline__ Raw load(const X* p) {
        Raw r;
        if (kWords == 2) {
            const uint2 v = *reinterpret_cast<const uint2*>(p);
            r.w[0] = v.x, r.w[1] = v.y;
        } else {
#pragma unroll
            for (int q = 0; q < kWords / 4; ++q) {
                const uint4 v = reinterpret_cast<const uint4*>(p)[q];
                r.w[4 * q] = v.x, r.w[4 * q + 1] = v.y, r.w[4 * q + 2] = v.z, r.w[4 * q + 3] = v.w;
            }
        }
        return r;
    }
    static __device__ __forceinline__ void widen(const Raw& r, float (&v)[N]) { dk_widen(r.w, v, static_cast<X*>(nullptr)); }
    static __device__ __forceinline__ void store_raw(X* p, const Raw& r) {
        if (kWords == 2) {
            *reinterpret_cast<uint2*>(p) = make_uint2(r.w[0], r.w[1]);
        } else {
#pragma unroll
            for (int q = 0; q < kWords / 4; ++q)
                reinterpret_cast<uint4*>(p)[q] = make_uint4(r.w[4 * q], r.w[4 * q + 1], r.w[4 * q + 2], r.w[4 * q + 3]);
        }
    }
    static __device__ __forceinline__ void store(X* p, const float (&v)[N]) {
        Raw r;
        dk_narrow(v, r.w, static_cast<X*>(nullptr));
        store_raw(p, r);
    }
};

// The part of a row one block handles: chunks [c_lo, c_hi), plus the scalar head (first part)
// and tail (last part). A row split over `parts` blocks gives each a contiguous run of chunks.
struct DkSlice {
    int c_lo, c_hi;
    bool head, tail;
};

__device__ __forceinline__ DkSlice dk_slice(const DkRowSplit& r, int n_chunk, int part, int parts) {
    const int chunks = (r.body_end - r.head) / n_chunk;
    const int per = (chunks + parts - 1) / parts;
    const int lo = min(part * per, chunks);
    return DkSlice{lo, min(lo + per, chunks), part == 0, part == parts - 1};
}

// Visits a slice of a row: f.template on<M>(sv, tv, gv) for scalar elements (M = 1) and chunks
// (M = N), in the order thread `tid` owns them; with WRITE, gv is stored to g (added to it with
// `acc`). Every element is read before the same thread writes it, so g may alias s. (The
// row-on-chip kernels' later passes visit their shared-memory stash with it too, and write JSD's
// mixture stash as a `g`.) NV, when given, is the chunk length instead of the pair's (a
// row-on-chip pass that reads the f32 mixture stash as its `t` keeps the 16-bit row's chunks of 8).
template <bool READ_T, bool WRITE, int NV = 0, typename S, typename T, typename G, typename F>
__device__ __forceinline__ void dk_kd_visit(const DkRowSplit& r, const DkSlice& sl, const S* s, const T* t, G* g, bool acc, F& f) {
    constexpr int N = NV ? NV : DkChunk<S, T>::kLen;
    const int tid = threadIdx.x, nt = blockDim.x;
    auto one = [&](int j) {
        float sv[1] = {dk_load(s + j)}, tv[1] = {READ_T ? dk_load(t + j) : 0.0f}, gv[1];
        f.template on<1>(sv, tv, gv);
        if (WRITE) dk_put(g + j, gv[0], acc);
    };
    if (sl.head)
        for (int j = tid; j < r.head; j += nt) one(j);

    typedef DkVec<S, N> VS;
    typedef DkVec<T, N> VT;
    typedef DkVec<G, N> VG;
    struct Raw {
        typename VS::Raw s;
        typename VT::Raw t;
    };
    auto load = [&](int c, Raw& x) {
        const int j0 = r.head + c * N;
        x.s = VS::load(s + j0);
        if (READ_T) x.t = VT::load(t + j0);
    };
    auto compute = [&](int c, const Raw& x) {
        const int j0 = r.head + c * N;
        float sv[N], tv[N], gv[N];
        VS::widen(x.s, sv);
        if (READ_T) {
            VT::widen(x.t, tv);
        } else {
#pragma unroll
            for (int i = 0; i < N; ++i) tv[i] = 0.0f;
        }
        f.template on<N>(sv, tv, gv);
        if (WRITE) {
            if (acc) {
                float old[N];
                VG::widen(VG::load(g + j0), old);
#pragma unroll
                for (int i = 0; i < N; ++i) gv[i] += old[i];
            }
            VG::store(g + j0, gv);
        }
    };
    // Reading passes keep two chunks in flight per thread, in two named buffers (no copies
    // between iterations): chunk c + nt is loaded before chunk c is computed. Writing passes keep
    // one: with two, the register allocation spills at the 64-register cap of 1,024-thread blocks
    // (reverse KL first), and their loads cannot move above the stores that may alias them.
    constexpr bool kTwoBuffers = !WRITE;
    const int chunks = sl.c_hi;
    if (!kTwoBuffers) {
        for (int c = sl.c_lo + tid; c < chunks; c += nt) {
            Raw x;
            load(c, x);
            compute(c, x);
        }
        if (sl.tail)
            for (int j = r.body_end + tid; j < r.n; j += nt) one(j);
        return;
    }
    Raw a, b;
    int c = sl.c_lo + tid;
    if (c < chunks) load(c, a);
    while (c < chunks) {
        const int c1 = c + nt;
        if (c1 < chunks) load(c1, b);
        compute(c, a);
        if (c1 >= chunks) break;
        const int c2 = c1 + nt;
        if (c2 < chunks) load(c2, a);
        compute(c1, b);
        c = c2;
    }

    if (sl.tail)
        for (int j = r.body_end + tid; j < r.n; j += nt) one(j);
}

// ---- online statistics in base 2: c is the running offset (max * k, -inf while every value
// seen is -inf), z = sum 2^(x k - c). Rescaling multiplies z by 2^(c_old - c_new) <= 1; an empty
// state has z = 0 and 2^(-inf) = 0, so it needs no branch. NaN never enters c (fmaxf drops it)
// but reaches z through its exponential.
struct DkLse2 {
    float c, z;
};

__device__ __forceinline__ DkLse2 dk_lse2_empty() { return DkLse2{-INFINITY, 0.0f}; }
// The offset exponentials are taken against: 0 while empty (every x is -inf, 2^-inf = 0).
__device__ __forceinline__ float dk_offset(float c) { return c == -INFINITY ? 0.0f : c; }

template <int N>
__device__ __forceinline__ void dk_lse2_add(DkLse2& st, const float (&x)[N], float xmax, float k) {
    const float cn = fmaxf(st.c, xmax * k);
    const float off = dk_offset(cn);
    float z = st.z * dk_ex2(st.c - off);
#pragma unroll
    for (int i = 0; i < N; ++i) z += dk_ex2(fmaf(x[i], k, -off));
    st = DkLse2{cn, z};
}

__device__ __forceinline__ DkLse2 dk_lse2_merge(DkLse2 a, DkLse2 b) {
    const float c = fmaxf(a.c, b.c);
    const float off = dk_offset(c);
    return DkLse2{c, a.z * dk_ex2(a.c - off) + b.z * dk_ex2(b.c - off)};
}

// A log-probability in base 2 once the statistics are final: l2(x) = fma(x, k, -off) - log2 z.
// The offset and log2 z are subtracted separately: folded into one constant they would round at
// the magnitude of the logits (1e4 logits: 1e-3), which no later step recovers.
struct DkLogP2 {
    float k, off, lz;
    __device__ __forceinline__ float operator()(float x) const { return fmaf(x, k, -off) - lz; }
};

__device__ __forceinline__ DkLogP2 dk_logp2(DkLse2 st, float k) {
    return DkLogP2{k, dk_offset(st.c), log2f(st.z)};  // once per row: the accurate log2f
}

// The pass-1 state of one thread: student at T, teacher at T, student at 1 (hard loss), and for
// reverse KL r = sum 2^a_s (a_s - a_t) with a = fma(x, k, -off) against the running offsets, so
// KL_r = ln2 (r / z_s - log2 z_s + log2 z_t) uses centered quantities only (1e4 logits lose
// nothing to cancellation). When an offset grows, the recorded terms shift: a_s falls by
// ds = off_s - off_s' and a_t by off_t' - off_t, so r' = 2^ds (r + (ds + off_t' - off_t) z_s).
struct DkKdStats {
    DkLse2 s, t, s1;
    float r;
};

__device__ __forceinline__ DkKdStats dk_kd_stats_empty() {
    return DkKdStats{dk_lse2_empty(), dk_lse2_empty(), dk_lse2_empty(), 0.0f};
}

// r of `x` moved to the offsets (cs, ct) >= x's. +-inf and NaN stay (KL_r is then infinite or NaN
// whatever else comes), so 2^-big * inf never makes a NaN.
__device__ __forceinline__ float dk_rkl_shift(const DkKdStats& x, float cs, float ct) {
    const float os = dk_offset(cs), ot = dk_offset(ct);
    const float moved = dk_ex2(x.s.c - os) * (x.r + ((dk_offset(x.s.c) - os) + (ot - dk_offset(x.t.c))) * x.s.z);
    return isfinite(x.r) ? moved : x.r;
}

template <int KIND>
struct DkKdStatsOp {
    __device__ __forceinline__ DkKdStats operator()(const DkKdStats& a, const DkKdStats& b) const {
        DkKdStats m{dk_lse2_merge(a.s, b.s), dk_lse2_merge(a.t, b.t), dk_lse2_merge(a.s1, b.s1), 0.0f};
        if (KIND == DK_KIND_REVERSE_KL) m.r = dk_rkl_shift(a, m.s.c, m.t.c) + dk_rkl_shift(b, m.s.c, m.t.c);
        return m;
    }
};

__device__ __forceinline__ DkLse2 dk_shfl_xor(DkLse2 v, int m) { return DkLse2{dk_shfl_xor(v.c, m), dk_shfl_xor(v.z, m)}; }
__device__ __forceinline__ DkKdStats dk_shfl_xor(DkKdStats v, int m) {
    return DkKdStats{dk_shfl_xor(v.s, m), dk_shfl_xor(v.t, m), dk_shfl_xor(v.s1, m), dk_shfl_xor(v.r, m)};
}

template <int N>
__device__ __forceinline__ float dk_max(const float (&x)[N]) {
    float m = x[0];
#pragma unroll
    for (int i = 1; i < N; ++i) m = fmaxf(m, x[i]);
    return m;
}

// Pass 1: the statistics.
template <int KIND, bool SOFT, bool HARD>
struct DkKdPass1 {
    DkKdStats st;
    float k;  // log2(e) / T
    template <int N>
    __device__ __forceinline__ void on(const float (&sv)[N], const float (&tv)[N], float (&)[N]) {
        const float smax = dk_max(sv);
        if (HARD) dk_lse2_add(st.s1, sv, smax, DK_LOG2E);
        if (!SOFT) return;
        const float tmax = dk_max(tv);
        if (KIND != DK_KIND_REVERSE_KL) {
            dk_lse2_add(st.s, sv, smax, k);
            dk_lse2_add(st.t, tv, tmax, k);
            return;
        }
        const float cs = fmaxf(st.s.c, smax * k), ct = fmaxf(st.t.c, tmax * k);
        const float os = dk_offset(cs), ot = dk_offset(ct);
        // dk_rkl_shift's formula, written out so the student's rescale 2^(c - c') is one MUFU
        // shared by r and z_s.
        const float rescale = dk_ex2(st.s.c - os);
        float r = isfinite(st.r) ? rescale * (st.r + ((dk_offset(st.s.c) - os) + (ot - dk_offset(st.t.c))) * st.s.z) : st.r;
        float zs = st.s.z * rescale, zt = st.t.z * dk_ex2(st.t.c - ot);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float as = fmaf(sv[i], k, -os), at = fmaf(tv[i], k, -ot);
            const float w = dk_ex2(as);
            zs += w;
            zt += dk_ex2(at);
            // 0 * log 0 = 0; a student term against a zero teacher probability is +inf (at = -inf).
            r = fmaf(w, w == 0.0f ? 0.0f : as - at, r);
        }
        st.s = DkLse2{cs, zs};
        st.t = DkLse2{ct, zt};
        st.r = r;
    }
};

// What pass 2 and 3 need of a row, in base 2 (losses and gradients carry ln 2 once).
struct DkKdRowConsts {
    DkLogP2 ls, lt, l1;  // student at T, teacher at T, student at 1
    float w_soft;        // grad_scale * soft_weight / T (d a / d s = 1 / T), times ln 2 for RKL/JSD
    float w_hard;        // grad_scale * hard_weight
    float kl_rev2;       // reverse KL in bits
    float beta, one_m_beta;
    float jsd_b;         // JSD: sum_k p_s(k) (l2_s(k) - l2_m(k)), from pass 2
};

// One element's base-2 log-probabilities and probabilities at T (and JSD's mixture), computed
// once and shared by the loss terms and the gradient.
struct DkKdElem {
    float ls, lt, ps, pt, lm;
};

template <int KIND, bool MIXTURE>
__device__ __forceinline__ DkKdElem dk_kd_elem(const DkKdRowConsts& k, float sv, float tv) {
    DkKdElem e;
    e.ls = k.ls(sv);
    e.lt = k.lt(tv);
    e.ps = dk_ex2(e.ls);
    e.pt = KIND == DK_KIND_REVERSE_KL ? 0.0f : dk_ex2(e.lt);
    // The mixture's log directly on the MUFU. A mixture below FLT_MIN (both probabilities
    // underflowed) is taken as FLT_MIN: lg2.approx.ftz would read a subnormal as 0 and make -inf,
    // and the terms it weighs are below 2^-126 * 126 anyway.
    e.lm = MIXTURE ? dk_lg2(fmaxf(fmaf(k.beta, e.pt, k.one_m_beta * e.ps), DK_FLT_MIN)) : 0.0f;
    return e;
}

// The gradient of one element, `label` = 1 at the row's label (thread 0's fix-up) and 0 in the
// loop: one formula for both. JSD's soft part exists in pass 3 only (it needs pass 2's sum).
template <int KIND, bool SOFT, bool HARD, bool JSD_GRAD>
__device__ __forceinline__ float dk_kd_grad(const DkKdRowConsts& k, const DkKdElem& e, float sv, float label) {
    float grad = 0.0f;
    if (SOFT) {
        if (KIND == DK_KIND_FORWARD_KL)
            grad = k.w_soft * (e.ps - e.pt);
        else if (KIND == DK_KIND_REVERSE_KL)
            grad = e.ps == 0.0f ? 0.0f : k.w_soft * e.ps * (e.ls - e.lt);  // lt carries + KL_r
        else if (JSD_GRAD)
            grad = e.ps == 0.0f ? 0.0f : k.w_soft * e.ps * ((e.ls - e.lm) - k.jsd_b);
    }
    if (HARD) grad = fmaf(k.w_hard, dk_ex2(k.l1(sv)) - label, grad);
    return grad;
}

// Pass 2: the soft loss terms (a: forward KL's or JSD's teacher-weighted sum; b: JSD's
// sum_k p_s (l2_s - l2_m)) and, for the KL kinds, the gradient. Each term is p * (log ratio) with
// 0 * anything = 0 (a masked entry is absent). Reverse KL's loss is pass 1's r. With KEEP_MIX
// (JSD, row on chip) the "gradient" it hands out is each element's log2 mixture, for pass 3.
template <int KIND, bool SOFT, bool HARD, bool KEEP_MIX = false>
struct DkKdPass2 {
    const DkKdRowConsts& k;
    float a, b;
    template <int N>
    __device__ __forceinline__ void on(const float (&sv)[N], const float (&tv)[N], float (&gv)[N]) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            DkKdElem e{};
            if (SOFT) {
                e = dk_kd_elem<KIND, KIND == DK_KIND_JSD>(k, sv[i], tv[i]);
                if (KIND == DK_KIND_FORWARD_KL) {
                    a = fmaf(e.pt, e.pt == 0.0f ? 0.0f : e.lt - e.ls, a);
                } else if (KIND == DK_KIND_JSD) {
                    a = fmaf(e.pt, e.pt == 0.0f ? 0.0f : e.lt - e.lm, a);
                    b = fmaf(e.ps, e.ps == 0.0f ? 0.0f : e.ls - e.lm, b);
                }
            }
            gv[i] = KEEP_MIX ? e.lm : dk_kd_grad<KIND, SOFT, HARD, false>(k, e, sv[i], 0.0f);
        }
    }
};

// Pass 3 (JSD with a gradient): the gradient only.
template <bool SOFT, bool HARD>
struct DkKdPass3 {
    const DkKdRowConsts& k;
    template <int N>
    __device__ __forceinline__ void on(const float (&sv)[N], const float (&tv)[N], float (&gv)[N]) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            DkKdElem e{};
            if (SOFT) e = dk_kd_elem<DK_KIND_JSD, true>(k, sv[i], tv[i]);
            gv[i] = dk_kd_grad<DK_KIND_JSD, SOFT, HARD, true>(k, e, sv[i], 0.0f);
        }
    }
};

// Pass 3 of JSD with the log2 mixture pass 2 kept (`lm`, read where the teacher was): the
// student's probability and the hard loss's remain, 2 MUFU ops per element instead of 4. The same
// operations on the same values as DkKdPass3's, so the same bits.
template <bool HARD>
struct DkKdPass3Kept {
    const DkKdRowConsts& k;
    template <int N>
    __device__ __forceinline__ void on(const float (&sv)[N], const float (&lm)[N], float (&gv)[N]) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            DkKdElem e{};
            e.ls = k.ls(sv[i]);
            e.ps = dk_ex2(e.ls);
            e.lm = lm[i];
            gv[i] = dk_kd_grad<DK_KIND_JSD, true, HARD, true>(k, e, sv[i], 0.0f);
        }
    }
};

// Pass-2 sums of one thread, reduced together.
struct DkSum2 {
    float a, b;
};
__device__ __forceinline__ DkSum2 dk_shfl_xor(DkSum2 v, int m) { return DkSum2{dk_shfl_xor(v.a, m), dk_shfl_xor(v.b, m)}; }
struct DkSum2Op {
    __device__ __forceinline__ DkSum2 operator()(DkSum2 x, DkSum2 y) const { return DkSum2{x.a + y.a, x.b + y.b}; }
};

// A split row's partial results, DK_KD_PARTIAL_FLOATS floats per (row, part) in `p.partials`:
// the part's statistics (phase 1) and pass-2 sums (phase 2); part 0 also keeps the label's
// logits and old gradient, read in phase 1 before any phase writes the gradient.
struct DkKdPartial {
    DkKdStats st;
    DkSum2 sums;
    float s_y, t_y, g_y;
};
static_assert(sizeof(DkKdPartial) == DK_KD_PARTIAL_FLOATS * sizeof(float), "abi.h's partial size");

// Thread 0's copy of the label's student logit, teacher logit and old gradient (3 floats).
__device__ __forceinline__ float* dk_kd_label_vals() {
    __shared__ float vals[3];
    return vals;
}

template <typename V, typename Op>
__device__ __forceinline__ V dk_merge_parts(const V* first, int stride_floats, int n, Op op, V empty, V* smem) {
    V x = empty;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        x = op(x, *reinterpret_cast<const V*>(reinterpret_cast<const float*>(first) + static_cast<int64_t>(i) * stride_floats));
    return dk_block_reduce_warp0(x, op, empty, smem);
}

// The row's constants once its statistics are final.
template <int KIND>
__device__ __forceinline__ DkKdRowConsts dk_kd_row_consts(const DkKdParams& p, const DkKdStats& st, float k) {
    DkKdRowConsts kc;
    kc.ls = dk_logp2(st.s, k);
    kc.lt = dk_logp2(st.t, k);
    kc.l1 = dk_logp2(st.s1, DK_LOG2E);
    const float gs = p.scalars->grad_scale;
    kc.w_soft = gs * p.soft_weight * p.inv_temperature;
    if (KIND == DK_KIND_REVERSE_KL) kc.w_soft *= DK_LN2;
    if (KIND == DK_KIND_JSD) kc.w_soft *= DK_LN2 * (1.0f - p.beta);
    kc.w_hard = gs * p.hard_weight;
    kc.kl_rev2 = st.r / st.s.z - kc.ls.lz + kc.lt.lz;
    // Reverse KL's gradient is p_s (l_s - l_t - KL_r): KL_r joins the teacher's constant (the
    // teacher's log-probabilities serve nothing else there), one FADD and register less.
    if (KIND == DK_KIND_REVERSE_KL) kc.lt.lz -= kc.kl_rev2;
    kc.beta = p.beta;
    kc.one_m_beta = 1.0f - p.beta;
    kc.jsd_b = 0.0f;
    return kc;
}

// The row's end, by one thread once every gradient write of the row is ordered before it: the
// label's gradient element (the loops wrote it without the label's -1) and the row's loss.
// `lv` holds the label's student logit, teacher logit and old gradient, read before any write.
template <int KIND, bool SOFT, bool HARD, typename G>
__device__ __forceinline__ void dk_kd_finish(const DkKdParams& p, int64_t row, const DkKdRowConsts& kc, DkSum2 sums,
                                             const float* lv, G* g, bool acc) {
    const float s_y = lv[0], t_y = lv[1], g_y = lv[2];
    const int64_t y = p.labels ? p.labels[row] : -1;
    if (HARD && g) {
        DkKdElem e{};
        if (SOFT) e = dk_kd_elem<KIND, KIND == DK_KIND_JSD>(kc, s_y, t_y);
        const float v = dk_kd_grad<KIND, SOFT, HARD, true>(kc, e, s_y, 1.0f);
        dk_store(g + y, acc ? g_y + v : v);
    }
    float loss = 0.0f;
    if (SOFT) {
        const float soft = KIND == DK_KIND_JSD          ? kc.beta * sums.a + kc.one_m_beta * sums.b
                           : KIND == DK_KIND_REVERSE_KL ? kc.kl_rev2
                                                        : sums.a;
        loss += p.soft_weight * DK_LN2 * soft;
    }
    if (HARD) loss += p.hard_weight * -(DK_LN2 * kc.l1(s_y));
    p.row_loss[row] = loss;
}

// One row (phase DK_KD_PHASE_FUSED, one block per row) or one phase of a row split over
// p.split blocks (see abi.h): the same passes, with the block reductions' results exchanged
// through p.partials between launches.
template <int KIND, bool SOFT, bool HARD, typename S, typename T, typename G>
__device__ void kd_row_body(const DkKdParams& p, int64_t row, int part, const S* s, const T* t, G* g) {
    // One buffer per reduction (dk_block_reduce_warp0 has no leading barrier): the statistics
    // and the sums, reduced over the block or merged over a split row's parts.
    __shared__ DkKdStats red_stats[DK_MAX_WARPS + 1];
    __shared__ DkSum2 red_sum[DK_MAX_WARPS + 1];
    const int phase = p.phase;
    const bool fused = phase == DK_KD_PHASE_FUSED;
    const int parts = fused ? 1 : p.split;
    DkKdPartial* partial = fused ? nullptr : reinterpret_cast<DkKdPartial*>(p.partials) + row * parts;
    const bool acc = p.accumulate != 0;
    const int n = static_cast<int>(p.vocab);
    constexpr int N = DkChunk<S, T>::kLen;
    const DkRowSplit split = dk_row_split<N>(n, s, SOFT ? t : nullptr, g);
    const DkSlice slice = dk_slice(split, N, part, parts);
    const float k = DK_LOG2E * p.inv_temperature;

    // ---- pass 1: online statistics, one fused reduction (or the parts' merged).
    DkKdStats st;
    if (fused || phase == DK_KD_PHASE_STATS) {
        DkKdPass1<KIND, SOFT, HARD> p1{dk_kd_stats_empty(), k};
        dk_kd_visit<SOFT, false>(split, slice, s, t, static_cast<G*>(nullptr), false, p1);
        st = dk_block_reduce_warp0(p1.st, DkKdStatsOp<KIND>{}, dk_kd_stats_empty(), red_stats);
        if (!fused) {
            if (threadIdx.x == 0) {
                partial[part].st = st;
                partial[part].sums = DkSum2{0.0f, 0.0f};
                const float* lv = dk_kd_label_vals();
                partial[part].s_y = lv[0], partial[part].t_y = lv[1], partial[part].g_y = lv[2];
            }
            return;
        }
    } else {
        st = dk_merge_parts(&partial[0].st, DK_KD_PARTIAL_FLOATS, parts, DkKdStatsOp<KIND>{}, dk_kd_stats_empty(),
                            red_stats);
    }

    DkKdRowConsts kc = dk_kd_row_consts<KIND>(p, st, k);

    // ---- pass 2: loss terms and (KL kinds) the gradient.
    const bool grad_in_pass2 = g && KIND != DK_KIND_JSD;
    // (Reverse KL's loss is pass 1's: without a gradient it reads the row once.)
    const bool sums_in_pass2 = SOFT && KIND != DK_KIND_REVERSE_KL;
    DkSum2 sums{0.0f, 0.0f};
    if (fused || phase == DK_KD_PHASE_APPLY) {
        DkKdPass2<KIND, SOFT, HARD> p2{kc, 0.0f, 0.0f};
        if (grad_in_pass2)
            dk_kd_visit<SOFT, true>(split, slice, s, t, g, acc, p2);
        else if (sums_in_pass2)
            dk_kd_visit<SOFT, false>(split, slice, s, t, static_cast<G*>(nullptr), false, p2);
        if (sums_in_pass2) sums = dk_block_reduce_warp0(DkSum2{p2.a, p2.b}, DkSum2Op{}, DkSum2{0.0f, 0.0f}, red_sum);
        if (!fused) {
            if (threadIdx.x == 0) partial[part].sums = sums;
            return;
        }
    } else {
        sums = dk_merge_parts(&partial[0].sums, DK_KD_PARTIAL_FLOATS, parts, DkSum2Op{}, DkSum2{0.0f, 0.0f},
                              red_sum);
    }
    kc.jsd_b = sums.b;

    // ---- pass 3 (JSD with a gradient).
    if (KIND == DK_KIND_JSD && g && (fused || phase == DK_KD_PHASE_JSD_GRAD)) {
        DkKdPass3<SOFT, HARD> p3{kc};
        dk_kd_visit<SOFT, true>(split, slice, s, t, g, acc, p3);
        if (!fused) return;
    }

    // ---- the row's end (fused, or the finishing launch of a split row).
    // The label's element: the loop wrote it without the label's -1, and thread 0 rewrites it.
    // Pass 2's reduction orders the loop's write before; otherwise a barrier does (a split row's
    // writes are in earlier launches).
    if (fused && HARD && g && !(grad_in_pass2 && sums_in_pass2)) __syncthreads();
    if (threadIdx.x != 0) return;
    // The label and its values, fetched again here rather than kept in registers through the
    // loops (they would cost the loops registers): thread 0 stored them before pass 1 (fused) or
    // part 0's statistics phase did (split).
    dk_kd_finish<KIND, SOFT, HARD>(p, row, kc, sums, fused ? dk_kd_label_vals() : &partial[0].s_y, g, acc);
}

// ---- The row on chip (sm_90, phase DK_KD_PHASE_CLUSTER): the p.split blocks of a row form one
// thread-block cluster, and each keeps its slice of the student and teacher rows in its shared
// memory as pass 1 reads them from DRAM, so the later passes read on-chip memory: 6 bytes per
// element for bf16 in place (read s and t once, write g) instead of 10, JSD included. The blocks
// exchange their statistics and sums through distributed shared memory (map_shared_rank) between
// cluster.sync()s; every block merges all ranks' in the same order, so all apply bitwise the same
// normalizers. Everything shared is in dynamic shared memory (the emulator runs a cluster's blocks
// on one OS thread, where static __shared__ would be one variable for all of them): a header, then
// the student's and the teacher's stash (abi.h: DK_KD_CLUSTER_HEADER_BYTES), and for JSD with a
// gradient of a 16-bit row the log2 mixture's.
struct DkKdClusterShared {
    DkKdStats red_stats[DK_MAX_WARPS + 1];
    DkSum2 red_sum[DK_MAX_WARPS + 1];
    DkKdStats merge_stats;  // the merged results, handed to the block
    DkSum2 merge_sum;
    DkKdStats block_stats;  // this block's, read by the cluster after a cluster.sync()
    DkSum2 block_sums;
    float label_vals[3];    // rank 0's copy of the label's logits and old gradient
};
static_assert(sizeof(DkKdClusterShared) <= DK_KD_CLUSTER_HEADER_BYTES, "abi.h's header size");

__device__ __forceinline__ DkKdClusterShared* dk_kd_cluster_shared() {
    DK_DYNAMIC_SHARED(DkKdClusterShared, sh);
    return sh;
}

// Bytes of one stash of `elems` elements: 16 of them are the alignment pad (dk_stash_view).
template <typename X>
__device__ __forceinline__ int dk_stash_bytes(int elems) {
    return (elems * static_cast<int>(sizeof(X)) + 16 + 15) / 16 * 16;
}

// The stash at `base` as a view indexed like the row, holding elements from `lo` on at the same
// address modulo 16 as in the row, so that the vector accesses of the later passes are aligned.
template <typename X>
__device__ __forceinline__ X* dk_stash_view(unsigned char* base, const X* row, int lo) {
    const int pad = static_cast<int>(reinterpret_cast<unsigned long long>(row + lo) % 16);
    return reinterpret_cast<X*>(base + pad) - lo;
}

// JSD's third stash (16-bit rows with a gradient): pass 2's log2 mixture of every element, f32,
// indexed like the row with the chunk starts (head + c * 8) on 16-byte boundaries.
__device__ __forceinline__ float* dk_mixture_view(unsigned char* base, int lo, int head) {
    const int pad = ((lo - head) % 4 + 4) % 4 * 4;
    return reinterpret_cast<float*>(base + pad) - lo;
}

// Pass 1 of the row on chip: like dk_kd_visit's reading pass, but each chunk goes from DRAM
// straight into the stash (cp.async, kDepth chunks ahead of the one being computed, read back
// with LDS), so a thread keeps kDepth x 32 bytes of a 16-bit pair in flight without the
// registers that loaded data would hold: 128 KiB per SM at 1,024 threads per SM (the two-pass
// kernels' register buffers: 32 KiB). Student and teacher are of one dtype here, so a chunk is
// 16 bytes of each; the scalar head and tail go through registers as in dk_kd_visit.
template <bool READ_T, typename S, typename T, typename F>
__device__ __forceinline__ void dk_kd_stash_pass(const DkRowSplit& r, const DkSlice& sl, const S* s, const T* t, S* ss, T* ts,
                                                 F& f) {
    static_assert(sizeof(S) == sizeof(T), "one dtype");
    constexpr int N = DkChunk<S, T>::kLen;
    constexpr int kDepth = 4;
    const int tid = threadIdx.x, nt = blockDim.x;
    auto one = [&](int j) {
        ss[j] = s[j];
        if (READ_T) ts[j] = t[j];
        float sv[1] = {dk_load(s + j)}, tv[1] = {READ_T ? dk_load(t + j) : 0.0f}, gv[1];
        f.template on<1>(sv, tv, gv);
    };
    if (sl.head)
        for (int j = tid; j < r.head; j += nt) one(j);
    // One commit group per chunk, empty past the slice's end, so that wait<kDepth - 1> always
    // retires the chunk about to be computed.
    auto issue = [&](int c) {
        if (c < sl.c_hi) {
            const int j0 = r.head + c * N;
            dk_cp_async16(ss + j0, s + j0);
            if (READ_T) dk_cp_async16(ts + j0, t + j0);
        }
        dk_cp_async_commit();
    };
    const int c0 = sl.c_lo + tid;
#pragma unroll
    for (int d = 0; d < kDepth; ++d) issue(c0 + d * nt);
    for (int c = c0; c < sl.c_hi; c += nt) {
        dk_cp_async_wait<kDepth - 1>();
        const int j0 = r.head + c * N;
        float sv[N], tv[N], gv[N];
        DkVec<S, N>::widen(DkVec<S, N>::load(ss + j0), sv);
        if (READ_T) {
            DkVec<T, N>::widen(DkVec<T, N>::load(ts + j0), tv);
        } else {
#pragma unroll
            for (int i = 0; i < N; ++i) tv[i] = 0.0f;
        }
        f.template on<N>(sv, tv, gv);
        issue(c + kDepth * nt);
    }
    dk_cp_async_wait<0>();  // nothing is left but empty groups; no copy outlives the pass
    if (sl.tail)
        for (int j = r.body_end + tid; j < r.n; j += nt) one(j);
}

// Every rank's `*mine`, merged by warp 0 in rank order (lane r reads rank r: at most 8), so every
// block gets the same bits; one barrier hands the result to the block through `*slot`.
template <typename V, typename Op>
__device__ __forceinline__ V dk_cluster_merge(V* mine, V empty, Op op, V* slot) {
    const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    if (threadIdx.x < DK_WARP) {
        V x = threadIdx.x < cluster.num_blocks() ? *cluster.map_shared_rank(mine, threadIdx.x) : empty;
        x = dk_warp_reduce(x, op);
        if (threadIdx.x == 0) *slot = x;
    }
    __syncthreads();
    return *slot;
}

template <int KIND, bool SOFT, bool HARD, typename S, typename T, typename G>
__device__ void kd_cluster_body(const DkKdParams& p, int64_t row, int part, const S* s, const T* t, G* g) {
    const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    DkKdClusterShared* sh = dk_kd_cluster_shared();
    const bool acc = p.accumulate != 0;
    const int n = static_cast<int>(p.vocab);
    constexpr int N = DkChunk<S, T>::kLen;
    const DkRowSplit split = dk_row_split<N>(n, s, SOFT ? t : nullptr, g);
    const DkSlice slice = dk_slice(split, N, part, p.split);
    const int lo = slice.head ? 0 : split.head + slice.c_lo * N;
    const int hi = slice.tail ? n : split.head + slice.c_hi * N;
    if (hi - lo > p.stash_elems) __trap();  // the host sizes the stash for the longest slice
    unsigned char* base = reinterpret_cast<unsigned char*>(sh) + DK_KD_CLUSTER_HEADER_BYTES;
    S* ss = dk_stash_view(base, s, lo);
    T* ts = dk_stash_view(base + dk_stash_bytes<S>(p.stash_elems), t, lo);
    const float k = DK_LOG2E * p.inv_temperature;

    // ---- pass 1 from DRAM, stashing the slice; the cluster's statistics.
    DkKdPass1<KIND, SOFT, HARD> p1{dk_kd_stats_empty(), k};
    dk_kd_stash_pass<SOFT>(split, slice, s, t, ss, ts, p1);
    const DkKdStats mine = dk_block_reduce_warp0(p1.st, DkKdStatsOp<KIND>{}, dk_kd_stats_empty(), sh->red_stats);
    if (threadIdx.x == 0) sh->block_stats = mine;
    cluster.sync();
    const DkKdStats st = dk_cluster_merge(&sh->block_stats, dk_kd_stats_empty(), DkKdStatsOp<KIND>{}, &sh->merge_stats);
    DkKdRowConsts kc = dk_kd_row_consts<KIND>(p, st, k);

    // ---- pass 2 (and 3) from the stash: each thread reads back the chunks it stashed.
    const S* sv = ss;
    const T* tv = ts;
    const bool grad_in_pass2 = g && KIND != DK_KIND_JSD;
    const bool sums_in_pass2 = SOFT && KIND != DK_KIND_REVERSE_KL;
    // JSD with a gradient, 16-bit rows: pass 2 keeps each element's log2 mixture in a third stash
    // (abi.h) so pass 3 does not recompute its two exponentials and logarithm: JSD is bound by
    // the MUFU there, not by bytes. (An f32 row is bound by bytes, and a third stash would take
    // the shared memory that lets it fit five blocks.)
    constexpr bool kKeepMix = KIND == DK_KIND_JSD && SOFT && sizeof(S) == 2;
    float* ms = kKeepMix && g ? dk_mixture_view(base + dk_stash_bytes<S>(p.stash_elems) + dk_stash_bytes<T>(p.stash_elems),
                                                lo, split.head)
                              : nullptr;
    DkKdPass2<KIND, SOFT, HARD> p2{kc, 0.0f, 0.0f};
    DkKdPass2<KIND, SOFT, HARD, true> p2m{kc, 0.0f, 0.0f};
    if (grad_in_pass2)
        dk_kd_visit<SOFT, true>(split, slice, sv, tv, g, acc, p2);
    else if (ms)
        dk_kd_visit<SOFT, true>(split, slice, sv, tv, ms, false, p2m);
    else if (sums_in_pass2)
        dk_kd_visit<SOFT, false>(split, slice, sv, tv, static_cast<G*>(nullptr), false, p2);
    if (sums_in_pass2) {
        const DkSum2 mine_sums = ms ? DkSum2{p2m.a, p2m.b} : DkSum2{p2.a, p2.b};
        const DkSum2 part_sums = dk_block_reduce_warp0(mine_sums, DkSum2Op{}, DkSum2{0.0f, 0.0f}, sh->red_sum);
        if (threadIdx.x == 0) sh->block_sums = part_sums;
    }
    cluster.sync();
    DkSum2 sums{0.0f, 0.0f};
    if (sums_in_pass2) sums = dk_cluster_merge(&sh->block_sums, DkSum2{0.0f, 0.0f}, DkSum2Op{}, &sh->merge_sum);
    kc.jsd_b = sums.b;
    if (KIND == DK_KIND_JSD && g) {
        if constexpr (kKeepMix) {
            // The mixture stash read where the teacher was, in the 16-bit row's chunks of 8.
            DkKdPass3Kept<HARD> p3{kc};
            dk_kd_visit<true, true, DkChunk<S, T>::kLen>(split, slice, sv, static_cast<const float*>(ms), g, acc, p3);
        } else {
            DkKdPass3<SOFT, HARD> p3{kc};
            dk_kd_visit<SOFT, true>(split, slice, sv, tv, g, acc, p3);
        }
    }
    // Every gradient write of the cluster, and every read of another block's shared memory,
    // before: the label's element may be another block's, and no block may exit while the others
    // read its memory.
    cluster.sync();
    if (part == 0 && threadIdx.x == 0) dk_kd_finish<KIND, SOFT, HARD>(p, row, kc, sums, sh->label_vals, g, acc);
}

// One row's share of a launch: the two-pass kernels (dk_kd_*) run every phase but the cluster's,
// the row-on-chip kernels (dk_kdc_*, CLUSTER) that one.
template <int KIND, bool CLUSTER, typename S, typename T, typename G>
__device__ void kd_row(const DkKdParams& p) {
    // Fused and the finishing launch: one block per row; the split phases and the cluster:
    // p.split per row.
    const int per_row = (p.phase == DK_KD_PHASE_FUSED || p.phase == DK_KD_PHASE_FINISH) ? 1 : p.split;
    const int64_t row = blockIdx.x / per_row;
    const int part = static_cast<int>(blockIdx.x % per_row);
    const int64_t V = p.vocab;
    const S* s = static_cast<const S*>(p.student) + row * p.student_stride;
    const T* t = static_cast<const T*>(p.teacher) + row * p.teacher_stride;
    // No __restrict__: the gradient may be written in place over the student logits.
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
    const bool soft = p.soft_weight != 0.0f;
    const bool hard = p.hard_weight != 0.0f && y >= 0;
    if (!valid || (!soft && !hard)) {  // uniform across the block: no thread reaches a barrier below
        // The row's gradient is 0: the fused launch zeroes it all, a split row's statistics
        // phase its part's elements; the row's loss is 0.
        const bool zero = p.phase == DK_KD_PHASE_FUSED || p.phase == DK_KD_PHASE_STATS || CLUSTER;
        if (g && !acc && zero) {
            const int64_t per = (V + per_row - 1) / per_row;
            const int64_t hi = min(V, (part + 1) * per);
            for (int64_t j = part * per + threadIdx.x; j < hi; j += blockDim.x) dk_store(g + j, 0.0f);
        }
        const bool loss_here = p.phase == DK_KD_PHASE_FUSED || p.phase == DK_KD_PHASE_FINISH || (CLUSTER && part == 0);
        if (threadIdx.x == 0 && loss_here) p.row_loss[row] = 0.0f;
        return;
    }
    // The label's logits (and accumulated gradient), read before any write: an in-place gradient
    // overwrites s_y in pass 2. Thread 0 keeps them in shared memory for its fix-up after the
    // loops (and a split row's statistics phase passes them on through its partials).
    const bool reads_label = hard && (p.phase == DK_KD_PHASE_FUSED || part == 0);
    if (threadIdx.x == 0 && (p.phase == DK_KD_PHASE_FUSED || p.phase == DK_KD_PHASE_STATS || CLUSTER)) {
        float* lv;
        if constexpr (CLUSTER)
            lv = dk_kd_cluster_shared()->label_vals;
        else
            lv = dk_kd_label_vals();
        lv[0] = reads_label ? dk_load(s + y) : 0.0f;
        lv[1] = reads_label && soft ? dk_load(t + y) : 0.0f;
        lv[2] = reads_label && g && acc ? dk_load(g + y) : 0.0f;
    }
    if constexpr (CLUSTER) {
        if (soft && hard)
            kd_cluster_body<KIND, true, true>(p, row, part, s, t, g);
        else if (soft)
            kd_cluster_body<KIND, true, false>(p, row, part, s, t, g);
        else
            kd_cluster_body<KIND, false, true>(p, row, part, s, t, g);
    } else {
        if (soft && hard)
            kd_row_body<KIND, true, true>(p, row, part, s, t, g);
        else if (soft)
            kd_row_body<KIND, true, false>(p, row, part, s, t, g);
        else
            kd_row_body<KIND, false, true>(p, row, part, s, t, g);
    }
}

// Instantiations: kind x student dtype x teacher dtype, gradient f32 or the student's dtype (in place).
// One kernel per kind: a runtime switch over the kinds makes ptxas keep all three bodies' state
// live at once and spill under the 64-register cap of 1024-thread blocks.
#define DK_KD_KIND(kind, KIND, s, t, g, S, T, G)                                                 \
    extern "C" __global__ void __launch_bounds__(1024) dk_kd_##kind##_##s##_##t##_##g(DkKdParams p) { \
        kd_row<KIND, false, S, T, G>(p);                                                         \
    }                                                                                            \
    DK_REGISTER_KERNEL(dk_kd_##kind##_##s##_##t##_##g, DkKdParams)
#define DK_KD(s, t, g, S, T, G)                                 \
    DK_KD_KIND(fkl, DK_KIND_FORWARD_KL, s, t, g, S, T, G)       \
    DK_KD_KIND(rkl, DK_KIND_REVERSE_KL, s, t, g, S, T, G)       \
    DK_KD_KIND(jsd, DK_KIND_JSD, s, t, g, S, T, G)

// Part 0 (the emulator's first translation unit of this file, and what CI's mutation proof
// mutates): the three same-dtype calls. Parts 1-3: the mixed ones, four each.
#if DK_EMU_IN_PART(0)
DK_KD(f32, f32, f32, float, float, float)
DK_KD(f16, f16, f16, __half, __half, __half)
DK_KD(bf16, bf16, bf16, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16)
#endif
#if DK_EMU_IN_PART(1)
DK_KD(f32, f16, f32, float, __half, float)
DK_KD(f32, bf16, f32, float, __nv_bfloat16, float)
DK_KD(f16, f32, f32, __half, float, float)
DK_KD(f16, f16, f32, __half, __half, float)
#endif
#if DK_EMU_IN_PART(2)
DK_KD(f16, bf16, f32, __half, __nv_bfloat16, float)
DK_KD(bf16, f32, f32, __nv_bfloat16, float, float)
DK_KD(bf16, f16, f32, __nv_bfloat16, __half, float)
DK_KD(bf16, bf16, f32, __nv_bfloat16, __nv_bfloat16, float)
#endif
#if DK_EMU_IN_PART(3)
DK_KD(f16, f32, f16, __half, float, __half)
DK_KD(f16, bf16, f16, __half, __nv_bfloat16, __half)
DK_KD(bf16, f32, bf16, __nv_bfloat16, float, __nv_bfloat16)
DK_KD(bf16, f16, bf16, __nv_bfloat16, __half, __nv_bfloat16)
#endif

// The row-on-chip kernels (sm_90 clusters): same-dtype student, teacher and gradient, the case
// that is bandwidth-bound (bf16 in place) and the f32 one. Other pairs take the two-pass kernels;
// on sm_80-89 these bodies are a trap the host never launches (no clusters there).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define DK_KDC_BODY(KIND, S) __trap();
#else
#define DK_KDC_BODY(KIND, S) kd_row<KIND, true, S, S, S>(p);
#endif
#define DK_KDC_KIND(kind, KIND, s, S)                                                                   \
    extern "C" __global__ void __launch_bounds__(1024) dk_kdc_##kind##_##s##_##s##_##s(DkKdParams p) { \
        DK_KDC_BODY(KIND, S)                                                                            \
    }                                                                                                   \
    DK_REGISTER_KERNEL(dk_kdc_##kind##_##s##_##s##_##s, DkKdParams)
#define DK_KDC(s, S)                                \
    DK_KDC_KIND(fkl, DK_KIND_FORWARD_KL, s, S)      \
    DK_KDC_KIND(rkl, DK_KIND_REVERSE_KL, s, S)      \
    DK_KDC_KIND(jsd, DK_KIND_JSD, s, S)
#if DK_EMU_IN_PART(4)
DK_KDC(f32, float)
DK_KDC(f16, __half)
DK_KDC(bf16, __nv_bfloat16)
#endif
