/*
 * driver.cpp: a fake CUDA driver (libcuda.so.1) backed by the SIMT emulator.
 *
 * Linked into one shared library with runtime.cpp and the kernels; cudarc (dynamic-loading)
 * resolves its cu* symbols here and runs its real code path. What it emulates, and how faithfully
 * (kernels/emulator/README.md, "The fake driver", is the user-facing version of this list):
 *   - one device (ordinal 0), sm_90-like attributes, memory pools supported (cudarc then uses
 *     cuMemAllocAsync/cuMemFreeAsync); contexts: the primary one and cuCtxCreate'd ones, each with
 *     its own legacy (NULL) stream; calls that need a context and find none current fail with
 *     CUDA_ERROR_INVALID_CONTEXT;
 *   - device memory is host memory (dk_emu::device_malloc): every copy and memset is checked
 *     against the allocation table; a range outside one allocation, overlapping device-to-device
 *     ranges, zero-byte allocations, double frees and the other documented argument errors fail
 *     like on the device (CUDA_ERROR_INVALID_VALUE, with a message in dkEmuLastError);
 *   - streams are asynchronous: kernel launches, memsets, device-to-device copies, event
 *     records, waits on events, host functions and cuMemFreeAsync are queued per stream and run
 *     in order on the stream's worker thread; copies between device and pageable host memory wait
 *     for the stream's earlier work and finish before they return (from or to pinned memory they
 *     are asynchronous); the legacy stream serialises with every blocking stream of its context;
 *     kernel parameters are copied when the launch is queued. DISTILL_EMU_SYNC=1 runs everything
 *     on the calling thread before the call returns instead (the old behaviour);
 *   - a fault in a kernel (illegal address, assert, trap, barrier divergence, ...) is reported by
 *     the next synchronising call (stream/context/event synchronize or query, a copy to or from
 *     pageable host memory), not by cuLaunchKernel. By default it is reported once, to the host
 *     thread that queued the kernel, and the context stays usable (tests that provoke faults share
 *     one context). DISTILL_EMU_STICKY=1 makes it sticky, as on CUDA: every later call on the
 *     context returns the same error until cuDevicePrimaryCtxReset (primary context), cuCtxDestroy
 *     (others) or the last cuDevicePrimaryCtxRelease;
 *   - modules: the image is read like the driver reads it: a fatbin (its sm_90 cubin, else its
 *     PTX), a cubin, PTX text; cuModuleGetFunction finds only the kernels the image contains
 *     (compiled into this library as well), and takes __launch_bounds__ and register counts from
 *     the cubin. The image "distill-emulator-module" (dkEmuModuleImage) is emulator-only: every
 *     kernel compiled into this library, self-test kernels included;
 *   - launch limits: dkEmuSetKernelLimits gives a kernel its ptxas numbers (registers, static
 *     shared memory); a block larger than the registers or __launch_bounds__ allow fails with
 *     CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES naming the kernel, and cuFuncGetAttribute reports them.
 * Graph capture and external memory are unsupported.
 * Signatures follow cuda.h (CUDA 12.8) as mirrored by cudarc 0.19's sys bindings.
 */
#include "emu_internal.h"

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

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
/* cuda.h's layout: a 4-byte id, padding to 8, and a 64-byte value union. */
struct CUlaunchAttribute {
    int id;
    char pad[4];
    union {
        char bytes[64];
        struct {
            unsigned int x, y, z;
        } clusterDim;
    } value;
};
static_assert(sizeof(CUlaunchAttribute) == 72, "CUlaunchAttribute as in cuda.h");
static constexpr int kLaunchAttributeClusterDimension = 4; /* CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION */
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

/* CUresult values the driver returns beyond emu_internal.h's. */
enum : int {
    kErrInvalidPtx = 218,
    kErrNoBinaryForGpu = 209,
    kErrContextIsDestroyed = 709,
    kErrHostMemoryAlreadyRegistered = 712,
    kErrHostMemoryNotRegistered = 713,
};

/* ------------------------------------------------------------------------------------------ */
/* Configuration                                                                               */
/* ------------------------------------------------------------------------------------------ */

/* Unset: `dflt`; "", "0", "off", "false", "no": false; anything else: true. */
bool env_flag(const char* name, bool dflt) {
    const char* v = getenv(name);
    if (!v) return dflt;
    return !(!*v || !strcmp(v, "0") || !strcmp(v, "off") || !strcmp(v, "false") || !strcmp(v, "no"));
}

struct Config {
    bool sync;   /* DISTILL_EMU_SYNC=1: every call completes its work before returning */
    bool sticky; /* DISTILL_EMU_STICKY=1: kernel faults poison the context, as on CUDA */
};

/* Read once, at the first call that needs it. */
const Config& config() {
    static const Config c{env_flag("DISTILL_EMU_SYNC", false), env_flag("DISTILL_EMU_STICKY", false)};
    return c;
}

/* ------------------------------------------------------------------------------------------ */
/* State                                                                                       */
/* ------------------------------------------------------------------------------------------ */

constexpr unsigned kMagicCtx = 0x43545854;    /* "CTXT" */
constexpr unsigned kMagicStream = 0x5354524d; /* "STRM" */
constexpr unsigned kMagicEvent = 0x45564e54;  /* "EVNT" */
constexpr unsigned kMagicModule = 0x4d4f444c; /* "MODL" */
constexpr unsigned kMagicPool = 0x504f4f4c;   /* "POOL" */
constexpr unsigned kEventBlockingSync = 0x1;
constexpr unsigned kEventDisableTiming = 0x2;
constexpr unsigned kEventInterprocess = 0x4;
constexpr unsigned kStreamNonBlocking = 0x1;
constexpr int kRegistersPerBlock = 65536;
constexpr int kRegisterAllocUnit = 256; /* registers, per warp (sm_90 occupancy calculator) */

/* The emulator-only module image (see dkEmuModuleImage). */
constexpr char kEmulatorModule[] = "distill-emulator-module";

struct Queue;
using QueueRef = std::shared_ptr<Queue>;

struct Ctx {
    unsigned magic = kMagicCtx;
    bool primary = false;
    unsigned flags = 0;
    /* Sticky error (a kernel fault) and its message; 0 while the context is usable. */
    int sticky = 0;
    std::string sticky_msg;
    QueueRef legacy; /* the context's NULL stream, created at first use */
};

/* One unit of stream work. `run` returns a CUresult; an empty `run` is a marker (an event wait). */
struct Dep {
    QueueRef q;
    uint64_t seq;
};
struct Op {
    uint64_t seq = 0;
    std::vector<Dep> deps; /* must have completed before the op runs */
    std::function<int()> run;
    bool always = false; /* runs even when the context has a sticky error (frees, callbacks) */
    std::thread::id origin;
};

/* A stream's FIFO and its worker thread (started at the first queued op). */
struct Queue {
    Ctx* ctx = nullptr;
    bool legacy = false;
    bool nonblocking = false;
    std::deque<Op> ops;
    uint64_t enqueued = 0;  /* seq of the last queued op */
    uint64_t completed = 0; /* seq of the last finished op (ops finish in order) */
    bool worker = false;
    bool closing = false; /* stream destroyed: the worker exits once drained */
    std::condition_variable cv;
};

struct Stream {
    unsigned magic = kMagicStream;
    unsigned flags = 0;
    int priority = 0;
    QueueRef q;
};

/* One cuEventRecord: complete once its queue has run past `seq`. */
struct Record {
    QueueRef q;
    uint64_t seq = 0;
    double t_ms = 0; /* written by the worker before the op completes */
};
struct Event {
    unsigned magic = kMagicEvent;
    unsigned flags = 0;
    Ctx* ctx = nullptr;
    std::shared_ptr<Record> rec; /* the latest record; null if never recorded */
};

/* What a module image contains (see parse_image). */
struct ImageInfo {
    bool all = false;  /* every kernel compiled into the library */
    std::string kind;  /* for messages: "fatbin (sm_90 cubin)", "PTX", ... */
    std::set<std::string> names;
    std::map<std::string, int> bounds; /* __launch_bounds__ / .maxntid: max threads per block */
    std::map<std::string, int> regs;   /* registers per thread (cubin EIATTR_REGCOUNT) */
};
struct Module {
    unsigned magic = kMagicModule;
    Ctx* ctx = nullptr;
    ImageInfo image;
};
struct Pool {
    unsigned magic = kMagicPool;
    unsigned long long release_threshold = 0;
};

struct Allocation {
    size_t size;
    bool managed;
    Ctx* ctx;
};

/* The driver's per-kernel state (KernelEntry is the runtime's; this side table is the driver's). */
struct KernelInfo {
    int regs = -1;         /* registers per thread; -1: unknown (no limit from registers) */
    bool regs_reported = false; /* from dkEmuSetKernelLimits (ptxas), not from an image */
    int static_smem = 0;   /* bytes of static __shared__ memory */
    int image_bound = 0;   /* __launch_bounds__ from the loaded image; 0: none */
    int caller_bound = 0;  /* max_threads_per_block given to dkEmuSetKernelLimits; 0: none */
    bool dyn_set = false;  /* CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES set explicitly */
};

/* A fault waiting to be reported to the host thread that queued the work. */
struct Fault {
    int code = 0;
    std::string msg;
    Ctx* ctx = nullptr;
};

struct State {
    std::mutex mu;
    std::condition_variable done_cv; /* some queued op completed */
    bool initialized = false;
    Ctx primary;
    int primary_refs = 0;
    std::map<uintptr_t, Allocation> allocs; /* device (and managed) allocations by base */
    std::map<uintptr_t, size_t> host_allocs; /* cuMemHostAlloc: pinned */
    std::map<uintptr_t, size_t> host_registered; /* cuMemHostRegister: pinned */
    size_t bytes_in_use = 0;
    std::set<Stream*> streams;
    std::set<Event*> events;
    std::set<Module*> modules;
    std::set<Ctx*> contexts;
    std::vector<QueueRef> queues; /* every queue with a live stream or a running worker */
    Pool default_pool;
    std::set<Pool*> pools;
    std::map<int, size_t> limits;
    int cache_config = 0;
    std::unordered_map<const KernelEntry*, KernelInfo> kernels;
    std::map<std::thread::id, Fault> pending; /* non-sticky faults, by the thread that queued */
    bool nodelete = false;
    State() { primary.primary = true; }
};

State& st() {
    static State* s = new State; /* leaked: cudarc may call in from Drop impls during exit */
    return *s;
}

/* Context stack of the calling thread; the top is the current context. */
constexpr int kCtxStackMax = 32;
thread_local CUcontext t_ctx_stack[kCtxStackMax];
thread_local int t_ctx_depth = 0;

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

void* as_ptr(CUdeviceptr p) { return reinterpret_cast<void*>(static_cast<uintptr_t>(p)); }

/* ------------------------------------------------------------------------------------------ */
/* Contexts (under st().mu)                                                                    */
/* ------------------------------------------------------------------------------------------ */

CUcontext primary_handle() { return reinterpret_cast<CUcontext>(&st().primary); }

bool ctx_alive_locked(CUcontext c) {
    if (!c) return false;
    if (c == primary_handle()) return true;
    return st().contexts.count(reinterpret_cast<Ctx*>(c)) != 0;
}

/* The calling thread's current context, or nullptr (none, or destroyed). */
Ctx* current_ctx_locked() {
    if (t_ctx_depth == 0) return nullptr;
    CUcontext c = t_ctx_stack[t_ctx_depth - 1];
    return ctx_alive_locked(c) ? reinterpret_cast<Ctx*>(c) : nullptr;
}

CUresult no_context(const char* fn) {
    return note_error(kErrInvalidContext, std::string(fn) + ": no current CUDA context on this thread (cuCtxSetCurrent / "
                                                            "cuDevicePrimaryCtxRetain first)");
}

/* The sticky error of `c`, re-reported with its message, or success. */
CUresult gate_locked(const Ctx* c) {
    if (c && c->sticky) return note_error(c->sticky, c->sticky_msg);
    return kSuccess;
}

/* Current context for a call that needs one: INVALID_CONTEXT without, the sticky error if any. */
CUresult need_ctx_locked(const char* fn, Ctx** out) {
    Ctx* c = current_ctx_locked();
    if (!c) return no_context(fn);
    *out = c;
    return gate_locked(c);
}

/* A synchronising call reports the context's sticky error, else a fault of this context that the
 * calling thread queued and has not been told about yet (non-sticky mode), once. */
CUresult report_locked(const Ctx* c) {
    if (c && c->sticky) return note_error(c->sticky, c->sticky_msg);
    auto it = st().pending.find(std::this_thread::get_id());
    if (it == st().pending.end() || (c && it->second.ctx != c)) return kSuccess;
    Fault f = std::move(it->second);
    st().pending.erase(it);
    return note_error(f.code, f.msg);
}

