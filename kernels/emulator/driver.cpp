/*
 * driver.cpp: a fake CUDA driver (libcuda.so.1) backed by the SIMT emulator.
 *
 * Linked into one shared library with runtime.cpp and the kernels; cudarc (dynamic-loading)
 * resolves its cu* symbols here and runs its real code path:
 *   - one device (ordinal 0), sm_90-like attributes, memory pools supported (cudarc then uses
 *     cuMemAllocAsync/cuMemFreeAsync);
 *   - device memory is host memory: exact-size 256-byte-aligned heap blocks, so AddressSanitizer
 *     sees kernel overruns; every copy/memset is checked against the allocation table and a
 *     range outside one allocation fails with CUDA_ERROR_INVALID_VALUE (message in dkEmuLastError);
 *   - all work is synchronous on the calling thread: "async" calls finish before they return,
 *     streams and events only keep the bookkeeping cudarc expects;
 *   - modules: any non-null image loads (the real fatbin or a placeholder); every kernel compiled
 *     into this library is visible in every module; unknown names give CUDA_ERROR_NOT_FOUND;
 *   - a failed launch returns its error from cuLaunchKernel and once more from the next
 *     cuStreamSynchronize/cuCtxSynchronize on the same OS thread, unless another launch comes
 *     first (not sticky: the context stays usable, and tests running in parallel threads are
 *     unaffected). Graph capture and external memory are unsupported.
 * Signatures follow cuda.h (CUDA 12.8) as mirrored by cudarc 0.19's sys bindings.
 */
#include "emu_internal.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>

using dk_emu::KernelEntry;

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st* CUcontext;
typedef struct CUmod_st* CUmodule;
typedef struct CUfunc_st* CUfunction;
typedef struct CUstream_st* CUstream;
typedef struct CUevent_st* CUevent;
typedef struct CUmemPoolHandle_st* CUmemoryPool;
typedef struct CUgraph_st* CUgraph;
typedef struct CUgraphExec_st* CUgraphExec;
typedef struct CUextMemory_st* CUexternalMemory;
typedef struct CUlib_st* CUlibrary;
typedef struct CUkern_st* CUkernel;
typedef void (*CUhostFn)(void* userData);
typedef void (*CUstreamCallback)(CUstream hStream, CUresult status, void* userData);
typedef size_t (*CUoccupancyB2DSize)(int blockSize);
struct CUuuid {
    char bytes[16];
};
struct CUmemLocation {
    int type;
    int id;
};
struct CUlaunchAttribute; /* contents unused */
struct CUlaunchConfig {
    unsigned int gridDimX, gridDimY, gridDimZ;
    unsigned int blockDimX, blockDimY, blockDimZ;
    unsigned int sharedMemBytes;
    CUstream hStream;
    CUlaunchAttribute* attrs;
    unsigned int numAttrs;
};

#define CU_API extern "C" DK_EMU_EXPORT CUresult

namespace {

using namespace dk_emu;

/* ------------------------------------------------------------------------------------------ */
/* State                                                                                       */
/* ------------------------------------------------------------------------------------------ */

constexpr unsigned kMagicCtx = 0x43545854;    /* "CTXT" */
constexpr unsigned kMagicStream = 0x5354524d; /* "STRM" */
constexpr unsigned kMagicEvent = 0x45564e54;  /* "EVNT" */
constexpr unsigned kMagicModule = 0x4d4f444c; /* "MODL" */
constexpr unsigned kMagicPool = 0x504f4f4c;   /* "POOL" */
constexpr unsigned kEventDisableTiming = 0x2;
constexpr size_t kAllocAlign = 256;

struct Ctx {
    unsigned magic = kMagicCtx;
    bool primary = false;
    unsigned flags = 0;
};
struct Stream {
    unsigned magic = kMagicStream;
    unsigned flags = 0;
    int priority = 0;
};
struct Event {
    unsigned magic = kMagicEvent;
    unsigned flags = 0;
    bool recorded = false;
    double t_ms = 0;
};
struct Module {
    unsigned magic = kMagicModule;
};
struct Pool {
    unsigned magic = kMagicPool;
    unsigned long long release_threshold = 0;
};

struct Allocation {
    size_t size;
    bool managed;
};

struct State {
    std::mutex mu;
    bool initialized = false;
    Ctx primary{kMagicCtx, true, 0};
    int primary_refs = 0;
    std::map<uintptr_t, Allocation> allocs; /* device (and managed) allocations by base */
    std::set<void*> host_allocs;
    size_t bytes_in_use = 0;
    std::set<Stream*> streams;
    std::set<Event*> events;
    std::set<Module*> modules;
    std::set<Ctx*> contexts;
    Pool default_pool;
    std::set<Pool*> pools;
    std::map<int, size_t> limits;
    int cache_config = 0;
};

State& st() {
    static State* s = new State; /* leaked: cudarc may call in from Drop impls during exit */
    return *s;
}

/* Context stack of the calling thread; the top is the current context. */
constexpr int kCtxStackMax = 32;
thread_local CUcontext t_ctx_stack[kCtxStackMax];
thread_local int t_ctx_depth = 0;

/* Error of this thread's last failed launch, reported once more by the next synchronize. */
thread_local int t_pending_error = 0;

double now_ms() {
    using clock = std::chrono::steady_clock;
    static const clock::time_point t0 = clock::now();
    return std::chrono::duration<double, std::milli>(clock::now() - t0).count();
}

size_t device_total_mem() {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    size_t phys = (pages > 0 && page > 0) ? static_cast<size_t>(pages) * static_cast<size_t>(page) : (16ull << 30);
    return phys < (80ull << 30) ? phys : (80ull << 30);
}

std::string hex(uintptr_t p) {
    char b[32];
    snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(p));
    return b;
}

/* The allocation containing [p, p + n), under st().mu. */
bool find_range_locked(uintptr_t p, size_t n, uintptr_t* base, size_t* size) {
    auto& a = st().allocs;
    auto it = a.upper_bound(p);
    if (it == a.begin()) return false;
    --it;
    const uintptr_t b = it->first;
    const size_t s = it->second.size;
    if (p < b || p - b > s || n > s - (p - b)) return false;
    if (base) *base = b;
    if (size) *size = s;
    return true;
}

/* Checks that [p, p + n) lies inside one device allocation. */
CUresult check_device_range(const char* fn, const char* which, CUdeviceptr p, size_t n) {
    if (n == 0) return kSuccess;
    std::lock_guard<std::mutex> g(st().mu);
    if (find_range_locked(static_cast<uintptr_t>(p), n, nullptr, nullptr)) return kSuccess;
    return note_error(kErrInvalidValue, std::string(fn) + ": " + which + " range [" + hex(static_cast<uintptr_t>(p)) +
                                            ", +" + std::to_string(n) + " bytes) is not inside one device allocation");
}

CUresult device_alloc(CUdeviceptr* dptr, size_t bytes, bool managed) {
    if (!dptr) return kErrInvalidValue;
    if (bytes == 0) {
        *dptr = 0;
        return kSuccess;
    }
    {
        std::lock_guard<std::mutex> g(st().mu);
        if (bytes > device_total_mem() - std::min(device_total_mem(), st().bytes_in_use)) return kErrOutOfMemory;
    }
    void* p = nullptr;
    if (posix_memalign(&p, kAllocAlign, bytes) != 0 || !p) return kErrOutOfMemory;
    std::lock_guard<std::mutex> g(st().mu);
    st().allocs[reinterpret_cast<uintptr_t>(p)] = Allocation{bytes, managed};
    st().bytes_in_use += bytes;
    *dptr = static_cast<CUdeviceptr>(reinterpret_cast<uintptr_t>(p));
    return kSuccess;
}

