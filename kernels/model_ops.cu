// The model's element-wise and row ops in f32, one forward and one backward per op, each the
// device twin of the function of the same name in src/model/ops.rs (the CPU executor's). The
// kernels know no model: shapes and pointers only. Sums that the CPU takes in a fixed order over
// rows (embedding and RMSNorm weight gradients) are taken in the same order here, each operation
// rounded on its own, so they agree to the bit; sums within a row use the block reduction.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024) dk_embedding_fwd(DkEmbeddingParams p) {
    const int64_t n = blockIdx.x;
    const uint32_t t = p.tokens[n];
    if ((int64_t)t >= p.vocab) return;
    for (int64_t j = threadIdx.x; j < p.c; j += blockDim.x) p.out[n * p.c + j] = p.wte[(int64_t)t * p.c + j];
}
DK_REGISTER_KERNEL(dk_embedding_fwd, DkEmbeddingParams)

extern "C" __global__ void __launch_bounds__(256) dk_embedding_bwd(DkEmbeddingParams p) {
    const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.c) return;
    for (int64_t n = 0; n < p.n; ++n) {
        const uint32_t t = p.tokens[n];
        if ((int64_t)t >= p.vocab) continue;
        float* g = p.dwte + (int64_t)t * p.c + j;
        *g = __fadd_rn(*g, p.dout[n * p.c + j]);
    }
}
DK_REGISTER_KERNEL(dk_embedding_bwd, DkEmbeddingParams)

extern "C" __global__ void __launch_bounds__(1024) dk_rmsnorm_fwd(DkRmsNormParams p) {
    __shared__ float red[DK_MAX_WARPS];
    const int64_t row = blockIdx.x, C = p.c;
    const float* x = p.inp + row * C;
    float acc = 0.0f;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) acc = __fadd_rn(acc, __fmul_rn(x[j], x[j]));
    acc = dk_block_reduce(acc, DkSum{}, red);
    const float inv_c = (float)(1.0 / (double)C);
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fmul_rn(acc, inv_c), p.eps)));
    if (threadIdx.x == 0) p.rstd[row] = r;
    float* out = p.out + row * C;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) out[j] = __fmul_rn(__fmul_rn(x[j], r), p.weight[j]);
}
DK_REGISTER_KERNEL(dk_rmsnorm_fwd, DkRmsNormParams)

extern "C" __global__ void __launch_bounds__(1024) dk_rmsnorm_bwd_dx(DkRmsNormParams p) {
    __shared__ float red[DK_MAX_WARPS];
    const int64_t row = blockIdx.x, C = p.c;
    const float* x = p.inp + row * C;
    const float* dy = p.dout + row * C;
    const float r = p.rstd[row];
    float acc = 0.0f;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x)
        acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(__fmul_rn(dy[j], p.weight[j]), x[j]), r));
    acc = dk_block_reduce(acc, DkSum{}, red);
    const float m = __fmul_rn(acc, (float)(1.0 / (double)C));
    float* dx = p.dinp + row * C;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
        const float inner = __fsub_rn(__fmul_rn(dy[j], p.weight[j]), __fmul_rn(__fmul_rn(x[j], r), m));
        dx[j] = __fadd_rn(dx[j], __fmul_rn(r, inner));
    }
}
DK_REGISTER_KERNEL(dk_rmsnorm_bwd_dx, DkRmsNormParams)

extern "C" __global__ void __launch_bounds__(256) dk_rmsnorm_bwd_dw(DkRmsNormParams p) {
    const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= p.c) return;
    float g = p.dweight[j];
    for (int64_t n = 0; n < p.rows; ++n)
        g = __fadd_rn(g, __fmul_rn(__fmul_rn(p.dout[n * p.c + j], p.inp[n * p.c + j]), p.rstd[n]));
    p.dweight[j] = g;
}
DK_REGISTER_KERNEL(dk_rmsnorm_bwd_dw, DkRmsNormParams)

__device__ __forceinline__ float dk_sigmoid(float x) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-x))); }

#define DK_GRID_STRIDE(i, n) \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

extern "C" __global__ void __launch_bounds__(256) dk_swiglu_fwd(DkElementwiseParams p) {
    DK_GRID_STRIDE(i, p.n) {
        const float g = p.gate[i];
        p.out[i] = __fmul_rn(__fmul_rn(g, dk_sigmoid(g)), p.up[i]);
    }
}
DK_REGISTER_KERNEL(dk_swiglu_fwd, DkElementwiseParams)

extern "C" __global__ void __launch_bounds__(256) dk_swiglu_bwd(DkElementwiseParams p) {
    DK_GRID_STRIDE(i, p.n) {
        const float g = p.gate[i], u = p.up[i], d = p.dout[i];
        const float s = dk_sigmoid(g);
        // d * u * silu'(g) with silu'(g) = s (1 + g (1 - s)), multiplied in the CPU's order.
        const float rest = __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, s)));
        p.dgate[i] = __fadd_rn(p.dgate[i], __fmul_rn(__fmul_rn(__fmul_rn(d, u), s), rest));
        p.dup[i] = __fadd_rn(p.dup[i], __fmul_rn(__fmul_rn(d, g), s));
    }
}
DK_REGISTER_KERNEL(dk_swiglu_bwd, DkElementwiseParams)

extern "C" __global__ void __launch_bounds__(256) dk_residual_fwd(DkElementwiseParams p) {
    DK_GRID_STRIDE(i, p.n) p.out[i] = __fadd_rn(p.gate[i], p.up[i]);
}
DK_REGISTER_KERNEL(dk_residual_fwd, DkElementwiseParams)

extern "C" __global__ void __launch_bounds__(256) dk_residual_bwd(DkElementwiseParams p) {
    DK_GRID_STRIDE(i, p.n) {
        p.dgate[i] = __fadd_rn(p.dgate[i], p.dout[i]);
        p.dup[i] = __fadd_rn(p.dup[i], p.dout[i]);
    }
}
DK_REGISTER_KERNEL(dk_residual_bwd, DkElementwiseParams)

// One thread per (vector, i) pair: each pair is read and written by its thread only, so in place
// is safe. The products and the difference rounded separately, as the CPU's Rust does.
extern "C" __global__ void __launch_bounds__(256) dk_rope(DkRopeParams p) {
    const int64_t pairs = p.vectors * p.half;
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < pairs; k += (int64_t)gridDim.x * blockDim.x) {
        const int64_t v = k / p.half, i = k - v * p.half;
        const int64_t t = (v / p.heads) % p.seq;
        const float c = p.cos[t * p.half + i];
        const float s = p.inverse ? -p.sin[t * p.half + i] : p.sin[t * p.half + i];
        float* lo = p.x + v * 2 * p.half + i;
        float* hi = lo + p.half;
        const float a = *lo, b = *hi;
        *lo = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        *hi = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
}
DK_REGISTER_KERNEL(dk_rope, DkRopeParams)

extern "C" __global__ void __launch_bounds__(256) dk_copy_rows(DkCopyRowsParams p) {
    DK_GRID_STRIDE(k, p.rows * p.width) {
        const int64_t r = k / p.width, j = k - r * p.width;
        p.dst[r * p.dst_stride + j] = p.src[r * p.src_stride + j];
    }
}
DK_REGISTER_KERNEL(dk_copy_rows, DkCopyRowsParams)