/* Errors that leave a context unusable on CUDA: the kernel faulted while running. */
bool is_sticky_code(int code) {
    switch (code) {
    case 700: /* ILLEGAL_ADDRESS */
    case 702: /* LAUNCH_TIMEOUT (the emulator's watchdog) */
    case 710: /* ASSERT */
    case 714: /* HARDWARE_STACK_ERROR */
    case 715: /* ILLEGAL_INSTRUCTION */
    case 716: /* MISALIGNED_ADDRESS */
    case 717: /* INVALID_ADDRESS_SPACE */
    case 718: /* INVALID_PC */
    case 719: /* LAUNCH_FAILED (trap, barrier or warp divergence here) */
    case 999: /* UNKNOWN (partial warp masks, bad shuffle widths here) */
        return true;
    default:
        return false;
    }
}

void record_fault_locked(Ctx* c, std::thread::id origin, int code, const std::string& msg) {
    if (config().sticky && is_sticky_code(code)) {
        if (!c->sticky) {
            c->sticky = code;
            c->sticky_msg = msg;
        }
        return;
    }
    Fault& f = st().pending[origin];
    if (!f.code) {
        f.code = code;
        f.msg = msg;
        f.ctx = c;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Streams: queues and workers (under st().mu unless noted)                                    */
/* ------------------------------------------------------------------------------------------ */

bool is_special_stream(CUstream s) {
    /* NULL (legacy default), CU_STREAM_LEGACY (0x1), CU_STREAM_PER_THREAD (0x2). */
    return reinterpret_cast<uintptr_t>(s) <= 0x2;
}

QueueRef new_queue_locked(Ctx* c, bool legacy, bool nonblocking) {
    QueueRef q = std::make_shared<Queue>();
    q->ctx = c;
    q->legacy = legacy;
    q->nonblocking = nonblocking;
    st().queues.push_back(q);
    return q;
}

QueueRef legacy_queue_locked(Ctx* c) {
    if (!c->legacy) c->legacy = new_queue_locked(c, true, false);
    return c->legacy;
}

/* The queue behind a stream handle. The special handles (NULL, CU_STREAM_LEGACY and also
 * CU_STREAM_PER_THREAD) are the current context's legacy stream. */
CUresult resolve_locked(const char* fn, CUstream s, QueueRef* out) {
    if (is_special_stream(s)) {
        Ctx* c = current_ctx_locked();
        if (!c) return no_context(fn);
        *out = legacy_queue_locked(c);
        return kSuccess;
    }
    Stream* p = reinterpret_cast<Stream*>(s);
    if (!st().streams.count(p)) {
        return note_error(kErrInvalidHandle, std::string(fn) + ": " + hex(reinterpret_cast<uintptr_t>(s)) +
                                                 " is not a live stream");
    }
    *out = p->q;
    return kSuccess;
}

bool deps_met_locked(const std::vector<Dep>& deps) {
    for (const Dep& d : deps)
        if (d.q->completed < d.seq) return false;
    return true;
}

void erase_queue_locked(const Queue* q) {
    auto& v = st().queues;
    v.erase(std::remove_if(v.begin(), v.end(), [&](const QueueRef& r) { return r.get() == q; }), v.end());
}

/* Worker threads run code of this library: never let dlclose unmap it (as runtime.cpp does). */
void pin_library_locked() {
    if (st().nodelete) return;
    st().nodelete = true;
    Dl_info info;
    if (dladdr(reinterpret_cast<void*>(&pin_library_locked), &info) && info.dli_fname)
        dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}

void worker_main(QueueRef q) {
    std::unique_lock<std::mutex> lk(st().mu);
    for (;;) {
        q->cv.wait(lk, [&] { return !q->ops.empty() || q->closing; });
        if (q->ops.empty()) break; /* closing and drained */
        Op op = std::move(q->ops.front());
        q->ops.pop_front();
        st().done_cv.wait(lk, [&] { return deps_met_locked(op.deps); });
        op.deps.clear();
        const bool skip = q->ctx->sticky != 0 && !op.always;
        int r = 0;
        std::string msg;
        if (op.run && !skip) {
            lk.unlock();
            r = op.run();
            if (r) {
                const char* m = last_error(); /* this worker thread's message for this op */
                msg = m ? m : "kernel failed";
            }
            op.run = nullptr; /* release captured buffers outside the lock */
            lk.lock();
        }
        if (r) record_fault_locked(q->ctx, op.origin, r, msg);
        q->completed = op.seq;
        st().done_cv.notify_all();
    }
    q->worker = false;
    erase_queue_locked(q.get());
}

/* Queues `op` on `q` (async mode). The legacy stream waits for every blocking stream of its
 * context and they wait for it: CUDA's legacy default-stream semantics. */
CUresult enqueue_locked(const QueueRef& q, Op&& op) {
    if (q->legacy) {
        for (const QueueRef& o : st().queues)
            if (o != q && o->ctx == q->ctx && !o->legacy && !o->nonblocking && o->enqueued > o->completed)
                op.deps.push_back(Dep{o, o->enqueued});
    } else if (!q->nonblocking && q->ctx->legacy && q->ctx->legacy->enqueued > q->ctx->legacy->completed) {
        op.deps.push_back(Dep{q->ctx->legacy, q->ctx->legacy->enqueued});
    }
    if (!q->worker) {
        pin_library_locked();
        try {
            std::thread(worker_main, q).detach();
        } catch (...) {
            return note_error(kErrOutOfMemory, "cannot start a stream worker thread");
        }
        q->worker = true;
    }
    op.seq = ++q->enqueued;
    op.origin = std::this_thread::get_id();
    q->ops.push_back(std::move(op));
    q->cv.notify_one();
    return kSuccess;
}

void wait_seq_locked(std::unique_lock<std::mutex>& lk, const QueueRef& q, uint64_t seq) {
    st().done_cv.wait(lk, [&] { return q->completed >= seq; });
}

/* Waits until every queue of `c` (every context if null) has run what was queued so far. */
void drain_locked(std::unique_lock<std::mutex>& lk, const Ctx* c) {
    std::vector<Dep> targets;
    for (const QueueRef& q : st().queues)
        if (!c || q->ctx == c) targets.push_back(Dep{q, q->enqueued});
    st().done_cv.wait(lk, [&] { return deps_met_locked(targets); });
}

/* Runs `op` in stream order on `q`. host_wait: the call returns once the op has run and then
 * reports (like a synchronising call) the context's sticky error or this thread's pending fault.
 * In sync mode (DISTILL_EMU_SYNC=1) the op runs here and now; a launch's fault is returned
 * directly (is_launch) and once more by the next synchronising call, unless this thread launches
 * again successfully first. */
CUresult submit_locked(std::unique_lock<std::mutex>& lk, const QueueRef& q, Op&& op, bool host_wait,
                       bool is_launch = false) {
    if (config().sync) {
        const uint64_t seq = ++q->enqueued;
        int r = 0;
        std::string msg;
        if (op.run) {
            lk.unlock();
            r = op.run();
            if (r) {
                const char* m = last_error();
                msg = m ? m : "kernel failed";
            }
            op.run = nullptr;
            lk.lock();
        }
        q->completed = std::max(q->completed, seq);
        st().done_cv.notify_all();
        if (r) {
            record_fault_locked(q->ctx, std::this_thread::get_id(), r, msg);
            return note_error(r, msg);
        }
        if (is_launch) {
            auto it = st().pending.find(std::this_thread::get_id());
            if (it != st().pending.end() && it->second.ctx == q->ctx) st().pending.erase(it);
        }
        return host_wait ? report_locked(q->ctx) : kSuccess;
    }
    CUresult r = enqueue_locked(q, std::move(op));
    if (r || !host_wait) return r;
    wait_seq_locked(lk, q, q->enqueued);
    return report_locked(q->ctx);
}

/* ------------------------------------------------------------------------------------------ */
/* Memory (under st().mu)                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* The allocation containing [p, p + n), n >= 1. */
bool find_range_locked(uintptr_t p, size_t n, uintptr_t* base, size_t* size) {
    auto& a = st().allocs;
    auto it = a.upper_bound(p);
    if (it == a.begin()) return false;
    --it;
    const uintptr_t b = it->first;
    const size_t s = it->second.size;
    if (p < b || p - b >= s || n > s - (p - b)) return false;
    if (base) *base = b;
    if (size) *size = s;
    return true;
}

/* Whether [p, p + n) touches any device allocation. */
bool touches_device_locked(uintptr_t p, size_t n) {
    auto& a = st().allocs;
    auto it = a.upper_bound(p);
    if (it != a.begin()) {
        auto prev = std::prev(it);
        if (p - prev->first < prev->second.size) return true;
    }
    return it != a.end() && it->first - p < n;
}

bool in_map_locked(const std::map<uintptr_t, size_t>& m, uintptr_t p, size_t n) {
    auto it = m.upper_bound(p);
    if (it == m.begin()) return false;
    --it;
    return p - it->first < it->second && n <= it->second - (p - it->first);
}

/* Page-locked host memory (cuMemHostAlloc, cuMemHostRegister): copies from and to it are
 * asynchronous, like on the device. */
bool is_pinned_locked(const void* p, size_t n) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    return in_map_locked(st().host_allocs, a, n) || in_map_locked(st().host_registered, a, n);
}

/* Checks that [p, p + n) lies inside one device allocation. */
CUresult check_range_locked(const char* fn, const char* which, CUdeviceptr p, size_t n) {
    if (find_range_locked(static_cast<uintptr_t>(p), n, nullptr, nullptr)) return kSuccess;
    return note_error(kErrInvalidValue, std::string(fn) + ": " + which + " range [" + hex(static_cast<uintptr_t>(p)) +
                                            ", +" + std::to_string(n) + " bytes) is not inside one device allocation");
}

CUresult device_alloc(const char* fn, CUdeviceptr* dptr, size_t bytes, bool managed, CUstream stream, bool async) {
    if (!dptr) return note_error(kErrInvalidValue, std::string(fn) + ": dptr is NULL");
    std::unique_lock<std::mutex> lk(st().mu);
    Ctx* c = nullptr;
    CUresult r;
    if (async) {
        QueueRef q;
        r = resolve_locked(fn, stream, &q);
        if (r) return r;
        c = q->ctx;
        r = gate_locked(c);
    } else {
        r = need_ctx_locked(fn, &c);
    }
    if (r) return r;
    if (bytes == 0) {
        return note_error(kErrInvalidValue, std::string(fn) + ": size 0 (the CUDA driver rejects zero-byte allocations "
                                                              "with CUDA_ERROR_INVALID_VALUE)");
    }
    if (bytes > device_total_mem() - std::min(device_total_mem(), st().bytes_in_use)) {
        return note_error(kErrOutOfMemory, std::string(fn) + ": " + std::to_string(bytes) + " bytes do not fit");
    }
    lk.unlock();
    /* dk_emu::device_malloc: 256-byte aligned, 0xFF-filled; in the check build with guard zones. */
    void* p = device_malloc(bytes);
    if (!p) return note_error(kErrOutOfMemory, std::string(fn) + ": out of host memory for " + std::to_string(bytes) + " bytes");
    lk.lock();
    st().allocs[reinterpret_cast<uintptr_t>(p)] = Allocation{bytes, managed, c};
    st().bytes_in_use += bytes;
    *dptr = static_cast<CUdeviceptr>(reinterpret_cast<uintptr_t>(p));
    return kSuccess;
}

/* Removes a live allocation from the table (so a second free fails at once). */
CUresult unlink_alloc_locked(const char* fn, CUdeviceptr dptr, Ctx** ctx) {
    auto it = st().allocs.find(static_cast<uintptr_t>(dptr));
    if (it == st().allocs.end()) {
        return note_error(kErrInvalidValue, std::string(fn) + ": " + hex(static_cast<uintptr_t>(dptr)) +
                                                " is not the start of a live device allocation (freed twice, or "
                                                "never allocated)");
    }
    if (ctx) *ctx = it->second.ctx;
    st().bytes_in_use -= it->second.size;
    st().allocs.erase(it);
    return kSuccess;
}

/* Frees every allocation of `c` (context destroyed or reset). */
void free_ctx_allocs_locked(const Ctx* c) {
    for (auto it = st().allocs.begin(); it != st().allocs.end();) {
        if (it->second.ctx == c) {
            st().bytes_in_use -= it->second.size;
            device_free_memory(reinterpret_cast<void*>(it->first));
            it = st().allocs.erase(it);
        } else {
            ++it;
        }
    }
}

template <class T>
CUresult device_fill(const char* fn, CUdeviceptr dst, T value, size_t n, CUstream stream) {
    std::unique_lock<std::mutex> lk(st().mu);
    QueueRef q;
    CUresult r = resolve_locked(fn, stream, &q);
    if (r) return r;
    r = gate_locked(q->ctx);
    if (r || n == 0) return r;
    if (n > SIZE_MAX / sizeof(T)) return note_error(kErrInvalidValue, std::string(fn) + ": count overflows");
    if (dst % sizeof(T) != 0) {
        return note_error(kErrInvalidValue, std::string(fn) + ": destination " + hex(static_cast<uintptr_t>(dst)) +
                                                " is not aligned to " + std::to_string(sizeof(T)) + " bytes");
    }
    r = check_range_locked(fn, "destination", dst, n * sizeof(T));
    if (r) return r;
    Op op;
    op.run = [dst, value, n]() {
        T* p = static_cast<T*>(as_ptr(dst));
        if (sizeof(T) == 1) {
            std::memset(p, static_cast<int>(value), n);
        } else {
            for (size_t i = 0; i < n; ++i) p[i] = value;
        }
        note_host_write(p, n * sizeof(T));
        return 0;
    };
    return submit_locked(lk, q, std::move(op), false);
}

enum class Dir { HtoD, DtoH, DtoD, HtoH };

/* One copy in stream order. Device-to-device copies are asynchronous; copies between device and
 * pageable host memory run in stream order and return once done; with pinned host memory the
 * asynchronous variants (`async`) return at once. */
CUresult do_copy(const char* fn, Dir dir, void* dst, const void* src, size_t n, CUstream stream, bool async) {
    std::unique_lock<std::mutex> lk(st().mu);
    QueueRef q;
    CUresult r = resolve_locked(fn, stream, &q);
    if (r) return r;
    r = gate_locked(q->ctx);
    if (r || n == 0) return r;
    const uintptr_t d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
    if (!dst || !src) return note_error(kErrInvalidValue, std::string(fn) + ": NULL " + (dst ? "source" : "destination"));
    if (dir == Dir::HtoD || dir == Dir::DtoD) {
        r = check_range_locked(fn, "destination", d, n);
        if (r) return r;
    }
    if (dir == Dir::DtoH || dir == Dir::DtoD) {
        r = check_range_locked(fn, "source", s, n);
        if (r) return r;
    }
    if (d < s + n && s < d + n) {
        return note_error(kErrInvalidValue, std::string(fn) + ": source [" + hex(s) + ", +" + std::to_string(n) +
                                                ") and destination [" + hex(d) + ", +" + std::to_string(n) +
                                                ") overlap (undefined on the device)");
    }
    bool host_wait = true;
    if (dir == Dir::DtoD) host_wait = false;
    if (async && dir == Dir::HtoD && is_pinned_locked(src, n)) host_wait = false;
    if (async && dir == Dir::DtoH && is_pinned_locked(dst, n)) host_wait = false;
    Op op;
    op.run = [dir, dst, src, n]() {
        std::memcpy(dst, src, n);
        if (dir == Dir::HtoD) note_host_write(dst, n);
        if (dir == Dir::DtoD) note_device_copy(dst, src, n);
        if (dir == Dir::DtoH) {
            const std::string bad = note_host_read(src, n);
            if (!bad.empty()) {
                report_finding(bad);
                return note_error(kErrLaunchFailed, bad);
            }
        }
        return 0;
    };
    return submit_locked(lk, q, std::move(op), host_wait);
}

/* cuMemcpy / cuMemcpyAsync (unified addressing): the direction comes from the allocation table. */
CUresult copy_unified(const char* fn, CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream stream, bool async) {
    Dir dir;
    {
        std::lock_guard<std::mutex> g(st().mu);
        if (n == 0) {
            dir = Dir::HtoH;
        } else {
            const bool dd = find_range_locked(static_cast<uintptr_t>(dst), n, nullptr, nullptr);
            const bool sd = find_range_locked(static_cast<uintptr_t>(src), n, nullptr, nullptr);
            if ((!dd && touches_device_locked(static_cast<uintptr_t>(dst), n)) ||
                (!sd && touches_device_locked(static_cast<uintptr_t>(src), n))) {
                return note_error(kErrInvalidValue, std::string(fn) + ": a range crosses the end of a device allocation");
            }
            dir = dd ? (sd ? Dir::DtoD : Dir::HtoD) : (sd ? Dir::DtoH : Dir::HtoH);
        }
    }
    return do_copy(fn, dir, as_ptr(dst), as_ptr(src), n, stream, async);
}

/* ------------------------------------------------------------------------------------------ */
/* Kernels: launch limits                                                                      */
/* ------------------------------------------------------------------------------------------ */

KernelEntry* as_kernel(CUfunction f) { return reinterpret_cast<KernelEntry*>(f); }

/* Threads per block the registers allow: registers are allocated per warp in units of 256, at
 * most 65536 per block (sm_90, as the CUDA occupancy calculator counts). */
int threads_for_registers(int regs) {
    if (regs <= 0) return kMaxThreadsPerBlock;
    const int per_warp = (regs * 32 + kRegisterAllocUnit - 1) / kRegisterAllocUnit * kRegisterAllocUnit;
    return std::min(kMaxThreadsPerBlock, kRegistersPerBlock / per_warp * 32);
}

int max_threads(const KernelInfo& k) {
    int m = std::min(kMaxThreadsPerBlock, threads_for_registers(k.regs));
    if (k.image_bound > 0) m = std::min(m, k.image_bound);
    if (k.caller_bound > 0) m = std::min(m, k.caller_bound);
    return m;
}

/* The side-table entry of a function handle the driver handed out, or nullptr. */
KernelInfo* kernel_info_locked(CUfunction f) {
    if (!f) return nullptr;
    auto it = st().kernels.find(as_kernel(f));
    return it == st().kernels.end() ? nullptr : &it->second;
}

CUresult bad_function(const char* fn, CUfunction f) {
    return note_error(kErrInvalidHandle, std::string(fn) + ": " + hex(reinterpret_cast<uintptr_t>(f)) +
                                             " is not a function handle from cuModuleGetFunction");
}

int occupancy_blocks(const KernelInfo* k, int block_size, size_t dyn_smem) {
    const int limit = k ? max_threads(*k) : kMaxThreadsPerBlock;
    if (block_size <= 0 || block_size > limit) return 0;
    const int warps = (block_size + 31) / 32;
    int blocks = std::min(32, 64 / warps); /* 2048 threads per SM */
    const size_t smem_per_block = dyn_smem + (k ? static_cast<size_t>(k->static_smem) : 0) + 1024; /* + reserved */
    blocks = std::min<int>(blocks, static_cast<int>(233472 / smem_per_block));
    if (k && k->regs > 0) {
        const int per_warp = (k->regs * 32 + kRegisterAllocUnit - 1) / kRegisterAllocUnit * kRegisterAllocUnit;
        blocks = std::min(blocks, kRegistersPerBlock / (per_warp * warps));
    }
    return blocks;
}

/* ------------------------------------------------------------------------------------------ */
/* Module images: fatbin, cubin (ELF), PTX text, the emulator-only marker                      */
/* ------------------------------------------------------------------------------------------ */

constexpr uint32_t kFatbinMagic = 0xBA55ED50u;        /* fatbin container */
constexpr uint32_t kFatbinWrapperMagic = 0x466243B1u; /* __fatBinC_Wrapper_t { magic, version, data, ... } */
constexpr int kDeviceArch = 90;
constexpr uint16_t kEmCuda = 190;
/* .nv.info attribute records: u8 format, u8 attribute, then a 2-byte value or a u16 size + data. */
constexpr unsigned kEifmtSval = 4;
constexpr unsigned kEiattrMaxThreads = 0x05; /* __launch_bounds__: u32 x, y, z */
constexpr unsigned kEiattrRegcount = 0x2f;   /* u32 symbol index, u32 registers */

/* A bounded view of image bytes: reads past the end fail instead of running off. */
struct Bytes {
    const unsigned char* p;
    size_t n;
    bool has(size_t off, size_t len) const { return off <= n && len <= n - off; }
    uint16_t u16(size_t o) const {
        uint16_t v;
        std::memcpy(&v, p + o, 2);
        return v;
    }
    uint32_t u32(size_t o) const {
        uint32_t v;
        std::memcpy(&v, p + o, 4);
        return v;
    }
    uint64_t u64(size_t o) const {
        uint64_t v;
        std::memcpy(&v, p + o, 8);
        return v;
    }
};

struct ImageError {
    int code;
    std::string msg;
};

/* The NUL-terminated string at `off` inside `b`, or "" when it runs off the end. */
std::string cstr_at(const Bytes& b, size_t off) {
    if (off >= b.n) return "";
    const void* z = std::memchr(b.p + off, 0, b.n - off);
    if (!z) return "";
    return std::string(reinterpret_cast<const char*>(b.p + off), static_cast<const unsigned char*>(z) - (b.p + off));
}

/* The size an ELF image spans according to its headers (a cubin handed over without a length). */
size_t elf_extent(const unsigned char* p) {
    Bytes h{p, 64};
    const uint64_t shoff = h.u64(40);
    const uint16_t shentsize = h.u16(58), shnum = h.u16(60);
    if (shentsize < 64 || shoff > (1ull << 40)) return 0;
    size_t end = static_cast<size_t>(shoff) + static_cast<size_t>(shentsize) * shnum;
    for (unsigned i = 0; i < shnum; ++i) {
        Bytes s{p + shoff + static_cast<size_t>(i) * shentsize, 64};
        const uint32_t type = s.u32(4);
        const uint64_t off = s.u64(24), size = s.u64(32);
        if (type == 8 /* SHT_NOBITS */ || off > (1ull << 40) || size > (1ull << 40)) continue;
        end = std::max<size_t>(end, static_cast<size_t>(off + size));
    }
    return end;
}

/* Kernels of a CUDA cubin: entry functions (STT_FUNC with STO_CUDA_ENTRY 0x10) of the symbol
 * table, their __launch_bounds__ (.nv.info.<name>, EIATTR_MAX_THREADS) and register counts
 * (.nv.info, EIATTR_REGCOUNT). */
bool parse_cubin(const Bytes& b, ImageInfo* out, ImageError* err) {
    auto bad = [&](const std::string& why) {
        *err = ImageError{kErrInvalidImage, "cubin: " + why};
        return false;
    };
    if (!b.has(0, 64) || b.p[4] != 2 || b.p[5] != 1) return bad("not a 64-bit little-endian ELF file");
    if (b.u16(18) != kEmCuda) return bad("ELF machine " + std::to_string(b.u16(18)) + " is not EM_CUDA (190)");
    const uint64_t shoff = b.u64(40);
    const uint16_t shentsize = b.u16(58), shnum = b.u16(60), shstrndx = b.u16(62);
    if (shentsize < 64 || shstrndx >= shnum || !b.has(shoff, static_cast<size_t>(shentsize) * shnum))
        return bad("section headers out of range");
    struct Sec {
        std::string name;
        uint32_t type, link;
        uint64_t off, size, entsize;
    };
    std::vector<Sec> secs(shnum);
    for (unsigned i = 0; i < shnum; ++i) {
        const size_t h = shoff + static_cast<size_t>(i) * shentsize;
        secs[i] = Sec{"", b.u32(h + 4), b.u32(h + 40), b.u64(h + 24), b.u64(h + 32), b.u64(h + 56)};
        if (secs[i].type != 8 && !b.has(secs[i].off, secs[i].size)) return bad("section " + std::to_string(i) + " out of range");
    }
    const Sec& shstr = secs[shstrndx];
    for (unsigned i = 0; i < shnum; ++i) {
        const size_t h = shoff + static_cast<size_t>(i) * shentsize;
        const uint32_t name = b.u32(h);
        if (name < shstr.size) secs[i].name = cstr_at(Bytes{b.p + shstr.off, static_cast<size_t>(shstr.size)}, name);
    }
    std::vector<std::string> symbols; /* by index */
    for (const Sec& s : secs) {
        if (s.type != 2 /* SHT_SYMTAB */ || s.link >= shnum) continue;
        const Sec& strs = secs[s.link];
        const Bytes names{b.p + strs.off, static_cast<size_t>(strs.size)};
        const size_t count = s.size / 24;
        symbols.assign(count, "");
        for (size_t j = 0; j < count; ++j) {
            const size_t e = s.off + j * 24;
            symbols[j] = cstr_at(names, b.u32(e));
            const unsigned type = b.p[e + 4] & 0xf, other = b.p[e + 5];
            if (type == 2 /* STT_FUNC */ && (other & 0x10) && !symbols[j].empty()) out->names.insert(symbols[j]);
        }
    }
    /* .nv.info sections: records of (format, attribute, value). */
    for (const Sec& s : secs) {
        if (s.name.compare(0, 8, ".nv.info") != 0 || s.type == 8) continue;
        const bool global = s.name == ".nv.info";
        if (!global && s.name.compare(0, 9, ".nv.info.") != 0) continue;
        const std::string fn = global ? "" : s.name.substr(9);
        size_t o = s.off;
        const size_t end = s.off + s.size;
        while (o + 4 <= end) {
            const unsigned fmt = b.p[o], attr = b.p[o + 1];
            if (fmt != kEifmtSval) { /* NVAL, BVAL, HVAL: 4 bytes in all */
                if (fmt < 1 || fmt > 3) break;
                o += 4;
                continue;
            }
            const size_t len = b.u16(o + 2);
            if (o + 4 + len > end) break;
            if (!global && attr == kEiattrMaxThreads && len >= 12) {
                const uint64_t t = 1ull * b.u32(o + 4) * b.u32(o + 8) * b.u32(o + 12);
                if (t > 0) out->bounds[fn] = static_cast<int>(std::min<uint64_t>(t, 1u << 30));
            } else if (global && attr == kEiattrRegcount && len >= 8) {
                const uint32_t sym = b.u32(o + 4), regs = b.u32(o + 8);
                if (sym < symbols.size() && regs <= 255) out->regs[symbols[sym]] = static_cast<int>(regs);
            }
            o += 4 + len;
        }
    }
    return true;
}

/* The value of `.directive a, b, c` in [from, to) of PTX text: the product of the numbers. */
int ptx_dims(const std::string& t, size_t from, size_t to, const char* directive) {
    const size_t at = t.find(directive, from);
    if (at == std::string::npos || at >= to) return 0;
    size_t i = at + std::strlen(directive);
    long long prod = 1;
    int count = 0;
    while (i < to && count < 3) {
        while (i < to && (t[i] == ' ' || t[i] == '\t' || t[i] == ',')) ++i;
        if (i >= to || t[i] < '0' || t[i] > '9') break;
        long long v = 0;
        while (i < to && t[i] >= '0' && t[i] <= '9' && v < (1 << 30)) v = v * 10 + (t[i++] - '0');
        prod *= std::max(1ll, v);
        ++count;
        if (prod > (1 << 30)) prod = 1 << 30;
    }
    return count ? static_cast<int>(prod) : 0;
}

bool is_ident(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '$' || c == '.';
}

/* Kernels of PTX text: `.entry name` (with `.maxntid` / `.reqntid` before its body). */
bool parse_ptx(const std::string& t, ImageInfo* out, ImageError* err) {
    if (t.find(".version") == std::string::npos || t.find(".target") == std::string::npos) {
        std::string head = t.substr(0, 40);
        for (char& c : head)
            if (c == '\n' || c == '\r') c = ' ';
        *err = ImageError{kErrInvalidPtx, "the image is text but not PTX (no .version/.target): \"" + head +
                                              "\"; an emulator-only module is the image \"" + kEmulatorModule + "\""};
        return false;
    }
    const size_t tg = t.find(".target");
    size_t i = tg + 7;
    while (i < t.size() && (t[i] == ' ' || t[i] == '\t')) ++i;
    if (t.compare(i, 3, "sm_") == 0 || t.compare(i, 8, "compute_") == 0) {
        i += t[i] == 's' ? 3 : 8;
        int arch = 0;
        while (i < t.size() && t[i] >= '0' && t[i] <= '9' && arch < 10000) arch = arch * 10 + (t[i++] - '0');
        if (arch > kDeviceArch) {
            *err = ImageError{kErrInvalidPtx, "PTX for .target sm_" + std::to_string(arch) +
                                                  " cannot be compiled for this sm_90 device"};
            return false;
        }
    }
    for (size_t at = t.find(".entry"); at != std::string::npos; at = t.find(".entry", at + 6)) {
        if (at > 0 && is_ident(t[at - 1])) continue;
        size_t j = at + 6;
        if (j >= t.size() || (t[j] != ' ' && t[j] != '\t')) continue;
        while (j < t.size() && (t[j] == ' ' || t[j] == '\t')) ++j;
        size_t k = j;
        while (k < t.size() && is_ident(t[k])) ++k;
        if (k == j) continue;
        const std::string name = t.substr(j, k - j);
        out->names.insert(name);
        size_t body = t.find('{', k);
        if (body == std::string::npos) body = t.size();
        int bound = ptx_dims(t, k, body, ".maxntid");
        const int req = ptx_dims(t, k, body, ".reqntid");
        if (req > 0 && (bound == 0 || req < bound)) bound = req;
        if (bound > 0) out->bounds[name] = bound;
    }
    out->kind = "PTX";
    return true;
}

/* Whether the first bytes of `p` are ASCII text (PTX), not compressed data. */
bool looks_like_text(const unsigned char* p, size_t n) {
    if (n == 0 || p[0] == 0) return false;
    for (size_t i = 0; i < std::min<size_t>(n, 64) && p[i]; ++i)
        if (!(p[i] == '\t' || p[i] == '\n' || p[i] == '\r' || (p[i] >= 0x20 && p[i] < 0x7f))) return false;
    return true;
}

/* A fatbin container: the device runs its sm_90 cubin if there is one, else JIT-compiles its
 * PTX (for compute_90 or older). Cubins for other architectures cannot run on sm_90. */
bool parse_fatbin(const Bytes& head, ImageInfo* out, ImageError* err) {
    const size_t hsize = head.u16(6);
    const uint64_t fat = head.u64(8);
    if (hsize < 16 || fat > (1ull << 40)) {
        *err = ImageError{kErrInvalidImage, "fatbin: bad header"};
        return false;
    }
    const Bytes b{head.p, hsize + static_cast<size_t>(fat)};
    const unsigned char* cubin = nullptr;
    size_t cubin_size = 0;
    const unsigned char* ptx = nullptr;
    size_t ptx_size = 0;
    int ptx_arch = -1;
    bool unreadable = false; /* an entry that could run here is compressed */
    std::string archs;
    for (size_t o = hsize; o + 32 <= b.n;) {
        const unsigned kind = b.u16(o);
        const size_t eh = b.u32(o + 4);
        const uint64_t payload = b.u64(o + 8);
        if (eh < 32 || !b.has(o, eh) || payload > b.n || !b.has(o + eh, static_cast<size_t>(payload))) {
            *err = ImageError{kErrInvalidImage, "fatbin: entry at offset " + std::to_string(o) + " out of range"};
            return false;
        }
        const int arch = static_cast<int>(b.u32(o + 28));
        const unsigned char* data = b.p + o + eh;
        const size_t size = static_cast<size_t>(payload);
        archs += (archs.empty() ? "" : ", ") + std::string(kind == 1 ? "compute_" : "sm_") + std::to_string(arch);
        if (kind == 2 && arch == kDeviceArch) {
            if (size >= 4 && !std::memcmp(data, "\x7f" "ELF", 4)) {
                cubin = data;
                cubin_size = size;
            } else {
                unreadable = true;
            }
        } else if (kind == 1 && arch <= kDeviceArch && arch > ptx_arch) {
            if (looks_like_text(data, size)) {
                ptx = data;
                ptx_size = size;
                ptx_arch = arch;
            } else {
                unreadable = true;
            }
        }
        o += eh + size;
    }
    if (cubin) {
        if (!parse_cubin(Bytes{cubin, cubin_size}, out, err)) return false;
        out->kind = "fatbin (sm_90 cubin)";
        return true;
    }
    if (ptx) {
        const char* text = reinterpret_cast<const char*>(ptx);
        if (!parse_ptx(std::string(text, strnlen(text, ptx_size)), out, err)) return false;
        out->kind = "fatbin (PTX)";
        return true;
    }
    if (unreadable) {
        /* Compressed code for this device: the driver would use it, the emulator cannot read it. */
        out->all = true;
        out->kind = "fatbin (compressed; kernel names not checked)";
        return true;
    }
    *err = ImageError{kErrNoBinaryForGpu, "fatbin has no code for sm_90 (it contains " + (archs.empty() ? "nothing" : archs) +
                                              "): no kernel image is available for execution on the device"};
    return false;
}

/* Reads an image the way cuModuleLoadData gets it: a pointer without a length. */
bool parse_image(const void* image, ImageInfo* out, ImageError* err) {
    const unsigned char* p = static_cast<const unsigned char*>(image);
    uint32_t magic;
    std::memcpy(&magic, p, 4);
    if (magic == kFatbinWrapperMagic) {
        const void* data;
        std::memcpy(&data, p + 8, sizeof data);
        if (!data) {
            *err = ImageError{kErrInvalidImage, "fatbin wrapper without data"};
            return false;
        }
        return parse_image(data, out, err);
    }
    if (magic == kFatbinMagic) return parse_fatbin(Bytes{p, 16}, out, err);
    if (!std::memcmp(p, "\x7f" "ELF", 4)) {
        const size_t n = elf_extent(p);
        if (!n) {
            *err = ImageError{kErrInvalidImage, "cubin: bad section headers"};
            return false;
        }
        const Bytes b{p, n};
        const uint32_t flags = b.u32(48);
        const int arch_hi = static_cast<int>((flags >> 8) & 0xff), arch_lo = static_cast<int>(flags & 0xff);
        if (b.u16(18) == kEmCuda && arch_hi != kDeviceArch && arch_lo != kDeviceArch) {
            *err = ImageError{kErrNoBinaryForGpu, "cubin for sm_" + std::to_string(arch_hi ? arch_hi : arch_lo) +
                                                      " cannot run on this sm_90 device"};
            return false;
        }
        if (!parse_cubin(b, out, err)) return false;
        out->kind = "cubin";
        return true;
    }
    const size_t marker = sizeof kEmulatorModule - 1;
    if (!std::strncmp(reinterpret_cast<const char*>(p), kEmulatorModule, marker) && (p[marker] == 0 || p[marker] == '\n')) {
        out->all = true;
        out->kind = "emulator-only module";
        return true;
    }
    const unsigned char c = p[0];
    if (c == '\t' || c == '\n' || c == '\r' || (c >= 0x20 && c < 0x7f)) {
        return parse_ptx(std::string(reinterpret_cast<const char*>(p)), out, err);
    }
    char b[16];
    snprintf(b, sizeof b, "0x%08x", magic);
    *err = ImageError{kErrInvalidImage, std::string("not a fatbin, cubin or PTX image (starts with ") + b + ")"};
    return false;
}

}  // namespace

