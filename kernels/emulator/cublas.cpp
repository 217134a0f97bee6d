/* The emulated GPU's cuBLAS: the entry points cudarc's `cublas` module calls (create, destroy,
 * set/get stream and pointer mode, SGEMM, strided-batched SGEMM, GemmEx and strided-batched
 * GemmEx in f32 and bf16 with f32 compute, status strings), with cuBLAS's column-major contract
 * and its argument checks, so that a transposition or leading-dimension mistake in our calls
 * fails a test as it would fail (or compute garbage) on a GPU.
 *
 * Linked as its own library with the SONAME libcublas.so (the first name cudarc tries), loaded
 * by the crate after the fake driver. The work runs on the CPU in stream order through the fake
 * driver (dkEmuEnqueue): every range a GEMM will touch is checked against the live device
 * allocations when it is queued (if one is not, the GEMM faults with CUDA_ERROR_ILLEGAL_ADDRESS
 * when it runs, as on the GPU), and in the check build its reads of bytes nothing wrote are
 * initcheck errors when it runs (dkEmuDeviceRange, dkEmuDeviceAccess).
 *
 * Numerics: each element of op(A) op(B) is summed in f32 with one fused multiply-add per term, in
 * ascending k, from operands widened exactly to f32; then `alpha * sum` (beta == 0: C is not
 * read, as cuBLAS documents) or `fma(alpha, sum, beta * C)`, rounded once to C's type (round to
 * nearest even). A real GPU sums in another order (tiles, split-k): tests compare with
 * tolerances, never bits, across the two. */

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#define CUBLAS_API extern "C" __attribute__((visibility("default")))

