/*
 * The one ABI between the Rust crate and the kernels.
 *
 * Every kernel takes exactly one of these structs by value. The Rust side is generated from this
 * file by bindgen (src/abi_bindings.rs, regenerated with `--features regen-bindings`; CI fails on
 * drift), so a field added here is a field added everywhere.
 *
 * Plain C, fixed-width types only, pointers as `const void*` / `void*` where the element type is
 * chosen by which kernel instantiation is launched. Row strides are in elements.
 */
#ifndef DISTILL_KERNELS_ABI_H
#define DISTILL_KERNELS_ABI_H

#include <stdint.h>

/* Soft-loss kinds (DESIGN section 4). */
#define DK_KIND_FORWARD_KL 0
#define DK_KIND_REVERSE_KL 1
#define DK_KIND_JSD 2

/* Reductions. */
#define DK_REDUCTION_NONE 0
#define DK_REDUCTION_SUM 1
#define DK_REDUCTION_MEAN 2

/* Row-independent numbers the prepare kernel computes on the device, read by the others. */
typedef struct DkScalars {
    float grad_scale;      /* upstream_scale / D for mean, upstream_scale otherwise; 0 when D == 0 */
    float loss_scale;      /* 1 / D for mean, 1 otherwise; 0 when D == 0 */
    float valid_rows;      /* number of rows whose label is not ignore_index (all rows without labels) */
    int32_t bad_label_row; /* first row whose label is outside [0, V) and not ignore_index, or -1 */
    int64_t bad_label;     /* that label */
    int64_t bad_topk;      /* row << 32 | id of the first bad top-k id (dk_topk_check), INT64_MAX: none */
} DkScalars;

/* dk_prepare: one block. Validates labels, counts valid rows, fills *scalars, and widens int32
 * labels into labels_out, which the row kernels then read (they take int64 labels only). */
typedef struct DkPrepareParams {
    const void* labels;  /* [rows] int64 (labels_i32 == 0) or int32 (labels_i32 == 1), or NULL */
    int64_t* labels_out; /* [rows]: the labels as int64, written when non-NULL */
    DkScalars* scalars;
    int64_t rows;
    int64_t vocab;
    int64_t ignore_index;
    int32_t reduction;
    int32_t labels_i32;
    float normalizer;     /* > 0: explicit D for mean; <= 0: D = number of valid rows */
    float upstream_scale; /* multiplies every gradient */
} DkPrepareParams;

/* dk_kd_<student>_<teacher>_<grad>: one block per row.
 * row_loss[r] = soft_weight * soft(r) + hard_weight * hard(r) for valid rows, 0 otherwise.
 * grad (may alias student) = scalars->grad_scale * d row_loss / d student. */
typedef struct DkKdParams {
    const void* student;   /* [rows, student_stride] */
    const void* teacher;   /* [rows, teacher_stride] */
    const int64_t* labels; /* [rows] or NULL */
    void* grad;            /* [rows, grad_stride] or NULL: loss only */
    float* row_loss;       /* [rows] */
    const DkScalars* scalars;
    int64_t rows;
    int64_t vocab;
    int64_t student_stride;
    int64_t teacher_stride;
    int64_t grad_stride;
    int64_t ignore_index;
    float inv_temperature;
    float temperature;
    float soft_weight; /* alpha, times T^2 when scaling is on */
    float hard_weight; /* 1 - alpha */
    float beta;        /* JSD only */
    int32_t kind;      /* DK_KIND_* */
    int32_t accumulate; /* 1: grad += the gradient (valid rows only; never in place) */
    /* A row split over blocks (few long rows): DK_KD_PHASE_FUSED runs one block per row and
     * ignores the two fields below. Otherwise the call is launched once per phase, STATS and APPLY
     * (and JSD_GRAD for JSD with a gradient) on rows * split blocks, FINISH on rows blocks; the
     * phases exchange results through partials. */
    float* partials;    /* [rows * split * DK_KD_PARTIAL_FLOATS], or NULL when fused */
    int32_t split;      /* blocks per row in the split phases and the cluster */
    int32_t phase;      /* DK_KD_PHASE_* */
    /* dk_kdc_* (phase CLUSTER, sm_90): one launch of rows * split blocks in clusters of split
     * blocks (at most 8), each block keeping its slice of the row in dynamic shared memory of
     * DK_KD_CLUSTER_HEADER_BYTES + stash(S) + stash(T) bytes, stash(X) = round_up(stash_elems *
     * sizeof(X) + 16, 16). stash_elems: at least the longest slice, ceil(floor(vocab / C) / split) * C
     * + 2 * C elements with C = 16 / sizeof(S) (the vector chunk). JSD with a gradient of a 16-bit
     * dtype adds a third stash, of f32 (its log2 mixture): + round_up(stash_elems * 4 + 16, 16).
     * Ignored by the other phases. */
    int32_t stash_elems;
} DkKdParams;

