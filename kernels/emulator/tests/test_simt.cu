/*
 * Semantics and speed of the SIMT runtime: block reductions (shuffles + __syncthreads) for many
 * block shapes, shuffle/vote semantics against a model written from the CUDA documentation,
 * dynamic shared memory, per-block __shared__ isolation under parallel workers, atomics from
 * parallel blocks, and timings.
 *
 * Kernels are written exactly as in kernels/NAME.cu (one parameter struct by value, registered with
 * DK_REGISTER_KERNEL), but include simt.h directly instead of common.cuh.
 */
#include "emulator/simt.h"

#include <vector>

#include "test_util.h"

#define FULL 0xffffffffu

/* ------------------------------------------------------------------------------------------ */
/* Kernels                                                                                     */
/* ------------------------------------------------------------------------------------------ */

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
    return v;
}

/* Block-wide sum, result in every thread (the usual two-level pattern). Block size must be a
 * multiple of 32 here. */
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < nwarps ? partial[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads(); /* partial[] is reused by the next call */
    return v;
}
__device__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < nwarps ? partial[lane] : -INFINITY;
    v = warp_max(v);
    __syncthreads();
    return v;
}

struct RowReduceParams {
    const float* x;
    float* out; /* [rows] */
    int64_t cols;
};

extern "C" __global__ void __launch_bounds__(1024) t_row_sum(RowReduceParams p) {
    const float* row = p.x + blockIdx.x * p.cols;
    float acc = 0.0f;
    for (int64_t i = threadIdx.x; i < p.cols; i += blockDim.x) acc += row[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) p.out[blockIdx.x] = acc;
}
DK_REGISTER_KERNEL(t_row_sum, RowReduceParams)

/* Partial warps: shfl_down with an explicit bound, and the sm_80 __reduce_add_sync. */
struct PartialParams {
    const int* x;
    int* out; /* [2]: shfl_down result, __reduce_add_sync result */
};
extern "C" __global__ void t_partial_warp_sum(PartialParams p) {
    const unsigned lane = threadIdx.x & 31;
    const unsigned lanes_here = min(32u, blockDim.x - (threadIdx.x & ~31u));
    int v = p.x[threadIdx.x];
    for (unsigned o = 16; o > 0; o >>= 1) {
        const int other = __shfl_down_sync(__activemask(), v, o);
        if (lane + o < lanes_here) v += other;
    }
    const int r = __reduce_add_sync(FULL, p.x[threadIdx.x]);
    if (lane == 0) {
        atomicAdd(&p.out[0], v);
        atomicAdd(&p.out[1], r);
    }
}
DK_REGISTER_KERNEL(t_partial_warp_sum, PartialParams)

/* Softmax over rows, the shape of the real kernels: 3 sweeps of (max, sum) reductions. */
struct SoftmaxParams {
    const float* x;
    float* y;
    int64_t cols;
    int repeats;
};
extern "C" __global__ void __launch_bounds__(1024) t_softmax(SoftmaxParams p) {
    const float* row = p.x + blockIdx.x * p.cols;
    float* out = p.y + blockIdx.x * p.cols;
    for (int r = 0; r < p.repeats; ++r) {
        float m = -INFINITY;
        for (int64_t i = threadIdx.x; i < p.cols; i += blockDim.x) m = fmaxf(m, row[i]);
        m = block_max(m);
        float s = 0.0f;
        for (int64_t i = threadIdx.x; i < p.cols; i += blockDim.x) s += __expf(row[i] - m);
        s = block_sum(s);
        const float inv = 1.0f / s;
        for (int64_t i = threadIdx.x; i < p.cols; i += blockDim.x) out[i] = __expf(row[i] - m) * inv;
    }
}
DK_REGISTER_KERNEL(t_softmax, SoftmaxParams)