namespace {

enum Status {
    kSuccess = 0,
    kNotInitialized = 1,
    kAllocFailed = 3,
    kInvalidValue = 7,
    kArchMismatch = 8,
    kMappingError = 11,
    kExecutionFailed = 13,
    kInternalError = 14,
    kNotSupported = 15,
    kLicenseError = 16,
};
enum Operation { kOpN = 0, kOpT = 1, kOpC = 2 };
enum PointerMode { kHostPointers = 0, kDevicePointers = 1 };
enum DataType { kR32F = 0, kR16F = 2, kR16BF = 14 };
enum ComputeType { kCompute32F = 68, kCompute32FPedantic = 69 };

/* The fake driver's helpers (driver.cpp), resolved in the already loaded libcuda.so.1. */
struct Driver {
    int (*enqueue)(void* stream, int (*run)(void*), void* arg, void (*release)(void*)) = nullptr;
    int (*fail)(int code, const char* msg) = nullptr;
    int (*range)(const void* p, size_t n, const char* who, char* msg, size_t cap) = nullptr;
    int (*access)(const void* p, size_t n, int write, const char* who) = nullptr;
};

const Driver* driver() {
    static Driver d;
    static std::once_flag once;
    static bool ok = false;
    std::call_once(once, [] {
        void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
        if (!lib) return;
        d.enqueue = reinterpret_cast<decltype(d.enqueue)>(dlsym(lib, "dkEmuEnqueue"));
        d.fail = reinterpret_cast<decltype(d.fail)>(dlsym(lib, "dkEmuFail"));
        d.range = reinterpret_cast<decltype(d.range)>(dlsym(lib, "dkEmuDeviceRange"));
        d.access = reinterpret_cast<decltype(d.access)>(dlsym(lib, "dkEmuDeviceAccess"));
        ok = d.enqueue && d.fail && d.range && d.access;
    });
    return ok ? &d : nullptr;
}

constexpr uint32_t kHandleMagic = 0x43424c53; /* "CBLS" */

struct Handle {
    uint32_t magic = kHandleMagic;
    void* stream = nullptr; /* the legacy default stream until cublasSetStream */
    int pointer_mode = kHostPointers;
};

std::mutex g_handles_mu;
std::set<const Handle*> g_handles;

bool live(const Handle* h) {
    std::lock_guard<std::mutex> g(g_handles_mu);
    return h && g_handles.count(h) && h->magic == kHandleMagic;
}

/* One operand as stored: `rows x cols` column-major with leading dimension `ld`, `stride`
 * elements between the matrices of a batch. */
struct Operand {
    const void* p = nullptr;
    int type = kR32F;
    int64_t rows = 0, cols = 0, ld = 0, stride = 0;
    bool trans = false;
};

struct Gemm {
    const char* name = "";
    int64_t m = 0, n = 0, k = 0, batch = 1;
    Operand a, b;
    void* c = nullptr;
    int ctype = kR32F;
    int64_t ldc = 0, stridec = 0;
    bool device_scalars = false;
    const float* alpha_ptr = nullptr; /* device pointers, read when the GEMM runs */
    const float* beta_ptr = nullptr;
    float alpha = 1.0f, beta = 0.0f; /* host pointer mode: read at the call, as cuBLAS does */
    int fault = 0;                   /* a range found bad when queued: the GEMM faults when it runs */
    std::string fault_msg;
};

size_t type_size(int t) { return t == kR32F ? 4 : 2; }

inline float widen(const void* base, int type, int64_t i) {
    if (type == kR32F) return static_cast<const float*>(base)[i];
    const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(base)[i]) << 16; /* bf16 */
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

inline void store(void* base, int type, int64_t i, float v) {
    if (type == kR32F)
        static_cast<float*>(base)[i] = v;
    else
        static_cast<uint16_t*>(base)[i] = to_bf16(v);
}

/* Calls `f(pointer, bytes)` for every column of one stored matrix of a batch: one range when
 * the columns are contiguous. Stops at the first nonzero result. */
template <class F>
int each_column(const void* base, int type, int64_t rows, int64_t cols, int64_t ld, int64_t offset, F f) {
    if (rows == 0 || cols == 0) return 0;
    const int64_t es = static_cast<int64_t>(type_size(type));
    const char* p = static_cast<const char*>(base) + offset * es;
    if (ld == rows) return f(p, static_cast<size_t>(rows * cols * es));
    for (int64_t j = 0; j < cols; ++j) {
        const int r = f(p + j * ld * es, static_cast<size_t>(rows * es));
        if (r) return r;
    }
    return 0;
}

/* What a GEMM reads and writes, matrix by matrix of the batch: `f(pointer, type, rows, cols, ld,
 * offset, write, who)`. A and B are read only when alpha != 0 and k > 0 (device pointer mode:
 * assumed read), C only when beta != 0. */
template <class F>
int each_operand(const Gemm& g, bool reads_ab, bool reads_c, F f) {
    const std::string who_a = std::string(g.name) + " operand A", who_b = std::string(g.name) + " operand B",
                      who_c = std::string(g.name) + " operand C";
    for (int64_t bi = 0; bi < g.batch; ++bi) {
        int r = 0;
        if (reads_ab) {
            r = f(g.a.p, g.a.type, g.a.rows, g.a.cols, g.a.ld, bi * g.a.stride, false, who_a.c_str());
            if (!r) r = f(g.b.p, g.b.type, g.b.rows, g.b.cols, g.b.ld, bi * g.b.stride, false, who_b.c_str());
        }
        if (!r && reads_c) r = f(g.c, g.ctype, g.m, g.n, g.ldc, bi * g.stridec, false, who_c.c_str());
        if (!r) r = f(g.c, g.ctype, g.m, g.n, g.ldc, bi * g.stridec, true, who_c.c_str());
        if (r) return r;
    }
    return 0;
}

int workers() {
    static int n = [] {
        const char* env = getenv("DISTILL_EMU_THREADS");
        int v = env ? atoi(env) : static_cast<int>(std::thread::hardware_concurrency());
        return std::clamp(v, 1, 64);
    }();
    return n;
}

/* op(A) of matrix `bi` of the batch, widened to f32 and stored column-major m x k (element
 * (i, l) at [i + l * m]), so that every column of C below is a run of contiguous multiply-adds
 * whatever A's transposition and type. */
std::vector<float> pack_a(const Gemm& g, int64_t bi) {
    std::vector<float> ap(static_cast<size_t>(g.m * g.k));
    const int64_t off = bi * g.a.stride;
    for (int64_t l = 0; l < g.k; ++l)
        for (int64_t i = 0; i < g.m; ++i)
            ap[i + l * g.m] = g.a.trans ? widen(g.a.p, g.a.type, off + l + i * g.a.ld)
                                        : widen(g.a.p, g.a.type, off + i + l * g.a.ld);
    return ap;
}

/* Columns [j0, j1) of C for matrix `bi` of the batch, with op(A) packed by pack_a. Each element
 * is summed in ascending l, one FMA per term; the loop over i is what the compiler vectorizes. */
void compute_columns(const Gemm& g, const float* __restrict ap, float alpha, float beta, int64_t bi, int64_t j0,
                     int64_t j1) {
    const int64_t offb = bi * g.b.stride, offc = bi * g.stridec;
    std::vector<float> accv(static_cast<size_t>(g.m));
    float* __restrict acc = accv.data();
    const int64_t m = g.m;
    for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = 0; i < m; ++i) acc[i] = 0.0f;
        if (alpha != 0.0f) {
            for (int64_t l = 0; l < g.k; ++l) {
                /* op(B)(l, j) */
                const float bl = g.b.trans ? widen(g.b.p, g.b.type, offb + j + l * g.b.ld)
                                           : widen(g.b.p, g.b.type, offb + l + j * g.b.ld);
                const float* __restrict col = ap + l * m;
                for (int64_t i = 0; i < m; ++i) acc[i] = std::fma(col[i], bl, acc[i]);
            }
        }
        for (int64_t i = 0; i < m; ++i) {
            const int64_t at = offc + i + j * g.ldc;
            const float v = beta == 0.0f ? alpha * acc[i] : std::fma(alpha, acc[i], beta * widen(g.c, g.ctype, at));
            store(g.c, g.ctype, at, v);
        }
    }
}

