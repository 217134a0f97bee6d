/*
 * simt.h: the CUDA device dialect for the host C++ compiler.
 *
 * A kernel file (kernels/NAME.cu) includes `kernels/common.cuh`; when the file is compiled by
 * nvcc that pulls in <cuda_fp16.h>/<cuda_bf16.h>, when it is compiled by g++/clang++ for the
 * emulator it pulls in this header instead. The same kernel source then runs on the CPU:
 *
 *   - one CUDA thread is one fiber (user-level context with its own stack), see runtime.cpp;
 *   - the fibers of one block all run on one OS thread, blocks of a grid run in parallel on a
 *     small pool of OS threads. Hence `__shared__` is `thread_local`: shared by the CUDA threads
 *     of the block being run, private to the OS worker thread;
 *   - `__syncthreads` and the warp primitives are real rendezvous points: a fiber parks there
 *     until every thread of the block (lane of the warp) has arrived. A barrier that can never
 *     complete (threads exited, or waiting at a different primitive) fails the launch with a
 *     message naming the kernel and the block; it never hangs.
 *
 * Semantics that differ from hardware are listed in kernels/emulator/README.md.
 * Everything in namespace dk_emu is private to the emulator.
 */
#ifndef DISTILL_EMULATOR_SIMT_H
#define DISTILL_EMULATOR_SIMT_H

#ifdef __CUDACC__
#error "kernels/emulator/simt.h is the host-compiler emulation of CUDA; nvcc must not include it"
#endif

/* Standard headers first: libstdc++ spells `__attribute__((__noinline__))` in <memory>, which
 * would break once `__noinline__` is a macro below. Kernels get <cmath>/<cstdint>/<cfloat>
 * names unqualified, as in device code (libstdc++'s <math.h> exports std::isinf etc.). */
#include <algorithm>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <math.h>
#include <memory>
#include <new>
#include <stdint.h>
#include <time.h>
#include <type_traits>
#include <utility>

/* Lets a kernel (or a test) tell it is compiled for the emulator. __CUDA_ARCH__ stays undefined. */
#define DK_EMULATOR 1

#define DK_EMU_HIDDEN __attribute__((visibility("hidden")))

/* ------------------------------------------------------------------------------------------ */
/* Qualifiers                                                                                  */
/* ------------------------------------------------------------------------------------------ */

#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __maxnreg__(...)
#define __cluster_dims__(...)
/* `__restrict__` is already a GNU keyword. */
/* `thread_local` at block scope implies `static`, so both `__shared__ float s[32];` and the
 * common `static __shared__ float s[32];` compile. Block-scope `__shared__` variables are zero
 * only once per OS thread, not per block: kernels must initialise shared memory (as on the GPU). */
#define __shared__ thread_local

/* ------------------------------------------------------------------------------------------ */
/* Vector types (CUDA's layout and alignment)                                                  */
/* ------------------------------------------------------------------------------------------ */