/* Every shuffle flavour and width; out[k * nthreads + t] for case k. */
struct ShflParams {
    int* out;
};
extern "C" __global__ void t_shfl_cases(ShflParams p) {
    const int t = threadIdx.x, n = blockDim.x;
    const int v = 1000 + t;
    int k = 0;
    const int widths[] = {32, 16, 8, 4, 2, 1};
    for (int w : widths) {
        p.out[(k++) * n + t] = __shfl_sync(FULL, v, 3, w);
        p.out[(k++) * n + t] = __shfl_sync(FULL, v, t + 5, w);
        p.out[(k++) * n + t] = __shfl_up_sync(FULL, v, 1, w);
        p.out[(k++) * n + t] = __shfl_up_sync(FULL, v, 3, w);
        p.out[(k++) * n + t] = __shfl_down_sync(FULL, v, 1, w);
        p.out[(k++) * n + t] = __shfl_down_sync(FULL, v, 5, w);
        p.out[(k++) * n + t] = __shfl_xor_sync(FULL, v, 1, w);
        p.out[(k++) * n + t] = __shfl_xor_sync(FULL, v, 6, w);
        p.out[(k++) * n + t] = __shfl_xor_sync(FULL, v, 16, w);
    }
    /* Per-lane different source lanes are allowed. */
    p.out[(k++) * n + t] = __shfl_sync(FULL, v, (t * 7) & 31);
}
DK_REGISTER_KERNEL(t_shfl_cases, ShflParams)

/* Model of PTX shfl.sync for one warp (32 lanes): returns the value lane t receives. */
static int model_shfl(int kind, int t, int b, int w) {
    const int v = 1000 + t;
    const int min_lane = t & ~(w - 1), max_lane = min_lane + w - 1;
    int src;
    bool ok;
    switch (kind) {
    case 0: src = min_lane + (b & (w - 1)); ok = true; break;
    case 1: src = t - b; ok = src >= min_lane; break;
    case 2: src = t + b; ok = src <= max_lane; break;
    default: src = t ^ b; ok = src <= max_lane; break;
    }
    return ok ? 1000 + src : v;
}

struct Big {
    double a;
    long long b;
};
struct TypesParams {
    int* ok; /* per thread: 1 if every typed shuffle matched */
};
extern "C" __global__ void t_shfl_types(TypesParams p) {
    const int t = threadIdx.x, lane = t & 31;
    const int src = (lane + 1) & 31, srct = (t & ~31) + src;
    bool ok = true;
    ok &= __shfl_sync(FULL, static_cast<double>(t) * 0.5, src) == static_cast<double>(srct) * 0.5;
    ok &= __shfl_sync(FULL, static_cast<long long>(t) << 40, src) == (static_cast<long long>(srct) << 40);
    ok &= __shfl_sync(FULL, static_cast<unsigned long long>(t) + 7ull, src) == static_cast<unsigned long long>(srct) + 7ull;
    ok &= __shfl_sync(FULL, static_cast<unsigned>(t) * 3u, src) == static_cast<unsigned>(srct) * 3u;
    ok &= __shfl_sync(FULL, static_cast<float>(t) + 0.25f, src) == static_cast<float>(srct) + 0.25f;
    const __half h = __shfl_sync(FULL, __float2half(static_cast<float>(t)), src);
    ok &= __half2float(h) == static_cast<float>(srct);
    const Big b = __shfl_xor_sync(FULL, Big{t * 1.5, -t}, 1);
    ok &= b.a == (t ^ 1) * 1.5 && b.b == -(t ^ 1);
    const float4 f4 = __shfl_down_sync(FULL, make_float4(t, t + 1, t + 2, t + 3), 1);
    const int s4 = lane == 31 ? t : t + 1;
    ok &= f4.x == s4 && f4.w == s4 + 3;
    p.ok[t] = ok ? 1 : 0;
}
DK_REGISTER_KERNEL(t_shfl_types, TypesParams)