/* A finding of the checks (or the host-side initcheck of a copy): printed, since a test may
 * swallow the error text. DISTILL_EMU_HALT_ON_ERROR=1 then ends the process with status 66, as
 * ASan's halt_on_error does: a run that only asks whether the checks find anything (the mutation
 * proof) stops at the first finding instead of running every later test. */
void dk_emu::report_finding(const std::string& msg) {
    fprintf(stderr, "distill emulator: %s\n", msg.c_str());
    if (env_flag("DISTILL_EMU_HALT_ON_ERROR", false)) {
        fprintf(stderr, "distill emulator: halting at the first finding (DISTILL_EMU_HALT_ON_ERROR)\n");
        fflush(stderr);
        _exit(66);
    }
}

namespace {
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
    {712, "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED", "part or all of the requested memory range is already mapped"},
    {713, "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED", "pointer does not correspond to a registered memory region"},
    {714, "CUDA_ERROR_HARDWARE_STACK_ERROR", "hardware stack error"},
    {715, "CUDA_ERROR_ILLEGAL_INSTRUCTION", "an illegal instruction was encountered"},
    {716, "CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address"},
    {717, "CUDA_ERROR_INVALID_ADDRESS_SPACE", "operation not supported on global/shared address space"},
    {718, "CUDA_ERROR_INVALID_PC", "invalid program counter"},
    {719, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {720, "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE", "too many blocks in cooperative launch"},
    {800, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {900, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", "operation not permitted when stream is capturing"},
    {912, "CUDA_ERROR_INVALID_CLUSTER_SIZE", "invalid cluster size"},
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

/* Waits for the context's work, then forgets its sticky error and the faults still waiting to
 * be reported for it: what destroying (or resetting) a context does to its error state. */
static void clear_errors_locked(std::unique_lock<std::mutex>& lk, Ctx* c) {
    drain_locked(lk, c);
    c->sticky = 0;
    c->sticky_msg.clear();
    for (auto it = st().pending.begin(); it != st().pending.end();) {
        if (it->second.ctx == c) {
            it = st().pending.erase(it);
        } else {
            ++it;
        }
    }
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

/* The last release destroys the primary context on CUDA: its error state goes with it (its
 * allocations are kept here; nothing can use them through a destroyed context anyway). */
CU_API cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    if (dev != 0) return kErrInvalidDevice;
    std::unique_lock<std::mutex> lk(st().mu);
    if (st().primary_refs <= 0) return kErrInvalidContext;
    if (--st().primary_refs == 0) clear_errors_locked(lk, &st().primary);
    return kSuccess;
}
CU_API cuDevicePrimaryCtxRelease(CUdevice dev) { return cuDevicePrimaryCtxRelease_v2(dev); }

/* As on CUDA: waits for the primary context's work, frees all its allocations and clears its
 * sticky error. Unlike CUDA, its streams, events and modules stay valid. */
CU_API cuDevicePrimaryCtxReset_v2(CUdevice dev) {
    if (dev != 0) return kErrInvalidDevice;
    std::unique_lock<std::mutex> lk(st().mu);
    clear_errors_locked(lk, &st().primary);
    free_ctx_allocs_locked(&st().primary);
    return kSuccess;
}
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

static bool valid_ctx(CUcontext c) {
    std::lock_guard<std::mutex> g(st().mu);
    return ctx_alive_locked(c);
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

/* Waits for the context's work, then frees what belongs to it: allocations, streams, events,
 * modules, its error state. The Ctx object itself is kept (handles to it stay recognisably dead). */
CU_API cuCtxDestroy_v2(CUcontext ctx) {
    if (!ctx) return kErrInvalidValue;
    if (ctx == primary_handle()) return kErrInvalidContext;
    Ctx* c = reinterpret_cast<Ctx*>(ctx);
    std::vector<Stream*> streams;
    std::vector<Event*> events;
    std::vector<Module*> modules;
    {
        std::unique_lock<std::mutex> lk(st().mu);
        if (!st().contexts.count(c)) return kErrInvalidContext;
        clear_errors_locked(lk, c);
        if (!st().contexts.erase(c)) return kErrInvalidContext; /* destroyed meanwhile */
        for (Stream* s : st().streams)
            if (s->q->ctx == c) streams.push_back(s);
        for (Event* e : st().events)
            if (e->ctx == c) events.push_back(e);
        for (Module* m : st().modules)
            if (m->ctx == c) modules.push_back(m);
        for (Stream* s : streams) st().streams.erase(s);
        for (Event* e : events) st().events.erase(e);
        for (Module* m : modules) st().modules.erase(m);
        for (const QueueRef& q : st().queues) {
            if (q->ctx != c) continue;
            q->closing = true;
            q->cv.notify_all();
        }
        /* Queues without a worker are not needed any more; workers remove theirs on exit. */
        auto& v = st().queues;
        v.erase(std::remove_if(v.begin(), v.end(), [&](const QueueRef& q) { return q->ctx == c && !q->worker; }), v.end());
        c->legacy.reset();
        free_ctx_allocs_locked(c);
        c->magic = 0;
    }
    for (Stream* s : streams) delete s;
    for (Event* e : events) delete e;
    for (Module* m : modules) delete m;
    /* Drop it from this thread's stack if it is there. */
    int j = 0;
    for (int i = 0; i < t_ctx_depth; ++i)
        if (t_ctx_stack[i] != ctx) t_ctx_stack[j++] = t_ctx_stack[i];
    t_ctx_depth = j;
    return kSuccess;
}
CU_API cuCtxDestroy(CUcontext ctx) { return cuCtxDestroy_v2(ctx); }

CU_API cuCtxGetDevice(CUdevice* device) {
    if (!device) return kErrInvalidValue;
    std::lock_guard<std::mutex> g(st().mu);
    if (!current_ctx_locked()) return kErrInvalidContext;
    *device = 0;
    return kSuccess;
}

/* Waits for all work of the current context; reports its sticky error, or a fault of work this
 * thread queued (non-sticky mode). */
CU_API cuCtxSynchronize() {
    std::unique_lock<std::mutex> lk(st().mu);
    Ctx* c = nullptr;
    CUresult r = need_ctx_locked("cuCtxSynchronize", &c);
    if (r) return r;
    drain_locked(lk, c);
    return report_locked(c);
}

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
    if (config < 0 || config > 3) return kErrInvalidValue;
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

CU_API cuMemAlloc_v2(CUdeviceptr* dptr, size_t bytesize) {
    return device_alloc("cuMemAlloc", dptr, bytesize, false, nullptr, false);
}
CU_API cuMemAllocAsync(CUdeviceptr* dptr, size_t bytesize, CUstream hStream) {
    return device_alloc("cuMemAllocAsync", dptr, bytesize, false, hStream, true);
}
CU_API cuMemAllocFromPoolAsync(CUdeviceptr* dptr, size_t bytesize, CUmemoryPool pool, CUstream hStream) {
    {
        std::lock_guard<std::mutex> g(st().mu);
        Pool* p = reinterpret_cast<Pool*>(pool);
        if (!pool || (p != &st().default_pool && !st().pools.count(p)))
            return note_error(kErrInvalidValue, "cuMemAllocFromPoolAsync: not a memory pool");
    }
    return device_alloc("cuMemAllocFromPoolAsync", dptr, bytesize, false, hStream, true);
}
/* flags: CU_MEM_ATTACH_GLOBAL (1) or CU_MEM_ATTACH_HOST (2). */
CU_API cuMemAllocManaged(CUdeviceptr* dptr, size_t bytesize, unsigned int flags) {
    if (flags != 1 && flags != 2) {
        return note_error(kErrInvalidValue, "cuMemAllocManaged: flags must be CU_MEM_ATTACH_GLOBAL or CU_MEM_ATTACH_HOST");
    }
    return device_alloc("cuMemAllocManaged", dptr, bytesize, true, nullptr, false);
}
CU_API cuMemAllocPitch_v2(CUdeviceptr* dptr, size_t* pPitch, size_t widthBytes, size_t height, unsigned int elemSize) {
    if (!pPitch) return kErrInvalidValue;
    if (elemSize != 4 && elemSize != 8 && elemSize != 16)
        return note_error(kErrInvalidValue, "cuMemAllocPitch: ElementSizeBytes must be 4, 8 or 16");
    if (widthBytes > (SIZE_MAX >> 1) || (height && (widthBytes + 511) / 512 * 512 > SIZE_MAX / height))
        return kErrInvalidValue;
    const size_t pitch = (widthBytes + 511) / 512 * 512;
    CUresult r = device_alloc("cuMemAllocPitch", dptr, pitch * height, false, nullptr, false);
    if (r == kSuccess) *pPitch = pitch;
    return r;
}

/* Synchronous free: like cudaFree, it waits for the device's work before the memory goes. */
CU_API cuMemFree_v2(CUdeviceptr dptr) {
    if (dptr == 0) return kSuccess;
    std::unique_lock<std::mutex> lk(st().mu);
    Ctx* c = nullptr;
    CUresult r = unlink_alloc_locked("cuMemFree", dptr, &c);
    if (r) return r;
    drain_locked(lk, nullptr);
    device_free_memory(as_ptr(dptr));
    return gate_locked(c);
}

/* Stream-ordered: the memory is released when the stream gets there (work queued before it may
 * still use it); the pointer is invalid for new work at once. */
CU_API cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream) {
    std::unique_lock<std::mutex> lk(st().mu);
    QueueRef q;
    CUresult r = resolve_locked("cuMemFreeAsync", hStream, &q);
    if (r) return r;
    if (dptr == 0) return gate_locked(q->ctx);
    r = unlink_alloc_locked("cuMemFreeAsync", dptr, nullptr);
    if (r) return r;
    Op op;
    op.always = true;
    op.run = [dptr]() {
        device_free_memory(as_ptr(dptr));
        return 0;
    };
    const CUresult sticky = q->ctx->sticky;
    r = submit_locked(lk, q, std::move(op), false);
    return r ? r : (sticky ? gate_locked(q->ctx) : kSuccess);
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

/* Pinned host memory: flags CU_MEMHOSTALLOC_PORTABLE 1, DEVICEMAP 2, WRITECOMBINED 4. */
CU_API cuMemHostAlloc(void** pp, size_t bytesize, unsigned int flags) {
    if (!pp) return kErrInvalidValue;
    if (flags & ~7u) return note_error(kErrInvalidValue, "cuMemHostAlloc: unknown flags");
    void* p = nullptr;
    if (posix_memalign(&p, 4096, bytesize ? bytesize : 1) != 0) return kErrOutOfMemory;
    std::lock_guard<std::mutex> g(st().mu);
    st().host_allocs[reinterpret_cast<uintptr_t>(p)] = bytesize ? bytesize : 1;
    *pp = p;
    return kSuccess;
}
CU_API cuMemAllocHost_v2(void** pp, size_t bytesize) { return cuMemHostAlloc(pp, bytesize, 0); }
CU_API cuMemFreeHost(void* p) {
    {
        std::lock_guard<std::mutex> g(st().mu);
        if (!st().host_allocs.erase(reinterpret_cast<uintptr_t>(p))) {
            return note_error(kErrInvalidValue, "cuMemFreeHost: " + hex(reinterpret_cast<uintptr_t>(p)) +
                                                    " is not from cuMemHostAlloc (or freed twice)");
        }
    }
    free(p);
    return kSuccess;
}
CU_API cuMemHostGetDevicePointer_v2(CUdeviceptr* pdptr, void* p, unsigned int flags) {
    if (!pdptr || flags != 0) return kErrInvalidValue;
    *pdptr = reinterpret_cast<uintptr_t>(p);
    return kSuccess;
}
CU_API cuMemHostRegister_v2(void* p, size_t bytesize, unsigned int flags) {
    if (!p || bytesize == 0 || (flags & ~0xfu)) return kErrInvalidValue;
    std::lock_guard<std::mutex> g(st().mu);
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto& m = st().host_registered;
    auto it = m.lower_bound(a);
    if ((it != m.end() && it->first - a < bytesize) ||
        (it != m.begin() && a - std::prev(it)->first < std::prev(it)->second)) {
        return note_error(kErrHostMemoryAlreadyRegistered, "cuMemHostRegister: the range is already registered");
    }
    m[a] = bytesize;
    return kSuccess;
}
CU_API cuMemHostUnregister(void* p) {
    std::lock_guard<std::mutex> g(st().mu);
    if (!st().host_registered.erase(reinterpret_cast<uintptr_t>(p))) {
        return note_error(kErrHostMemoryNotRegistered, "cuMemHostUnregister: " + hex(reinterpret_cast<uintptr_t>(p)) +
                                                           " is not the start of a registered range");
    }
    return kSuccess;
}

CU_API cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    return do_copy("cuMemcpyHtoD", Dir::HtoD, as_ptr(dst), src, n, nullptr, false);
}
CU_API cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    return do_copy("cuMemcpyHtoDAsync", Dir::HtoD, as_ptr(dst), src, n, s, true);
}
CU_API cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    return do_copy("cuMemcpyDtoH", Dir::DtoH, dst, as_ptr(src), n, nullptr, false);
}
CU_API cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    return do_copy("cuMemcpyDtoHAsync", Dir::DtoH, dst, as_ptr(src), n, s, true);
}
CU_API cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return do_copy("cuMemcpyDtoD", Dir::DtoD, as_ptr(dst), as_ptr(src), n, nullptr, false);
}
CU_API cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    return do_copy("cuMemcpyDtoDAsync", Dir::DtoD, as_ptr(dst), as_ptr(src), n, s, true);
}
CU_API cuMemcpyPeer(CUdeviceptr dst, CUcontext dstCtx, CUdeviceptr src, CUcontext srcCtx, size_t n) {
    if (!valid_ctx(dstCtx) || !valid_ctx(srcCtx)) return kErrInvalidContext;
    return do_copy("cuMemcpyPeer", Dir::DtoD, as_ptr(dst), as_ptr(src), n, nullptr, false);
}
CU_API cuMemcpyPeerAsync(CUdeviceptr dst, CUcontext dstCtx, CUdeviceptr src, CUcontext srcCtx, size_t n, CUstream s) {
    if (!valid_ctx(dstCtx) || !valid_ctx(srcCtx)) return kErrInvalidContext;
    return do_copy("cuMemcpyPeerAsync", Dir::DtoD, as_ptr(dst), as_ptr(src), n, s, true);
}
/* Unified addressing: either side may be host or device memory. */
CU_API cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) { return copy_unified("cuMemcpy", dst, src, n, nullptr, false); }
CU_API cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    return copy_unified("cuMemcpyAsync", dst, src, n, s, true);
}