int run_gemm(void* arg) {
    const Gemm& g = *static_cast<const Gemm*>(arg);
    const Driver* d = driver();
    if (g.fault) return d->fail(g.fault, g.fault_msg.c_str());
    float alpha = g.alpha, beta = g.beta;
    if (g.device_scalars) {
        int r = d->access(g.alpha_ptr, sizeof(float), 0, "cuBLAS GEMM alpha");
        if (!r) r = d->access(g.beta_ptr, sizeof(float), 0, "cuBLAS GEMM beta");
        if (r) return r;
        alpha = *g.alpha_ptr;
        beta = *g.beta_ptr;
    }
    const int r = each_operand(g, alpha != 0.0f && g.k > 0, beta != 0.0f,
                               [&](const void* p, int type, int64_t rows, int64_t cols, int64_t ld, int64_t off,
                                   bool write, const char* who) {
                                   return each_column(p, type, rows, cols, ld, off, [&](const char* q, size_t n) {
                                       return d->access(q, n, write, who);
                                   });
                               });
    if (r) return r;
    const double flops = static_cast<double>(g.m) * static_cast<double>(g.n) * static_cast<double>(g.k);
    const int64_t threads = std::min<int64_t>(workers(), std::max<int64_t>(1, static_cast<int64_t>(flops / 2e5)));
    /* One batch matrix at a time: op(A) packed once, its columns split evenly over the threads. */
    for (int64_t bi = 0; bi < g.batch; ++bi) {
        const std::vector<float> ap = alpha != 0.0f ? pack_a(g, bi) : std::vector<float>();
        const int64_t split = std::min<int64_t>(threads, g.n);
        auto work = [&](int64_t t) {
            compute_columns(g, ap.data(), alpha, beta, bi, t * g.n / split, (t + 1) * g.n / split);
        };
        if (split <= 1) {
            work(0);
        } else {
            std::vector<std::thread> pool;
            for (int64_t t = 1; t < split; ++t) pool.emplace_back(work, t);
            work(0);
            for (auto& th : pool) th.join();
        }
    }
    return 0;
}

void release_gemm(void* arg) { delete static_cast<Gemm*>(arg); }

bool valid_op(int op) { return op == kOpN || op == kOpT || op == kOpC; }

/* cuBLAS's checks (the cublas<t>gemm and cublasGemmEx documentation), then the work queued on
 * the handle's stream. */