struct VoteParams {
    unsigned* out; /* per thread: ballot, any, all, activemask, syncthreads_count, and, or, match */
};
extern "C" __global__ void t_votes(VoteParams p) {
    const int t = threadIdx.x;
    unsigned* o = p.out + 8 * t;
    o[0] = __ballot_sync(FULL, (t % 3) == 0);
    o[1] = __any_sync(FULL, t == 37);
    o[2] = __all_sync(FULL, t < 1000);
    o[3] = __activemask();
    o[4] = __syncthreads_count(t % 2);
    o[5] = __syncthreads_and(t >= 0);
    o[6] = __syncthreads_or(t == 5);
    o[7] = __match_any_sync(FULL, t / 4);
}
DK_REGISTER_KERNEL(t_votes, VoteParams)

/* 3D blocks and grids: builtins and linearisation. */
struct ShapeParams {
    unsigned* out; /* per global thread: packed thread and block coordinates */
    float* sums;   /* per block: block_sum over 3D block (size multiple of 32) */
};
extern "C" __global__ void t_shapes(ShapeParams p) {
    const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned bid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned nt = blockDim.x * blockDim.y * blockDim.z;
    p.out[bid * nt + tid] = (threadIdx.x) | (threadIdx.y << 8) | (threadIdx.z << 16) | (blockIdx.x << 24) |
                            (blockIdx.y << 27) | (blockIdx.z << 30);
    /* block_sum indexes warps by threadIdx.x: do a linear version here. */
    __shared__ float partial[32];
    float v = static_cast<float>(tid + 1);
    v = warp_sum(v);
    if ((tid & 31) == 0) partial[tid >> 5] = v;
    __syncthreads();
    if (tid == 0) {
        float s = 0;
        for (unsigned w = 0; w < nt / 32; ++w) s += partial[w];
        p.sums[bid] = s;
    }
}
DK_REGISTER_KERNEL(t_shapes, ShapeParams)

/* Dynamic shared memory: reverse each block's chunk through shared memory; also report whether
 * the buffer was pre-filled with 0xFF. */
struct DynParams {
    const float* x;
    float* y;
    int* was_filled;
};
extern "C" __global__ void t_dyn_smem(DynParams p) {
    DK_DYNAMIC_SHARED(float, buf);
    const int t = threadIdx.x, n = blockDim.x;
    unsigned bits;
    std::memcpy(&bits, &buf[t], 4);
    if (bits != 0xffffffffu) atomicAdd(p.was_filled, 1);
    __syncthreads(); /* every thread has looked before anybody writes */
    buf[t] = p.x[blockIdx.x * n + t];
    __syncthreads();
    p.y[blockIdx.x * n + t] = buf[n - 1 - t];
}
DK_REGISTER_KERNEL(t_dyn_smem, DynParams)

/* Static __shared__ is per block even when blocks run in parallel on several OS threads. */
struct IsoParams {
    int* bad;
};
extern "C" __global__ void t_shared_isolation(IsoParams p) {
    __shared__ int mine[256];
    for (int rep = 0; rep < 20; ++rep) {
        mine[threadIdx.x] = static_cast<int>(blockIdx.x * 1000 + rep);
        __syncthreads();
        for (unsigned i = 0; i < blockDim.x; i += 37)
            if (mine[i] != static_cast<int>(blockIdx.x * 1000 + rep)) atomicAdd(p.bad, 1);
        __syncthreads();
    }
}
DK_REGISTER_KERNEL(t_shared_isolation, IsoParams)