struct __attribute__((aligned(2))) char2 { signed char x, y; };
struct __attribute__((aligned(2))) uchar2 { unsigned char x, y; };
struct __attribute__((aligned(4))) char4 { signed char x, y, z, w; };
struct __attribute__((aligned(4))) uchar4 { unsigned char x, y, z, w; };
struct __attribute__((aligned(4))) short2 { short x, y; };
struct __attribute__((aligned(4))) ushort2 { unsigned short x, y; };
struct __attribute__((aligned(8))) short4 { short x, y, z, w; };
struct __attribute__((aligned(8))) ushort4 { unsigned short x, y, z, w; };
struct __attribute__((aligned(8))) int2 { int x, y; };
struct int3 { int x, y, z; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
struct uint3 { unsigned int x, y, z; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
struct __attribute__((aligned(8))) float2 { float x, y; };
struct float3 { float x, y, z; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(16))) double2 { double x, y; };
struct __attribute__((aligned(16))) longlong2 { long long x, y; };
struct __attribute__((aligned(16))) ulonglong2 { unsigned long long x, y; };

static_assert(sizeof(float4) == 16 && alignof(float4) == 16, "float4 layout");
static_assert(sizeof(uint2) == 8 && alignof(uint2) == 8, "uint2 layout");
static_assert(sizeof(float2) == 8 && alignof(float2) == 8, "float2 layout");

inline char2 make_char2(signed char x, signed char y) { return {x, y}; }
inline uchar2 make_uchar2(unsigned char x, unsigned char y) { return {x, y}; }
inline char4 make_char4(signed char x, signed char y, signed char z, signed char w) { return {x, y, z, w}; }
inline uchar4 make_uchar4(unsigned char x, unsigned char y, unsigned char z, unsigned char w) { return {x, y, z, w}; }
inline short2 make_short2(short x, short y) { return {x, y}; }
inline ushort2 make_ushort2(unsigned short x, unsigned short y) { return {x, y}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int3 make_int3(int x, int y, int z) { return {x, y, z}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline longlong2 make_longlong2(long long x, long long y) { return {x, y}; }
inline ulonglong2 make_ulonglong2(unsigned long long x, unsigned long long y) { return {x, y}; }

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

/* ------------------------------------------------------------------------------------------ */
/* Runtime interface (implemented in runtime.cpp)                                              */
/* ------------------------------------------------------------------------------------------ */

namespace dk_emu {

/* Block-wide values, one instance per block of the running cluster (one for a plain launch),
 * rewritten for every cluster. */
struct BlockPublic {
    uint3 block_idx;
    uint3 block_dim;
    uint3 grid_dim;
    unsigned char* dyn_smem;
    unsigned cluster_rank; /* this block's rank in its cluster */
    unsigned cluster_size; /* blocks in the cluster (1: a plain launch) */
    uint3 cluster_dim;
};

/* The part of a fiber the inline code below reads. runtime.cpp's Fiber derives from it. */
/* A cp.async copy issued and not yet retired by a wait (see "Asynchronous copies" below). */
struct AsyncCopy {
    void* dst;
    const void* src;
    unsigned bytes; /* 4, 8 or 16 */
    unsigned group; /* the commit group it belongs to (the count of groups committed before it) */
};
constexpr unsigned kAsyncCopiesMax = 16;

struct FiberPublic {
    uint3 thread_idx;
    unsigned lane;       /* linear thread index % 32 */
    unsigned warp_lanes; /* lanes in this thread's warp: 32, fewer for the last warp of an odd-sized block */
    unsigned warp_mask;  /* (1 << warp_lanes) - 1 */
    const BlockPublic* block;
    unsigned async_count;  /* copies in async_copies */
    unsigned async_groups; /* commit groups so far */
    AsyncCopy async_copies[kAsyncCopiesMax];
};

/* Finding the running CUDA thread without thread-local storage: every fiber stack is a region
 * of g_stack_bytes (a power of two) aligned to its size, with this header in its top bytes. So
 * the stack pointer, rounded down and offset, leads to the fiber. No TLS access (which costs a
 * __tls_get_addr call in a dlopen'd library) and nothing to update on a fiber switch. */
struct StackHeader {
    FiberPublic* fiber;
    uintptr_t magic;
};
constexpr uintptr_t kStackMagic = 0x64656d75666962ull; /* "demufib" */
constexpr uintptr_t kStackHeaderBytes = 64;            /* reserved at the top of each stack */
extern DK_EMU_HIDDEN uintptr_t g_stack_bytes;          /* set once, before the first fiber runs */

__attribute__((always_inline)) inline uintptr_t stack_pointer() {
    uintptr_t sp;
#if defined(__x86_64__)
    __asm__("movq %%rsp, %0" : "=r"(sp));
#elif defined(__aarch64__)
    __asm__("mov %0, sp" : "=r"(sp));
#else
    sp = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
#endif
    return sp;
}

__attribute__((always_inline)) inline StackHeader* stack_header() {
    const uintptr_t top = (stack_pointer() & ~(g_stack_bytes - 1)) + g_stack_bytes;
    return reinterpret_cast<StackHeader*>(top - kStackHeaderBytes);
}

/* The CUDA thread running this code. Only valid inside a kernel launch. */
__attribute__((always_inline)) inline FiberPublic* self() { return stack_header()->fiber; }

/* Warp primitive kinds (also used in diagnostics). */
enum WarpOp : unsigned {
    OP_NONE = 0,
    OP_SYNCTHREADS,
    OP_CLUSTER_SYNC,
    OP_SHFL,
    OP_SHFL_UP,
    OP_SHFL_DOWN,
    OP_SHFL_XOR,
    OP_BALLOT,
    OP_ANY,
    OP_ALL,
    OP_SYNCWARP,
    OP_REDUCE,
    OP_MATCH_ANY,
    OP_MATCH_ALL,
    OP_COUNT_
};

/* Result of a warp rendezvous: the 32 exchange slots of this generation (16 bytes each, valid
 * until the warp's next-but-one primitive), the OR of the predicates, and who we are. */
struct WarpResult { /* 16 bytes: returned in registers */
    const unsigned char* slots;
    unsigned ballot;
    unsigned short lane;
    unsigned short nlanes;
};

DK_EMU_HIDDEN WarpResult warp_sync(unsigned mask, unsigned op, const void* value, unsigned size, int pred);
DK_EMU_HIDDEN void syncthreads();
DK_EMU_HIDDEN int syncthreads_count(int pred);
/* Thread-block clusters: every thread of every block of the cluster arrives (barrier.cluster
 * arrive + wait); and the address of `p` (this block's dynamic shared memory) in block `rank`. */
DK_EMU_HIDDEN void cluster_sync();
DK_EMU_HIDDEN void* map_shared_rank(const void* p, unsigned rank);
[[noreturn]] DK_EMU_HIDDEN void trap();
[[noreturn]] DK_EMU_HIDDEN void assert_fail(const char* expr, const char* file, unsigned line, const char* func);
[[noreturn]] DK_EMU_HIDDEN void misuse(const char* what);

/* Kernel registration: the name and a trampoline that unpacks cuLaunchKernel's argument array. */
typedef void (*KernelTrampoline)(void** kernel_params);
DK_EMU_HIDDEN void register_kernel(const char* name, KernelTrampoline fn, unsigned param_bytes);
struct KernelRegistrar {
    KernelRegistrar(const char* name, KernelTrampoline fn, unsigned param_bytes) { register_kernel(name, fn, param_bytes); }
};

template <class To, class From>
inline To bit_cast(const From& from) {
    static_assert(sizeof(To) == sizeof(From), "bit_cast size mismatch");
    To to;
    std::memcpy(&to, &from, sizeof(To));
    return to;
}

}  // namespace dk_emu

/* Built-in variables. Read like on the device: threadIdx.x, blockDim.y, ... */
#define threadIdx (::dk_emu::self()->thread_idx)
#define blockIdx (::dk_emu::self()->block->block_idx)
#define blockDim (::dk_emu::self()->block->block_dim)
#define gridDim (::dk_emu::self()->block->grid_dim)
static constexpr int warpSize = 32;

/* Registers kernel `name` taking one parameter struct `P` by value. Every CUDA thread gets its
 * own copy of the struct, as on the device. */
#define DK_REGISTER_KERNEL(name, P)                                                            \
    static const ::dk_emu::KernelRegistrar dk_emu_registrar_##name(                            \
        #name, [](void** dk_emu_params) { name(*static_cast<const P*>(dk_emu_params[0])); }, \
        static_cast<unsigned>(sizeof(P)));

/* Dynamic shared memory: the launch's sharedMemBytes, 16-byte aligned, one buffer per block
 * being run. Filled with 0xFF bytes (NaN for floats) before every block, so reads of
 * uninitialised shared memory show up in results instead of passing by luck. */
#ifndef DK_DYNAMIC_SHARED
#define DK_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::dk_emu::self()->block->dyn_smem)
#endif

/* ------------------------------------------------------------------------------------------ */
/* Synchronisation                                                                             */
/* ------------------------------------------------------------------------------------------ */

inline void __syncthreads() { ::dk_emu::syncthreads(); }
inline int __syncthreads_count(int pred) { return ::dk_emu::syncthreads_count(pred); }
inline int __syncthreads_and(int pred) {
    return ::dk_emu::syncthreads_count(pred) ==
           static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int pred) { return ::dk_emu::syncthreads_count(pred) != 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    ::dk_emu::warp_sync(mask, ::dk_emu::OP_SYNCWARP, nullptr, 0, 0);
}
/* Blocks of a grid may run on different OS threads: a real fence. */
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
/* Threads of a block share one OS thread: ordering the compiler is enough. */
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

/* Asynchronous copies, global to shared memory, of 16, 8 or 4 bytes (cp.async.{cg,ca}.shared.global,
 * cp.async.commit_group, cp.async.wait_group N; common.cuh's dk_cp_async16 / dk_cp_async_commit /
 * dk_cp_async_wait<N> on the GPU). A copy is performed when a wait retires its group, not when it
 * is issued: the latest moment the hardware may land it. So a read of the destination before the
 * wait sees the old bytes (shared memory starts as 0xFF bytes, and the check build's initcheck
 * reports it), and the copy's own accesses are checked (memcheck, racecheck, alignment) as this
 * thread's at the wait; in the check build the source's read and the destination's write are also
 * checked at the issue (the copy is in flight in between), and a destination outside this block's
 * shared memory is an illegal address. Copies not yet committed are not waited for, as in PTX; a
 * thread that exits with copies pending fails the launch (runtime.cpp). */
#ifdef DK_EMU_CHECK
extern "C" void dk_emu_check_async_write(void* dst, unsigned bytes); /* sanitizer.cpp */
#endif
namespace dk_emu {
[[noreturn]] DK_EMU_HIDDEN void async_overflow();
inline void cp_async(void* dst, const void* src, unsigned bytes) {
#ifdef DK_EMU_CHECK
    /* The copy is in flight from here to the wait. The destination: racecheck sees a write now
     * (and the real one at the wait); it must be this block's shared memory, as for
     * cp.async.shared.global. The source is read some time in between: it is read here too (and
     * thrown away, an instrumented read), so that a write by another thread that only a barrier
     * after the issue orders is a race, as on the GPU. */
    dk_emu_check_async_write(dst, bytes);
    for (unsigned k = 0; k < bytes / 4; ++k) (void)static_cast<const volatile unsigned*>(src)[k];
#endif
    FiberPublic* f = self();
    if (f->async_count == kAsyncCopiesMax) async_overflow();
    f->async_copies[f->async_count++] = AsyncCopy{dst, src, bytes, f->async_groups};
}
inline void cp_async_commit() { ++self()->async_groups; }
/* Retires every committed group but the newest `pending`, in issue order. */
inline void cp_async_wait(unsigned pending) {
    FiberPublic* f = self();
    const unsigned retire_below = f->async_groups > pending ? f->async_groups - pending : 0;
    unsigned kept = 0;
    for (unsigned i = 0; i < f->async_count; ++i) {
        const AsyncCopy c = f->async_copies[i];
        if (c.group >= retire_below)
            f->async_copies[kept++] = c;
        else if (c.bytes == 16)
            *static_cast<uint4*>(c.dst) = *static_cast<const uint4*>(c.src);
        else if (c.bytes == 8)
            *static_cast<uint2*>(c.dst) = *static_cast<const uint2*>(c.src);
        else
            *static_cast<unsigned*>(c.dst) = *static_cast<const unsigned*>(c.src);
    }
    f->async_count = kept;
}
}  // namespace dk_emu

/* Thread-block clusters: the part of CUDA's cooperative_groups that cluster kernels use (kernels
 * include <cooperative_groups.h> under nvcc only). Blocks are ranked x fastest, as on sm_90. */
namespace cooperative_groups {
struct cluster_group {
    void sync() const { ::dk_emu::cluster_sync(); }
    unsigned block_rank() const { return ::dk_emu::self()->block->cluster_rank; }
    unsigned num_blocks() const { return ::dk_emu::self()->block->cluster_size; }
    dim3 dim_blocks() const {
        const uint3 d = ::dk_emu::self()->block->cluster_dim;
        return dim3(d.x, d.y, d.z);
    }
    dim3 block_index() const {
        const ::dk_emu::BlockPublic* b = ::dk_emu::self()->block;
        const unsigned r = b->cluster_rank;
        return dim3(r % b->cluster_dim.x, r / b->cluster_dim.x % b->cluster_dim.y,
                    r / (b->cluster_dim.x * b->cluster_dim.y));
    }
    unsigned num_threads() const {
        const ::dk_emu::BlockPublic* b = ::dk_emu::self()->block;
        return b->cluster_size * b->block_dim.x * b->block_dim.y * b->block_dim.z;
    }
    template <typename T>
    T* map_shared_rank(T* p, unsigned rank) const {
        return static_cast<T*>(::dk_emu::map_shared_rank(p, rank));
    }
};
inline cluster_group this_cluster() { return cluster_group{}; }
}  // namespace cooperative_groups

[[noreturn]] inline void __trap() { ::dk_emu::trap(); }
[[noreturn]] inline void __brkpt() { ::dk_emu::trap(); }

/* Device assert: fails the launch (naming the kernel, block and thread) instead of aborting the
 * process. Kernels must not include <assert.h>/<cassert> after common.cuh (that would restore
 * the host assert). */
#undef assert
#ifdef NDEBUG
#define assert(e) ((void)0)
#else
#define assert(e) \
    ((e) ? (void)0 : ::dk_emu::assert_fail(#e, __FILE__, static_cast<unsigned>(__LINE__), __func__))
#endif

/* ------------------------------------------------------------------------------------------ */
/* Warp primitives                                                                             */
/* Every lane of the warp must take part, with mask 0xffffffff (or, for the last warp of a     */
/* block whose size is not a multiple of 32, exactly the mask of its existing lanes; those     */
/* lanes are the whole warp). Anything else fails the launch. A source lane that does not     */
/* exist in a partial warp reads the caller's own value.                                      */
/* ------------------------------------------------------------------------------------------ */

namespace dk_emu {

template <class T>
inline void check_exchangeable() {
    static_assert(std::is_trivially_copyable<T>::value, "warp shuffles need a trivially copyable type");
    static_assert(sizeof(T) <= 16, "warp shuffles of types larger than 16 bytes are not supported");
}

inline bool valid_width(int width) { return width >= 1 && width <= 32 && (width & (width - 1)) == 0; }

/* PTX shfl.sync semantics: a lane whose computed source is outside its `width` segment (or does
 * not exist) gets its own value back. */
template <class T>
inline T shfl_impl(unsigned mask, T var, unsigned op, int b, int width) {
    check_exchangeable<T>();
    if (!valid_width(width)) misuse("shuffle width must be a power of two between 1 and 32");
    WarpResult r = warp_sync(mask, op, &var, sizeof(T), 0);
    const int lane = static_cast<int>(r.lane);
    const int min_lane = lane & ~(width - 1);
    const int max_lane = min_lane + width - 1;
    int src;
    bool ok;
    switch (op) {
    case OP_SHFL: src = min_lane + (b & (width - 1)); ok = true; break;
    case OP_SHFL_UP: src = lane - b; ok = b >= 0 && src >= min_lane; break;
    case OP_SHFL_DOWN: src = lane + b; ok = b >= 0 && src <= max_lane; break;
    default: src = lane ^ b; ok = src >= 0 && src <= max_lane; break; /* OP_SHFL_XOR */
    }
    if (!ok || src >= static_cast<int>(r.nlanes)) return var;
    T out;
    std::memcpy(&out, r.slots + 16 * src, sizeof(T));
    return out;
}

}  // namespace dk_emu

template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32) {
    return ::dk_emu::shfl_impl(mask, var, ::dk_emu::OP_SHFL, srcLane, width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ::dk_emu::shfl_impl(mask, var, ::dk_emu::OP_SHFL_UP, static_cast<int>(delta & 0xffffu), width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ::dk_emu::shfl_impl(mask, var, ::dk_emu::OP_SHFL_DOWN, static_cast<int>(delta & 0xffffu), width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
    return ::dk_emu::shfl_impl(mask, var, ::dk_emu::OP_SHFL_XOR, laneMask, width);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
    return ::dk_emu::warp_sync(mask, ::dk_emu::OP_BALLOT, nullptr, 0, pred != 0).ballot;
}
inline int __any_sync(unsigned mask, int pred) {
    return ::dk_emu::warp_sync(mask, ::dk_emu::OP_ANY, nullptr, 0, pred != 0).ballot != 0;
}
inline int __all_sync(unsigned mask, int pred) {
    ::dk_emu::WarpResult r = ::dk_emu::warp_sync(mask, ::dk_emu::OP_ALL, nullptr, 0, pred != 0);
    return r.ballot == (r.nlanes == 32 ? 0xffffffffu : ((1u << r.nlanes) - 1u));
}
inline int __uni_sync(unsigned mask, int pred) {
    ::dk_emu::WarpResult r = ::dk_emu::warp_sync(mask, ::dk_emu::OP_ALL, nullptr, 0, pred != 0);
    return r.ballot == 0 || r.ballot == (r.nlanes == 32 ? 0xffffffffu : ((1u << r.nlanes) - 1u));
}
/* All existing lanes of the warp: the emulator runs a warp's lanes as one converged group. */
inline unsigned __activemask() { return ::dk_emu::self()->warp_mask; }
inline unsigned __lanemask_lt() { return (1u << ::dk_emu::self()->lane) - 1u; }
inline unsigned __lanemask_le() { return ((1u << ::dk_emu::self()->lane) << 1) - 1u; }

/* sm_80 warp reductions over 32-bit integers. */
namespace dk_emu {
template <class T, class F>
inline T warp_reduce(unsigned mask, T v, F f) {
    WarpResult r = warp_sync(mask, OP_REDUCE, &v, sizeof(T), 0);
    T acc;
    std::memcpy(&acc, r.slots, sizeof(T));
    for (unsigned i = 1; i < r.nlanes; ++i) {
        T x;
        std::memcpy(&x, r.slots + 16 * i, sizeof(T));
        acc = f(acc, x);
    }
    return acc;
}
}  // namespace dk_emu
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) { return ::dk_emu::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a + b; }); }
inline int __reduce_add_sync(unsigned mask, int v) { return static_cast<int>(__reduce_add_sync(mask, static_cast<unsigned>(v))); }
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) { return ::dk_emu::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a < b ? a : b; }); }
inline int __reduce_min_sync(unsigned mask, int v) { return ::dk_emu::warp_reduce(mask, v, [](int a, int b) { return a < b ? a : b; }); }
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) { return ::dk_emu::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a > b ? a : b; }); }
inline int __reduce_max_sync(unsigned mask, int v) { return ::dk_emu::warp_reduce(mask, v, [](int a, int b) { return a > b ? a : b; }); }
inline unsigned __reduce_and_sync(unsigned mask, unsigned v) { return ::dk_emu::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a & b; }); }
inline unsigned __reduce_or_sync(unsigned mask, unsigned v) { return ::dk_emu::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a | b; }); }
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v) { return ::dk_emu::warp_reduce(mask, v, [](unsigned a, unsigned b) { return a ^ b; }); }

