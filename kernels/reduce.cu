// The row-independent steps around the per-row kernels: dk_prepare (label check, D, scales) runs
// before them, dk_reduce (deterministic sum of the row losses) after. One block each.
#include "common.cuh"

struct DkMinI64 {
    __device__ __forceinline__ long long operator()(long long a, long long b) const { return a < b ? a : b; }
};

extern "C" __global__ void __launch_bounds__(1024) dk_prepare(DkPrepareParams p) {
    __shared__ float red_f[DK_MAX_WARPS];
    __shared__ long long red_i[DK_MAX_WARPS];
    float valid = 0.0f;
    long long first_bad = p.rows;  // smallest offending row, p.rows when none
    const int64_t* labels64 = static_cast<const int64_t*>(p.labels);
    const int32_t* labels32 = static_cast<const int32_t*>(p.labels);
    for (int64_t r = threadIdx.x; r < p.rows; r += blockDim.x) {
        if (!p.labels) {
            valid += 1.0f;
            continue;
        }
        const int64_t y = p.labels_i32 ? (int64_t)labels32[r] : labels64[r];
        if (p.labels_out) p.labels_out[r] = y;
        if (y == p.ignore_index) continue;
        if (y < 0 || y >= p.vocab) {
            if (r < first_bad) first_bad = r;
            continue;
        }
        valid += 1.0f;
    }
    // Counts up to 2^24 rows are exact in f32 per thread; rows beyond that are not a batch.
    valid = dk_block_reduce(valid, DkSum{}, red_f);
    first_bad = dk_block_reduce(first_bad, DkMinI64{}, red_i);
    if (threadIdx.x == 0) {
        DkScalars out;
        const float d = p.reduction == DK_REDUCTION_MEAN ? (p.normalizer > 0.0f ? p.normalizer : valid) : 1.0f;
        out.loss_scale = d == 0.0f ? 0.0f : 1.0f / d;
        out.grad_scale = d == 0.0f ? 0.0f : p.upstream_scale / d;
        out.valid_rows = valid;
        out.bad_label_row = first_bad < p.rows ? (int32_t)first_bad : -1;
        out.bad_topk = INT64_MAX;  // lowered by dk_topk_check when a top-k call has a bad id
        out.bad_label = first_bad >= p.rows ? 0 : p.labels_i32 ? (int64_t)labels32[first_bad] : labels64[first_bad];
        *p.scalars = out;
    }
}
DK_REGISTER_KERNEL(dk_prepare, DkPrepareParams)

extern "C" __global__ void __launch_bounds__(1024) dk_reduce(DkReduceParams p) {
    __shared__ float red_f[DK_MAX_WARPS];
    // A bad label or top-k id fails the call and the row kernels wrote nothing: nothing to sum.
    if (p.scalars->bad_label_row >= 0 || p.scalars->bad_topk != INT64_MAX) {
        if (threadIdx.x == 0) *p.loss = 0.0f;
        return;
    }
    float acc = 0.0f;
    for (int64_t r = threadIdx.x; r < p.rows; r += blockDim.x) acc += p.row_loss[r];
    acc = dk_block_reduce(acc, DkSum{}, red_f);
    if (threadIdx.x == 0) *p.loss = acc * p.scalars->loss_scale;
}
DK_REGISTER_KERNEL(dk_reduce, DkReduceParams)