int gemm(const Handle* h, const char* name, int transa, int transb, int64_t m, int64_t n, int64_t k,
         const float* alpha, const void* A, int atype, int64_t lda, int64_t stridea, const void* B, int btype,
         int64_t ldb, int64_t strideb, const float* beta, void* C, int ctype, int64_t ldc, int64_t stridec,
         int64_t batch) {
    if (!live(h)) return kNotInitialized;
    const Driver* d = driver();
    if (!d) return kNotInitialized;
    if (!valid_op(transa) || !valid_op(transb) || m < 0 || n < 0 || k < 0 || batch < 0 || !alpha || !beta)
        return kInvalidValue;
    const bool ta = transa != kOpN, tb = transb != kOpN;
    if (lda < std::max<int64_t>(1, ta ? k : m) || ldb < std::max<int64_t>(1, tb ? n : k) ||
        ldc < std::max<int64_t>(1, m))
        return kInvalidValue;
    if (m == 0 || n == 0 || batch == 0) return kSuccess;
    auto* g = new Gemm;
    g->name = name;
    g->m = m;
    g->n = n;
    g->k = k;
    g->batch = batch;
    g->a = Operand{A, atype, ta ? k : m, ta ? m : k, lda, stridea, ta};
    g->b = Operand{B, btype, tb ? n : k, tb ? k : n, ldb, strideb, tb};
    g->c = C;
    g->ctype = ctype;
    g->ldc = ldc;
    g->stridec = stridec;
    if (h->pointer_mode == kDevicePointers) {
        g->device_scalars = true;
        g->alpha_ptr = alpha;
        g->beta_ptr = beta;
    } else {
        g->alpha = *alpha;
        g->beta = *beta;
    }
    const bool device_scalars = g->device_scalars;
    char msg[512] = {0};
    auto in_range = [&](const void* p, size_t n, const char* who) {
        const int r = d->range(p, n, who, msg, sizeof msg);
        if (r && !g->fault) {
            g->fault = r;
            g->fault_msg = msg;
        }
        return r;
    };
    if (device_scalars) {
        in_range(g->alpha_ptr, sizeof(float), "cuBLAS GEMM alpha (device pointer mode)");
        in_range(g->beta_ptr, sizeof(float), "cuBLAS GEMM beta (device pointer mode)");
    }
    if (!g->fault)
        each_operand(*g, device_scalars || (g->alpha != 0.0f && k > 0), device_scalars || g->beta != 0.0f,
                     [&](const void* p, int type, int64_t rows, int64_t cols, int64_t ld, int64_t off, bool,
                         const char* who) {
                         return each_column(p, type, rows, cols, ld, off,
                                            [&](const char* q, size_t n) { return in_range(q, n, who); });
                     });
    const int r = d->enqueue(h->stream, run_gemm, g, release_gemm);
    return r == 0 ? kSuccess : kExecutionFailed;
}

/* GemmEx's type rules for the types the emulator implements: f32 compute with f32 scalars,
 * A and B of one type (f32 or bf16), C of that type or f32 (bf16 in, f32 out). */
int check_ex_types(int atype, int btype, int ctype, int compute) {
    const auto known = [](int t) { return t == kR32F || t == kR16F || t == kR16BF; };
    if (!known(atype) || !known(btype) || !known(ctype)) return kNotSupported;
    if (compute != kCompute32F && compute != kCompute32FPedantic) return kNotSupported;
    if (atype != btype) return kNotSupported;
    if (atype == kR16F || ctype == kR16F) return kNotSupported; /* not implemented here (see README) */
    if (atype == kR32F && ctype != kR32F) return kNotSupported;
    return kSuccess;
}

bool valid_algo(int algo) { return (algo >= -1 && algo <= 23) || (algo >= 99 && algo <= 115); }

}  // namespace

CUBLAS_API int cublasCreate_v2(Handle** handle) {
    if (!handle) return kInvalidValue;
    if (!driver()) return kNotInitialized;
    auto* h = new Handle;
    {
        std::lock_guard<std::mutex> g(g_handles_mu);
        g_handles.insert(h);
    }
    *handle = h;
    return kSuccess;
}

CUBLAS_API int cublasDestroy_v2(Handle* handle) {
    std::lock_guard<std::mutex> g(g_handles_mu);
    if (!handle || !g_handles.erase(handle)) return kNotInitialized;
    handle->magic = 0;
    delete handle;
    return kSuccess;
}

CUBLAS_API int cublasSetStream_v2(Handle* handle, void* stream) {
    if (!live(handle)) return kNotInitialized;
    handle->stream = stream;
    return kSuccess;
}

CUBLAS_API int cublasGetStream_v2(Handle* handle, void** stream) {
    if (!live(handle)) return kNotInitialized;
    if (!stream) return kInvalidValue;
    *stream = handle->stream;
    return kSuccess;
}

CUBLAS_API int cublasSetPointerMode_v2(Handle* handle, int mode) {
    if (!live(handle)) return kNotInitialized;
    if (mode != kHostPointers && mode != kDevicePointers) return kInvalidValue;
    handle->pointer_mode = mode;
    return kSuccess;
}

CUBLAS_API int cublasGetPointerMode_v2(Handle* handle, int* mode) {
    if (!live(handle)) return kNotInitialized;
    if (!mode) return kInvalidValue;
    *mode = handle->pointer_mode;
    return kSuccess;
}

CUBLAS_API int cublasGetVersion_v2(Handle* handle, int* version) {
    if (!live(handle)) return kNotInitialized;
    if (!version) return kInvalidValue;
    *version = 130000; /* reports itself as the CUDA 13.0 cuBLAS whose contract it follows */
    return kSuccess;
}