CUresult device_free(CUdeviceptr dptr) {
    if (dptr == 0) return kSuccess;
    {
        std::lock_guard<std::mutex> g(st().mu);
        auto it = st().allocs.find(static_cast<uintptr_t>(dptr));
        if (it == st().allocs.end()) {
            return note_error(kErrInvalidValue, "cuMemFree: " + hex(static_cast<uintptr_t>(dptr)) +
                                                    " is not the start of a live device allocation");
        }
        st().bytes_in_use -= it->second.size;
        st().allocs.erase(it);
    }
    free(reinterpret_cast<void*>(static_cast<uintptr_t>(dptr)));
    return kSuccess;
}

template <class T>
CUresult device_fill(const char* fn, CUdeviceptr dst, T value, size_t n) {
    if (n == 0) return kSuccess;
    CUresult r = check_device_range(fn, "destination", dst, n * sizeof(T));
    if (r) return r;
    T* p = reinterpret_cast<T*>(static_cast<uintptr_t>(dst));
    if (sizeof(T) == 1) {
        std::memset(p, static_cast<int>(value), n);
    } else {
        for (size_t i = 0; i < n; ++i) p[i] = value;
    }
    return kSuccess;
}

CUresult copy_htod(const char* fn, CUdeviceptr dst, const void* src, size_t n) {
    if (n == 0) return kSuccess;
    if (!src) return kErrInvalidValue;
    CUresult r = check_device_range(fn, "destination", dst, n);
    if (r) return r;
    std::memcpy(reinterpret_cast<void*>(static_cast<uintptr_t>(dst)), src, n);
    return kSuccess;
}

CUresult copy_dtoh(const char* fn, void* dst, CUdeviceptr src, size_t n) {
    if (n == 0) return kSuccess;
    if (!dst) return kErrInvalidValue;
    CUresult r = check_device_range(fn, "source", src, n);
    if (r) return r;
    std::memcpy(dst, reinterpret_cast<const void*>(static_cast<uintptr_t>(src)), n);
    return kSuccess;
}

CUresult copy_dtod(const char* fn, CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (n == 0) return kSuccess;
    CUresult r = check_device_range(fn, "source", src, n);
    if (r) return r;
    r = check_device_range(fn, "destination", dst, n);
    if (r) return r;
    std::memmove(reinterpret_cast<void*>(static_cast<uintptr_t>(dst)),
                 reinterpret_cast<const void*>(static_cast<uintptr_t>(src)), n);
    return kSuccess;
}

bool is_special_stream(CUstream s) {
    /* NULL (legacy default), CU_STREAM_LEGACY (0x1), CU_STREAM_PER_THREAD (0x2). */
    return reinterpret_cast<uintptr_t>(s) <= 0x2;
}

CUresult check_stream(CUstream s) {
    if (is_special_stream(s)) return kSuccess;
    std::lock_guard<std::mutex> g(st().mu);
    return st().streams.count(reinterpret_cast<Stream*>(s)) ? kSuccess : kErrInvalidHandle;
}

Event* as_event(CUevent e) {
    if (!e) return nullptr;
    std::lock_guard<std::mutex> g(st().mu);
    Event* ev = reinterpret_cast<Event*>(e);
    return st().events.count(ev) ? ev : nullptr;
}

KernelEntry* as_kernel(CUfunction f) { return reinterpret_cast<KernelEntry*>(f); }

CUresult take_pending() {
    const int e = t_pending_error;
    t_pending_error = 0;
    return e;
}

CUresult do_launch(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned smem, CUstream stream, void** params, void** extra) {
    if (!f) return kErrInvalidHandle;
    CUresult r = check_stream(stream);
    if (r) return r;
    if (!params) {
        return note_error(extra ? kErrNotSupported : kErrInvalidValue,
                          "cuLaunchKernel: the emulator needs kernelParams (the `extra` packing is not supported)");
    }
    /* A failed launch is reported by cuLaunchKernel itself and once more by the next synchronize
     * on this thread, unless the caller has moved on to another launch (it has seen the error). */
    r = launch(as_kernel(f), gx, gy, gz, bx, by, bz, smem, params);
    const bool kernel_fault = r == kErrLaunchFailed || r == kErrAssert || r == kErrUnknown || r == kErrIllegalAddress;
    t_pending_error = kernel_fault ? r : 0;
    return r;
}

int occupancy_blocks(int block_size, size_t dyn_smem) {
    if (block_size <= 0 || block_size > kMaxThreadsPerBlock) return 0;
    const int warps = (block_size + 31) / 32;
    int blocks = std::min(32, 64 / warps);                               /* 2048 threads per SM */
    const size_t smem_per_block = dyn_smem + 1024;                      /* + reserved */
    blocks = std::min<int>(blocks, static_cast<int>(233472 / smem_per_block));
    return blocks;
}