struct AtomicParams {
    int* i;
    unsigned* u;
    unsigned long long* ull;
    float* f;
    double* d;
    int* imax;
    int* imin;
    unsigned* umax;
    long long* llmin;
    unsigned* orbits;
    unsigned* andbits;
    int* cas_counter;
    int* exch;
    unsigned* inc;
};
extern "C" __global__ void t_atomics(AtomicParams p) {
    const int g = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    atomicAdd(p.i, 1);
    atomicAdd(p.u, 2u);
    atomicAdd(p.ull, 1ull << 33);
    atomicAdd(p.f, 1.0f);
    atomicAdd(p.d, 0.5);
    atomicMax(p.imax, g);
    atomicMin(p.imin, -g);
    atomicMax(p.umax, static_cast<unsigned>(g) * 3u);
    atomicMin(p.llmin, -static_cast<long long>(g) * 100000000000ll);
    atomicOr(p.orbits, 1u << (g & 31));
    atomicAnd(p.andbits, ~(1u << (g & 15)));
    /* CAS loop increment */
    int old = *p.cas_counter, assumed;
    do {
        assumed = old;
        old = atomicCAS(p.cas_counter, assumed, assumed + 1);
    } while (old != assumed);
    atomicExch(p.exch, g);
    atomicInc(p.inc, 0xffffffffu);
}
DK_REGISTER_KERNEL(t_atomics, AtomicParams)

/* Streaming over a long row with one block: the 1M-element case. */
struct LongRowParams {
    const float* x;
    float* out;
    int64_t n;
};
extern "C" __global__ void __launch_bounds__(1024) t_long_row(LongRowParams p) {
    float acc = 0.0f;
    for (int64_t i = threadIdx.x; i < p.n; i += blockDim.x) acc += p.x[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) *p.out = acc;
}
DK_REGISTER_KERNEL(t_long_row, LongRowParams)

struct EmptyParams {
    int* counter;
};
extern "C" __global__ void t_tiny(EmptyParams p) {
    if (threadIdx.x == 0) atomicAdd(p.counter, 1);
}
DK_REGISTER_KERNEL(t_tiny, EmptyParams)

/* Kernel parameters are a private copy per thread; device printf works. */
struct CopyParams {
    int* out;
    int value;
};
extern "C" __global__ void t_param_copy(CopyParams p) {
    p.value += static_cast<int>(threadIdx.x); /* must not leak into other threads */
    p.out[threadIdx.x] = p.value;
    if (threadIdx.x == 0 && blockIdx.x == 0) printf("device printf from thread %u of kernel t_param_copy\n", threadIdx.x);
}
DK_REGISTER_KERNEL(t_param_copy, CopyParams)

/* ------------------------------------------------------------------------------------------ */
/* Tests                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static void test_block_reduce() {
    const unsigned sizes[] = {32, 64, 96, 128, 256, 512, 1024};
    const int64_t cols_list[] = {1, 31, 1000, 1271, 4097};
    const unsigned rows = 7;
    for (unsigned bs : sizes) {
        for (int64_t cols : cols_list) {
            std::vector<float> x(rows * cols), out(rows, -1.0f);
            for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 13) - 6.0f; /* small ints: exact */
            RowReduceParams p{x.data(), out.data(), cols};
            const int rc = launch("t_row_sum", rows, bs, p);
            CHECK_MSG(rc == 0, "block %u cols %lld: rc %d %s", bs, static_cast<long long>(cols), rc, last_error().c_str());
            for (unsigned r = 0; r < rows; ++r) {
                double ref = 0;
                for (int64_t c = 0; c < cols; ++c) ref += x[r * cols + c];
                CHECK_MSG(out[r] == static_cast<float>(ref), "block %u cols %lld row %u: %f vs %f", bs,
                          static_cast<long long>(cols), r, out[r], ref);
            }
        }
    }
}

static void test_partial_warps() {
    const unsigned sizes[] = {1, 7, 33, 40, 100, 1000};
    for (unsigned bs : sizes) {
        std::vector<int> x(bs);
        long long ref = 0;
        for (unsigned i = 0; i < bs; ++i) {
            x[i] = static_cast<int>(i * 3 + 1);
            ref += x[i];
        }
        int out[2] = {0, 0};
        PartialParams p{x.data(), out};
        const int rc = launch("t_partial_warp_sum", 1, bs, p);
        CHECK_MSG(rc == 0, "block %u: rc %d %s", bs, rc, last_error().c_str());
        CHECK_MSG(out[0] == ref, "block %u: shfl_down sum %d vs %lld", bs, out[0], ref);
        /* __reduce_add_sync gives the warp's sum to all lanes; lane 0 adds it once per warp. */
        CHECK_MSG(out[1] == ref, "block %u: __reduce_add_sync sum %d vs %lld", bs, out[1], ref);
    }
}