template <class T>
inline unsigned __match_any_sync(unsigned mask, T value) {
    ::dk_emu::check_exchangeable<T>();
    ::dk_emu::WarpResult r = ::dk_emu::warp_sync(mask, ::dk_emu::OP_MATCH_ANY, &value, sizeof(T), 0);
    unsigned m = 0;
    for (unsigned i = 0; i < r.nlanes; ++i)
        if (std::memcmp(r.slots + 16 * i, &value, sizeof(T)) == 0) m |= 1u << i;
    return m;
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred) {
    ::dk_emu::check_exchangeable<T>();
    ::dk_emu::WarpResult r = ::dk_emu::warp_sync(mask, ::dk_emu::OP_MATCH_ALL, &value, sizeof(T), 0);
    for (unsigned i = 0; i < r.nlanes; ++i) {
        if (std::memcmp(r.slots + 16 * i, r.slots, sizeof(T)) != 0) {
            *pred = 0;
            return 0;
        }
    }
    *pred = 1;
    return r.nlanes == 32 ? 0xffffffffu : ((1u << r.nlanes) - 1u);
}

/* ------------------------------------------------------------------------------------------ */
/* Atomics: truly atomic across OS threads (blocks of a grid run in parallel), sequentially    */
/* consistent (stronger than the device's relaxed atomics, never weaker).                      */
/* Only the overloads CUDA has, so code that compiles here also compiles for the device.      */
/* ------------------------------------------------------------------------------------------ */