/* Memsets of device memory are asynchronous with respect to the host, also the "synchronous"
 * variants (they go on the legacy stream). */
CU_API cuMemsetD8_v2(CUdeviceptr dst, unsigned char uc, size_t n) { return device_fill("cuMemsetD8", dst, uc, n, nullptr); }
CU_API cuMemsetD8Async(CUdeviceptr dst, unsigned char uc, size_t n, CUstream s) {
    return device_fill("cuMemsetD8Async", dst, uc, n, s);
}
CU_API cuMemsetD16_v2(CUdeviceptr dst, unsigned short us, size_t n) { return device_fill("cuMemsetD16", dst, us, n, nullptr); }
CU_API cuMemsetD16Async(CUdeviceptr dst, unsigned short us, size_t n, CUstream s) {
    return device_fill("cuMemsetD16Async", dst, us, n, s);
}
CU_API cuMemsetD32_v2(CUdeviceptr dst, unsigned int ui, size_t n) { return device_fill("cuMemsetD32", dst, ui, n, nullptr); }
CU_API cuMemsetD32Async(CUdeviceptr dst, unsigned int ui, size_t n, CUstream s) {
    return device_fill("cuMemsetD32Async", dst, ui, n, s);
}

static CUresult check_stream(const char* fn, CUstream s) {
    std::lock_guard<std::mutex> g(st().mu);
    QueueRef q;
    CUresult r = resolve_locked(fn, s, &q);
    return r ? r : gate_locked(q->ctx);
}