static void test_shfl_semantics() {
    const unsigned n = 64; /* two warps */
    const int ncases = 6 * 9 + 1;
    std::vector<int> out(ncases * n, -1);
    ShflParams p{out.data()};
    const int rc = launch("t_shfl_cases", 1, n, p);
    CHECK_MSG(rc == 0, "rc %d %s", rc, last_error().c_str());
    const int widths[] = {32, 16, 8, 4, 2, 1};
    int k = 0;
    for (int w : widths) {
        struct C {
            int kind, b;
            bool per_lane;
        };
        const C cases[] = {{0, 3, false}, {0, 5, true}, {1, 1, false}, {1, 3, false}, {2, 1, false},
                           {2, 5, false}, {3, 1, false}, {3, 6, false}, {3, 16, false}};
        for (const C& c : cases) {
            for (unsigned t = 0; t < n; ++t) {
                const int lane = t & 31, base = t & ~31;
                const int b = c.per_lane ? static_cast<int>(t) + c.b : c.b;
                const int expect = base + model_shfl(c.kind, lane, b, w);
                CHECK_MSG(out[k * n + t] == expect, "case %d (kind %d b %d width %d) thread %u: %d vs %d", k, c.kind,
                          c.b, w, t, out[k * n + t], expect);
            }
            ++k;
        }
    }
    for (unsigned t = 0; t < n; ++t) CHECK(out[k * n + t] == static_cast<int>(1000 + (t & ~31u) + ((t * 7) & 31)));
}

static void test_shfl_types() {
    std::vector<int> ok(96, 0);
    TypesParams p{ok.data()};
    const int rc = launch("t_shfl_types", 1, 96, p);
    CHECK_MSG(rc == 0, "rc %d %s", rc, last_error().c_str());
    for (int t = 0; t < 96; ++t) CHECK_MSG(ok[t] == 1, "thread %d", t);
}

static void test_votes() {
    const unsigned n = 70; /* warps of 32, 32, 6 */
    std::vector<unsigned> out(8 * n, 0xdeadbeef);
    VoteParams p{out.data()};
    const int rc = launch("t_votes", 1, n, p);
    CHECK_MSG(rc == 0, "rc %d %s", rc, last_error().c_str());
    unsigned count_odd = 0;
    for (unsigned t = 0; t < n; ++t) count_odd += t % 2;
    for (unsigned t = 0; t < n; ++t) {
        const unsigned base = t & ~31u, lanes = std::min(32u, n - base);
        const unsigned wmask = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
        unsigned ballot = 0, match = 0;
        bool any = false;
        for (unsigned l = 0; l < lanes; ++l) {
            if (((base + l) % 3) == 0) ballot |= 1u << l;
            if (base + l == 37) any = true;
            if ((base + l) / 4 == t / 4) match |= 1u << l;
        }
        const unsigned* o = &out[8 * t];
        CHECK_MSG(o[0] == ballot, "ballot t %u: %08x vs %08x", t, o[0], ballot);
        CHECK(o[1] == (any ? 1u : 0u));
        CHECK(o[2] == 1u);
        CHECK(o[3] == wmask);
        CHECK_MSG(o[4] == count_odd, "syncthreads_count %u vs %u", o[4], count_odd);
        CHECK(o[5] == 1u);
        CHECK(o[6] == 1u);
        CHECK_MSG(o[7] == match, "match_any t %u: %08x vs %08x", t, o[7], match);
    }
}

