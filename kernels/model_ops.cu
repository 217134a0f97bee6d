// The model's element-wise and row ops, one forward and one backward per op, each the device twin
// of the function of the same name in src/model/ops.rs (the CPU executor's). The kernels know no
// model: shapes and pointers only. Sums that the CPU takes in a fixed order over rows (embedding
// and RMSNorm weight gradients) are taken in the same order here, each operation rounded on its
// own, so they agree to the bit; sums within a row use the block reduction.
//
// Every op comes in two storage types, suffix _f32 and _bf16 (the tensors the model passes
// between ops: activations, their gradients, the working copy of the weights). Arithmetic is f32
// in both: a bf16 element is widened on load and rounded to nearest-even on store (dk_load,
// dk_store), so the f32 instantiation is the f32 kernel exactly. What stays f32 in both: the
// parameter gradients (dwte, dweight: sums over every row, which bf16 would swamp), RMSNorm's
// rstd, the RoPE tables.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void embedding_fwd(const DkEmbeddingParams& p) {
    const int64_t n = blockIdx.x;
    const uint32_t t = p.tokens[n];
    if ((int64_t)t >= p.vocab) return;
    const T* wte = static_cast<const T*>(p.wte);
    T* out = static_cast<T*>(p.out);
    for (int64_t j = threadIdx.x; j < p.c; j += blockDim.x) out[n * p.c + j] = wte[(int64_t)t * p.c + j];
}

template <typename T>
__device__ __forceinline__ void embedding_bwd(const DkEmbeddingParams& p) {
    const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.c) return;
    const T* dout = static_cast<const T*>(p.dout);
    for (int64_t n = 0; n < p.n; ++n) {
        const uint32_t t = p.tokens[n];
        if ((int64_t)t >= p.vocab) continue;
        float* g = p.dwte + (int64_t)t * p.c + j;
        *g = __fadd_rn(*g, dk_load(dout + n * p.c + j));
    }
}

template <typename T>
__device__ __forceinline__ void rmsnorm_fwd(const DkRmsNormParams& p) {
    __shared__ float red[DK_MAX_WARPS];
    const int64_t row = blockIdx.x, C = p.c;
    const T* x = static_cast<const T*>(p.inp) + row * C;
    const T* w = static_cast<const T*>(p.weight);
    float acc = 0.0f;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
        const float xj = dk_load(x + j);
        acc = __fadd_rn(acc, __fmul_rn(xj, xj));
    }
    acc = dk_block_reduce(acc, DkSum{}, red);
    const float inv_c = (float)(1.0 / (double)C);
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fmul_rn(acc, inv_c), p.eps)));
    if (threadIdx.x == 0) p.rstd[row] = r;
    T* out = static_cast<T*>(p.out) + row * C;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x)
        dk_store(out + j, __fmul_rn(__fmul_rn(dk_load(x + j), r), dk_load(w + j)));
}

template <typename T>
__device__ __forceinline__ void rmsnorm_bwd_dx(const DkRmsNormParams& p) {
    __shared__ float red[DK_MAX_WARPS];
    const int64_t row = blockIdx.x, C = p.c;
    const T* x = static_cast<const T*>(p.inp) + row * C;
    const T* dy = static_cast<const T*>(p.dout) + row * C;
    const T* w = static_cast<const T*>(p.weight);
    const float r = p.rstd[row];
    float acc = 0.0f;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x)
        acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(__fmul_rn(dk_load(dy + j), dk_load(w + j)), dk_load(x + j)), r));
    acc = dk_block_reduce(acc, DkSum{}, red);
    const float m = __fmul_rn(acc, (float)(1.0 / (double)C));
    T* dx = static_cast<T*>(p.dinp) + row * C;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
        const float inner = __fsub_rn(__fmul_rn(dk_load(dy + j), dk_load(w + j)), __fmul_rn(__fmul_rn(dk_load(x + j), r), m));
        dk_store(dx + j, __fadd_rn(dk_load(dx + j), __fmul_rn(r, inner)));
    }
}

template <typename T>
__device__ __forceinline__ void rmsnorm_bwd_dw(const DkRmsNormParams& p) {
    const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.c) return;
    const T* dout = static_cast<const T*>(p.dout);
    const T* inp = static_cast<const T*>(p.inp);
    float g = p.dweight[j];
    for (int64_t n = 0; n < p.rows; ++n)
        g = __fadd_rn(g, __fmul_rn(__fmul_rn(dk_load(dout + n * p.c + j), dk_load(inp + n * p.c + j)), p.rstd[n]));
    p.dweight[j] = g;
}

__device__ __forceinline__ float dk_sigmoid(float x) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-x))); }

#define DK_GRID_STRIDE(i, n) \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

template <typename T>
__device__ __forceinline__ void swiglu_fwd(const DkElementwiseParams& p) {
    const T* gate = static_cast<const T*>(p.gate);
    const T* up = static_cast<const T*>(p.up);
    T* out = static_cast<T*>(p.out);
    DK_GRID_STRIDE(i, p.n) {
        const float g = dk_load(gate + i);
        dk_store(out + i, __fmul_rn(__fmul_rn(g, dk_sigmoid(g)), dk_load(up + i)));
    }
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd(const DkElementwiseParams& p) {
    const T* gate = static_cast<const T*>(p.gate);
    const T* up = static_cast<const T*>(p.up);
    const T* dout = static_cast<const T*>(p.dout);
    T* dgate = static_cast<T*>(p.dgate);
    T* dup = static_cast<T*>(p.dup);
    DK_GRID_STRIDE(i, p.n) {
        const float g = dk_load(gate + i), u = dk_load(up + i), d = dk_load(dout + i);
        const float s = dk_sigmoid(g);
        // d * u * silu'(g) with silu'(g) = s (1 + g (1 - s)), multiplied in the CPU's order.
        const float rest = __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, s)));
        dk_store(dgate + i, __fadd_rn(dk_load(dgate + i), __fmul_rn(__fmul_rn(__fmul_rn(d, u), s), rest)));
        dk_store(dup + i, __fadd_rn(dk_load(dup + i), __fmul_rn(__fmul_rn(d, g), s)));
    }
}