CU_API cuMemPrefetchAsync(CUdeviceptr devPtr, size_t count, CUdevice dstDevice, CUstream s) {
    (void)devPtr;
    (void)count;
    (void)dstDevice;
    return check_stream("cuMemPrefetchAsync", s);
}
CU_API cuMemPrefetchAsync_v2(CUdeviceptr devPtr, size_t count, CUmemLocation location, unsigned int flags, CUstream s) {
    (void)devPtr;
    (void)count;
    (void)location;
    (void)flags;
    return check_stream("cuMemPrefetchAsync", s);
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
    Ctx* ctx;
    {
        std::lock_guard<std::mutex> g(st().mu);
        if (!find_range_locked(static_cast<uintptr_t>(ptr), 1, &base, &size)) return kErrInvalidValue;
        managed = st().allocs[base].managed;
        ctx = st().allocs[base].ctx;
    }
    switch (attribute) {
    case 1: *static_cast<CUcontext*>(data) = reinterpret_cast<CUcontext>(ctx); break;
    case 2: *static_cast<unsigned*>(data) = 2u; break; /* CU_MEMORYTYPE_DEVICE */
    case 3: *static_cast<CUdeviceptr*>(data) = ptr; break;
    case 4:
        if (!managed) return kErrInvalidValue;
        *static_cast<void**>(data) = as_ptr(ptr);
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
    if (!pool || !poolProps) return kErrInvalidValue;
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
static bool valid_pool(CUmemoryPool pool) {
    std::lock_guard<std::mutex> g(st().mu);
    Pool* p = reinterpret_cast<Pool*>(pool);
    return pool && (p == &st().default_pool || st().pools.count(p));
}
/* CUmemPool_attribute: 1-3 are int flags, 4 (RELEASE_THRESHOLD) and above are cuuint64_t. */
CU_API cuMemPoolSetAttribute(CUmemoryPool pool, int attr, void* value) {
    if (!valid_pool(pool) || !value || attr < 1 || attr > 8) return kErrInvalidValue;
    if (attr == 4) reinterpret_cast<Pool*>(pool)->release_threshold = *static_cast<unsigned long long*>(value);
    return kSuccess;
}
CU_API cuMemPoolGetAttribute(CUmemoryPool pool, int attr, void* value) {
    if (!valid_pool(pool) || !value || attr < 1 || attr > 8) return kErrInvalidValue;
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
    (void)minBytesToKeep;
    return valid_pool(pool) ? kSuccess : kErrInvalidValue;
}

/* ------------------------------------------------------------------------------------------ */
/* Streams and events                                                                          */
/* ------------------------------------------------------------------------------------------ */

/* flags: CU_STREAM_DEFAULT 0 (synchronises with the legacy stream) or CU_STREAM_NON_BLOCKING 1. */
static CUresult new_stream(CUstream* ph, unsigned flags, int priority) {
    if (!ph) return kErrInvalidValue;
    if (flags & ~kStreamNonBlocking) return note_error(kErrInvalidValue, "cuStreamCreate: flags must be 0 or CU_STREAM_NON_BLOCKING");
    std::lock_guard<std::mutex> g(st().mu);
    Ctx* c = nullptr;
    CUresult r = need_ctx_locked("cuStreamCreate", &c);
    if (r) return r;
    Stream* s = new Stream;
    s->flags = flags;
    s->priority = std::max(-5, std::min(0, priority)); /* clamped to the range, as CUDA does */
    s->q = new_queue_locked(c, false, (flags & kStreamNonBlocking) != 0);
    st().streams.insert(s);
    *ph = reinterpret_cast<CUstream>(s);
    return kSuccess;
}
CU_API cuStreamCreate(CUstream* phStream, unsigned int flags) { return new_stream(phStream, flags, 0); }
CU_API cuStreamCreateWithPriority(CUstream* phStream, unsigned int flags, int priority) {
    return new_stream(phStream, flags, priority);
}
/* Returns at once; the stream's queued work still runs (as on CUDA), then its worker exits. */
CU_API cuStreamDestroy_v2(CUstream hStream) {
    if (is_special_stream(hStream)) return kErrInvalidHandle;
    Stream* s = reinterpret_cast<Stream*>(hStream);
    {
        std::lock_guard<std::mutex> g(st().mu);
        if (!st().streams.erase(s)) return kErrInvalidHandle;
        s->q->closing = true;
        s->q->cv.notify_all();
        if (!s->q->worker) erase_queue_locked(s->q.get());
    }
    delete s;
    return kSuccess;
}
CU_API cuStreamDestroy(CUstream hStream) { return cuStreamDestroy_v2(hStream); }

CU_API cuStreamSynchronize(CUstream hStream) {
    std::unique_lock<std::mutex> lk(st().mu);
    QueueRef q;
    CUresult r = resolve_locked("cuStreamSynchronize", hStream, &q);
    if (r) return r;
    r = gate_locked(q->ctx);
    if (r) return r;
    wait_seq_locked(lk, q, q->enqueued);
    return report_locked(q->ctx);
}
/* CUDA_SUCCESS once everything queued so far has run, else CUDA_ERROR_NOT_READY. */
CU_API cuStreamQuery(CUstream hStream) {
    std::lock_guard<std::mutex> g(st().mu);
    QueueRef q;
    CUresult r = resolve_locked("cuStreamQuery", hStream, &q);
    if (r) return r;
    r = gate_locked(q->ctx);
    if (r) return r;
    if (q->completed < q->enqueued) return kErrNotReady;
    return report_locked(q->ctx);
}

static Event* as_event_locked(CUevent e) {
    Event* ev = reinterpret_cast<Event*>(e);
    return e && st().events.count(ev) ? ev : nullptr;
}

/* flags: 0 or CU_EVENT_WAIT_EXTERNAL (1). Work queued on the stream later waits for the work
 * the event's latest record captured (nothing if it was never recorded). */
CU_API cuStreamWaitEvent(CUstream hStream, CUevent hEvent, unsigned int flags) {
    if (flags & ~1u) return note_error(kErrInvalidValue, "cuStreamWaitEvent: flags must be 0 or CU_EVENT_WAIT_EXTERNAL");
    std::unique_lock<std::mutex> lk(st().mu);
    QueueRef q;
    CUresult r = resolve_locked("cuStreamWaitEvent", hStream, &q);
    if (r) return r;
    Event* e = as_event_locked(hEvent);
    if (!e) return note_error(kErrInvalidHandle, "cuStreamWaitEvent: not a live event");
    r = gate_locked(q->ctx);
    if (r) return r;
    if (!e->rec || e->rec->q->completed >= e->rec->seq || e->rec->q == q) return kSuccess;
    Op op; /* a marker: completes once the dependency has */
    op.deps.push_back(Dep{e->rec->q, e->rec->seq});
    return submit_locked(lk, q, std::move(op), false);
}
CU_API cuStreamGetPriority(CUstream hStream, int* priority) {
    if (!priority) return kErrInvalidValue;
    CUresult r = check_stream("cuStreamGetPriority", hStream);
    if (r) return r;
    std::lock_guard<std::mutex> g(st().mu);
    *priority = is_special_stream(hStream) ? 0 : reinterpret_cast<Stream*>(hStream)->priority;
    return kSuccess;
}
CU_API cuStreamGetFlags(CUstream hStream, unsigned int* flags) {
    if (!flags) return kErrInvalidValue;
    CUresult r = check_stream("cuStreamGetFlags", hStream);
    if (r) return r;
    std::lock_guard<std::mutex> g(st().mu);
    *flags = is_special_stream(hStream) ? 0 : reinterpret_cast<Stream*>(hStream)->flags;
    return kSuccess;
}
CU_API cuStreamGetCtx(CUstream hStream, CUcontext* pctx) {
    if (!pctx) return kErrInvalidValue;
    std::lock_guard<std::mutex> g(st().mu);
    QueueRef q;
    CUresult r = resolve_locked("cuStreamGetCtx", hStream, &q);
    if (r) return r;
    *pctx = reinterpret_cast<CUcontext>(q->ctx);
    return kSuccess;
}
CU_API cuStreamIsCapturing(CUstream hStream, int* captureStatus) {
    if (!captureStatus) return kErrInvalidValue;
    CUresult r = check_stream("cuStreamIsCapturing", hStream);
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
    return check_stream("cuStreamAttachMemAsync", hStream);
}
/* Runs `fn` on the stream's worker once the work before it has finished. */
CU_API cuLaunchHostFunc(CUstream hStream, CUhostFn fn, void* userData) {
    if (!fn) return kErrInvalidValue;
    std::unique_lock<std::mutex> lk(st().mu);
    QueueRef q;
    CUresult r = resolve_locked("cuLaunchHostFunc", hStream, &q);
    if (r) return r;
    r = gate_locked(q->ctx);
    if (r) return r;
    Op op;
    op.run = [fn, userData]() {
        fn(userData);
        return 0;
    };
    return submit_locked(lk, q, std::move(op), false);
}
/* flags must be 0. The callback gets the context's sticky error as its status. */
CU_API cuStreamAddCallback(CUstream hStream, CUstreamCallback callback, void* userData, unsigned int flags) {
    if (!callback || flags != 0) return kErrInvalidValue;
    std::unique_lock<std::mutex> lk(st().mu);
    QueueRef q;
    CUresult r = resolve_locked("cuStreamAddCallback", hStream, &q);
    if (r) return r;
    r = gate_locked(q->ctx);
    if (r) return r;
    Op op;
    op.always = true;
    Ctx* c = q->ctx;
    op.run = [callback, userData, hStream, c]() {
        int status;
        {
            std::lock_guard<std::mutex> g(st().mu);
            status = c->sticky;
        }
        callback(hStream, status, userData);
        return 0;
    };
    return submit_locked(lk, q, std::move(op), false);
}

/* flags: CU_EVENT_BLOCKING_SYNC 1, DISABLE_TIMING 2, INTERPROCESS 4 (needs DISABLE_TIMING). */
CU_API cuEventCreate(CUevent* phEvent, unsigned int flags) {
    if (!phEvent) return kErrInvalidValue;
    if (flags & ~(kEventBlockingSync | kEventDisableTiming | kEventInterprocess))
        return note_error(kErrInvalidValue, "cuEventCreate: unknown flags");
    if ((flags & kEventInterprocess) && !(flags & kEventDisableTiming))
        return note_error(kErrInvalidValue, "cuEventCreate: CU_EVENT_INTERPROCESS needs CU_EVENT_DISABLE_TIMING");
    std::lock_guard<std::mutex> g(st().mu);
    Ctx* c = nullptr;
    CUresult r = need_ctx_locked("cuEventCreate", &c);
    if (r) return r;
    Event* e = new Event;
    e->flags = flags;
    e->ctx = c;
    st().events.insert(e);
    *phEvent = reinterpret_cast<CUevent>(e);
    return kSuccess;
}
/* Captures the work queued on the stream so far; the event completes (and takes its time) when
 * the stream gets there. Event and stream must belong to the same context. */
static CUresult record_event(const char* fn, CUevent hEvent, CUstream hStream) {
    std::unique_lock<std::mutex> lk(st().mu);
    Event* e = as_event_locked(hEvent);
    if (!e) return note_error(kErrInvalidHandle, std::string(fn) + ": not a live event");
    QueueRef q;
    CUresult r = resolve_locked(fn, hStream, &q);
    if (r) return r;
    if (q->ctx != e->ctx) return note_error(kErrInvalidHandle, std::string(fn) + ": event and stream belong to different contexts");
    r = gate_locked(q->ctx);
    if (r) return r;
    auto rec = std::make_shared<Record>();
    rec->q = q;
    Op op;
    op.always = true;
    op.run = [rec]() {
        rec->t_ms = now_ms();
        return 0;
    };
    r = submit_locked(lk, q, std::move(op), false);
    if (r) return r;
    rec->seq = q->enqueued;
    e->rec = rec;
    return kSuccess;
}
CU_API cuEventRecord(CUevent hEvent, CUstream hStream) { return record_event("cuEventRecord", hEvent, hStream); }
CU_API cuEventRecordWithFlags(CUevent hEvent, CUstream hStream, unsigned int flags) {
    if (flags & ~1u) return note_error(kErrInvalidValue, "cuEventRecordWithFlags: flags must be 0 or CU_EVENT_RECORD_EXTERNAL");
    return record_event("cuEventRecordWithFlags", hEvent, hStream);
}
static bool event_done_locked(const Event* e) { return !e->rec || e->rec->q->completed >= e->rec->seq; }

/* CUDA_SUCCESS if the captured work has run (or the event was never recorded), else
 * CUDA_ERROR_NOT_READY. */
CU_API cuEventQuery(CUevent hEvent) {
    std::lock_guard<std::mutex> g(st().mu);
    Event* e = as_event_locked(hEvent);
    if (!e) return kErrInvalidHandle;
    CUresult r = gate_locked(e->ctx);
    if (r) return r;
    if (!event_done_locked(e)) return kErrNotReady;
    return report_locked(e->ctx);
}
CU_API cuEventSynchronize(CUevent hEvent) {
    std::unique_lock<std::mutex> lk(st().mu);
    Event* e = as_event_locked(hEvent);
    if (!e) return kErrInvalidHandle;
    CUresult r = gate_locked(e->ctx);
    if (r) return r;
    std::shared_ptr<Record> rec = e->rec;
    if (rec) wait_seq_locked(lk, rec->q, rec->seq);
    return report_locked(e->ctx);
}
CU_API cuEventElapsedTime(float* pMilliseconds, CUevent hStart, CUevent hEnd) {
    if (!pMilliseconds) return kErrInvalidValue;
    std::lock_guard<std::mutex> g(st().mu);
    Event* a = as_event_locked(hStart);
    Event* b = as_event_locked(hEnd);
    if (!a || !b) return kErrInvalidHandle;
    /* Like the driver: events created with CU_EVENT_DISABLE_TIMING, or never recorded, fail;
     * recorded but not yet complete: not ready. */
    if ((a->flags | b->flags) & kEventDisableTiming) return kErrInvalidHandle;
    if (!a->rec || !b->rec) return kErrInvalidHandle;
    if (!event_done_locked(a) || !event_done_locked(b)) return kErrNotReady;
    *pMilliseconds = static_cast<float>(b->rec->t_ms - a->rec->t_ms);
    return kSuccess;
}
CU_API cuEventElapsedTime_v2(float* pMilliseconds, CUevent hStart, CUevent hEnd) {
    return cuEventElapsedTime(pMilliseconds, hStart, hEnd);
}
/* A pending record still completes (the queue holds it), as on CUDA. */
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

/* Reads the image (see parse_image): a fatbin's sm_90 cubin or its PTX, a cubin, PTX text, or
 * the emulator-only image "distill-emulator-module". */
static CUresult load_module(const char* fn, CUmodule* module, const void* image) {
    if (!module || !image) return note_error(kErrInvalidValue, std::string(fn) + ": NULL argument");
    Ctx* c = nullptr;
    {
        std::lock_guard<std::mutex> g(st().mu);
        CUresult r = need_ctx_locked(fn, &c);
        if (r) return r;
    }
    Module* m = new Module;
    m->ctx = c;
    ImageError err{0, ""};
    if (!parse_image(image, &m->image, &err)) {
        delete m;
        return note_error(err.code, std::string(fn) + ": " + err.msg);
    }
    std::lock_guard<std::mutex> g(st().mu);
    st().modules.insert(m);
    *module = reinterpret_cast<CUmodule>(m);
    return kSuccess;
}

CU_API cuModuleLoadData(CUmodule* module, const void* image) { return load_module("cuModuleLoadData", module, image); }
CU_API cuModuleLoadDataEx(CUmodule* module, const void* image, unsigned int numOptions, int* options, void** optionValues) {
    if (numOptions && (!options || !optionValues)) return kErrInvalidValue;
    return load_module("cuModuleLoadDataEx", module, image);
}
CU_API cuModuleLoadFatBinary(CUmodule* module, const void* fatCubin) {
    return load_module("cuModuleLoadFatBinary", module, fatCubin);
}
CU_API cuModuleLoad(CUmodule* module, const char* fname) {
    if (!module || !fname) return kErrInvalidValue;
    FILE* f = fopen(fname, "rb");
    if (!f) return note_error(301, std::string("cuModuleLoad: cannot read ") + fname);
    std::vector<char> data;
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + n);
    fclose(f);
    data.resize(data.size() + 64, 0); /* NUL-terminates text, pads short files */
    return load_module("cuModuleLoad", module, data.data());
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

/* A kernel must be in the loaded image (unless it is the emulator-only image) and compiled into
 * this library. Its handle is the runtime's KernelEntry; the image's __launch_bounds__ and
 * register count go into the driver's side table. */
CU_API cuModuleGetFunction(CUfunction* hfunc, CUmodule hmod, const char* name) {
    if (!hfunc || !name) return kErrInvalidValue;
    std::lock_guard<std::mutex> g(st().mu);
    Module* m = reinterpret_cast<Module*>(hmod);
    if (!hmod || !st().modules.count(m)) return kErrInvalidHandle;
    CUresult r = gate_locked(m->ctx);
    if (r) return r;
    const ImageInfo& im = m->image;
    if (!im.all && !im.names.count(name)) {
        return note_error(kErrNotFound, std::string("cuModuleGetFunction: no kernel named ") + name + " in the loaded " +
                                            im.kind + " image (" + std::to_string(im.names.size()) +
                                            " kernels; emulator-only kernels need the module image \"" + kEmulatorModule +
                                            "\")");
    }
    KernelEntry* k = find_kernel(name);
    if (!k) {
        return note_error(kErrNotFound, std::string("cuModuleGetFunction: no kernel named ") + name +
                                            (im.all ? "" : " (it is in the image)") +
                                            " is compiled into the emulator (missing DK_REGISTER_KERNEL?)");
    }
    KernelInfo& info = st().kernels[k];
    auto b = im.bounds.find(name);
    if (b != im.bounds.end()) info.image_bound = b->second;
    auto rg = im.regs.find(name);
    if (rg != im.regs.end() && !info.regs_reported) info.regs = rg->second;
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
    if (!name) return kErrInvalidValue;
    std::lock_guard<std::mutex> g(st().mu);
    if (!kernel_info_locked(hfunc)) return bad_function("cuFuncGetName", hfunc);
    *name = as_kernel(hfunc)->name.c_str();
    return kSuccess;
}

/* CUfunction_attribute: MAX_THREADS_PER_BLOCK 0, SHARED_SIZE_BYTES 1, CONST_SIZE_BYTES 2,
 * LOCAL_SIZE_BYTES 3, NUM_REGS 4, PTX_VERSION 5, BINARY_VERSION 6, CACHE_MODE_CA 7,
 * MAX_DYNAMIC_SHARED_SIZE_BYTES 8, PREFERRED_SHARED_MEMORY_CARVEOUT 9, CLUSTER_SIZE_MUST_BE_SET
 * 10, REQUIRED_CLUSTER_WIDTH/HEIGHT/DEPTH 11-13, NON_PORTABLE_CLUSTER_SIZE_ALLOWED 14,
 * CLUSTER_SCHEDULING_POLICY_PREFERENCE 15. */
constexpr int kFuncAttributeCount = 16;

CU_API cuFuncGetAttribute(int* pi, int attrib, CUfunction hfunc) {
    if (!pi) return kErrInvalidValue;
    std::lock_guard<std::mutex> g(st().mu);
    const KernelInfo* info = kernel_info_locked(hfunc);
    if (!info) return bad_function("cuFuncGetAttribute", hfunc);
    if (attrib < 0 || attrib >= kFuncAttributeCount) return kErrInvalidValue;
    KernelEntry* k = as_kernel(hfunc);
    switch (attrib) {
    case 0: *pi = max_threads(*info); break;
    case 1: *pi = info->static_smem; break;
    case 4: *pi = info->regs >= 0 ? info->regs : 32; break;
    case 5: *pi = 90; break;
    case 6: *pi = 90; break;
    case 8: *pi = k->max_dynamic_smem.load(); break;
    case 9: *pi = k->preferred_carveout.load(); break;
    default: *pi = 0; break;
    }
    return kSuccess;
}

/* Only MAX_DYNAMIC_SHARED_SIZE_BYTES, PREFERRED_SHARED_MEMORY_CARVEOUT and the cluster
 * attributes 11-15 are writable; dynamic + static shared memory may not exceed 227 KiB. */
CU_API cuFuncSetAttribute(CUfunction hfunc, int attrib, int value) {
    std::lock_guard<std::mutex> g(st().mu);
    KernelInfo* info = kernel_info_locked(hfunc);
    if (!info) return bad_function("cuFuncSetAttribute", hfunc);
    KernelEntry* k = as_kernel(hfunc);
    if (attrib == 8) {
        if (value < 0 || value > kMaxSharedPerBlockOptin - info->static_smem) {
            return note_error(kErrInvalidValue, "cuFuncSetAttribute: kernel " + k->name + ": " + std::to_string(value) +
                                                    " bytes of dynamic shared memory + " + std::to_string(info->static_smem) +
                                                    " static exceed the " + std::to_string(kMaxSharedPerBlockOptin) +
                                                    " bytes a block can have");
        }
        k->max_dynamic_smem.store(value);
        info->dyn_set = true;
    } else if (attrib == 9) {
        if (value < -1 || value > 100) return kErrInvalidValue;
        k->preferred_carveout.store(value);
    } else if (attrib < 11 || attrib >= kFuncAttributeCount) {
        return note_error(kErrInvalidValue, "cuFuncSetAttribute: attribute " + std::to_string(attrib) + " is read-only or unknown");
    }
    return kSuccess;
}
CU_API cuFuncSetCacheConfig(CUfunction hfunc, int config) {
    std::lock_guard<std::mutex> g(st().mu);
    if (!kernel_info_locked(hfunc)) return bad_function("cuFuncSetCacheConfig", hfunc);
    return config >= 0 && config <= 3 ? kSuccess : kErrInvalidValue;
}
CU_API cuFuncSetSharedMemConfig(CUfunction hfunc, int config) {
    std::lock_guard<std::mutex> g(st().mu);
    if (!kernel_info_locked(hfunc)) return bad_function("cuFuncSetSharedMemConfig", hfunc);
    return config >= 0 && config <= 2 ? kSuccess : kErrInvalidValue;
}

/* ------------------------------------------------------------------------------------------ */
/* Launch                                                                                      */
/* ------------------------------------------------------------------------------------------ */

/* Checks the launch like the driver does when it is called (configuration, resources), copies
 * the parameters and queues the kernel; a fault while it runs is reported by a later call. */
static CUresult do_launch(const char* fn, CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                          unsigned bz, unsigned smem, CUstream stream, void** params, void** extra,
                          ClusterDim cluster = ClusterDim{1, 1, 1}) {
    std::unique_lock<std::mutex> lk(st().mu);
    const KernelInfo* info = kernel_info_locked(f);
    if (!info) return bad_function(fn, f);
    KernelEntry* k = as_kernel(f);
    QueueRef q;
    CUresult r = resolve_locked(fn, stream, &q);
    if (r) return r;
    r = gate_locked(q->ctx);
    if (r) return r;
    const char* kn = k->name.c_str();
    if (params && extra) return note_error(kErrInvalidValue, std::string(fn) + ": both kernelParams and extra given");
    if (!params && extra) {
        return note_error(kErrNotSupported, std::string(fn) + ": the emulator needs kernelParams (the `extra` packing is "
                                                              "not supported)");
    }
    if (!params && k->param_bytes) return note_error(kErrInvalidValue, std::string(fn) + ": kernel " + kn + " launched without kernelParams");
    const unsigned long long nthreads = 1ull * bx * by * bz;
    if (bx == 0 || by == 0 || bz == 0 || gx == 0 || gy == 0 || gz == 0 || nthreads > kMaxThreadsPerBlock || bx > 1024 ||
        by > 1024 || bz > 64 || gx > 0x7fffffffu || gy > 65535 || gz > 65535) {
        char b[320];
        snprintf(b, sizeof b,
                 "invalid launch configuration for kernel %s: grid (%u,%u,%u), block (%u,%u,%u) (at most 1024 threads "
                 "per block, block.z <= 64, grid.y/z <= 65535)",
                 kn, gx, gy, gz, bx, by, bz);
        return note_error(kErrInvalidValue, b);
    }
    const int limit = max_threads(*info);
    if (nthreads > static_cast<unsigned long long>(limit)) {
        std::string why;
        if (info->image_bound > 0 && info->image_bound == limit) why = "its __launch_bounds__";
        else if (info->caller_bound > 0 && info->caller_bound == limit) why = "its configured limit";
        else why = std::to_string(info->regs) + " registers per thread (65536 per block)";
        return note_error(kErrLaunchOutOfResources, "too many resources requested for launch of kernel " + k->name + ": " +
                                                        std::to_string(nthreads) + " threads per block, but " + why +
                                                        " allow at most " + std::to_string(limit));
    }
    const int max_dyn = k->max_dynamic_smem.load();
    if (smem > static_cast<unsigned>(max_dyn)) {
        char b[400];
        snprintf(b, sizeof b,
                 "kernel %s launched with %u bytes of dynamic shared memory, more than its limit of %d (raise it with "
                 "cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), at most %d minus %d static)",
                 kn, smem, max_dyn, kMaxSharedPerBlockOptin, info->static_smem);
        return note_error(kErrInvalidValue, b);
    }
    if (1ull * smem + static_cast<unsigned>(info->static_smem) > static_cast<unsigned>(kMaxSharedPerBlockOptin)) {
        return note_error(kErrLaunchOutOfResources, "too many resources requested for launch of kernel " + k->name + ": " +
                                                        std::to_string(info->static_smem) + " bytes of static and " +
                                                        std::to_string(smem) + " of dynamic shared memory exceed " +
                                                        std::to_string(kMaxSharedPerBlockOptin));
    }
    /* The parameters are copied now: the caller may reuse its buffers as soon as we return. */
    const size_t words = (k->param_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t);
    auto args = std::make_shared<std::vector<std::max_align_t>>(std::max<size_t>(words, 1));
    if (k->param_bytes) {
        if (!params[0]) return note_error(kErrInvalidValue, std::string(fn) + ": kernel " + kn + ": kernelParams[0] is NULL");
        std::memcpy(args->data(), params[0], k->param_bytes);
    }
    Op op;
    op.run = [k, gx, gy, gz, bx, by, bz, smem, args, cluster]() {
        void* p[1] = {args->data()};
        return launch(k, gx, gy, gz, bx, by, bz, smem, p, cluster);
    };
    return submit_locked(lk, q, std::move(op), false, true);
}

CU_API cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
                      unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ, unsigned int sharedMemBytes,
                      CUstream hStream, void** kernelParams, void** extra) {
    return do_launch("cuLaunchKernel", f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes,
                     hStream, kernelParams, extra);
}

/* The cluster dimension attribute launches thread-block clusters (runtime.cpp); the other
 * attributes (priorities, scheduling policies, ...) do not change what a kernel computes and are
 * ignored. */
CU_API cuLaunchKernelEx(const CUlaunchConfig* config, CUfunction f, void** kernelParams, void** extra) {
    if (!config) return kErrInvalidValue;
    if (config->numAttrs && !config->attrs) return kErrInvalidValue;
    ClusterDim cluster{1, 1, 1};
    for (unsigned i = 0; i < config->numAttrs; ++i) {
        const CUlaunchAttribute& a = config->attrs[i];
        if (a.id != kLaunchAttributeClusterDimension) continue;
        cluster = ClusterDim{a.value.clusterDim.x, a.value.clusterDim.y, a.value.clusterDim.z};
        const unsigned long long n = 1ull * cluster.x * cluster.y * cluster.z;
        if (n == 0 || n > 8 || config->gridDimX % std::max(cluster.x, 1u) || config->gridDimY % std::max(cluster.y, 1u) ||
            config->gridDimZ % std::max(cluster.z, 1u)) {
            return note_error(kErrInvalidClusterSize,
                              "cuLaunchKernelEx: cluster dimension (" + std::to_string(cluster.x) + "," +
                                  std::to_string(cluster.y) + "," + std::to_string(cluster.z) + ") for grid (" +
                                  std::to_string(config->gridDimX) + "," + std::to_string(config->gridDimY) + "," +
                                  std::to_string(config->gridDimZ) +
                                  "): a cluster holds 1 to 8 blocks and divides every grid dimension");
        }
    }
    return do_launch("cuLaunchKernelEx", f, config->gridDimX, config->gridDimY, config->gridDimZ, config->blockDimX,
                     config->blockDimY, config->blockDimZ, config->sharedMemBytes, config->hStream, kernelParams, extra,
                     cluster);
}

/* Grid-wide synchronisation is not emulated, so a cooperative launch is a plain one. */
CU_API cuLaunchCooperativeKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
                                 unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ,
                                 unsigned int sharedMemBytes, CUstream hStream, void** kernelParams) {
    return do_launch("cuLaunchCooperativeKernel", f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ,
                     sharedMemBytes, hStream, kernelParams, nullptr);
}