#define DK_KD_PHASE_FUSED 0
#define DK_KD_PHASE_STATS 1
#define DK_KD_PHASE_APPLY 2
#define DK_KD_PHASE_JSD_GRAD 3
#define DK_KD_PHASE_FINISH 4
#define DK_KD_PHASE_CLUSTER 5
#define DK_KD_CLUSTER_HEADER_BYTES 4096
/* floats per (row, part) of DkKdParams.partials: statistics 7, pass-2 sums 2, label values 3 */
#define DK_KD_PARTIAL_FLOATS 12

/* Dtype codes of buffers whose element type is chosen at run time (not by the instantiation). */
#define DK_DTYPE_F32 0
#define DK_DTYPE_F16 1
#define DK_DTYPE_BF16 2

/* The most ids per row of a top-k teacher (semantics::MAX_TOP_K). */
#define DK_MAX_TOP_K 1024

/* dk_topk_check: one block per row. Every id of the row in [0, vocab) and distinct, else
 * atomicMin(&scalars->bad_topk, row << 32 | id) with the row's smallest offending id (out of range,
 * or repeated); dk_prepare sets it to INT64_MAX first. */
typedef struct DkTopKCheckParams {
    const uint32_t* ids; /* [rows, k] */
    DkScalars* scalars;
    int64_t rows;
    int64_t vocab;
    int32_t k;
} DkTopKCheckParams;

/* dk_topk_<kind>_<student>_<grad>: one block per row, the loss against a top-k teacher
 * (semantics::TopKTeacher). row_loss[r] = soft_weight * soft(r) + hard_weight * hard(r) for valid
 * rows, 0 otherwise; grad (may alias student) = scalars->grad_scale * d row_loss / d student. */
typedef struct DkTopKParams {
    const void* student;   /* [rows, student_stride] */
    const uint32_t* ids;   /* [rows, k] */
    const void* values;    /* [rows, k], dtype values_dtype: log-probabilities at T = 1 */
    const float* tail;     /* [rows]: the tail bucket's logit at T: log sum_tail p^(1/T) */
    const int64_t* labels; /* [rows] or NULL */
    void* grad;            /* [rows, grad_stride] or NULL: loss only */
    float* row_loss;       /* [rows] */
    const DkScalars* scalars;
    int64_t rows;
    int64_t vocab;
    int64_t student_stride;
    int64_t grad_stride;
    int64_t ignore_index;
    int32_t k;
    int32_t values_dtype; /* DK_DTYPE_* */
    float inv_temperature;
    float soft_weight; /* alpha, times T^2 when scaling is on */
    float hard_weight; /* 1 - alpha */
    int32_t accumulate; /* 1: grad += the gradient (valid rows only; never in place) */
} DkTopKParams;

/* dk_hidden_mse_<student>_<teacher>_<grad>: one block per row.
 * row_loss[r] += weight * mean_h (s - t)^2 for valid rows; grad = grad_scale * d/ds of that. */
typedef struct DkHiddenParams {
    const void* student; /* [rows, hidden] */
    const void* teacher; /* [rows, hidden] */
    const int64_t* labels;
    void* grad; /* [rows, hidden] or NULL */
    float* row_loss;
    const DkScalars* scalars;
    int64_t rows;
    int64_t hidden;
    int64_t ignore_index;
    float weight;
} DkHiddenParams;

/* dk_reduce: one block. *loss = loss_scale * sum_r row_loss[r], summed in a fixed order. */
typedef struct DkReduceParams {
    const float* row_loss;
    const DkScalars* scalars;
    float* loss;
    int64_t rows;
} DkReduceParams;