namespace dk_emu {
template <class T, class F>
inline T atomic_update(T* addr, F f) {
    T old;
    __atomic_load(addr, &old, __ATOMIC_RELAXED);
    T desired;
    do {
        desired = f(old);
    } while (!__atomic_compare_exchange(addr, &old, &desired, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
    return old;
}
}  // namespace dk_emu

#define DK_EMU_ATOMIC_INT(T)                                                                      \
    inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }           \
    inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }         \
    inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }             \
    inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }           \
    inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }           \
    inline T atomicMax(T* a, T v) { return ::dk_emu::atomic_update(a, [v](T o) { return o < v ? v : o; }); } \
    inline T atomicMin(T* a, T v) { return ::dk_emu::atomic_update(a, [v](T o) { return v < o ? v : o; }); } \
    inline T atomicCAS(T* a, T compare, T v) {                                                     \
        __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);    \
        return compare;                                                                            \
    }
DK_EMU_ATOMIC_INT(int)
DK_EMU_ATOMIC_INT(unsigned int)
DK_EMU_ATOMIC_INT(unsigned long long)
#undef DK_EMU_ATOMIC_INT
inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicSub(unsigned* a, unsigned v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }
inline long long atomicMax(long long* a, long long v) { return ::dk_emu::atomic_update(a, [v](long long o) { return o < v ? v : o; }); }
inline long long atomicMin(long long* a, long long v) { return ::dk_emu::atomic_update(a, [v](long long o) { return v < o ? v : o; }); }
inline unsigned short atomicCAS(unsigned short* a, unsigned short compare, unsigned short v) {
    __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;
}
inline float atomicAdd(float* a, float v) { return ::dk_emu::atomic_update(a, [v](float o) { return o + v; }); }
inline double atomicAdd(double* a, double v) { return ::dk_emu::atomic_update(a, [v](double o) { return o + v; }); }
inline float atomicExch(float* a, float v) {
    float old;
    __atomic_exchange(a, &v, &old, __ATOMIC_SEQ_CST);
    return old;
}
inline unsigned atomicInc(unsigned* a, unsigned limit) {
    return ::dk_emu::atomic_update(a, [limit](unsigned o) { return o >= limit ? 0u : o + 1u; });
}
inline unsigned atomicDec(unsigned* a, unsigned limit) {
    return ::dk_emu::atomic_update(a, [limit](unsigned o) { return (o == 0u || o > limit) ? limit : o - 1u; });
}
/* Block- and system-scope variants: same thing here. */
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd
#define atomicMax_block atomicMax
#define atomicMin_block atomicMin
#define atomicCAS_block atomicCAS
#define atomicExch_block atomicExch

/* ------------------------------------------------------------------------------------------ */
/* Half precision and bfloat16 (2-byte storage, CUDA's layout; conversions round to nearest    */
/* even exactly like the hardware: subnormals, overflow to inf, NaN -> canonical NaN 0x7fff).  */
/* The types convert implicitly to and from float like CUDA's host-side types; they have no   */
/* arithmetic operators here: compute in float.                                                */
/* ------------------------------------------------------------------------------------------ */