/* ------------------------------------------------------------------------------------------ */
/* Occupancy                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* The kernel's limits (registers, static shared memory, launch bounds) count, as on the device. */
static CUresult func_info(const char* fn, CUfunction f, KernelInfo* out) {
    std::lock_guard<std::mutex> g(st().mu);
    const KernelInfo* info = kernel_info_locked(f);
    if (!info) return bad_function(fn, f);
    *out = *info;
    return kSuccess;
}

CU_API cuOccupancyMaxActiveBlocksPerMultiprocessor(int* numBlocks, CUfunction func, int blockSize, size_t dynamicSMemSize) {
    if (!numBlocks) return kErrInvalidValue;
    KernelInfo info;
    CUresult r = func_info("cuOccupancyMaxActiveBlocksPerMultiprocessor", func, &info);
    if (r) return r;
    *numBlocks = occupancy_blocks(&info, blockSize, dynamicSMemSize);
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
    KernelInfo info;
    CUresult r = func_info("cuOccupancyMaxPotentialBlockSize", func, &info);
    if (r) return r;
    int bs = max_threads(info);
    if (blockSizeLimit > 0 && blockSizeLimit < bs) bs = blockSizeLimit;
    if (bs >= 32) bs = bs / 32 * 32;
    const size_t smem = blockSizeToDynamicSMemSize ? blockSizeToDynamicSMemSize(bs) : dynamicSMemSize;
    *blockSize = bs;
    *minGridSize = 132 * std::max(1, occupancy_blocks(&info, bs, smem));
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
    KernelInfo info;
    CUresult r = func_info("cuOccupancyAvailableDynamicSMemPerBlock", func, &info);
    if (r) return r;
    const size_t per_block = 233472 / static_cast<size_t>(numBlocks);
    const size_t used = 1024 + static_cast<size_t>(info.static_smem);
    *dynamicSmemSize = std::min<size_t>(kMaxSharedPerBlockOptin - info.static_smem, per_block > used ? per_block - used : 0);
    return kSuccess;
}
CU_API cuOccupancyMaxPotentialClusterSize(int* clusterSize, CUfunction func, const CUlaunchConfig* config) {
    (void)config;
    if (!clusterSize) return kErrInvalidValue;
    KernelInfo info;
    CUresult r = func_info("cuOccupancyMaxPotentialClusterSize", func, &info);
    if (r) return r;
    *clusterSize = 8;
    return kSuccess;
}
CU_API cuOccupancyMaxActiveClusters(int* numClusters, CUfunction func, const CUlaunchConfig* config) {
    (void)config;
    if (!numClusters) return kErrInvalidValue;
    KernelInfo info;
    CUresult r = func_info("cuOccupancyMaxActiveClusters", func, &info);
    if (r) return r;
    *numClusters = 16;
    return kSuccess;
}