CUBLAS_API int cublasSgemm_v2(Handle* handle, int transa, int transb, int m, int n, int k, const float* alpha,
                              const float* A, int lda, const float* B, int ldb, const float* beta, float* C, int ldc) {
    return gemm(handle, "cublasSgemm", transa, transb, m, n, k, alpha, A, kR32F, lda, 0, B, kR32F, ldb, 0, beta, C,
                kR32F, ldc, 0, 1);
}

CUBLAS_API int cublasSgemmStridedBatched(Handle* handle, int transa, int transb, int m, int n, int k,
                                         const float* alpha, const float* A, int lda, long long strideA,
                                         const float* B, int ldb, long long strideB, const float* beta, float* C,
                                         int ldc, long long strideC, int batchCount) {
    return gemm(handle, "cublasSgemmStridedBatched", transa, transb, m, n, k, alpha, A, kR32F, lda, strideA, B, kR32F,
                ldb, strideB, beta, C, kR32F, ldc, strideC, batchCount);
}

CUBLAS_API int cublasGemmEx(Handle* handle, int transa, int transb, int m, int n, int k, const void* alpha,
                            const void* A, int Atype, int lda, const void* B, int Btype, int ldb, const void* beta,
                            void* C, int Ctype, int ldc, int computeType, int algo) {
    if (!live(handle)) return kNotInitialized;
    if (!valid_algo(algo)) return kInvalidValue;
    const int t = check_ex_types(Atype, Btype, Ctype, computeType);
    if (t) return t;
    return gemm(handle, "cublasGemmEx", transa, transb, m, n, k, static_cast<const float*>(alpha), A, Atype, lda, 0,
                B, Btype, ldb, 0, static_cast<const float*>(beta), C, Ctype, ldc, 0, 1);
}

CUBLAS_API int cublasGemmStridedBatchedEx(Handle* handle, int transa, int transb, int m, int n, int k,
                                          const void* alpha, const void* A, int Atype, int lda, long long strideA,
                                          const void* B, int Btype, int ldb, long long strideB, const void* beta,
                                          void* C, int Ctype, int ldc, long long strideC, int batchCount,
                                          int computeType, int algo) {
    if (!live(handle)) return kNotInitialized;
    if (!valid_algo(algo)) return kInvalidValue;
    const int t = check_ex_types(Atype, Btype, Ctype, computeType);
    if (t) return t;
    return gemm(handle, "cublasGemmStridedBatchedEx", transa, transb, m, n, k, static_cast<const float*>(alpha), A,
                Atype, lda, strideA, B, Btype, ldb, strideB, static_cast<const float*>(beta), C, Ctype, ldc, strideC,
                batchCount);
}

CUBLAS_API const char* cublasGetStatusName(int status) {
    switch (status) {
        case kSuccess: return "CUBLAS_STATUS_SUCCESS";
        case kNotInitialized: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case kAllocFailed: return "CUBLAS_STATUS_ALLOC_FAILED";
        case kInvalidValue: return "CUBLAS_STATUS_INVALID_VALUE";
        case kArchMismatch: return "CUBLAS_STATUS_ARCH_MISMATCH";
        case kMappingError: return "CUBLAS_STATUS_MAPPING_ERROR";
        case kExecutionFailed: return "CUBLAS_STATUS_EXECUTION_FAILED";
        case kInternalError: return "CUBLAS_STATUS_INTERNAL_ERROR";
        case kNotSupported: return "CUBLAS_STATUS_NOT_SUPPORTED";
        case kLicenseError: return "CUBLAS_STATUS_LICENSE_ERROR";
        default: return "CUBLAS_STATUS_UNKNOWN";
    }
}

CUBLAS_API const char* cublasGetStatusString(int status) {
    switch (status) {
        case kSuccess: return "success";
        case kNotInitialized: return "the library was not initialized";
        case kAllocFailed: return "the resource allocation failed";
        case kInvalidValue: return "an invalid numeric value was used as an argument";
        case kArchMismatch: return "an absent device architectural feature is required";
        case kMappingError: return "an access to GPU memory space failed";
        case kExecutionFailed: return "the GPU program failed to execute";
        case kInternalError: return "an internal operation failed";
        case kNotSupported: return "the functionality requested is not supported";
        case kLicenseError: return "error detected trying to check the license";
        default: return "unknown error";
    }
}