struct ErrorText {
    int code;
    const char* name;
    const char* text;
};
const ErrorText kErrors[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {4, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {5, "CUDA_ERROR_PROFILER_DISABLED", "profiler disabled while using a system-wide profiling tool"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {200, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {202, "CUDA_ERROR_CONTEXT_ALREADY_CURRENT", "context already current"},
    {209, "CUDA_ERROR_NO_BINARY_FOR_GPU", "no kernel image is available for execution on the device"},
    {215, "CUDA_ERROR_UNSUPPORTED_LIMIT", "limit is not supported on this architecture"},
    {218, "CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"},
    {222, "CUDA_ERROR_UNSUPPORTED_PTX_VERSION", "the provided PTX was compiled with an unsupported toolchain."},
    {300, "CUDA_ERROR_INVALID_SOURCE", "device kernel image is invalid"},
    {301, "CUDA_ERROR_FILE_NOT_FOUND", "file not found"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {401, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"},
    {500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {600, "CUDA_ERROR_NOT_READY", "device not ready"},
    {700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {701, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"},
    {702, "CUDA_ERROR_LAUNCH_TIMEOUT", "the launch timed out and was terminated"},
    {709, "CUDA_ERROR_CONTEXT_IS_DESTROYED", "context is destroyed"},
    {710, "CUDA_ERROR_ASSERT", "device-side assert triggered"},
    {715, "CUDA_ERROR_ILLEGAL_INSTRUCTION", "an illegal instruction was encountered"},
    {716, "CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address"},
    {719, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {720, "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE", "too many blocks in cooperative launch"},
    {800, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {900, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", "operation not permitted when stream is capturing"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

const ErrorText* find_error(int code) {
    for (const ErrorText& e : kErrors)
        if (e.code == code) return &e;
    return nullptr;
}

}  // namespace

/* ------------------------------------------------------------------------------------------ */
/* Initialisation, version, errors                                                             */
/* ------------------------------------------------------------------------------------------ */

CU_API cuInit(unsigned int flags) {
    if (flags != 0) return kErrInvalidValue;
    std::lock_guard<std::mutex> g(st().mu);
    st().initialized = true;
    return kSuccess;
}

CU_API cuDriverGetVersion(int* version) {
    if (!version) return kErrInvalidValue;
    *version = 12080;
    return kSuccess;
}

CU_API cuGetErrorString(CUresult error, const char** pStr) {
    if (!pStr) return kErrInvalidValue;
    const ErrorText* e = find_error(error);
    if (!e) {
        *pStr = nullptr;
        return kErrInvalidValue;
    }
    *pStr = e->text;
    return kSuccess;
}

CU_API cuGetErrorName(CUresult error, const char** pStr) {
    if (!pStr) return kErrInvalidValue;
    const ErrorText* e = find_error(error);
    if (!e) {
        *pStr = nullptr;
        return kErrInvalidValue;
    }
    *pStr = e->name;
    return kSuccess;
}

/* ------------------------------------------------------------------------------------------ */
/* Device                                                                                      */
/* ------------------------------------------------------------------------------------------ */

static bool initialized() {
    std::lock_guard<std::mutex> g(st().mu);
    return st().initialized;
}

CU_API cuDeviceGetCount(int* count) {
    if (!count) return kErrInvalidValue;
    if (!initialized()) return kErrNotInitialized;
    *count = 1;
    return kSuccess;
}

CU_API cuDeviceGet(CUdevice* device, int ordinal) {
    if (!device) return kErrInvalidValue;
    if (!initialized()) return kErrNotInitialized;
    if (ordinal != 0) return kErrInvalidDevice;
    *device = 0;
    return kSuccess;
}

CU_API cuDeviceGetName(char* name, int len, CUdevice dev) {
    if (!name || len <= 0) return kErrInvalidValue;
    if (dev != 0) return kErrInvalidDevice;
    snprintf(name, static_cast<size_t>(len), "%s", "distill-kernels emulated GPU (sm_90 SIMT on CPU)");
    return kSuccess;
}

CU_API cuDeviceTotalMem_v2(size_t* bytes, CUdevice dev) {
    if (!bytes) return kErrInvalidValue;
    if (dev != 0) return kErrInvalidDevice;
    *bytes = device_total_mem();
    return kSuccess;
}

CU_API cuDeviceGetUuid(CUuuid* uuid, CUdevice dev) {
    if (!uuid) return kErrInvalidValue;
    if (dev != 0) return kErrInvalidDevice;
    static const char id[16] = {'d', 'i', 's', 't', 'i', 'l', 'l', '-', 'e', 'm', 'u', 'l', 'a', 't', 'o', 'r'};
    std::memcpy(uuid->bytes, id, 16);
    return kSuccess;
}
CU_API cuDeviceGetUuid_v2(CUuuid* uuid, CUdevice dev) { return cuDeviceGetUuid(uuid, dev); }

CU_API cuDeviceGetPCIBusId(char* pciBusId, int len, CUdevice dev) {
    if (!pciBusId || len <= 0) return kErrInvalidValue;
    if (dev != 0) return kErrInvalidDevice;
    snprintf(pciBusId, static_cast<size_t>(len), "0000:00:00.0");
    return kSuccess;
}

CU_API cuDeviceComputeCapability(int* major, int* minor, CUdevice dev) {
    if (!major || !minor) return kErrInvalidValue;
    if (dev != 0) return kErrInvalidDevice;
    *major = 9;
    *minor = 0;
    return kSuccess;
}

CU_API cuDeviceGetAttribute(int* pi, int attrib, CUdevice dev) {
    if (!pi) return kErrInvalidValue;
    if (dev != 0) return kErrInvalidDevice;
    int v = 0;
    switch (attrib) {
    case 1: v = kMaxThreadsPerBlock; break;           /* MAX_THREADS_PER_BLOCK */
    case 2: v = 1024; break;                          /* MAX_BLOCK_DIM_X */
    case 3: v = 1024; break;                          /* MAX_BLOCK_DIM_Y */
    case 4: v = 64; break;                            /* MAX_BLOCK_DIM_Z */
    case 5: v = 2147483647; break;                    /* MAX_GRID_DIM_X */
    case 6: v = 65535; break;                         /* MAX_GRID_DIM_Y */
    case 7: v = 65535; break;                         /* MAX_GRID_DIM_Z */
    case 8: v = kDefaultSharedPerBlock; break;        /* MAX_SHARED_MEMORY_PER_BLOCK */
    case 9: v = 65536; break;                         /* TOTAL_CONSTANT_MEMORY */
    case 10: v = 32; break;                           /* WARP_SIZE */
    case 11: v = 2147483647; break;                   /* MAX_PITCH */
    case 12: v = 65536; break;                        /* MAX_REGISTERS_PER_BLOCK */
    case 13: v = 1980000; break;                      /* CLOCK_RATE (kHz) */
    case 14: v = 512; break;                          /* TEXTURE_ALIGNMENT */
    case 15: v = 1; break;                            /* GPU_OVERLAP */
    case 16: v = 132; break;                          /* MULTIPROCESSOR_COUNT */
    case 17: v = 0; break;                            /* KERNEL_EXEC_TIMEOUT */
    case 18: v = 0; break;                            /* INTEGRATED */
    case 19: v = 1; break;                            /* CAN_MAP_HOST_MEMORY */
    case 20: v = 0; break;                            /* COMPUTE_MODE (default) */
    case 30: v = 512; break;                          /* SURFACE_ALIGNMENT */
    case 31: v = 1; break;                            /* CONCURRENT_KERNELS */
    case 32: v = 0; break;                            /* ECC_ENABLED */
    case 36: v = 2619000; break;                      /* MEMORY_CLOCK_RATE (kHz) */
    case 37: v = 5120; break;                         /* GLOBAL_MEMORY_BUS_WIDTH */
    case 38: v = 50 * 1024 * 1024; break;             /* L2_CACHE_SIZE */
    case 39: v = 2048; break;                         /* MAX_THREADS_PER_MULTIPROCESSOR */
    case 40: v = 2; break;                            /* ASYNC_ENGINE_COUNT */
    case 41: v = 1; break;                            /* UNIFIED_ADDRESSING */
    case 51: v = 32; break;                           /* TEXTURE_PITCH_ALIGNMENT */
    case 75: v = 9; break;                            /* COMPUTE_CAPABILITY_MAJOR */
    case 76: v = 0; break;                            /* COMPUTE_CAPABILITY_MINOR */
    case 78: v = 1; break;                            /* STREAM_PRIORITIES_SUPPORTED */
    case 79: v = 1; break;                            /* GLOBAL_L1_CACHE_SUPPORTED */
    case 80: v = 1; break;                            /* LOCAL_L1_CACHE_SUPPORTED */
    case 81: v = 233472; break;                       /* MAX_SHARED_MEMORY_PER_MULTIPROCESSOR */
    case 82: v = 65536; break;                        /* MAX_REGISTERS_PER_MULTIPROCESSOR */
    case 83: v = 1; break;                            /* MANAGED_MEMORY */
    case 87: v = 2; break;                            /* SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO */
    case 89: v = 1; break;                            /* CONCURRENT_MANAGED_ACCESS */
    case 90: v = 1; break;                            /* COMPUTE_PREEMPTION_SUPPORTED */
    case 95: v = 1; break;                            /* COOPERATIVE_LAUNCH */
    case 97: v = kMaxSharedPerBlockOptin; break;      /* MAX_SHARED_MEMORY_PER_BLOCK_OPTIN */
    case 99: v = 1; break;                            /* HOST_REGISTER_SUPPORTED */
    case 106: v = 32; break;                          /* MAX_BLOCKS_PER_MULTIPROCESSOR */
    case 111: v = 1024; break;                        /* RESERVED_SHARED_MEMORY_PER_BLOCK */
    case 115: v = 1; break;                           /* MEMORY_POOLS_SUPPORTED: cudarc uses async alloc */
    default:
        if (attrib <= 0 || attrib > 200) return kErrInvalidValue;
        v = 0; /* features the emulator does not have */
        break;
    }
    *pi = v;
    return kSuccess;
}

CU_API cuDeviceCanAccessPeer(int* canAccessPeer, CUdevice dev, CUdevice peerDev) {
    if (!canAccessPeer) return kErrInvalidValue;
    if (dev != 0 || peerDev != 0) return kErrInvalidDevice;
    *canAccessPeer = 0;
    return kSuccess;
}

/* ------------------------------------------------------------------------------------------ */
/* Contexts                                                                                    */
/* ------------------------------------------------------------------------------------------ */

static CUcontext primary_handle() { return reinterpret_cast<CUcontext>(&st().primary); }

static bool valid_ctx(CUcontext c) {
    if (c == primary_handle()) return true;
    std::lock_guard<std::mutex> g(st().mu);
    return st().contexts.count(reinterpret_cast<Ctx*>(c)) != 0;
}

CU_API cuDevicePrimaryCtxRetain(CUcontext* pctx, CUdevice dev) {
    if (!pctx) return kErrInvalidValue;
    if (!initialized()) return kErrNotInitialized;
    if (dev != 0) return kErrInvalidDevice;
    std::lock_guard<std::mutex> g(st().mu);
    ++st().primary_refs;
    *pctx = primary_handle();
    return kSuccess;
}

CU_API cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    if (dev != 0) return kErrInvalidDevice;
    std::lock_guard<std::mutex> g(st().mu);
    if (st().primary_refs <= 0) return kErrInvalidContext;
    --st().primary_refs;
    return kSuccess;
}
CU_API cuDevicePrimaryCtxRelease(CUdevice dev) { return cuDevicePrimaryCtxRelease_v2(dev); }

CU_API cuDevicePrimaryCtxReset_v2(CUdevice dev) { return dev == 0 ? kSuccess : kErrInvalidDevice; }
CU_API cuDevicePrimaryCtxReset(CUdevice dev) { return cuDevicePrimaryCtxReset_v2(dev); }

CU_API cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int* flags, int* active) {
    if (!flags || !active) return kErrInvalidValue;
    if (dev != 0) return kErrInvalidDevice;
    std::lock_guard<std::mutex> g(st().mu);
    *flags = st().primary.flags;
    *active = st().primary_refs > 0;
    return kSuccess;
}

CU_API cuDevicePrimaryCtxSetFlags_v2(CUdevice dev, unsigned int flags) {
    if (dev != 0) return kErrInvalidDevice;
    std::lock_guard<std::mutex> g(st().mu);
    st().primary.flags = flags;
    return kSuccess;
}
CU_API cuDevicePrimaryCtxSetFlags(CUdevice dev, unsigned int flags) { return cuDevicePrimaryCtxSetFlags_v2(dev, flags); }

CU_API cuCtxGetCurrent(CUcontext* pctx) {
    if (!pctx) return kErrInvalidValue;
    *pctx = t_ctx_depth > 0 ? t_ctx_stack[t_ctx_depth - 1] : nullptr;
    return kSuccess;
}

CU_API cuCtxSetCurrent(CUcontext ctx) {
    if (!ctx) {
        if (t_ctx_depth > 0) --t_ctx_depth;
        return kSuccess;
    }
    if (!valid_ctx(ctx)) return kErrInvalidContext;
    if (t_ctx_depth == 0) t_ctx_depth = 1;
    t_ctx_stack[t_ctx_depth - 1] = ctx;
    return kSuccess;
}

CU_API cuCtxPushCurrent_v2(CUcontext ctx) {
    if (!ctx || !valid_ctx(ctx)) return kErrInvalidContext;
    if (t_ctx_depth >= kCtxStackMax) return kErrInvalidValue;
    t_ctx_stack[t_ctx_depth++] = ctx;
    return kSuccess;
}
CU_API cuCtxPushCurrent(CUcontext ctx) { return cuCtxPushCurrent_v2(ctx); }

CU_API cuCtxPopCurrent_v2(CUcontext* pctx) {
    if (t_ctx_depth == 0) return kErrInvalidContext;
    CUcontext c = t_ctx_stack[--t_ctx_depth];
    if (pctx) *pctx = c;
    return kSuccess;
}
CU_API cuCtxPopCurrent(CUcontext* pctx) { return cuCtxPopCurrent_v2(pctx); }

static CUresult create_ctx(CUcontext* pctx, unsigned flags, CUdevice dev) {
    if (!pctx) return kErrInvalidValue;
    if (!initialized()) return kErrNotInitialized;
    if (dev != 0) return kErrInvalidDevice;
    Ctx* c = new Ctx;
    c->flags = flags;
    {
        std::lock_guard<std::mutex> g(st().mu);
        st().contexts.insert(c);
    }
    *pctx = reinterpret_cast<CUcontext>(c);
    return cuCtxPushCurrent_v2(*pctx); /* a created context becomes current */
}

CU_API cuCtxCreate_v2(CUcontext* pctx, unsigned int flags, CUdevice dev) { return create_ctx(pctx, flags, dev); }
CU_API cuCtxCreate_v3(CUcontext* pctx, void* paramsArray, int numParams, unsigned int flags, CUdevice dev) {
    (void)paramsArray;
    (void)numParams;
    return create_ctx(pctx, flags, dev);
}
CU_API cuCtxCreate_v4(CUcontext* pctx, void* ctxCreateParams, unsigned int flags, CUdevice dev) {
    (void)ctxCreateParams;
    return create_ctx(pctx, flags, dev);
}

CU_API cuCtxDestroy_v2(CUcontext ctx) {
    if (!ctx) return kErrInvalidValue;
    if (ctx == primary_handle()) return kErrInvalidContext;
    Ctx* c = reinterpret_cast<Ctx*>(ctx);
    {
        std::lock_guard<std::mutex> g(st().mu);
        if (!st().contexts.erase(c)) return kErrInvalidContext;
    }
    /* Drop it from this thread's stack if it is there. */
    int j = 0;
    for (int i = 0; i < t_ctx_depth; ++i)
        if (t_ctx_stack[i] != ctx) t_ctx_stack[j++] = t_ctx_stack[i];
    t_ctx_depth = j;
    delete c;
    return kSuccess;
}
CU_API cuCtxDestroy(CUcontext ctx) { return cuCtxDestroy_v2(ctx); }

CU_API cuCtxGetDevice(CUdevice* device) {
    if (!device) return kErrInvalidValue;
    if (t_ctx_depth == 0) return kErrInvalidContext;
    *device = 0;
    return kSuccess;
}

CU_API cuCtxSynchronize() { return take_pending(); }

CU_API cuCtxGetFlags(unsigned int* flags) {
    if (!flags) return kErrInvalidValue;
    *flags = 0;
    return kSuccess;
}
CU_API cuCtxSetFlags(unsigned int flags) {
    (void)flags;
    return kSuccess;
}

CU_API cuCtxGetApiVersion(CUcontext ctx, unsigned int* version) {
    (void)ctx;
    if (!version) return kErrInvalidValue;
    *version = 3020;
    return kSuccess;
}

CU_API cuCtxGetLimit(size_t* pvalue, int limit) {
    if (!pvalue) return kErrInvalidValue;
    std::lock_guard<std::mutex> g(st().mu);
    auto it = st().limits.find(limit);
    if (it != st().limits.end()) {
        *pvalue = it->second;
        return kSuccess;
    }
    switch (limit) {
    case 0: *pvalue = 1024; break;              /* STACK_SIZE */
    case 1: *pvalue = 1 << 20; break;           /* PRINTF_FIFO_SIZE */
    case 2: *pvalue = 8 << 20; break;           /* MALLOC_HEAP_SIZE */
    case 3: *pvalue = 2; break;                 /* DEV_RUNTIME_SYNC_DEPTH */
    case 4: *pvalue = 2048; break;              /* DEV_RUNTIME_PENDING_LAUNCH_COUNT */
    case 5: *pvalue = 32; break;                /* MAX_L2_FETCH_GRANULARITY */
    case 6: *pvalue = 0; break;                 /* PERSISTING_L2_CACHE_SIZE */
    default: return kErrInvalidValue;
    }
    return kSuccess;
}

CU_API cuCtxSetLimit(int limit, size_t value) {
    if (limit < 0 || limit > 6) return kErrInvalidValue;
    std::lock_guard<std::mutex> g(st().mu);
    st().limits[limit] = value;
    return kSuccess;
}

CU_API cuCtxGetCacheConfig(int* pconfig) {
    if (!pconfig) return kErrInvalidValue;
    std::lock_guard<std::mutex> g(st().mu);
    *pconfig = st().cache_config;
    return kSuccess;
}
CU_API cuCtxSetCacheConfig(int config) {
    std::lock_guard<std::mutex> g(st().mu);
    st().cache_config = config;
    return kSuccess;
}
CU_API cuCtxGetSharedMemConfig(int* pConfig) {
    if (!pConfig) return kErrInvalidValue;
    *pConfig = 1; /* four-byte banks */
    return kSuccess;
}
CU_API cuCtxSetSharedMemConfig(int config) {
    (void)config;
    return kSuccess;
}

CU_API cuCtxGetStreamPriorityRange(int* leastPriority, int* greatestPriority) {
    if (leastPriority) *leastPriority = 0;
    if (greatestPriority) *greatestPriority = -5;
    return kSuccess;
}

CU_API cuCtxEnablePeerAccess(CUcontext peerContext, unsigned int flags) {
    (void)peerContext;
    (void)flags;
    return kErrInvalidDevice; /* one device: no peers */
}
CU_API cuCtxDisablePeerAccess(CUcontext peerContext) {
    (void)peerContext;
    return kErrInvalidDevice;
}

/* ------------------------------------------------------------------------------------------ */
/* Memory                                                                                      */
/* ------------------------------------------------------------------------------------------ */

CU_API cuMemAlloc_v2(CUdeviceptr* dptr, size_t bytesize) { return device_alloc(dptr, bytesize, false); }
CU_API cuMemAllocAsync(CUdeviceptr* dptr, size_t bytesize, CUstream hStream) {
    CUresult r = check_stream(hStream);
    return r ? r : device_alloc(dptr, bytesize, false);
}
CU_API cuMemAllocFromPoolAsync(CUdeviceptr* dptr, size_t bytesize, CUmemoryPool pool, CUstream hStream) {
    (void)pool;
    return cuMemAllocAsync(dptr, bytesize, hStream);
}
CU_API cuMemAllocManaged(CUdeviceptr* dptr, size_t bytesize, unsigned int flags) {
    (void)flags;
    return device_alloc(dptr, bytesize, true);
}
CU_API cuMemAllocPitch_v2(CUdeviceptr* dptr, size_t* pPitch, size_t widthBytes, size_t height, unsigned int elemSize) {
    (void)elemSize;
    if (!pPitch) return kErrInvalidValue;
    const size_t pitch = (widthBytes + 511) / 512 * 512;
    *pPitch = pitch;
    return device_alloc(dptr, pitch * height, false);
}
CU_API cuMemFree_v2(CUdeviceptr dptr) { return device_free(dptr); }
CU_API cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream) {
    (void)hStream; /* freeing must not fail because a stream went away first */
    return device_free(dptr);
}

CU_API cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> g(st().mu);
    const size_t t = device_total_mem();
    if (total) *total = t;
    if (free_bytes) *free_bytes = t - std::min(t, st().bytes_in_use);
    return kSuccess;
}

CU_API cuMemGetAddressRange_v2(CUdeviceptr* pbase, size_t* psize, CUdeviceptr dptr) {
    std::lock_guard<std::mutex> g(st().mu);
    uintptr_t base;
    size_t size;
    if (!find_range_locked(static_cast<uintptr_t>(dptr), 1, &base, &size)) return kErrNotFound;
    if (pbase) *pbase = base;
    if (psize) *psize = size;
    return kSuccess;
}

CU_API cuMemHostAlloc(void** pp, size_t bytesize, unsigned int flags) {
    (void)flags;
    if (!pp) return kErrInvalidValue;
    void* p = nullptr;
    if (posix_memalign(&p, 4096, bytesize ? bytesize : 1) != 0) return kErrOutOfMemory;
    std::lock_guard<std::mutex> g(st().mu);
    st().host_allocs.insert(p);
    *pp = p;
    return kSuccess;
}
CU_API cuMemAllocHost_v2(void** pp, size_t bytesize) { return cuMemHostAlloc(pp, bytesize, 0); }
CU_API cuMemFreeHost(void* p) {
    {
        std::lock_guard<std::mutex> g(st().mu);
        if (!st().host_allocs.erase(p)) return kErrInvalidValue;
    }
    free(p);
    return kSuccess;
}
CU_API cuMemHostGetDevicePointer_v2(CUdeviceptr* pdptr, void* p, unsigned int flags) {
    (void)flags;
    if (!pdptr) return kErrInvalidValue;
    *pdptr = reinterpret_cast<uintptr_t>(p);
    return kSuccess;
}
CU_API cuMemHostRegister_v2(void* p, size_t bytesize, unsigned int flags) {
    (void)p;
    (void)bytesize;
    (void)flags;
    return kSuccess;
}
CU_API cuMemHostUnregister(void* p) {
    (void)p;
    return kSuccess;
}

CU_API cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) { return copy_htod("cuMemcpyHtoD", dst, src, n); }
CU_API cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    CUresult r = check_stream(s);
    return r ? r : copy_htod("cuMemcpyHtoDAsync", dst, src, n);
}
CU_API cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) { return copy_dtoh("cuMemcpyDtoH", dst, src, n); }
CU_API cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    CUresult r = check_stream(s);
    return r ? r : copy_dtoh("cuMemcpyDtoHAsync", dst, src, n);
}
CU_API cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) { return copy_dtod("cuMemcpyDtoD", dst, src, n); }
CU_API cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    CUresult r = check_stream(s);
    return r ? r : copy_dtod("cuMemcpyDtoDAsync", dst, src, n);
}
CU_API cuMemcpyPeer(CUdeviceptr dst, CUcontext dstCtx, CUdeviceptr src, CUcontext srcCtx, size_t n) {
    (void)dstCtx;
    (void)srcCtx;
    return copy_dtod("cuMemcpyPeer", dst, src, n);
}
CU_API cuMemcpyPeerAsync(CUdeviceptr dst, CUcontext dstCtx, CUdeviceptr src, CUcontext srcCtx, size_t n, CUstream s) {
    (void)dstCtx;
    (void)srcCtx;
    CUresult r = check_stream(s);
    return r ? r : copy_dtod("cuMemcpyPeerAsync", dst, src, n);
}
/* Unified addressing: either side may be host or device memory. */
CU_API cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (n && (!dst || !src)) return kErrInvalidValue;
    if (n) std::memmove(reinterpret_cast<void*>(static_cast<uintptr_t>(dst)), reinterpret_cast<const void*>(static_cast<uintptr_t>(src)), n);
    return kSuccess;
}
CU_API cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    CUresult r = check_stream(s);
    return r ? r : cuMemcpy(dst, src, n);
}