/* dk_softmax_fwd_<dtype>: one block per row. output = softmax(input / T) or its log. */
typedef struct DkSoftmaxParams {
    const void* input; /* [rows, vocab] */
    void* output;      /* [rows, vocab], same dtype as input */
    int64_t rows;
    int64_t vocab;
    float inv_temperature;
    int32_t log_output; /* 1: log_softmax */
} DkSoftmaxParams;

/* dk_softmax_bwd_<dtype>: one block per row. Given y = forward output and dy, writes
 * dx = d<y, dy>/dx. softmax: (y * (dy - sum(y dy))) / T; log_softmax: (dy - exp(y) sum(dy)) / T. */
typedef struct DkSoftmaxBwdParams {
    const void* output;      /* y */
    const void* grad_output; /* dy */
    void* grad_input;        /* dx, may alias grad_output */
    int64_t rows;
    int64_t vocab;
    float inv_temperature;
    int32_t log_output;
} DkSoftmaxBwdParams;

/* ---- The optimizer step (kernels/optim.cu). */

/* Elements per block of dk_sumsq_partial: the gradient norm's partial sums are over these fixed
 * chunks, so the norm does not depend on the GPU it runs on. */
#define DK_NORM_CHUNK 32768

/* The gradient norm and the clipping factor, computed on the device for AdamW to read. */
typedef struct DkClipResult {
    double sum_sq;  /* sum of g^2, f64 */
    float norm;     /* sqrt(sum_sq) */
    float scale;    /* max_norm / norm when clipping applies, else 1: every gradient is multiplied by it */
    int32_t finite; /* 0 when the norm is NaN or infinite: dk_adamw_f32 then writes nothing */
    int32_t reserved;
} DkClipResult;

/* dk_sumsq_partial: one block per DK_NORM_CHUNK elements; partials[b] = sum of g^2 over chunk b. */
typedef struct DkSumSqParams {
    const float* grads; /* [n] */
    double* partials;   /* [ceil(n / DK_NORM_CHUNK)] */
    int64_t n;
} DkSumSqParams;

/* dk_clip_finish: one block. Sums the partials in a fixed order into *result. */
typedef struct DkClipParams {
    const double* partials;
    DkClipResult* result;
    int64_t blocks;
    float max_norm; /* negative or NaN: never clip */
} DkClipParams;

/* dk_adamw_f32: elements [begin, end) of the flat buffers, all with the same decay (`shrink`).
 * The scalars are computed on the host exactly as the CPU optimizer computes them, and every
 * operation is rounded separately (no FMA contraction), so the update is bit-identical to it. */
typedef struct DkAdamWParams {
    float* params;
    const float* grads;
    float* m;
    float* v;
    const DkClipResult* clip; /* NULL: gradients as they are */
    void* bf16_copy;          /* NULL, or [n] bf16: the updated parameters rounded to nearest-even,
                                 the model's working copy in mixed precision */
    int64_t begin;
    int64_t end;
    float beta1;
    float beta2;
    float one_minus_beta1;
    float one_minus_beta2;
    float eps;
    float step_size; /* lr / (1 - beta1^t) */
    float bc2_sqrt;  /* sqrt(1 - beta2^t) */
    float shrink;    /* 1 - lr * weight_decay, or 1 where the parameter does not decay */
} DkAdamWParams;

/* ---- The model's element-wise and row ops (kernels/model_ops.cu). Each mirrors the function of
 * the same name in src/model/ops.rs; backward kernels accumulate (+=) into their outputs. Every
 * kernel comes as dk_<op>_f32 and dk_<op>_bf16: the `void*` tensors are of that storage type,
 * the `float*` ones f32 in both (parameter gradients, rstd, RoPE tables). */

/* dk_embedding_fwd: one block per position, out[n, :] = wte[tokens[n], :].
 * dk_embedding_bwd: one thread per channel, dwte[tokens[n], j] += dout[n, j] for n in order (no
 * atomics: the sum is the CPU's, bit for bit). A token >= vocab reads and writes nothing; the host
 * checks tokens before they are uploaded. */
typedef struct DkEmbeddingParams {
    const uint32_t* tokens; /* [n] */
    const void* wte;        /* forward: [vocab, c] */
    void* out;              /* forward: [n, c] */
    const void* dout;       /* backward: [n, c] */
    float* dwte;            /* backward: [vocab, c] */
    int64_t n;
    int64_t c;
    int64_t vocab;
} DkEmbeddingParams;