template <typename T>
__device__ __forceinline__ void residual_fwd(const DkElementwiseParams& p) {
    const T* a = static_cast<const T*>(p.gate);
    const T* b = static_cast<const T*>(p.up);
    T* out = static_cast<T*>(p.out);
    DK_GRID_STRIDE(i, p.n) dk_store(out + i, __fadd_rn(dk_load(a + i), dk_load(b + i)));
}

template <typename T>
__device__ __forceinline__ void residual_bwd(const DkElementwiseParams& p) {
    const T* dout = static_cast<const T*>(p.dout);
    T* da = static_cast<T*>(p.dgate);
    T* db = static_cast<T*>(p.dup);
    DK_GRID_STRIDE(i, p.n) {
        const float d = dk_load(dout + i);
        dk_store(da + i, __fadd_rn(dk_load(da + i), d));
        dk_store(db + i, __fadd_rn(dk_load(db + i), d));
    }
}

template <typename T>
__device__ __forceinline__ void bias_fwd(const DkBiasParams& p) {
    T* out = static_cast<T*>(p.out);
    const T* bias = static_cast<const T*>(p.bias);
    DK_GRID_STRIDE(i, p.n * p.c) dk_store(out + i, __fadd_rn(dk_load(out + i), dk_load(bias + i % p.c)));
}

template <typename T>
__device__ __forceinline__ void bias_bwd(const DkBiasParams& p) {
    const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.c) return;
    const T* dout = static_cast<const T*>(p.dout);
    float g = p.dbias[j];
    for (int64_t n = 0; n < p.n; ++n) g = __fadd_rn(g, dk_load(dout + n * p.c + j));
    p.dbias[j] = g;
}

// One thread per (vector, i) pair: each pair is read and written by its thread only, so in place
// is safe. The products and the difference rounded separately, as the CPU's Rust does.
template <typename T>
__device__ __forceinline__ void rope(const DkRopeParams& p) {
    const int64_t pairs = p.vectors * p.half;
    T* x = static_cast<T*>(p.x);
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < pairs; k += (int64_t)gridDim.x * blockDim.x) {
        const int64_t v = k / p.half, i = k - v * p.half;
        const int64_t t = (v / p.heads) % p.seq;
        const float c = p.cos[t * p.half + i];
        const float s = p.inverse ? -p.sin[t * p.half + i] : p.sin[t * p.half + i];
        T* lo = x + v * 2 * p.half + i;
        T* hi = lo + p.half;
        const float a = dk_load(lo), b = dk_load(hi);
        dk_store(lo, __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
        dk_store(hi, __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
    }
}

template <typename T>
__device__ __forceinline__ void copy_rows(const DkCopyRowsParams& p) {
    T* dst = static_cast<T*>(p.dst);
    const T* src = static_cast<const T*>(p.src);
    DK_GRID_STRIDE(k, p.rows * p.width) {
        const int64_t r = k / p.width, j = k - r * p.width;
        dst[r * p.dst_stride + j] = src[r * p.src_stride + j];
    }
}

// Instantiations: op x storage type, each with its launch bound.
#define DK_MODEL_OP(name, fn, P, bound, dt, T)                                          \
    extern "C" __global__ void __launch_bounds__(bound) dk_##name##_##dt(P p) { fn<T>(p); } \
    DK_REGISTER_KERNEL(dk_##name##_##dt, P)
#define DK_MODEL_OPS(dt, T)                                                      \
    DK_MODEL_OP(embedding_fwd, embedding_fwd, DkEmbeddingParams, 1024, dt, T)    \
    DK_MODEL_OP(embedding_bwd, embedding_bwd, DkEmbeddingParams, 256, dt, T)     \
    DK_MODEL_OP(rmsnorm_fwd, rmsnorm_fwd, DkRmsNormParams, 1024, dt, T)          \
    DK_MODEL_OP(rmsnorm_bwd_dx, rmsnorm_bwd_dx, DkRmsNormParams, 1024, dt, T)    \
    DK_MODEL_OP(rmsnorm_bwd_dw, rmsnorm_bwd_dw, DkRmsNormParams, 256, dt, T)     \
    DK_MODEL_OP(swiglu_fwd, swiglu_fwd, DkElementwiseParams, 256, dt, T)         \
    DK_MODEL_OP(swiglu_bwd, swiglu_bwd, DkElementwiseParams, 256, dt, T)         \
    DK_MODEL_OP(residual_fwd, residual_fwd, DkElementwiseParams, 256, dt, T)     \
    DK_MODEL_OP(residual_bwd, residual_bwd, DkElementwiseParams, 256, dt, T)     \
    DK_MODEL_OP(bias_fwd, bias_fwd, DkBiasParams, 256, dt, T)                    \
    DK_MODEL_OP(bias_bwd, bias_bwd, DkBiasParams, 256, dt, T)                    \
    DK_MODEL_OP(rope, rope, DkRopeParams, 256, dt, T)                            \
    DK_MODEL_OP(copy_rows, copy_rows, DkCopyRowsParams, 256, dt, T)

DK_MODEL_OPS(f32, float)
DK_MODEL_OPS(bf16, __nv_bfloat16)