CU_API cuMemsetD8_v2(CUdeviceptr dst, unsigned char uc, size_t n) { return device_fill("cuMemsetD8", dst, uc, n); }
CU_API cuMemsetD8Async(CUdeviceptr dst, unsigned char uc, size_t n, CUstream s) {
    CUresult r = check_stream(s);
    return r ? r : device_fill("cuMemsetD8Async", dst, uc, n);
}
CU_API cuMemsetD16_v2(CUdeviceptr dst, unsigned short us, size_t n) { return device_fill("cuMemsetD16", dst, us, n); }
CU_API cuMemsetD16Async(CUdeviceptr dst, unsigned short us, size_t n, CUstream s) {
    CUresult r = check_stream(s);
    return r ? r : device_fill("cuMemsetD16Async", dst, us, n);
}
CU_API cuMemsetD32_v2(CUdeviceptr dst, unsigned int ui, size_t n) { return device_fill("cuMemsetD32", dst, ui, n); }
CU_API cuMemsetD32Async(CUdeviceptr dst, unsigned int ui, size_t n, CUstream s) {
    CUresult r = check_stream(s);
    return r ? r : device_fill("cuMemsetD32Async", dst, ui, n);
}

CU_API cuMemPrefetchAsync(CUdeviceptr devPtr, size_t count, CUdevice dstDevice, CUstream s) {
    (void)devPtr;
    (void)count;
    (void)dstDevice;
    return check_stream(s);
}
CU_API cuMemPrefetchAsync_v2(CUdeviceptr devPtr, size_t count, CUmemLocation location, unsigned int flags, CUstream s) {
    (void)devPtr;
    (void)count;
    (void)location;
    (void)flags;
    return check_stream(s);
}
CU_API cuMemAdvise(CUdeviceptr devPtr, size_t count, int advice, CUdevice device) {
    (void)devPtr;
    (void)count;
    (void)advice;
    (void)device;
    return kSuccess;
}
CU_API cuMemAdvise_v2(CUdeviceptr devPtr, size_t count, int advice, CUmemLocation location) {
    (void)devPtr;
    (void)count;
    (void)advice;
    (void)location;
    return kSuccess;
}