/* dk_rmsnorm_fwd: one block per row; out = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps).
 * dk_rmsnorm_bwd_dx: one block per row; dinp += rstd * (dy*w - x*rstd * mean(dy*w*x*rstd)).
 * dk_rmsnorm_bwd_dw: one thread per channel; dweight += dy * x * rstd over the rows in order. */
typedef struct DkRmsNormParams {
    const void* inp;    /* [rows, c] */
    const void* weight; /* [c] */
    void* out;          /* forward: [rows, c] */
    float* rstd;        /* forward: written; backward: read. [rows] */
    const void* dout;   /* backward: [rows, c] */
    void* dinp;         /* backward: [rows, c] */
    float* dweight;     /* backward: [c] */
    int64_t rows;
    int64_t c;
    float eps;
} DkRmsNormParams;

/* dk_swiglu_fwd: out = silu(gate) * up. dk_swiglu_bwd: dgate += dout * up * silu'(gate),
 * dup += dout * silu(gate). dk_residual_fwd: out = a + b (a = gate, b = up). dk_residual_bwd:
 * dgate += dout, dup += dout. Grid-stride over n elements. */
typedef struct DkElementwiseParams {
    const void* gate;
    const void* up;
    const void* dout;
    void* out;
    void* dgate;
    void* dup;
    int64_t n;
} DkElementwiseParams;

/* dk_bias_fwd: out[n, j] += bias[j], grid-stride over n * c elements (a linear layer's bias,
 * after its matmul). dk_bias_bwd: one thread per channel; dbias[j] += dout[n, j] over the rows in
 * order, each sum rounded (the CPU's order, so the two agree to the bit). bias is in the storage
 * type, dbias f32 like every parameter gradient. */
typedef struct DkBiasParams {
    void* out;        /* forward: [n, c] */
    const void* bias; /* forward: [c] */
    const void* dout; /* backward: [n, c] */
    float* dbias;     /* backward: [c] */
    int64_t n;
    int64_t c;
} DkBiasParams;

/* dk_copy_rows: dst[r * dst_stride + j] = src[r * src_stride + j] for r < rows, j < width: a
 * [rows, width] block between row-major buffers of different row strides (the hidden-state
 * pairs side by side in one loss row, and back). dst and src do not overlap. Grid-stride over
 * rows * width. */
typedef struct DkCopyRowsParams {
    void* dst;
    const void* src;
    int64_t rows;
    int64_t width;
    int64_t dst_stride;
    int64_t src_stride;
} DkCopyRowsParams;

/* dk_rope: rotate-half RoPE in place over x [vectors, head_dim] (vectors = N * heads), row n of
 * the activations at position n % seq: for i < half, y[i] = x[i] cos - x[i+half] sin,
 * y[i+half] = x[i+half] cos + x[i] sin, with cos/sin [seq, half]. inverse != 0: the transposed
 * rotation (sin negated), which turns dL/dy into dL/dx. Grid-stride over vectors * half pairs. */
typedef struct DkRopeParams {
    void* x;
    const float* cos;
    const float* sin;
    int64_t vectors;
    int64_t heads;
    int64_t seq;
    int64_t half;
    int32_t inverse;
} DkRopeParams;

/* dk_attention_fwd, dk_attention_bwd_dq, dk_attention_bwd_dkv (kernels/attention.cu): causal
 * softmax attention, query head h reading key/value head h / (n_heads / n_kv_heads). q, out,
 * dout, dq [batch, seq, n_heads, head_dim]; k, v, dk, dv [batch, seq, n_kv_heads, head_dim];
 * lse, delta [batch, seq, n_heads]. Forward: out_w and lse (the row's log-sum-exp of the scaled
 * scores) written. bwd_dq: delta = rowsum(dout * out) written, dq accumulated. bwd_dkv (after
 * bwd_dq): dk, dv accumulated. head_dim <= 128. Suffix _f32 or _bf16: the `void*` tensors' storage
 * type; lse and delta f32 in both. */
typedef struct DkAttentionParams {
    const void* q;
    const void* k;
    const void* v;
    const void* out;
    const void* dout;
    void* out_w;
    float* lse;
    float* delta;
    void* dq;
    void* dk;
    void* dv;
    int64_t batch;
    int64_t seq;
    int64_t n_heads;
    int64_t n_kv_heads;
    int64_t head_dim;
    float scale;
} DkAttentionParams;

#endif