/* ------------------------------------------------------------------------------------------ */
/* Emulator-only entry points                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* A kernel's numbers from ptxas (registers per thread, static shared memory) and an optional cap
 * on threads per block (0: none). The limit a launch gets is the smallest of 1024, what the
 * registers allow (65536 per block, allocated per warp in units of 256), __launch_bounds__ from
 * the loaded image and this cap; cuFuncGetAttribute reports them. Returns a CUresult:
 * CUDA_ERROR_NOT_FOUND for a kernel not compiled into the library, CUDA_ERROR_INVALID_VALUE for
 * out-of-range numbers. Call it before launching the kernel. */
extern "C" DK_EMU_EXPORT int dkEmuSetKernelLimits(const char* name, int max_threads_per_block, int static_smem_bytes,
                                                  int num_regs) {
    if (!name) return kErrInvalidValue;
    KernelEntry* k = find_kernel(name);
    if (!k) return note_error(kErrNotFound, std::string("dkEmuSetKernelLimits: no kernel named ") + name + " is compiled into the emulator");
    if (max_threads_per_block < 0 || max_threads_per_block > kMaxThreadsPerBlock || static_smem_bytes < 0 ||
        static_smem_bytes > kDefaultSharedPerBlock || num_regs < 0 || num_regs > 255) {
        return note_error(kErrInvalidValue, std::string("dkEmuSetKernelLimits: ") + name + ": out-of-range limits (threads " +
                                                std::to_string(max_threads_per_block) + ", static shared " +
                                                std::to_string(static_smem_bytes) + ", registers " + std::to_string(num_regs) + ")");
    }
    std::lock_guard<std::mutex> g(st().mu);
    KernelInfo& info = st().kernels[k];
    info.caller_bound = max_threads_per_block;
    info.static_smem = static_smem_bytes;
    info.regs = num_regs;
    info.regs_reported = true;
    /* The default dynamic limit is what is left of 48 KiB (as on the device). */
    if (!info.dyn_set) k->max_dynamic_smem.store(kDefaultSharedPerBlock - static_smem_bytes);
    return kSuccess;
}