/* CUpointer_attribute values: CONTEXT 1, MEMORY_TYPE 2, DEVICE_POINTER 3, HOST_POINTER 4,
 * BUFFER_ID 7, IS_MANAGED 8, DEVICE_ORDINAL 9, RANGE_START_ADDR 11, RANGE_SIZE 12, MAPPED 13. */
CU_API cuPointerGetAttribute(void* data, int attribute, CUdeviceptr ptr) {
    if (!data) return kErrInvalidValue;
    uintptr_t base;
    size_t size;
    bool managed;
    {
        std::lock_guard<std::mutex> g(st().mu);
        if (!find_range_locked(static_cast<uintptr_t>(ptr), 1, &base, &size)) return kErrInvalidValue;
        managed = st().allocs[base].managed;
    }
    switch (attribute) {
    case 1: *static_cast<CUcontext*>(data) = primary_handle(); break;
    case 2: *static_cast<unsigned*>(data) = 2u; break; /* CU_MEMORYTYPE_DEVICE */
    case 3: *static_cast<CUdeviceptr*>(data) = ptr; break;
    case 4:
        if (!managed) return kErrInvalidValue;
        *static_cast<void**>(data) = reinterpret_cast<void*>(static_cast<uintptr_t>(ptr));
        break;
    case 6: *static_cast<int*>(data) = 1; break;
    case 7: *static_cast<unsigned long long*>(data) = base; break;
    case 8: *static_cast<int*>(data) = managed ? 1 : 0; break;
    case 9: *static_cast<int*>(data) = 0; break;
    case 11: *static_cast<CUdeviceptr*>(data) = base; break;
    case 12: *static_cast<size_t*>(data) = size; break;
    case 13: *static_cast<int*>(data) = 1; break;
    default: return kErrInvalidValue;
    }
    return kSuccess;
}