static void test_shapes() {
    struct Shape {
        unsigned bx, by, bz, gx, gy, gz;
    };
    const Shape shapes[] = {{32, 1, 1, 3, 1, 1}, {8, 4, 2, 2, 3, 2}, {16, 16, 1, 1, 2, 1}, {4, 8, 32, 2, 1, 1}};
    for (const Shape& s : shapes) {
        const unsigned nt = s.bx * s.by * s.bz, nb = s.gx * s.gy * s.gz;
        std::vector<unsigned> out(nt * nb, 0);
        std::vector<float> sums(nb, -1);
        ShapeParams p{out.data(), sums.data()};
        const int rc = launch("t_shapes", s.gx, s.bx, p, 0, s.gy, s.gz, s.by, s.bz);
        CHECK_MSG(rc == 0, "rc %d %s", rc, last_error().c_str());
        for (unsigned bz = 0; bz < s.gz; ++bz)
            for (unsigned by = 0; by < s.gy; ++by)
                for (unsigned bx = 0; bx < s.gx; ++bx) {
                    const unsigned bid = bx + s.gx * (by + s.gy * bz);
                    for (unsigned tz = 0; tz < s.bz; ++tz)
                        for (unsigned ty = 0; ty < s.by; ++ty)
                            for (unsigned tx = 0; tx < s.bx; ++tx) {
                                const unsigned tid = tx + s.bx * (ty + s.by * tz);
                                const unsigned expect = tx | (ty << 8) | (tz << 16) | (bx << 24) | (by << 27) | (bz << 30);
                                CHECK(out[bid * nt + tid] == expect);
                            }
                    CHECK(sums[bid] == static_cast<float>(nt * (nt + 1) / 2));
                }
    }
}

static void test_dyn_smem() {
    const unsigned n = 128, blocks = 9;
    std::vector<float> x(n * blocks), y(n * blocks, 0);
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i);
    int not_filled = 0;
    DynParams p{x.data(), y.data(), &not_filled};
    const int rc = launch("t_dyn_smem", blocks, n, p, n * sizeof(float));
    CHECK_MSG(rc == 0, "rc %d %s", rc, last_error().c_str());
    CHECK(not_filled == 0);
    for (unsigned b = 0; b < blocks; ++b)
        for (unsigned t = 0; t < n; ++t) CHECK(y[b * n + t] == x[b * n + (n - 1 - t)]);
}

static void test_shared_isolation() {
    int bad = 0;
    IsoParams p{&bad};
    const int rc = launch("t_shared_isolation", 64, 256, p);
    CHECK_MSG(rc == 0, "rc %d %s", rc, last_error().c_str());
    CHECK_MSG(bad == 0, "%d mismatches: blocks on different workers shared __shared__ memory", bad);
}

static void test_atomics() {
    int i = 0, imax = -1, imin = 1, cas = 0, exch = -1;
    unsigned u = 0, umax = 0, orbits = 0, andbits = 0xffffffffu, inc = 0;
    unsigned long long ull = 0;
    float f = 0;
    double d = 0;
    long long llmin = 0;
    AtomicParams p{&i, &u, &ull, &f, &d, &imax, &imin, &umax, &llmin, &orbits, &andbits, &cas, &exch, &inc};
    const unsigned blocks = 200, threads = 128, total = blocks * threads;
    const int rc = launch("t_atomics", blocks, threads, p);
    CHECK_MSG(rc == 0, "rc %d %s", rc, last_error().c_str());
    CHECK(i == static_cast<int>(total));
    CHECK(u == 2 * total);
    CHECK(ull == (1ull << 33) * total);
    CHECK(f == static_cast<float>(total));
    CHECK(d == 0.5 * total);
    CHECK(imax == static_cast<int>(total - 1));
    CHECK(imin == -static_cast<int>(total - 1));
    CHECK(umax == 3u * (total - 1));
    CHECK(llmin == -static_cast<long long>(total - 1) * 100000000000ll);
    CHECK(orbits == 0xffffffffu);
    CHECK(andbits == 0xffff0000u);
    CHECK(cas == static_cast<int>(total));
    CHECK(exch >= 0 && exch < static_cast<int>(total));
    CHECK(inc == total);
}