namespace dk_emu {

inline unsigned short float_to_half_bits(float f) {
    uint32_t x = bit_cast<uint32_t>(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return 0x7fffu;                      /* NaN */
    if (x >= 0x47800000u) return static_cast<unsigned short>(sign | 0x7c00u); /* >= 65536 or inf */
    if (x >= 0x38800000u) {                                    /* normal half: >= 2^-14 */
        const uint32_t mant = x & 0x7fffffu;
        uint32_t h = (((x >> 23) - 112u) << 10) | (mant >> 13);
        const uint32_t rem = mant & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h; /* a carry may reach inf: right */
        return static_cast<unsigned short>(sign | h);
    }
    if (x <= 0x33000000u) return static_cast<unsigned short>(sign); /* <= 2^-25: ties to 0 */
    /* Subnormal half: value = m * 2^(E-150), in units of 2^-24 that is m >> (126 - E). */
    const uint32_t m = (x & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - (x >> 23);
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    return static_cast<unsigned short>(sign | h);
}

inline float half_bits_to_float(unsigned short h) {
    const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;
    if (em >= 0x7c00u) return bit_cast<float>(sign | 0x7f800000u | ((em & 0x3ffu) << 13));
    if (em >= 0x0400u) return bit_cast<float>(sign | ((em << 13) + 0x38000000u));
    const float f = static_cast<float>(em) * 5.9604644775390625e-08f; /* em * 2^-24, exact */
    return sign ? -f : f;
}

inline unsigned short float_to_bf16_bits(float f) {
    const uint32_t x = bit_cast<uint32_t>(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu; /* NaN */
    /* Round to nearest even on the 16 dropped bits; the carry handles overflow to inf. */
    return static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_float(unsigned short b) { return bit_cast<float>(static_cast<uint32_t>(b) << 16); }

/* double -> 16-bit float with `mbits` explicit mantissa bits, minimum normal exponent `emin`,
 * bias `bias`: scale to an integer significand and let nearbyint (round to nearest even in the
 * default rounding mode) do the rounding. Rare on the device path; clarity over speed. */
inline unsigned short double_to_small_float_bits(double d, int mbits, int emin, int bias, int inf_bits) {
    const uint64_t x = bit_cast<uint64_t>(d);
    const unsigned short sign = static_cast<unsigned short>((x >> 48) & 0x8000u);
    if (std::isnan(d)) return 0x7fffu;
    const double a = std::fabs(d);
    if (std::isinf(a)) return static_cast<unsigned short>(sign | inf_bits);
    if (a == 0.0) return sign;
    int e;
    std::frexp(a, &e);
    e -= 1; /* a in [2^e, 2^(e+1)) */
    if (e < emin) e = emin; /* subnormal: fixed scale */
    double m = std::nearbyint(std::ldexp(a, mbits - e));
    if (m >= std::ldexp(1.0, mbits + 1)) { /* rounding carried into the next binade */
        m /= 2;
        e += 1;
    }
    const int biased = (m < std::ldexp(1.0, mbits)) ? 0 : e + bias; /* still subnormal? */
    if (biased >= (inf_bits >> mbits)) return static_cast<unsigned short>(sign | inf_bits);
    const unsigned mant = static_cast<unsigned>(m) & ((1u << mbits) - 1u);
    return static_cast<unsigned short>(sign | (static_cast<unsigned>(biased) << mbits) | mant);
}

}  // namespace dk_emu

struct __half_raw {
    unsigned short x;
};
struct __nv_bfloat16_raw {
    unsigned short x;
};

struct __attribute__((aligned(2))) __half {
    unsigned short __x;
    __half() = default;
    constexpr __half(const __half_raw& r) : __x(r.x) {}
    __half(float f) : __x(::dk_emu::float_to_half_bits(f)) {}
    __half(double d) : __x(::dk_emu::double_to_small_float_bits(d, 10, -14, 15, 0x7c00)) {}
    __half(int i) : __half(static_cast<float>(i)) {}
    __half(unsigned int i) : __half(static_cast<float>(i)) {}
    __half(short i) : __half(static_cast<float>(i)) {}
    __half(unsigned short i) : __half(static_cast<float>(i)) {}
    __half(long long i) : __half(static_cast<double>(i)) {}
    __half(unsigned long long i) : __half(static_cast<double>(i)) {}
    __half& operator=(float f) { __x = ::dk_emu::float_to_half_bits(f); return *this; }
    __half& operator=(const __half_raw& r) { __x = r.x; return *this; }
    operator float() const { return ::dk_emu::half_bits_to_float(__x); }
    operator __half_raw() const { return __half_raw{__x}; }
};

struct __attribute__((aligned(2))) __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
    __nv_bfloat16(float f) : __x(::dk_emu::float_to_bf16_bits(f)) {}
    __nv_bfloat16(double d) : __x(::dk_emu::double_to_small_float_bits(d, 7, -126, 127, 0x7f80)) {}
    __nv_bfloat16(int i) : __nv_bfloat16(static_cast<double>(i)) {}
    __nv_bfloat16(unsigned int i) : __nv_bfloat16(static_cast<double>(i)) {}
    __nv_bfloat16(short i) : __nv_bfloat16(static_cast<float>(i)) {}
    __nv_bfloat16(unsigned short i) : __nv_bfloat16(static_cast<float>(i)) {}
    __nv_bfloat16(long long i) : __nv_bfloat16(static_cast<double>(i)) {}
    __nv_bfloat16(unsigned long long i) : __nv_bfloat16(static_cast<double>(i)) {}
    __nv_bfloat16& operator=(float f) { __x = ::dk_emu::float_to_bf16_bits(f); return *this; }
    __nv_bfloat16& operator=(const __nv_bfloat16_raw& r) { __x = r.x; return *this; }
    operator float() const { return ::dk_emu::bf16_bits_to_float(__x); }
    operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};

struct __attribute__((aligned(4))) __half2 {
    __half x, y;
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half layout");
static_assert(sizeof(__nv_bfloat16) == 2 && alignof(__nv_bfloat16) == 2, "__nv_bfloat16 layout");
static_assert(sizeof(__half2) == 4 && alignof(__half2) == 4, "__half2 layout");
static_assert(std::is_trivially_copyable<__half>::value && std::is_trivially_default_constructible<__half>::value,
              "__half must be trivial so that __shared__ arrays of it need no initialisation");

typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

inline float __half2float(__half h) { return ::dk_emu::half_bits_to_float(h.__x); }
inline __half __float2half(float f) { return __half_raw{::dk_emu::float_to_half_bits(f)}; }
inline __half __float2half_rn(float f) { return __half_raw{::dk_emu::float_to_half_bits(f)}; }
inline __half __double2half(double d) { return __half(d); }
inline __half __int2half_rn(int i) { return __half(i); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return static_cast<short>(h.__x); }
inline __half __ushort_as_half(unsigned short u) { return __half_raw{u}; }
inline __half __short_as_half(short s) { return __half_raw{static_cast<unsigned short>(s)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float2half2_rn(float a) { return __half2{__float2half_rn(a), __float2half_rn(a)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline bool __hisnan(__half h) { return (h.__x & 0x7fffu) > 0x7c00u; }
inline int __hisinf(__half h) { return h.__x == 0x7c00u ? 1 : (h.__x == 0xfc00u ? -1 : 0); }

inline float __bfloat162float(__nv_bfloat16 b) { return ::dk_emu::bf16_bits_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16_raw{::dk_emu::float_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16_raw{::dk_emu::float_to_bf16_bits(f)}; }
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16(d); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 b) { return static_cast<short>(b.__x); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16_raw{u}; }
inline __nv_bfloat16 __short_as_bfloat16(short s) { return __nv_bfloat16_raw{static_cast<unsigned short>(s)}; }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline bool __hisnan(__nv_bfloat16 h) { return (h.__x & 0x7fffu) > 0x7f80u; }

/* ------------------------------------------------------------------------------------------ */
/* Math. <cmath> names are available unqualified through <math.h>.                            */
/*                                                                                            */
/* Fast-math intrinsics (__expf, __logf, __sinf, __fdividef, ...). By default they are the     */
/* correctly rounded host functions; the device's are approximations with the error bounds of  */
/* the CUDA C++ Programming Guide, appendix "Mathematical Functions", section "Intrinsic        */
/* Functions", table "Single-Precision Floating-Point Intrinsic Functions"                     */
/* (https://docs.nvidia.com/cuda/cuda-c-programming-guide/#intrinsic-functions):              */
/*   __fdividef(x,y)  for |y| in [2^-126, 2^126], the maximum ulp error is 2 (and 0 for        */
/*                    2^126 < |y| < 2^128 and finite x, NaN for infinite x: see below)         */
/*   __expf(x)        the maximum ulp error is 2 + floor(abs(1.173 * x))                       */
/*   __exp10f(x)      the maximum ulp error is 2 + floor(abs(2.97 * x))                        */
/*   __logf(x)        for x in [0.5, 2], the maximum absolute error is 2^-21.41, otherwise,    */
/*                    the maximum ulp error is 3                                               */
/*   __log2f(x)       for x in [0.5, 2], the maximum absolute error is 2^-22, otherwise, the   */
/*                    maximum ulp error is 2                                                   */
/*   __log10f(x)      for x in [0.5, 2], the maximum absolute error is 2^-24, otherwise, the   */
/*                    maximum ulp error is 3                                                   */
/*   __sinf(x)        for x in [-pi, pi], the maximum absolute error is 2^-21.41, and larger   */
/*                    otherwise                                                                */
/*   __cosf(x)        for x in [-pi, pi], the maximum absolute error is 2^-21.19, and larger   */
/*                    otherwise                                                                */
/*   __sincosf        same as __sinf(x) and __cosf(x)                                          */
/*   __tanf(x)        derived from its implementation as __sinf(x) * (1/__cosf(x))             */
/*   __powf(x,y)      derived from its implementation as exp2f(y * __log2f(x))                 */
/* DISTILL_EMU_APPROX (read once) selects the model: unset or "exact": the host functions;     */
/* "perturb": every result moved by a pseudo-random amount within its bound, a function of the */
/* inputs and DISTILL_EMU_APPROX_SEED only; "max": always at the edge of the bound, the sign   */
/* from the same hash. In both, special values behave as on the device (see approx_*). A      */
/* kernel test that passes only with accurate intrinsics fails in these modes. Outside the     */
/* documented ranges (|x| > pi for sin/cos, which are "larger otherwise") the in-range bound   */
/* is used: the device may be worse. Not a device function: __exp2f (nvcc 13 rejects it in     */
/* device code); modelled here as ex2.approx.f32 with 2 ulp, the error assumed for the ex2     */
/* step of __powf too. fdividef (no underscores) is IEEE division unless -use_fast_math, which */
/* the crate does not use (crt/device_functions.h; nvcc emits div.rn.f32): exact in all modes. */
/* ------------------------------------------------------------------------------------------ */

namespace dk_emu {
enum : int { kApproxExact = 0, kApproxPerturb = 1, kApproxMax = 2 };
struct ApproxConfig {
    int mode;
    unsigned long long seed;
};
__attribute__((noinline, cold)) inline ApproxConfig approx_config_from_env() {
    ApproxConfig c{kApproxExact, 0};
    const char* m = getenv("DISTILL_EMU_APPROX");
    if (m && *m) {
        if (!strcmp(m, "exact"))
            c.mode = kApproxExact;
        else if (!strcmp(m, "perturb"))
            c.mode = kApproxPerturb;
        else if (!strcmp(m, "max"))
            c.mode = kApproxMax;
        else
            fprintf(stderr, "distill emulator: ignoring DISTILL_EMU_APPROX=%s (expected exact, perturb or max)\n", m);
    }
    const char* s = getenv("DISTILL_EMU_APPROX_SEED");
    if (s && *s) {
        char* end = nullptr;
        const unsigned long long v = strtoull(s, &end, 0);
        if (end == s || *end != '\0' || *s == '-')
            fprintf(stderr, "distill emulator: ignoring DISTILL_EMU_APPROX_SEED=%s (expected an unsigned integer)\n", s);
        else
            c.seed = v;
    }
    return c;
}
/* Read once per process; the exact mode's hot path is this guard check and one compare. */
inline const ApproxConfig& approx_config() {
    static const ApproxConfig c = approx_config_from_env();
    return c;
}
inline bool approx_on() { return __builtin_expect(approx_config().mode != kApproxExact, 0); }

enum ApproxFn : unsigned { kFnExp = 1, kFnExp10, kFnExp2, kFnLog, kFnLog2, kFnLog10, kFnSin, kFnCos, kFnDiv };
inline unsigned long long approx_mix(unsigned long long z) { /* splitmix64's finaliser */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
inline unsigned long long approx_hash(const ApproxConfig& c, ApproxFn fn, float a, float b = 0.0f) {
    const unsigned long long in = (static_cast<unsigned long long>(bit_cast<uint32_t>(a)) << 32) | bit_cast<uint32_t>(b);
    return approx_mix(approx_mix(c.seed ^ (0x9e3779b97f4a7c15ull * fn)) ^ in);
}
/* `cr` (the correctly rounded result) moved by k ulps, |k| <= max_ulps, counted in representable
 * floats as the Guide counts them: k uniform (perturb) or +-max_ulps (max). Zero, infinity and
 * NaN stay; the result neither crosses zero nor overflows to infinity. */
inline float approx_ulps(const ApproxConfig& c, float cr, long long max_ulps, unsigned long long h) {
    if (!std::isfinite(cr) || cr == 0.0f) return cr;
    const long long k = c.mode == kApproxMax ? ((h >> 63) ? max_ulps : -max_ulps)
                                             : static_cast<long long>(h % static_cast<unsigned long long>(2 * max_ulps + 1)) - max_ulps;
    const uint32_t u = bit_cast<uint32_t>(cr);
    const long long mag = std::min(std::max(static_cast<long long>(u & 0x7fffffffu) + k, 0ll), 0x7f7fffffll);
    return bit_cast<float>((u & 0x80000000u) | static_cast<uint32_t>(mag));
}
/* `ref` (the double-precision value) moved by at most `err`, uniform (perturb) or +-err (max),
 * rounded to float and pulled back inside the bound if the rounding pushed it out. */
inline float approx_abs(const ApproxConfig& c, double ref, double err, unsigned long long h) {
    const double u = c.mode == kApproxMax ? ((h >> 63) ? 1.0 : -1.0) : static_cast<double>(h >> 11) * 0x1p-52 - 1.0;
    float f = static_cast<float>(ref + u * err);
    while (std::fabs(static_cast<double>(f) - ref) > err) f = nextafterf(f, static_cast<float>(ref));
    return f;
}
inline float flush_subnormal(float f) { return std::fabs(f) < FLT_MIN ? std::copysign(0.0f, f) : f; }

/* The approximations. Special values as the device computes them: e^(+-0) = 1, e^-inf = +0,
 * overflow to inf and underflow to 0 as the correctly rounded result; log(1) = +0, log(+-0) = -inf,
 * log(x < 0) = NaN; sin(+-0) = +-0, cos(+-0) = 1, sin/cos(+-inf) = NaN; NaN in, NaN out. */
__attribute__((noinline, cold)) inline float approx_exp(ApproxFn fn, float x) {
    const ApproxConfig& c = approx_config();
    const double xd = x;
    const double ref = fn == kFnExp ? std::exp(xd) : fn == kFnExp10 ? std::pow(10.0, xd) : std::exp2(xd);
    if (std::fabs(x) < FLT_MIN) return 1.0f; /* ex2.approx: +-0 and subnormals give exactly 1 */
    const double slope = fn == kFnExp ? 1.173 : fn == kFnExp10 ? 2.97 : 0.0;
    const float cr = static_cast<float>(ref);
    if (!std::isfinite(cr) || cr == 0.0f) return cr; /* before the bound: it overflows for large |x| */
    return approx_ulps(c, cr, 2 + static_cast<long long>(std::floor(std::fabs(slope * xd))), approx_hash(c, fn, x));
}
__attribute__((noinline, cold)) inline float approx_log(ApproxFn fn, float x) {
    const ApproxConfig& c = approx_config();
    const double xd = x;
    const double ref = fn == kFnLog ? std::log(xd) : fn == kFnLog2 ? std::log2(xd) : std::log10(xd);
    if (!(x > 0.0f) || x == 1.0f || std::isinf(x)) return static_cast<float>(ref); /* NaN, -inf, +0, +inf */
    if (x >= 0.5f && x <= 2.0f) {
        const double err = fn == kFnLog ? std::exp2(-21.41) : fn == kFnLog2 ? 0x1p-22 : 0x1p-24;
        return approx_abs(c, ref, err, approx_hash(c, fn, x));
    }
    return approx_ulps(c, static_cast<float>(ref), fn == kFnLog2 ? 2 : 3, approx_hash(c, fn, x));
}
/* ex2.approx.ftz.f32 and lg2.approx.ftz.f32 (the kernels' dk_ex2 and dk_lg2, inline PTX): the
 * bounds of ex2.approx.f32 (exp2f, 2 ulp) and lg2.approx.f32 (__log2f: 2^-22 absolute in [0.5, 2],
 * 2 ulp elsewhere), with .ftz: a subnormal input reads as +-0 (2^x = 1, log2 x = -inf) and a
 * subnormal result is +0. nvcc's exp2f and __log2f are the non-ftz forms (-ftz=false), which
 * cost three more instructions each on sm_90. The flushes apply in every mode, exact included:
 * the device does them, and a kernel that depends on a subnormal must fail here too. */
inline float ex2_approx_ftz(float x) {
    if (std::fabs(x) < FLT_MIN) return 1.0f;
    return flush_subnormal(approx_on() ? approx_exp(kFnExp2, x) : exp2f(x));
}
inline float lg2_approx_ftz(float x) {
    if (std::fabs(x) < FLT_MIN) return -INFINITY;
    return approx_on() ? approx_log(kFnLog2, x) : log2f(x);
}
/* sin.approx/cos.approx; __sinf's and __tanf's subnormal results are flushed to +-0 (their notes in
 * crt/device_functions.h). */
__attribute__((noinline, cold)) inline float approx_sin(float x) {
    const ApproxConfig& c = approx_config();
    if (std::isnan(x) || std::isinf(x)) return sinf(x);
    if (std::fabs(x) < FLT_MIN) return std::copysign(0.0f, x);
    return flush_subnormal(approx_abs(c, std::sin(static_cast<double>(x)), std::exp2(-21.41), approx_hash(c, kFnSin, x)));
}
__attribute__((noinline, cold)) inline float approx_cos(float x) {
    const ApproxConfig& c = approx_config();
    if (std::isnan(x) || std::isinf(x)) return cosf(x);
    if (std::fabs(x) < FLT_MIN) return 1.0f;
    return approx_abs(c, std::cos(static_cast<double>(x)), std::exp2(-21.19), approx_hash(c, kFnCos, x));
}
/* div.approx.f32: x * (1/y). 2 ulp for |y| in [2^-126, 2^126]; for 2^126 < |y| < 2^128 the
 * reciprocal is 0, so the result is a signed zero for finite x and NaN for infinite x (documented
 * for __fdividef in crt/device_functions.h). Elsewhere (y zero, subnormal, infinite) exact. */
__attribute__((noinline, cold)) inline float approx_fdividef(float x, float y) {
    const ApproxConfig& c = approx_config();
    const float ay = std::fabs(y);
    if (ay > 0x1p126f && ay < INFINITY) return x * std::copysign(0.0f, y);
    if (!(ay >= 0x1p-126f && ay <= 0x1p126f)) return x / y;
    return approx_ulps(c, x / y, 2, approx_hash(c, kFnDiv, x, y));
}
/* nvcc's code: sin.approx, cos.approx, div.approx; subnormal results flushed. */
__attribute__((noinline, cold)) inline float approx_tan(float x) { return flush_subnormal(approx_fdividef(approx_sin(x), approx_cos(x))); }
/* nvcc's code: ex2.approx(y * lg2.approx(x)), hence its special values: x < 0 gives NaN,
 * __powf(0, 0) and __powf(1, inf) NaN, __powf(0, y > 0) = 0. */
__attribute__((noinline, cold)) inline float approx_pow(float x, float y) {
    const float t = y * approx_log(kFnLog2, x);
    return approx_exp(kFnExp2, t);
}
}  // namespace dk_emu

inline float __expf(float x) { return ::dk_emu::approx_on() ? ::dk_emu::approx_exp(::dk_emu::kFnExp, x) : expf(x); }
inline float __exp10f(float x) { return ::dk_emu::approx_on() ? ::dk_emu::approx_exp(::dk_emu::kFnExp10, x) : powf(10.0f, x); }
inline float __exp2f(float x) { return ::dk_emu::approx_on() ? ::dk_emu::approx_exp(::dk_emu::kFnExp2, x) : exp2f(x); }
inline float __logf(float x) { return ::dk_emu::approx_on() ? ::dk_emu::approx_log(::dk_emu::kFnLog, x) : logf(x); }
inline float __log2f(float x) { return ::dk_emu::approx_on() ? ::dk_emu::approx_log(::dk_emu::kFnLog2, x) : log2f(x); }
inline float __log10f(float x) { return ::dk_emu::approx_on() ? ::dk_emu::approx_log(::dk_emu::kFnLog10, x) : log10f(x); }
inline float __powf(float x, float y) { return ::dk_emu::approx_on() ? ::dk_emu::approx_pow(x, y) : powf(x, y); }
inline float __sinf(float x) { return ::dk_emu::approx_on() ? ::dk_emu::approx_sin(x) : sinf(x); }
inline float __cosf(float x) { return ::dk_emu::approx_on() ? ::dk_emu::approx_cos(x) : cosf(x); }
inline float __tanf(float x) { return ::dk_emu::approx_on() ? ::dk_emu::approx_tan(x) : tanf(x); }
inline void __sincosf(float x, float* s, float* c) {
    if (::dk_emu::approx_on()) {
        if (std::fabs(x) < FLT_MIN) x = std::copysign(0.0f, x); /* subnormal input flushed (its note) */
        *s = ::dk_emu::approx_sin(x);
        *c = ::dk_emu::approx_cos(x);
        return;
    }
    *s = sinf(x);
    *c = cosf(x);
}
inline float __fdividef(float a, float b) { return ::dk_emu::approx_on() ? ::dk_emu::approx_fdividef(a, b) : a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline double fdivide(double a, double b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); /* NaN -> 0 */ }

/* The _rn arithmetic intrinsics are never contracted into an FMA (the emulator is built with
 * -ffp-contract=fast, like nvcc's default --fmad=true): an empty asm makes the product opaque
 * to the optimiser, and the operands of an addition too, so that __fadd_rn(a * b, c) keeps its
 * rounded product. */
#if defined(__x86_64__) || defined(__i386__)
#define DK_EMU_OPAQUE_F(v) __asm__("" : "+x"(v))
#elif defined(__aarch64__)
#define DK_EMU_OPAQUE_F(v) __asm__("" : "+w"(v))
#else
#define DK_EMU_OPAQUE_F(v) __asm__("" : "+m"(v))
#endif
inline float __fmul_rn(float a, float b) { float r = a * b; DK_EMU_OPAQUE_F(r); return r; }
inline float __fadd_rn(float a, float b) { DK_EMU_OPAQUE_F(a); DK_EMU_OPAQUE_F(b); float r = a + b; DK_EMU_OPAQUE_F(r); return r; }
inline float __fsub_rn(float a, float b) { DK_EMU_OPAQUE_F(a); DK_EMU_OPAQUE_F(b); float r = a - b; DK_EMU_OPAQUE_F(r); return r; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dmul_rn(double a, double b) { double r = a * b; DK_EMU_OPAQUE_F(r); return r; }
inline double __dadd_rn(double a, double b) { DK_EMU_OPAQUE_F(a); DK_EMU_OPAQUE_F(b); double r = a + b; DK_EMU_OPAQUE_F(r); return r; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }

inline float __int_as_float(int i) { return ::dk_emu::bit_cast<float>(i); }
inline int __float_as_int(float f) { return ::dk_emu::bit_cast<int>(f); }
inline float __uint_as_float(unsigned u) { return ::dk_emu::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return ::dk_emu::bit_cast<unsigned>(f); }
inline double __longlong_as_double(long long i) { return ::dk_emu::bit_cast<double>(i); }
inline long long __double_as_longlong(double d) { return ::dk_emu::bit_cast<long long>(d); }
inline int __double2hiint(double d) { return static_cast<int>(::dk_emu::bit_cast<unsigned long long>(d) >> 32); }
inline int __double2loint(double d) { return static_cast<int>(::dk_emu::bit_cast<unsigned long long>(d)); }
inline double __hiloint2double(int hi, int lo) {
    return ::dk_emu::bit_cast<double>((static_cast<unsigned long long>(static_cast<unsigned>(hi)) << 32) | static_cast<unsigned>(lo));
}

/* Float -> integer conversions saturate and map NaN to 0, like the device's cvt. */
namespace dk_emu {
template <class I>
inline I float_to_int_sat(double r) {
    if (std::isnan(r)) return 0;
    if (r <= static_cast<double>(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
    if (r >= static_cast<double>(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
    return static_cast<I>(r);
}
}  // namespace dk_emu
inline int __float2int_rn(float x) { return ::dk_emu::float_to_int_sat<int>(std::nearbyint(static_cast<double>(x))); }
inline int __float2int_rz(float x) { return ::dk_emu::float_to_int_sat<int>(std::trunc(static_cast<double>(x))); }
inline int __float2int_rd(float x) { return ::dk_emu::float_to_int_sat<int>(std::floor(static_cast<double>(x))); }
inline int __float2int_ru(float x) { return ::dk_emu::float_to_int_sat<int>(std::ceil(static_cast<double>(x))); }
inline unsigned __float2uint_rn(float x) { return ::dk_emu::float_to_int_sat<unsigned>(std::nearbyint(static_cast<double>(x))); }
inline unsigned __float2uint_rz(float x) { return ::dk_emu::float_to_int_sat<unsigned>(std::trunc(static_cast<double>(x))); }
inline long long __float2ll_rn(float x) { return ::dk_emu::float_to_int_sat<long long>(std::nearbyint(static_cast<double>(x))); }
inline long long __float2ll_rz(float x) { return ::dk_emu::float_to_int_sat<long long>(std::trunc(static_cast<double>(x))); }
inline int __double2int_rn(double x) { return ::dk_emu::float_to_int_sat<int>(std::nearbyint(x)); }
inline int __double2int_rz(double x) { return ::dk_emu::float_to_int_sat<int>(std::trunc(x)); }
inline float __int2float_rn(int i) { return static_cast<float>(i); }
inline float __uint2float_rn(unsigned u) { return static_cast<float>(u); }
inline float __ll2float_rn(long long i) { return static_cast<float>(i); }
inline float __ull2float_rn(unsigned long long i) { return static_cast<float>(i); }
inline double __ll2double_rn(long long i) { return static_cast<double>(i); }
inline float __double2float_rn(double d) { return static_cast<float>(d); }

/* Integer intrinsics. */
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
    return (static_cast<unsigned long long>(__brev(static_cast<unsigned>(x))) << 32) | __brev(static_cast<unsigned>(x >> 32));
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32); }
inline long long __mul64hi(long long a, long long b) { return static_cast<long long>((static_cast<__int128>(a) * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __mul24(int a, int b) { return ((a << 8) >> 8) * ((b << 8) >> 8); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
    const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
    return static_cast<unsigned>((v << (shift & 31u)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
    const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
    return static_cast<unsigned>(v >> (shift & 31u));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
    return r;
}

/* min/max as CUDA device code has them (global, non-template overloads). */
#define DK_EMU_MINMAX(T)                                    \
    inline T max(T a, T b) { return a > b ? a : b; } \
    inline T min(T a, T b) { return a < b ? a : b; }
DK_EMU_MINMAX(int)
DK_EMU_MINMAX(unsigned int)
DK_EMU_MINMAX(long)
DK_EMU_MINMAX(unsigned long)
DK_EMU_MINMAX(long long)
DK_EMU_MINMAX(unsigned long long)
#undef DK_EMU_MINMAX
inline unsigned int max(int a, unsigned int b) { return max(static_cast<unsigned>(a), b); }
inline unsigned int max(unsigned int a, int b) { return max(a, static_cast<unsigned>(b)); }
inline unsigned int min(int a, unsigned int b) { return min(static_cast<unsigned>(a), b); }
inline unsigned int min(unsigned int a, int b) { return min(a, static_cast<unsigned>(b)); }
inline unsigned long long max(long long a, unsigned long long b) { return max(static_cast<unsigned long long>(a), b); }
inline unsigned long long max(unsigned long long a, long long b) { return max(a, static_cast<unsigned long long>(b)); }
inline unsigned long long min(long long a, unsigned long long b) { return min(static_cast<unsigned long long>(a), b); }
inline unsigned long long min(unsigned long long a, long long b) { return min(a, static_cast<unsigned long long>(b)); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(static_cast<double>(a), b); }
inline double max(double a, float b) { return fmax(a, static_cast<double>(b)); }
inline double min(float a, double b) { return fmin(static_cast<double>(a), b); }
inline double min(double a, float b) { return fmin(a, static_cast<double>(b)); }
inline unsigned umax(unsigned a, unsigned b) { return max(a, b); }
inline unsigned umin(unsigned a, unsigned b) { return min(a, b); }
inline long long llmax(long long a, long long b) { return max(a, b); }
inline long long llmin(long long a, long long b) { return min(a, b); }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return max(a, b); }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return min(a, b); }

/* Cache-hinted loads and stores: plain accesses. */
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

/* Nanoseconds of a monotonic clock stand in for SM cycles. */
inline long long clock64() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}
inline void __nanosleep(unsigned) {}

#endif /* DISTILL_EMULATOR_SIMT_H */