CU_API cuPointerGetAttributes(unsigned int numAttributes, int* attributes, void** data, CUdeviceptr ptr) {
    if (!attributes || !data) return kErrInvalidValue;
    for (unsigned i = 0; i < numAttributes; ++i) {
        CUresult r = cuPointerGetAttribute(data[i], attributes[i], ptr);
        if (r) return r;
    }
    return kSuccess;
}

/* Memory pools: one default pool; attributes are remembered or reported as 0. */
CU_API cuDeviceGetDefaultMemPool(CUmemoryPool* pool_out, CUdevice dev) {
    if (!pool_out) return kErrInvalidValue;
    if (dev != 0) return kErrInvalidDevice;
    *pool_out = reinterpret_cast<CUmemoryPool>(&st().default_pool);
    return kSuccess;
}
CU_API cuDeviceGetMemPool(CUmemoryPool* pool, CUdevice dev) { return cuDeviceGetDefaultMemPool(pool, dev); }
CU_API cuDeviceSetMemPool(CUdevice dev, CUmemoryPool pool) {
    (void)pool;
    return dev == 0 ? kSuccess : kErrInvalidDevice;
}
CU_API cuMemPoolCreate(CUmemoryPool* pool, const void* poolProps) {
    (void)poolProps;
    if (!pool) return kErrInvalidValue;
    Pool* p = new Pool;
    std::lock_guard<std::mutex> g(st().mu);
    st().pools.insert(p);
    *pool = reinterpret_cast<CUmemoryPool>(p);
    return kSuccess;
}
CU_API cuMemPoolDestroy(CUmemoryPool pool) {
    Pool* p = reinterpret_cast<Pool*>(pool);
    {
        std::lock_guard<std::mutex> g(st().mu);
        if (!st().pools.erase(p)) return kErrInvalidValue;
    }
    delete p;
    return kSuccess;
}
/* CUmemPool_attribute: 1-3 are int flags, 4 (RELEASE_THRESHOLD) and above are cuuint64_t. */
CU_API cuMemPoolSetAttribute(CUmemoryPool pool, int attr, void* value) {
    if (!pool || !value) return kErrInvalidValue;
    if (attr == 4) reinterpret_cast<Pool*>(pool)->release_threshold = *static_cast<unsigned long long*>(value);
    return kSuccess;
}
CU_API cuMemPoolGetAttribute(CUmemoryPool pool, int attr, void* value) {
    if (!pool || !value) return kErrInvalidValue;
    if (attr >= 1 && attr <= 3) {
        *static_cast<int*>(value) = 1;
    } else if (attr == 4) {
        *static_cast<unsigned long long*>(value) = reinterpret_cast<Pool*>(pool)->release_threshold;
    } else {
        std::lock_guard<std::mutex> g(st().mu);
        *static_cast<unsigned long long*>(value) = (attr == 6 || attr == 8) ? st().bytes_in_use : 0; /* *_CURRENT */
    }
    return kSuccess;
}
CU_API cuMemPoolTrimTo(CUmemoryPool pool, size_t minBytesToKeep) {
    (void)pool;
    (void)minBytesToKeep;
    return kSuccess;
}

/* ------------------------------------------------------------------------------------------ */
/* Streams and events                                                                          */
/* ------------------------------------------------------------------------------------------ */

static CUresult new_stream(CUstream* ph, unsigned flags, int priority) {
    if (!ph) return kErrInvalidValue;
    Stream* s = new Stream;
    s->flags = flags;
    s->priority = priority;
    std::lock_guard<std::mutex> g(st().mu);
    st().streams.insert(s);
    *ph = reinterpret_cast<CUstream>(s);
    return kSuccess;
}
CU_API cuStreamCreate(CUstream* phStream, unsigned int flags) { return new_stream(phStream, flags, 0); }
CU_API cuStreamCreateWithPriority(CUstream* phStream, unsigned int flags, int priority) {
    return new_stream(phStream, flags, priority);
}
CU_API cuStreamDestroy_v2(CUstream hStream) {
    if (is_special_stream(hStream)) return kErrInvalidHandle;
    Stream* s = reinterpret_cast<Stream*>(hStream);
    {
        std::lock_guard<std::mutex> g(st().mu);
        if (!st().streams.erase(s)) return kErrInvalidHandle;
    }
    delete s;
    return kSuccess;
}
CU_API cuStreamDestroy(CUstream hStream) { return cuStreamDestroy_v2(hStream); }