static void test_param_copy() {
    std::vector<int> out(64, 0);
    CopyParams p{out.data(), 100};
    const int rc = launch("t_param_copy", 1, 64, p);
    CHECK_MSG(rc == 0, "rc %d %s", rc, last_error().c_str());
    for (int t = 0; t < 64; ++t) CHECK(out[t] == 100 + t);
}

static void timings() {
    /* The case the brief names: 41 blocks x 256 threads, 1271 floats per row, ~12 barriers and
     * ~60 shuffles per thread (3 sweeps of a max and a sum block reduction). */
    {
        const unsigned rows = 41, threads = 256;
        const int64_t cols = 1271;
        std::vector<float> x(rows * cols), y(rows * cols);
        for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 31) % 17) * 0.25f;
        SoftmaxParams p{x.data(), y.data(), cols, 3};
        launch("t_softmax", rows, threads, p); /* warm up: stacks are allocated lazily */
        const int reps = 20;
        const double t0 = now_ms();
        int rc = 0;
        for (int r = 0; r < reps; ++r) rc |= launch("t_softmax", rows, threads, p);
        const double ms = (now_ms() - t0) / reps;
        CHECK_MSG(rc == 0, "rc %d %s", rc, last_error().c_str());
        for (unsigned r = 0; r < rows; ++r) {
            double s = 0;
            for (int64_t c = 0; c < cols; ++c) s += y[r * cols + c];
            CHECK_MSG(std::fabs(s - 1.0) < 1e-4, "softmax row %u sums to %f", r, s);
        }
        std::printf("timing: softmax 41 blocks x 256 threads x 1271 cols (60 shuffles, 12 barriers per thread): %.2f ms "
                    "per launch on %d workers\n",
                    ms, dkEmuWorkerCount());
    }
    {
        const int64_t n = 1000000;
        std::vector<float> x(n, 1.0f);
        float out = 0;
        LongRowParams p{x.data(), &out, n};
        launch("t_long_row", 1, 1024, p);
        const double t0 = now_ms();
        const int rc = launch("t_long_row", 1, 1024, p);
        const double ms = now_ms() - t0;
        CHECK_MSG(rc == 0, "rc %d %s", rc, last_error().c_str());
        CHECK(out == static_cast<float>(n));
        std::printf("timing: one 1024-thread block summing 1,000,000 floats: %.2f ms\n", ms);
    }
    {
        int counter = 0;
        EmptyParams p{&counter};
        const int reps = 2000;
        const double t0 = now_ms();
        for (int r = 0; r < reps; ++r) launch("t_tiny", 1, 32, p);
        const double us = (now_ms() - t0) * 1000.0 / reps;
        CHECK(counter == reps);
        std::printf("timing: launch overhead (1 block x 32 threads): %.1f us per launch\n", us);
        const double t1 = now_ms();
        for (int r = 0; r < 200; ++r) launch("t_tiny", 64, 32, p);
        std::printf("timing: launch overhead (64 blocks x 32 threads): %.1f us per launch\n", (now_ms() - t1) * 1000.0 / 200);
    }
    {
        std::vector<float> x(7 * 4097), out(7);
        RowReduceParams p{x.data(), out.data(), 4097};
        const double t0 = now_ms();
        for (int r = 0; r < 10; ++r) launch("t_row_sum", 7, 1024, p);
        std::printf("timing: 7 blocks x 1024 threads row sum over 4097 cols: %.2f ms per launch\n", (now_ms() - t0) / 10);
    }
}

int main() {
    CHECK(dkEmuIdentify() == 0x44454d55);
    test_block_reduce();
    test_partial_warps();
    test_shfl_semantics();
    test_shfl_types();
    test_votes();
    test_shapes();
    test_dyn_smem();
    test_shared_isolation();
    test_atomics();
    test_param_copy();
    timings();
    return finish("test_simt");
}