/* The emulator-only module image: cuModuleLoadData of it gives a module with every kernel
 * compiled into this library, self-test kernels included (a real driver rejects it). */
extern "C" DK_EMU_EXPORT const char* dkEmuModuleImage(void) { return kEmulatorModule; }

/* Bit 0: launches run asynchronously (DISTILL_EMU_SYNC unset or 0); bit 1: kernel faults are
 * sticky (DISTILL_EMU_STICKY=1). */
extern "C" DK_EMU_EXPORT int dkEmuDriverMode(void) { return (config().sync ? 0 : 1) | (config().sticky ? 2 : 0); }

/* ------------------------------------------------------------------------------------------ */
/* For libraries beside the driver: the fake cuBLAS (cublas.cpp)                               */
/* ------------------------------------------------------------------------------------------ */

/* Runs `run(arg)` on `stream` in stream order, as a kernel launch would: a nonzero CUresult from
 * it is a fault of the stream's context (its message set with dkEmuFail), reported by the next
 * synchronising call. `release(arg)`, if given, runs once the work is done or was never queued.
 * Returns the enqueue's CUresult. */
extern "C" DK_EMU_EXPORT int dkEmuEnqueue(CUstream stream, int (*run)(void*), void* arg, void (*release)(void*)) {
    std::shared_ptr<void> owned(arg, [release](void* a) {
        if (release) release(a);
    });
    if (!run) return kErrInvalidValue;
    std::unique_lock<std::mutex> lk(st().mu);
    QueueRef q;
    CUresult r = resolve_locked("dkEmuEnqueue", stream, &q);
    if (r) return r;
    r = gate_locked(q->ctx);
    if (r) return r;
    Op op;
    op.run = [run, owned]() { return run(owned.get()); };
    return submit_locked(lk, q, std::move(op), false, true);
}

/* Records `msg` as the calling thread's last error (what dkEmuLastError and a fault report show);
 * returns `code`. */
extern "C" DK_EMU_EXPORT int dkEmuFail(int code, const char* msg) { return note_error(code, msg ? msg : "failed"); }

/* Work queued by host code (the fake cuBLAS) will touch [p, p + n): checked when it is queued,
 * as a kernel's pointers are (memory freed with cuMemFreeAsync stays usable by work queued before
 * the free, and is invalid for new work at once). Returns CUDA_ERROR_ILLEGAL_ADDRESS, with the
 * message also written to `msg` (capacity `cap`), when the range is not inside one live device
 * allocation; else CUDA_SUCCESS. */
extern "C" DK_EMU_EXPORT int dkEmuDeviceRange(const void* p, size_t n, const char* who, char* msg, size_t cap) {
    if (!n) return kSuccess;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    std::lock_guard<std::mutex> g(st().mu);
    if (find_range_locked(a, n, nullptr, nullptr)) return kSuccess;
    const std::string m = std::string(who ? who : "device work") + ": range [" + hex(a) + ", +" + std::to_string(n) +
                          " bytes) is not inside one device allocation";
    if (msg && cap) snprintf(msg, cap, "%s", m.c_str());
    return note_error(kErrIllegalAddress, m);
}

/* The queued work of dkEmuDeviceRange, now running, reads or writes [p, p + n). In the check
 * build a write marks the bytes initialised and, under initcheck, a read of bytes nothing wrote
 * is CUDA_ERROR_LAUNCH_FAILED (with the report as the message); the fast build checks nothing
 * here. Returns a CUresult. */
extern "C" DK_EMU_EXPORT int dkEmuDeviceAccess(const void* p, size_t n, int write, const char* who) {
    if (!n) return kSuccess;
    if (write) {
        note_host_write(const_cast<void*>(p), n);
        return kSuccess;
    }
    const std::string bad = note_host_read(p, n, who ? who : "device work");
    if (!bad.empty()) {
        report_finding(bad);
        return note_error(kErrLaunchFailed, bad);
    }
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