CU_API cuStreamSynchronize(CUstream hStream) {
    CUresult r = check_stream(hStream);
    return r ? r : take_pending();
}
CU_API cuStreamQuery(CUstream hStream) { return check_stream(hStream); }
CU_API cuStreamWaitEvent(CUstream hStream, CUevent hEvent, unsigned int flags) {
    (void)flags;
    CUresult r = check_stream(hStream);
    if (r) return r;
    return as_event(hEvent) ? kSuccess : kErrInvalidHandle;
}
CU_API cuStreamGetPriority(CUstream hStream, int* priority) {
    if (!priority) return kErrInvalidValue;
    CUresult r = check_stream(hStream);
    if (r) return r;
    *priority = is_special_stream(hStream) ? 0 : reinterpret_cast<Stream*>(hStream)->priority;
    return kSuccess;
}
CU_API cuStreamGetFlags(CUstream hStream, unsigned int* flags) {
    if (!flags) return kErrInvalidValue;
    CUresult r = check_stream(hStream);
    if (r) return r;
    *flags = is_special_stream(hStream) ? 0 : reinterpret_cast<Stream*>(hStream)->flags;
    return kSuccess;
}
CU_API cuStreamGetCtx(CUstream hStream, CUcontext* pctx) {
    if (!pctx) return kErrInvalidValue;
    CUresult r = check_stream(hStream);
    if (r) return r;
    *pctx = primary_handle();
    return kSuccess;
}
CU_API cuStreamIsCapturing(CUstream hStream, int* captureStatus) {
    if (!captureStatus) return kErrInvalidValue;
    CUresult r = check_stream(hStream);
    if (r) return r;
    *captureStatus = 0; /* CU_STREAM_CAPTURE_STATUS_NONE */
    return kSuccess;
}
CU_API cuStreamBeginCapture_v2(CUstream hStream, int mode) {
    (void)hStream;
    (void)mode;
    return note_error(kErrNotSupported, "stream capture (CUDA graphs) is not supported by the emulator");
}
CU_API cuStreamEndCapture(CUstream hStream, CUgraph* phGraph) {
    (void)hStream;
    (void)phGraph;
    return kErrNotSupported;
}
CU_API cuStreamAttachMemAsync(CUstream hStream, CUdeviceptr dptr, size_t length, unsigned int flags) {
    (void)dptr;
    (void)length;
    (void)flags;
    return check_stream(hStream);
}
CU_API cuLaunchHostFunc(CUstream hStream, CUhostFn fn, void* userData) {
    if (!fn) return kErrInvalidValue;
    CUresult r = check_stream(hStream);
    if (r) return r;
    fn(userData); /* everything before it on the stream has already finished */
    return kSuccess;
}
CU_API cuStreamAddCallback(CUstream hStream, CUstreamCallback callback, void* userData, unsigned int flags) {
    (void)flags;
    if (!callback) return kErrInvalidValue;
    CUresult r = check_stream(hStream);
    if (r) return r;
    callback(hStream, kSuccess, userData);
    return kSuccess;
}

CU_API cuEventCreate(CUevent* phEvent, unsigned int flags) {
    if (!phEvent) return kErrInvalidValue;
    Event* e = new Event;
    e->flags = flags;
    std::lock_guard<std::mutex> g(st().mu);
    st().events.insert(e);
    *phEvent = reinterpret_cast<CUevent>(e);
    return kSuccess;
}
CU_API cuEventRecord(CUevent hEvent, CUstream hStream) {
    Event* e = as_event(hEvent);
    if (!e) return kErrInvalidHandle;
    CUresult r = check_stream(hStream);
    if (r) return r;
    const double t = now_ms();
    std::lock_guard<std::mutex> g(st().mu);
    e->recorded = true;
    e->t_ms = t;
    return kSuccess;
}
CU_API cuEventRecordWithFlags(CUevent hEvent, CUstream hStream, unsigned int flags) {
    (void)flags;
    return cuEventRecord(hEvent, hStream);
}
CU_API cuEventQuery(CUevent hEvent) { return as_event(hEvent) ? kSuccess : kErrInvalidHandle; }
CU_API cuEventSynchronize(CUevent hEvent) { return as_event(hEvent) ? kSuccess : kErrInvalidHandle; }
CU_API cuEventElapsedTime(float* pMilliseconds, CUevent hStart, CUevent hEnd) {
    if (!pMilliseconds) return kErrInvalidValue;
    Event* a = as_event(hStart);
    Event* b = as_event(hEnd);
    if (!a || !b) return kErrInvalidHandle;
    std::lock_guard<std::mutex> g(st().mu);
    /* Like the driver: events created with CU_EVENT_DISABLE_TIMING, or never recorded, fail. */
    if ((a->flags | b->flags) & kEventDisableTiming) return kErrInvalidHandle;
    if (!a->recorded || !b->recorded) return kErrInvalidHandle;
    *pMilliseconds = static_cast<float>(b->t_ms - a->t_ms);
    return kSuccess;
}
CU_API cuEventElapsedTime_v2(float* pMilliseconds, CUevent hStart, CUevent hEnd) {
    return cuEventElapsedTime(pMilliseconds, hStart, hEnd);
}
CU_API cuEventDestroy_v2(CUevent hEvent) {
    Event* e = reinterpret_cast<Event*>(hEvent);
    {
        std::lock_guard<std::mutex> g(st().mu);
        if (!e || !st().events.erase(e)) return kErrInvalidHandle;
    }
    delete e;
    return kSuccess;
}
CU_API cuEventDestroy(CUevent hEvent) { return cuEventDestroy_v2(hEvent); }

/* ------------------------------------------------------------------------------------------ */
/* Modules and functions                                                                       */
/* ------------------------------------------------------------------------------------------ */

static CUresult new_module(CUmodule* module) {
    Module* m = new Module;
    std::lock_guard<std::mutex> g(st().mu);
    st().modules.insert(m);
    *module = reinterpret_cast<CUmodule>(m);
    return kSuccess;
}

/* The image (fatbin, cubin, PTX or a placeholder) is not interpreted: the kernels compiled into
 * this library are what runs. */
CU_API cuModuleLoadData(CUmodule* module, const void* image) {
    if (!module || !image) return kErrInvalidValue;
    return new_module(module);
}
CU_API cuModuleLoadDataEx(CUmodule* module, const void* image, unsigned int numOptions, int* options, void** optionValues) {
    (void)numOptions;
    (void)options;
    (void)optionValues;
    return cuModuleLoadData(module, image);
}
CU_API cuModuleLoadFatBinary(CUmodule* module, const void* fatCubin) { return cuModuleLoadData(module, fatCubin); }
CU_API cuModuleLoad(CUmodule* module, const char* fname) {
    if (!module || !fname) return kErrInvalidValue;
    if (access(fname, R_OK) != 0) return note_error(301, std::string("cuModuleLoad: cannot read ") + fname);
    return new_module(module);
}
CU_API cuModuleUnload(CUmodule hmod) {
    Module* m = reinterpret_cast<Module*>(hmod);
    {
        std::lock_guard<std::mutex> g(st().mu);
        if (!m || !st().modules.erase(m)) return kErrInvalidHandle;
    }
    delete m;
    return kSuccess;
}
CU_API cuModuleGetFunction(CUfunction* hfunc, CUmodule hmod, const char* name) {
    if (!hfunc || !name) return kErrInvalidValue;
    {
        std::lock_guard<std::mutex> g(st().mu);
        if (!hmod || !st().modules.count(reinterpret_cast<Module*>(hmod))) return kErrInvalidHandle;
    }
    KernelEntry* k = find_kernel(name);
    if (!k) {
        return note_error(kErrNotFound, std::string("cuModuleGetFunction: no kernel named ") + name +
                                            " is compiled into the emulator (missing DK_REGISTER_KERNEL?)");
    }
    *hfunc = reinterpret_cast<CUfunction>(k);
    return kSuccess;
}
CU_API cuModuleGetGlobal_v2(CUdeviceptr* dptr, size_t* bytes, CUmodule hmod, const char* name) {
    (void)dptr;
    (void)bytes;
    (void)hmod;
    return note_error(kErrNotFound, std::string("cuModuleGetGlobal: module globals are not supported by the emulator (") +
                                        (name ? name : "(null)") + ")");
}

CU_API cuFuncGetName(const char** name, CUfunction hfunc) {
    if (!name || !hfunc) return kErrInvalidValue;
    *name = as_kernel(hfunc)->name.c_str();
    return kSuccess;
}

/* CUfunction_attribute: MAX_THREADS_PER_BLOCK 0, SHARED_SIZE_BYTES 1, CONST_SIZE_BYTES 2,
 * LOCAL_SIZE_BYTES 3, NUM_REGS 4, PTX_VERSION 5, BINARY_VERSION 6, CACHE_MODE_CA 7,
 * MAX_DYNAMIC_SHARED_SIZE_BYTES 8, PREFERRED_SHARED_MEMORY_CARVEOUT 9, ... */
CU_API cuFuncGetAttribute(int* pi, int attrib, CUfunction hfunc) {
    if (!pi) return kErrInvalidValue;
    if (!hfunc) return kErrInvalidHandle;
    KernelEntry* k = as_kernel(hfunc);
    switch (attrib) {
    case 0: *pi = kMaxThreadsPerBlock; break;
    case 1: *pi = 0; break; /* static shared memory is not measured */
    case 2: *pi = 0; break;
    case 3: *pi = 0; break;
    case 4: *pi = 32; break;
    case 5: *pi = 90; break;
    case 6: *pi = 90; break;
    case 7: *pi = 0; break;
    case 8: *pi = k->max_dynamic_smem.load(); break;
    case 9: *pi = k->preferred_carveout.load(); break;
    default:
        if (attrib < 0 || attrib > 20) return kErrInvalidValue;
        *pi = 0;
        break;
    }
    return kSuccess;
}

CU_API cuFuncSetAttribute(CUfunction hfunc, int attrib, int value) {
    if (!hfunc) return kErrInvalidHandle;
    KernelEntry* k = as_kernel(hfunc);
    if (attrib == 8) {
        if (value < 0 || value > kMaxSharedPerBlockOptin) return kErrInvalidValue;
        k->max_dynamic_smem.store(value);
    } else if (attrib == 9) {
        if (value < -1 || value > 100) return kErrInvalidValue;
        k->preferred_carveout.store(value);
    } else if (attrib < 0 || attrib > 20) {
        return kErrInvalidValue;
    }
    return kSuccess;
}
CU_API cuFuncSetCacheConfig(CUfunction hfunc, int config) {
    (void)config;
    return hfunc ? kSuccess : kErrInvalidHandle;
}
CU_API cuFuncSetSharedMemConfig(CUfunction hfunc, int config) {
    (void)config;
    return hfunc ? kSuccess : kErrInvalidHandle;
}

/* ------------------------------------------------------------------------------------------ */
/* Launch                                                                                      */
/* ------------------------------------------------------------------------------------------ */

CU_API cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
                      unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ, unsigned int sharedMemBytes,
                      CUstream hStream, void** kernelParams, void** extra) {
    return do_launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes, hStream,
                     kernelParams, extra);
}

/* Launch attributes (clusters, priorities, ...) are ignored: blocks run independently anyway. */
CU_API cuLaunchKernelEx(const CUlaunchConfig* config, CUfunction f, void** kernelParams, void** extra) {
    if (!config) return kErrInvalidValue;
    return do_launch(f, config->gridDimX, config->gridDimY, config->gridDimZ, config->blockDimX, config->blockDimY,
                     config->blockDimZ, config->sharedMemBytes, config->hStream, kernelParams, extra);
}

/* Grid-wide synchronisation is not emulated, so a cooperative launch is a plain one. */
CU_API cuLaunchCooperativeKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
                                 unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ,
                                 unsigned int sharedMemBytes, CUstream hStream, void** kernelParams) {
    return do_launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes, hStream,
                     kernelParams, nullptr);
}

/* ------------------------------------------------------------------------------------------ */
/* Occupancy                                                                                   */
/* ------------------------------------------------------------------------------------------ */

CU_API cuOccupancyMaxActiveBlocksPerMultiprocessor(int* numBlocks, CUfunction func, int blockSize, size_t dynamicSMemSize) {
    if (!numBlocks) return kErrInvalidValue;
    if (!func) return kErrInvalidHandle;
    *numBlocks = occupancy_blocks(blockSize, dynamicSMemSize);
    return kSuccess;
}
CU_API cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* numBlocks, CUfunction func, int blockSize,
                                                            size_t dynamicSMemSize, unsigned int flags) {
    (void)flags;
    return cuOccupancyMaxActiveBlocksPerMultiprocessor(numBlocks, func, blockSize, dynamicSMemSize);
}
CU_API cuOccupancyMaxPotentialBlockSize(int* minGridSize, int* blockSize, CUfunction func,
                                        CUoccupancyB2DSize blockSizeToDynamicSMemSize, size_t dynamicSMemSize,
                                        int blockSizeLimit) {
    if (!minGridSize || !blockSize) return kErrInvalidValue;
    if (!func) return kErrInvalidHandle;
    int bs = kMaxThreadsPerBlock;
    if (blockSizeLimit > 0 && blockSizeLimit < bs) bs = blockSizeLimit >= 32 ? blockSizeLimit / 32 * 32 : blockSizeLimit;
    const size_t smem = blockSizeToDynamicSMemSize ? blockSizeToDynamicSMemSize(bs) : dynamicSMemSize;
    *blockSize = bs;
    *minGridSize = 132 * std::max(1, occupancy_blocks(bs, smem));
    return kSuccess;
}
CU_API cuOccupancyMaxPotentialBlockSizeWithFlags(int* minGridSize, int* blockSize, CUfunction func,
                                                 CUoccupancyB2DSize blockSizeToDynamicSMemSize, size_t dynamicSMemSize,
                                                 int blockSizeLimit, unsigned int flags) {
    (void)flags;
    return cuOccupancyMaxPotentialBlockSize(minGridSize, blockSize, func, blockSizeToDynamicSMemSize, dynamicSMemSize,
                                            blockSizeLimit);
}
CU_API cuOccupancyAvailableDynamicSMemPerBlock(size_t* dynamicSmemSize, CUfunction func, int numBlocks, int blockSize) {
    (void)blockSize;
    if (!dynamicSmemSize || numBlocks <= 0) return kErrInvalidValue;
    if (!func) return kErrInvalidHandle;
    *dynamicSmemSize = std::min<size_t>(kMaxSharedPerBlockOptin, 233472 / static_cast<size_t>(numBlocks) - 1024);
    return kSuccess;
}
CU_API cuOccupancyMaxPotentialClusterSize(int* clusterSize, CUfunction func, const CUlaunchConfig* config) {
    (void)config;
    if (!clusterSize) return kErrInvalidValue;
    if (!func) return kErrInvalidHandle;
    *clusterSize = 8;
    return kSuccess;
}
CU_API cuOccupancyMaxActiveClusters(int* numClusters, CUfunction func, const CUlaunchConfig* config) {
    (void)config;
    if (!numClusters) return kErrInvalidValue;
    if (!func) return kErrInvalidHandle;
    *numClusters = 16;
    return kSuccess;
}

/* ------------------------------------------------------------------------------------------ */
/* Unsupported: profiler (no-op), graphs, external memory                                      */
/* ------------------------------------------------------------------------------------------ */

CU_API cuProfilerStart() { return kSuccess; }
CU_API cuProfilerStop() { return kSuccess; }
CU_API cuProfilerInitialize(const char* configFile, const char* outputFile, int outputMode) {
    (void)configFile;
    (void)outputFile;
    (void)outputMode;
    return kSuccess;
}

CU_API cuGraphInstantiateWithFlags(CUgraphExec* phGraphExec, CUgraph hGraph, unsigned long long flags) {
    (void)phGraphExec;
    (void)hGraph;
    (void)flags;
    return kErrNotSupported;
}
CU_API cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream) {
    (void)hGraphExec;
    (void)hStream;
    return kErrNotSupported;
}
CU_API cuGraphUpload(CUgraphExec hGraphExec, CUstream hStream) {
    (void)hGraphExec;
    (void)hStream;
    return kErrNotSupported;
}
CU_API cuGraphDestroy(CUgraph hGraph) {
    (void)hGraph;
    return kErrNotSupported;
}
CU_API cuGraphExecDestroy(CUgraphExec hGraphExec) {
    (void)hGraphExec;
    return kErrNotSupported;
}
CU_API cuImportExternalMemory(CUexternalMemory* extMem_out, const void* memHandleDesc) {
    (void)extMem_out;
    (void)memHandleDesc;
    return kErrNotSupported;
}
CU_API cuExternalMemoryGetMappedBuffer(CUdeviceptr* devPtr, CUexternalMemory extMem, const void* bufferDesc) {
    (void)devPtr;
    (void)extMem;
    (void)bufferDesc;
    return kErrNotSupported;
}
CU_API cuDestroyExternalMemory(CUexternalMemory extMem) {
    (void)extMem;
    return kErrNotSupported;
}
