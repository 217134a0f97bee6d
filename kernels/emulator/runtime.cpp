/*
 * runtime.cpp: the SIMT scheduler of the emulated GPU.
 *
 * Model
 *   - One CUDA thread is one fiber: a user-level context with its own mmap'd stack (64 KiB by
 *     default, DISTILL_EMU_STACK_KB to change, with a guard page below it). Stacks are regions
 *     aligned to their power-of-two size with a header at the top naming the fiber, so device
 *     code finds "the current CUDA thread" from its stack pointer (simt.h: self()), without
 *     thread-local storage and with nothing to update on a switch.
 *   - A block runs on one OS thread from start to end; its fibers switch cooperatively, only at
 *     __syncthreads, warp primitives and thread exit. No preemption: a spin-wait on memory that
 *     another thread of the same block writes never ends (documented in README.md).
 *   - Blocks of a grid are spread over a pool of OS workers (DISTILL_EMU_THREADS, default: the
 *     CPUs this process may run on). The launching thread is worker 0, so a one-block launch
 *     never wakes the pool. Launches are serialised by one global mutex.
 *
 * Scheduling
 *   The live fibers of a block form a ring. A fiber that must wait records what it waits for as
 *   "the word *wait_word still equals wait_value" (a barrier or warp generation counter) and
 *   switches directly to the next fiber in the ring whose condition no longer holds. The last
 *   arriver at a rendezvous bumps the generation, which releases everybody at once, and simply
 *   continues. So a shuffle costs one context switch per lane. If a full turn of the ring finds
 *   nobody runnable, no progress is possible: that is barrier/warp divergence and the launch
 *   fails with a message that names the kernel and the block.
 *
 * Warp exchange
 *   Each warp has two sets of 32 16-byte slots, used by alternating generations. A lane writes
 *   its value into slot[gen & 1][lane] and parks; once released it reads the source lane's slot.
 *   A fast lane can already be at the next primitive and write slot[(gen + 1) & 1] while slow
 *   lanes still read slot[gen & 1]; it cannot get two generations ahead because that next
 *   primitive needs the slow lanes too.
 *
 * Context switch
 *   x86_64 and aarch64: a hand-written switch saving the callee-saved registers (no syscall, no
 *   signal mask). Elsewhere (or with -DDK_EMU_USE_UCONTEXT): ucontext, correct but ~10x slower.
 *   Under AddressSanitizer every switch is announced with __sanitizer_{start,finish}_switch_fiber.
 */
#include "simt.h"
#include "emu_internal.h"

#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define DK_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DK_EMU_ASAN 1
#endif
#endif
#ifndef DK_EMU_ASAN
#define DK_EMU_ASAN 0
#endif
#ifndef DK_EMU_CHECK
#define DK_EMU_CHECK 0
#endif
#if DK_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if (defined(__x86_64__) || defined(__aarch64__)) && !defined(DK_EMU_USE_UCONTEXT)
#define DK_EMU_ASM_SWITCH 1
#else
#define DK_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

namespace dk_emu {

/* ------------------------------------------------------------------------------------------ */
/* Small helpers                                                                               */
/* ------------------------------------------------------------------------------------------ */

std::string strfmt(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return std::string(buf);
}

static const char* op_name(unsigned op) {
    static const char* const names[OP_COUNT_] = {
        "(running)",       "__syncthreads", "cluster.sync()", "__shfl_sync",  "__shfl_up_sync", "__shfl_down_sync",
        "__shfl_xor_sync", "__ballot_sync", "__any_sync",   "__all_sync",     "__syncwarp",
        "__reduce_*_sync", "__match_any_sync", "__match_all_sync",
    };
    return op < OP_COUNT_ ? names[op] : "(unknown primitive)";
}

static unsigned env_unsigned(const char* name, unsigned fallback, unsigned lo, unsigned hi) {
    const char* s = getenv(name);
    if (!s || !*s) return fallback;
    char* end = nullptr;
    unsigned long v = strtoul(s, &end, 10);
    if (end == s || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "distill emulator: ignoring %s=%s (expected an integer in [%u, %u])\n", name, s, lo, hi);
        return fallback;
    }
    return static_cast<unsigned>(v);
}

/* ------------------------------------------------------------------------------------------ */
/* Contexts                                                                                    */
/* ------------------------------------------------------------------------------------------ */

struct Fiber;
static void fiber_main(Fiber* f) noexcept;

#if DK_EMU_ASM_SWITCH
struct Context {
    void* sp = nullptr; /* saved stack pointer; the callee-saved registers sit on that stack */
};

extern "C" DK_EMU_HIDDEN void dk_emu_ctx_switch(void** save_sp, void* new_sp);
extern "C" DK_EMU_HIDDEN void dk_emu_ctx_entry();

#if defined(__x86_64__)
/* dk_emu_ctx_switch(save, next): push the callee-saved registers, save rsp into *save, load
 * next as rsp, pop the registers of the target and return into it. A fresh fiber's stack is
 * prepared (ctx_make) so that this "returns" into dk_emu_ctx_entry with r12 = argument and
 * r13 = function. rbp = 0 there ends frame-pointer stack walks (debuggers, ASan reports).
 * The x87 control word and MXCSR are not switched: kernels do not change them. */
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".globl dk_emu_ctx_switch\n"
    ".hidden dk_emu_ctx_switch\n"
    ".type dk_emu_ctx_switch,@function\n"
    "dk_emu_ctx_switch:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    ".size dk_emu_ctx_switch, .-dk_emu_ctx_switch\n"
    ".p2align 4\n"
    ".globl dk_emu_ctx_entry\n"
    ".hidden dk_emu_ctx_entry\n"
    ".type dk_emu_ctx_entry,@function\n"
    "dk_emu_ctx_entry:\n"
    "    movq %r12, %rdi\n"
    "    callq *%r13\n"
    "    ud2\n"
    ".size dk_emu_ctx_entry, .-dk_emu_ctx_entry\n");

static void ctx_make(Context* c, char* stack_lo, size_t size, Fiber* arg) {
    /* Frame popped by dk_emu_ctx_switch: r15 r14 r13 r12 rbx rbp, then the return address.
     * After the `ret`, rsp = top (16-byte aligned); the entry stub's `call` then leaves rsp + 8
     * 16-byte aligned at the function's entry, as the SysV ABI wants. */
    uintptr_t top = reinterpret_cast<uintptr_t>(stack_lo + size) & ~static_cast<uintptr_t>(15);
    void** sp = reinterpret_cast<void**>(top - 7 * sizeof(void*));
    sp[0] = nullptr;                                    /* r15 */
    sp[1] = nullptr;                                    /* r14 */
    sp[2] = reinterpret_cast<void*>(&fiber_main);       /* r13: function */
    sp[3] = arg;                                        /* r12: argument */
    sp[4] = nullptr;                                    /* rbx */
    sp[5] = nullptr;                                    /* rbp */
    sp[6] = reinterpret_cast<void*>(&dk_emu_ctx_entry); /* return address */
    c->sp = sp;
}

#else /* __aarch64__ */
/* AAPCS64: x19-x28, the frame pointer x29, the link register x30 and the low halves of v8-v15
 * (d8-d15) are callee-saved. dk_emu_ctx_switch stores them in a 160-byte frame on the current
 * stack, saves sp into *save, loads next as sp, restores the target's frame and returns to its
 * x30. A fresh fiber's frame (ctx_make) has x30 = dk_emu_ctx_entry, x19 = argument,
 * x20 = function, x29 = 0 (ends frame-pointer stack walks). FPCR is not switched. */
__asm__(
    ".text\n"
    ".p2align 4\n"
    ".globl dk_emu_ctx_switch\n"
    ".hidden dk_emu_ctx_switch\n"
    ".type dk_emu_ctx_switch,%function\n"
    "dk_emu_ctx_switch:\n"
    "    sub sp, sp, #160\n"
    "    stp x19, x20, [sp, #0]\n"
    "    stp x21, x22, [sp, #16]\n"
    "    stp x23, x24, [sp, #32]\n"
    "    stp x25, x26, [sp, #48]\n"
    "    stp x27, x28, [sp, #64]\n"
    "    stp x29, x30, [sp, #80]\n"
    "    stp d8, d9, [sp, #96]\n"
    "    stp d10, d11, [sp, #112]\n"
    "    stp d12, d13, [sp, #128]\n"
    "    stp d14, d15, [sp, #144]\n"
    "    mov x9, sp\n"
    "    str x9, [x0]\n"
    "    mov sp, x1\n"
    "    ldp x19, x20, [sp, #0]\n"
    "    ldp x21, x22, [sp, #16]\n"
    "    ldp x23, x24, [sp, #32]\n"
    "    ldp x25, x26, [sp, #48]\n"
    "    ldp x27, x28, [sp, #64]\n"
    "    ldp x29, x30, [sp, #80]\n"
    "    ldp d8, d9, [sp, #96]\n"
    "    ldp d10, d11, [sp, #112]\n"
    "    ldp d12, d13, [sp, #128]\n"
    "    ldp d14, d15, [sp, #144]\n"
    "    add sp, sp, #160\n"
    "    ret\n"
    ".size dk_emu_ctx_switch, .-dk_emu_ctx_switch\n"
    ".p2align 4\n"
    ".globl dk_emu_ctx_entry\n"
    ".hidden dk_emu_ctx_entry\n"
    ".type dk_emu_ctx_entry,%function\n"
    "dk_emu_ctx_entry:\n"
    "    mov x0, x19\n"
    "    blr x20\n"
    "    brk #0\n"
    ".size dk_emu_ctx_entry, .-dk_emu_ctx_entry\n");

static void ctx_make(Context* c, char* stack_lo, size_t size, Fiber* arg) {
    uintptr_t top = reinterpret_cast<uintptr_t>(stack_lo + size) & ~static_cast<uintptr_t>(15);
    void** frame = reinterpret_cast<void**>(top - 160);
    for (int i = 0; i < 20; ++i) frame[i] = nullptr;
    frame[0] = arg;                                          /* x19: argument */
    frame[1] = reinterpret_cast<void*>(&fiber_main);         /* x20: function */
    frame[10] = nullptr;                                     /* x29 */
    frame[11] = reinterpret_cast<void*>(&dk_emu_ctx_entry);  /* x30: return address */
    c->sp = frame;
}
#endif

static inline void ctx_swap(Context* from, Context* to) { dk_emu_ctx_switch(&from->sp, to->sp); }

#else /* ucontext fallback */
struct Context {
    ucontext_t uc;
};

static void uc_entry(unsigned hi, unsigned lo) {
    fiber_main(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo));
}

static void ctx_make(Context* c, char* stack_lo, size_t size, Fiber* arg) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = stack_lo;
    c->uc.uc_stack.ss_size = size;
    c->uc.uc_link = nullptr;
    const uintptr_t p = reinterpret_cast<uintptr_t>(arg);
    makecontext(&c->uc, reinterpret_cast<void (*)()>(&uc_entry), 2, static_cast<unsigned>(p >> 32),
                static_cast<unsigned>(p & 0xffffffffu));
}

static inline void ctx_swap(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
#endif

/* ------------------------------------------------------------------------------------------ */
/* Data structures                                                                             */
/* ------------------------------------------------------------------------------------------ */

/* One fiber stack: a region of g_stack_bytes aligned to its size. Layout, low to high: a
 * PROT_NONE guard page (overflow faults instead of corrupting a neighbour), the usable stack,
 * and the StackHeader (see simt.h) in the top kStackHeaderBytes. */
struct Stack {
    char* lo = nullptr; /* usable [lo, lo + size) */
    size_t size = 0;
};

struct Warp {
    unsigned gen = 0;     /* completed rendezvous count */
    unsigned sync_gen = 0; /* completed __syncwarp count: the warp primitive that orders memory */
    unsigned arrived = 0; /* lanes at the current rendezvous */
    unsigned nlanes = 32;
    unsigned mask = 0xffffffffu;
    unsigned index = 0;   /* warp index in the cluster's blocks, rank-major (the block's own for a plain launch) */
    unsigned first = 0;   /* fiber index of lane 0 */
    unsigned op[2] = {0, 0};   /* primitive of the rendezvous using slot set gen & 1 */
    unsigned size[2] = {0, 0}; /* value size of that rendezvous */
    unsigned ballot[2] = {0, 0};
    alignas(16) unsigned char slots[2][32][16];
};

struct Worker;

/* The fields the scheduler touches on every switch come first and fit one cache line. */
struct alignas(64) Fiber : FiberPublic {
    Context ctx;
    Fiber* next = nullptr;               /* ring of live fibers of the block */
    const unsigned* wait_word = nullptr; /* parked while *wait_word == wait_value */
    unsigned wait_value = 0;
    unsigned wait_op = OP_NONE; /* what it waits at, for diagnostics */
    Warp* warp = nullptr;
    Worker* worker = nullptr;
    struct Block* blk = nullptr; /* the block this thread belongs to (one of the cluster's) */
    /* colder */
    Fiber* prev = nullptr;
    bool exited = false;
    Stack stack;
    void* fake_stack = nullptr; /* ASan's fake stack while switched out */
};

/* A fresh fiber is runnable: its wait word (1) differs from its wait value (0). */
static const unsigned kRunnable = 1;

struct Launch;

struct Block {
    uint3 idx = {0, 0, 0};
    unsigned rank = 0; /* in its cluster (0 for a plain launch) */
    unsigned nthreads = 0;
    unsigned live = 0;
    unsigned bar_gen = 0;
    unsigned bar_arrived = 0;
    int bar_count[2] = {0, 0};
    unsigned long long linear = 0; /* linear index in the grid */
    unsigned long long serial = 0; /* unique per block run in this process (sanitizer epochs); one
                                    * value for all the blocks of a cluster, whose shared memory the
                                    * cluster's threads all reach */
};

/* Thread-block clusters (sm_90). A worker runs one cluster at a time: the fibers of all its blocks
 * form one ring on one OS thread, so cluster.sync() is one more rendezvous of that ring and
 * map_shared_rank() is pointer arithmetic between the blocks' dynamic shared memory. Static
 * __shared__ is thread_local, so the blocks of a cluster would share it: cluster kernels must use
 * dynamic shared memory (the check build reports any static __shared__ access in a cluster
 * launch). A plain launch is a cluster of one block. */
static constexpr unsigned kMaxClusterBlocks = 8; /* the portable cluster size limit */

struct Cluster {
    unsigned size = 1;     /* blocks */
    unsigned nthreads = 0; /* of all its blocks */
    unsigned live = 0;     /* threads not yet exited */
    unsigned bar_gen = 0;  /* completed cluster.sync() rendezvous */
    unsigned bar_arrived = 0;
    bool aborted = false;
};

static std::atomic<unsigned long long> g_block_serial{1};

struct Worker {
    unsigned index = 0;
    std::vector<Stack> stacks; /* grown lazily, reused across blocks and launches */
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    Context main_ctx; /* the OS thread's own stack while a cluster runs */
    void* main_fake_stack = nullptr;
    const void* main_stack_lo = nullptr;
    size_t main_stack_size = 0;
    Block blocks[kMaxClusterBlocks];     /* the running cluster's, by rank */
    BlockPublic pubs[kMaxClusterBlocks]; /* what blockIdx/blockDim/gridDim/DK_DYNAMIC_SHARED read */
    Cluster cluster;
    Launch* launch = nullptr;
    size_t dyn_smem_bytes = 0;
    /* Watchdog (DISTILL_EMU_WATCHDOG_S): the fiber running now, a counter bumped at every
     * scheduling point, and whether a block is running on this worker. */
    std::atomic<Fiber*> running{nullptr};
    std::atomic<unsigned long long> progress{0};
    std::atomic<bool> in_block{false};
    std::atomic<bool> stuck{false};
    pthread_t thread{};
    /* Seeded schedule (DISTILL_EMU_SCHEDULE_SEED): warp priorities of the running block. */
    bool seeded = false;
    unsigned long long rng = 0;
    std::vector<unsigned> warp_order;
};

struct Launch {
    KernelEntry* kernel = nullptr;
    void** params = nullptr;
    uint3 grid = {1, 1, 1};
    uint3 block = {1, 1, 1};
    uint3 cluster = {1, 1, 1};
    unsigned cluster_size = 1;
    unsigned smem = 0;
    unsigned long long nblocks = 0;
    unsigned long long nclusters = 0; /* the units workers take: nblocks / cluster_size */
    std::atomic<unsigned long long> next_block{0}; /* next cluster, in fact */
    std::atomic<bool> failed{false};
    std::vector<unsigned long long> block_order; /* seeded schedules: the order clusters run in */
    unsigned long long serial = 0;                /* launches so far, for the schedule's seed */
    unsigned long long seed = 0;                  /* DISTILL_EMU_SCHEDULE_SEED at launch; 0: default order */
    std::mutex err_mu;
    int err_code = 0;
    std::string err_msg;

    /* First failure wins; the remaining blocks are not started. */
    void fail(int code, std::string msg) {
        std::lock_guard<std::mutex> g(err_mu);
        if (err_code == 0) {
            err_code = code;
            err_msg = std::move(msg);
        }
        failed.store(true, std::memory_order_relaxed);
    }
};

uintptr_t g_stack_bytes = 0;

/* Guard zone on each side of dynamic shared memory in the check build. */
static constexpr size_t kSmemGuardBytes = 4096;

static size_t page_bytes() {
    static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return p;
}

/* Stack tops are staggered by up to this much so that the hot tops of the fibers' stacks (all
 * at the same offset of size-aligned regions otherwise) spread over the cache sets. */
static constexpr size_t kMaxColor = 255 * 64;

/* Region size: DISTILL_EMU_STACK_KB of usable stack (at least) plus guard page, header and
 * colouring, rounded up to a power of two (the stack pointer is masked with it). Untouched
 * pages cost address space only. */
static size_t configured_stack_bytes() {
    /* ASan frames carry redzones: give them room. */
    const size_t want = static_cast<size_t>(env_unsigned("DISTILL_EMU_STACK_KB", DK_EMU_ASAN ? 256 : 64, 16, 65536)) * 1024;
    const size_t need = want + page_bytes() + kStackHeaderBytes + kMaxColor;
    size_t bytes = 16 * 1024;
    while (bytes < need) bytes *= 2;
    return bytes;
}

static bool alloc_stack(Stack* s) {
    const size_t page = page_bytes();
    const size_t size = g_stack_bytes;
    /* Map twice the size and keep the aligned middle. */
    char* raw = static_cast<char*>(
        mmap(nullptr, 2 * size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (raw == MAP_FAILED) return false;
    char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + size - 1) & ~(size - 1));
    if (base > raw) munmap(raw, static_cast<size_t>(base - raw));
    if (base + size < raw + 2 * size) munmap(base + size, static_cast<size_t>(raw + 2 * size - (base + size)));
    mprotect(base, page, PROT_NONE);
    s->lo = base + page;
    s->size = size - page - kStackHeaderBytes;
    StackHeader* h = reinterpret_cast<StackHeader*>(base + size - kStackHeaderBytes);
    h->fiber = nullptr;
    h->magic = kStackMagic;
    return true;
}

static inline StackHeader* header_of(const Stack& s) { return reinterpret_cast<StackHeader*>(s.lo + s.size); }

/* ------------------------------------------------------------------------------------------ */
/* Switching                                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* The running fiber, checked: device primitives called from host code end here. */
static inline Fiber* current_fiber() {
    const StackHeader* h = stack_header();
    if (__builtin_expect(g_stack_bytes == 0 || h->magic != kStackMagic || h->fiber == nullptr, 0)) {
        fprintf(stderr, "distill emulator: a device primitive was called outside a kernel launch\n");
        abort();
    }
    return static_cast<Fiber*>(h->fiber);
}

/* Usable stack of fiber i: its top is lowered by (i % 256) cache lines (see kMaxColor). */
static inline void fiber_stack_range(const Stack& s, unsigned i, char** lo, size_t* size) {
    const size_t color = static_cast<size_t>(i % 256) * 64;
    *lo = s.lo;
    *size = s.size - color;
}

/* The fiber after `to` in the ring is usually the next one to run: start pulling the top of its
 * stack (saved registers and hot frames) into cache now, while `to` runs. */
static inline void prefetch_successor(const Fiber* to) {
#if DK_EMU_ASM_SWITCH
    const char* sp = static_cast<const char*>(to->next->ctx.sp);
    for (int i = 0; i < 8; ++i) __builtin_prefetch(sp + 64 * i);
#else
    (void)to;
#endif
}

/* The watchdog's view: which fiber runs, and a counter that moves at every scheduling point. */
static inline void note_progress(Fiber* f) {
    Worker* w = f->worker;
    w->running.store(f, std::memory_order_relaxed);
    w->progress.store(w->progress.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

/* Switch from fiber `from` (which will be resumed later) to fiber `to`. */
static inline void switch_fiber(Fiber* from, Fiber* to) {
    prefetch_successor(to);
#if DK_EMU_ASAN
    __sanitizer_start_switch_fiber(&from->fake_stack, to->stack.lo, to->stack.size);
#endif
    ctx_swap(&from->ctx, &to->ctx);
#if DK_EMU_ASAN
    __sanitizer_finish_switch_fiber(from->fake_stack, nullptr, nullptr);
#endif
    note_progress(from);
}

/* Leave fiber `from` for good (it exited, or the block is abandoned). */
[[noreturn]] static void leave_fiber(Fiber* from, Context* to, const void* to_lo, size_t to_size) {
#if DK_EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, to_lo, to_size);
#else
    (void)to_lo;
    (void)to_size;
#endif
    ctx_swap(&from->ctx, to);
    __builtin_unreachable();
}

[[noreturn]] static void leave_to_main(Worker* w, Fiber* from) {
    leave_fiber(from, &w->main_ctx, w->main_stack_lo, w->main_stack_size);
}

static std::string block_where(const char* what, const Launch* L, const Block& B) {
    return strfmt("%s in kernel %s: block (%u,%u,%u)", what, L->kernel->name.c_str(), B.idx.x, B.idx.y, B.idx.z);
}

static std::string thread_where(const char* what, const Launch* L, const Block& B, const Fiber* f) {
    return block_where(what, L, B) + strfmt(", thread (%u,%u,%u)", f->thread_idx.x, f->thread_idx.y, f->thread_idx.z);
}

/* Failing from inside a fiber. The fiber stack is abandoned without unwinding, so the message
 * is built and handed to the launch in one full-expression (all temporaries destroyed) before
 * abandon_block runs from a frame that owns nothing:
 *     w->launch->fail(code, make_message(...));
 *     abandon_block(w, f);                                                                     */
[[noreturn]] static void abandon_block(Worker* w, Fiber* f) {
    w->cluster.aborted = true;
    leave_to_main(w, f);
}

/* Nobody in the block can run: explain who waits where, then fail. */
static std::string describe_stall(Worker* w, const Fiber* f) {
    const Block& B = *f->blk;
    const Cluster& C = w->cluster;
    unsigned exited = 0, at_bar = 0, at_cluster = 0;
    unsigned per_op[OP_COUNT_] = {};
    std::string warps_of_op[OP_COUNT_];
    unsigned warps_listed[OP_COUNT_] = {};
    const Warp* last_listed[OP_COUNT_] = {};
    for (unsigned i = 0; i < C.nthreads; ++i) {
        const Fiber& t = w->fibers[i];
        if (t.exited) {
            ++exited;
        } else if (t.wait_op == OP_SYNCTHREADS) {
            ++at_bar;
        } else if (t.wait_op == OP_CLUSTER_SYNC) {
            ++at_cluster;
        } else if (t.wait_op < OP_COUNT_) {
            const unsigned op = t.wait_op;
            ++per_op[op];
            /* Name each warp once (fibers are visited in warp order). */
            if (last_listed[op] != t.warp) {
                last_listed[op] = t.warp;
                if (warps_listed[op] < 4) {
                    warps_of_op[op] += strfmt("%swarp %u: %u of %u lanes arrived", warps_listed[op] ? "; " : "",
                                              t.warp->index, t.warp->arrived, t.warp->nlanes);
                } else if (warps_listed[op] == 4) {
                    warps_of_op[op] += "; ...";
                }
                ++warps_listed[op];
            }
        }
    }
    std::vector<std::string> groups;
    if (at_bar) groups.push_back(strfmt("%u wait at __syncthreads", at_bar));
    if (at_cluster) groups.push_back(strfmt("%u wait at cluster.sync()", at_cluster));
    for (unsigned op = OP_SHFL; op < OP_COUNT_; ++op)
        if (per_op[op]) groups.push_back(strfmt("%u wait at %s (%s)", per_op[op], op_name(op), warps_of_op[op].c_str()));

    std::string msg = block_where(at_bar || at_cluster ? "barrier divergence" : "warp divergence", w->launch, B);
    if (C.size > 1) msg += strfmt(" (rank %u of a cluster of %u blocks, whose threads are counted together)", B.rank, C.size);
    msg += ": ";
    if (exited) {
        msg += strfmt("%u of %u threads exited", exited, C.nthreads);
        for (size_t i = 0; i < groups.size(); ++i) msg += (i == 0 ? " while " : ", ") + groups[i];
    } else if (!groups.empty()) {
        /* "128 of 256 threads wait at __syncthreads while 128 wait at ..." */
        const std::string& g0 = groups[0];
        const size_t sp = g0.find(' ');
        msg += g0.substr(0, sp) + strfmt(" of %u threads", C.nthreads) + g0.substr(sp);
        for (size_t i = 1; i < groups.size(); ++i) msg += (i == 1 ? " while " : ", ") + groups[i];
    }
    msg += "; no thread can make progress";
    return msg;
}

[[noreturn]] static void report_stall(Worker* w, Fiber* f) {
    w->launch->fail(kErrLaunchFailed, describe_stall(w, f));
    abandon_block(w, f);
}

/* Park the current fiber (its wait condition is already recorded) and run the next runnable
 * fiber of the ring. Returns once somebody has released it. */
/* ---- Seeded schedules (DISTILL_EMU_SCHEDULE_SEED).
 * The default schedule runs the ring in thread order, so a block always interleaves the same
 * way and a race whose outcome depends on the order stays hidden. With a seed, every block gets
 * a random priority order of its warps: the scheduler always resumes a runnable lane of the
 * highest-priority warp, so one warp runs ahead through as many primitives as it can while the
 * others lag (what a missing barrier needs in order to show in the results), and at random
 * points (probability 1/1024 per switch) the running warp drops to the lowest priority (the
 * change points of PCT, Burckhardt et al. 2010). Blocks also run in a seeded random order. */

static std::atomic<unsigned long long>& schedule_seed_slot() {
    static std::atomic<unsigned long long> seed{env_unsigned("DISTILL_EMU_SCHEDULE_SEED", 0, 0, 0xffffffffu)};
    return seed;
}

static inline unsigned long long splitmix64(unsigned long long& x) {
    unsigned long long z = (x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The runnable lane of the highest-priority warp that has one, or nullptr. */
static Fiber* pick_by_priority(Worker* w, const Fiber* f) {
    if ((splitmix64(w->rng) & 1023u) == 0) { /* change point: the running warp goes last */
        auto& o = w->warp_order;
        auto it = std::find(o.begin(), o.end(), f->warp->index);
        if (it != o.end()) std::rotate(it, it + 1, o.end());
    }
    for (unsigned wi : w->warp_order) {
        const Warp& wp = w->warps[wi];
        for (unsigned i = wp.first; i < wp.first + wp.nlanes; ++i) {
            Fiber* t = &w->fibers[i];
            if (t != f && !t->exited && *t->wait_word != t->wait_value) return t;
        }
    }
    return nullptr;
}

static void park(Worker* w, Fiber* f) {
    if (w->seeded) {
        if (Fiber* n = pick_by_priority(w, f)) {
            switch_fiber(f, n);
            return;
        }
        report_stall(w, f);
    }
    for (Fiber* n = f->next; n != f; n = n->next) {
        if (*n->wait_word != n->wait_value) {
            switch_fiber(f, n);
            return;
        }
    }
    report_stall(w, f);
}

/* A block of a cluster whose threads have all exited: its shared memory is gone on the device
 * while the rest of the cluster may still run. Poisoned (NaN bytes) so that a late read through
 * map_shared_rank shows in results; map_shared_rank refuses it and the check build reports any
 * access. */
static void block_exited(Worker* w, const Block& B) {
    if (w->dyn_smem_bytes) std::memset(w->pubs[B.rank].dyn_smem, 0xff, w->dyn_smem_bytes);
#if DK_EMU_CHECK
    san_cluster_block_exited(B.rank);
#endif
}

[[noreturn]] static void fiber_exit(Worker* w, Fiber* f) {
    f->exited = true;
    f->wait_op = OP_NONE;
    if (--f->blk->live == 0 && w->cluster.size > 1) block_exited(w, *f->blk);
    if (--w->cluster.live == 0) leave_to_main(w, f);
    Fiber* start = f->next;
    f->prev->next = f->next;
    f->next->prev = f->prev;
    if (w->seeded) {
        if (Fiber* t = pick_by_priority(w, f)) leave_fiber(f, &t->ctx, t->stack.lo, t->stack.size);
        report_stall(w, f);
    }
    Fiber* n = start;
    do {
        if (*n->wait_word != n->wait_value) {
            leave_fiber(f, &n->ctx, n->stack.lo, n->stack.size);
        }
        n = n->next;
    } while (n != start);
    report_stall(w, f);
}

static void fiber_main(Fiber* f) noexcept {
#if DK_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    Worker* w = f->worker;
    note_progress(f);
    f->async_count = 0;
    f->async_groups = 0;
    w->launch->kernel->fn(w->launch->params);
    if (f->async_count) {
        w->launch->fail(kErrLaunchFailed, thread_where("cp.async", w->launch, *f->blk, f) +
                                              strfmt(": the thread exited with %u asynchronous copies not waited for "
                                                     "(cp.async.wait_group)",
                                                     f->async_count));
        abandon_block(w, f);
    }
    fiber_exit(w, f);
}

/* ------------------------------------------------------------------------------------------ */
/* Primitives called by simt.h                                                                 */
/* ------------------------------------------------------------------------------------------ */

/* Error paths live out of line so the hot paths below keep small frames. */
[[noreturn]] __attribute__((noinline, cold)) static void bad_mask(Fiber* f, unsigned mask, unsigned op) {
    Worker* w = f->worker;
    { /* scoped: nothing that owns memory may be alive when the fiber is abandoned */
        const std::string partial =
            f->warp->mask == 0xffffffffu ? "" : strfmt(", or 0x%08x for this partial warp", f->warp->mask);
        w->launch->fail(kErrUnknown, thread_where("unsupported warp mask", w->launch, *f->blk, f) +
                                         strfmt(": %s called with mask 0x%08x; the emulator needs every lane of "
                                                "the warp to take part (mask 0xffffffff%s)",
                                                op_name(op), mask, partial.c_str()));
    }
    abandon_block(w, f);
}

[[noreturn]] __attribute__((noinline, cold)) static void mixed_primitives(Fiber* f, unsigned op, unsigned size) {
    Worker* w = f->worker;
    const Warp* wp = f->warp;
    const unsigned b = wp->gen & 1u;
    w->launch->fail(kErrLaunchFailed,
                    block_where("warp divergence", w->launch, *f->blk) +
                        strfmt(": warp %u: lane %u called %s (%u-byte value) while %u lanes wait at %s (%u-byte value)",
                               wp->index, f->lane, op_name(op), size, wp->arrived, op_name(wp->op[b]), wp->size[b]));
    abandon_block(w, f);
}

/* Parks `f` until *word != value. Out of line: only lanes that are not last take this path. */
__attribute__((noinline)) static void wait_for(Fiber* f, const unsigned* word, unsigned value, unsigned op) {
    f->wait_word = word;
    f->wait_value = value;
    f->wait_op = op;
    park(f->worker, f);
    f->wait_op = OP_NONE;
}

static inline void copy_slot(unsigned char* dst, const void* src, unsigned size) {
    /* Fixed-size copies compile to single moves; the general case is rare. */
    switch (size) {
    case 4: std::memcpy(dst, src, 4); break;
    case 8: std::memcpy(dst, src, 8); break;
    case 2: std::memcpy(dst, src, 2); break;
    case 16: std::memcpy(dst, src, 16); break;
    default: std::memcpy(dst, src, size); break;
    }
}

WarpResult warp_sync(unsigned mask, unsigned op, const void* value, unsigned size, int pred) {
    Fiber* f = current_fiber();
    Warp* wp = f->warp;
    if (__builtin_expect(mask != 0xffffffffu && mask != wp->mask, 0)) bad_mask(f, mask, op);
    const unsigned g = wp->gen;
    const unsigned b = g & 1u;
    if (wp->arrived == 0) {
        wp->op[b] = op;
        wp->size[b] = size;
        wp->ballot[b] = 0;
    } else if (__builtin_expect(wp->op[b] != op || wp->size[b] != size, 0)) {
        mixed_primitives(f, op, size);
    }
    if (size) copy_slot(wp->slots[b][f->lane], value, size);
    if (pred) wp->ballot[b] |= 1u << f->lane;
    if (++wp->arrived == wp->nlanes) {
        wp->arrived = 0;
        if (op == OP_SYNCWARP) ++wp->sync_gen;
        wp->gen = g + 1; /* releases the parked lanes */
    } else {
        wait_for(f, &wp->gen, g, op);
    }
    return WarpResult{&wp->slots[b][0][0], wp->ballot[b], static_cast<unsigned short>(f->lane),
                      static_cast<unsigned short>(wp->nlanes)};
}

int syncthreads_count(int pred) {
    Fiber* f = current_fiber();
    Block& B = *f->blk;
    const unsigned g = B.bar_gen;
    const unsigned b = g & 1u;
    if (B.bar_arrived == 0) B.bar_count[b] = 0;
    if (pred) ++B.bar_count[b];
    if (++B.bar_arrived == B.nthreads) {
        B.bar_arrived = 0;
        B.bar_gen = g + 1;
    } else {
        wait_for(f, &B.bar_gen, g, OP_SYNCTHREADS);
    }
    return B.bar_count[b];
}

void syncthreads() { (void)syncthreads_count(0); }

void cluster_sync() {
    Fiber* f = current_fiber();
    Worker* w = f->worker;
    Cluster& C = w->cluster;
    const unsigned g = C.bar_gen;
    if (++C.bar_arrived == C.nthreads) {
        C.bar_arrived = 0;
        /* Also a barrier of each block: nobody waits at a __syncthreads now (every thread of the
         * cluster is here), so the blocks' counts can move, which orders the block's accesses
         * for the sanitizer as a __syncthreads would (a cluster of one block included). */
        for (unsigned r = 0; r < C.size; ++r) ++w->blocks[r].bar_gen;
        C.bar_gen = g + 1;
    } else {
        wait_for(f, &C.bar_gen, g, OP_CLUSTER_SYNC);
    }
}

void* map_shared_rank(const void* p, unsigned rank) {
    Fiber* f = current_fiber();
    Worker* w = f->worker;
    const Cluster& C = w->cluster;
    const unsigned char* own = w->pubs[f->blk->rank].dyn_smem;
    const uintptr_t off = reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(own);
    if (rank >= C.size) {
        char buf[160];
        snprintf(buf, sizeof buf, "map_shared_rank to rank %u of a cluster of %u blocks", rank, C.size);
        misuse(buf);
    }
    if (!own || off > w->dyn_smem_bytes) {
        misuse("map_shared_rank of an address outside this block's dynamic shared memory (static __shared__ "
               "is per OS thread in the emulator and cannot be mapped: cluster kernels use dynamic shared memory)");
    }
    if (w->blocks[rank].live == 0) {
        char buf[200];
        snprintf(buf, sizeof buf,
                 "map_shared_rank to block rank %u of the cluster, which has exited (a cluster.sync() before a "
                 "block exits keeps its shared memory alive for the others)",
                 rank);
        w->launch->fail(kErrIllegalAddress, thread_where(buf, w->launch, *f->blk, f));
        abandon_block(w, f);
    }
    return w->pubs[rank].dyn_smem + off;
}

void trap() {
    Fiber* f = current_fiber();
    Worker* w = f->worker;
    w->launch->fail(kErrLaunchFailed, thread_where("__trap()", w->launch, *f->blk, f));
    abandon_block(w, f);
}

void assert_fail(const char* expr, const char* file, unsigned line, const char* func) {
    Fiber* f = current_fiber();
    Worker* w = f->worker;
    w->launch->fail(kErrAssert, thread_where("device assertion failed", w->launch, *f->blk, f) +
                                    strfmt(": %s:%u: %s: Assertion `%s` failed.", file, line, func, expr));
    abandon_block(w, f);
}

void async_overflow() {
    char buf[160]; /* no owning string: misuse() abandons this fiber's stack */
    snprintf(buf, sizeof buf,
             "more than %u cp.async copies pending in one thread (the emulator's limit: wait for older groups first)",
             kAsyncCopiesMax);
    misuse(buf);
}

void misuse(const char* what) {
    Fiber* f = current_fiber();
    Worker* w = f->worker;
    w->launch->fail(kErrUnknown, thread_where("unsupported use of the emulator", w->launch, *f->blk, f) + ": " + what);
    abandon_block(w, f);
}

/* ------------------------------------------------------------------------------------------ */
/* Kernel registry                                                                             */
/* ------------------------------------------------------------------------------------------ */

/* Leaked on purpose: registration runs in static initialisers, lookups may come from threads
 * still running during exit. */
static std::mutex& registry_mutex() {
    static std::mutex* m = new std::mutex;
    return *m;
}
static std::unordered_map<std::string, KernelEntry*>& registry() {
    static auto* r = new std::unordered_map<std::string, KernelEntry*>;
    return *r;
}

void register_kernel(const char* name, KernelTrampoline fn, unsigned param_bytes) {
    std::lock_guard<std::mutex> g(registry_mutex());
    auto& r = registry();
    if (r.count(name)) {
        fprintf(stderr, "distill emulator: kernel %s registered twice; keeping the first\n", name);
        return;
    }
    KernelEntry* e = new KernelEntry;
    e->name = name;
    e->fn = fn;
    e->param_bytes = param_bytes;
    r.emplace(e->name, e);
}

KernelEntry* find_kernel(const char* name) {
    if (!name) return nullptr;
    std::lock_guard<std::mutex> g(registry_mutex());
    auto& r = registry();
    auto it = r.find(name);
    return it == r.end() ? nullptr : it->second;
}

/* ------------------------------------------------------------------------------------------ */
/* Blocks                                                                                      */
/* ------------------------------------------------------------------------------------------ */

#if DK_EMU_ASAN
static void this_thread_stack(const void** lo, size_t* size) {
    static thread_local const void* t_lo = nullptr;
    static thread_local size_t t_size = 0;
    if (!t_lo) {
        pthread_attr_t attr;
        void* addr = nullptr;
        size_t sz = 0;
        if (pthread_getattr_np(pthread_self(), &attr) == 0) {
            pthread_attr_getstack(&attr, &addr, &sz);
            pthread_attr_destroy(&attr);
        }
        t_lo = addr;
        t_size = sz;
    }
    *lo = t_lo;
    *size = t_size;
}
#endif

/* Room for `nthreads` fibers in `nwarps` warps (every block of a cluster has its own last,
 * possibly partial, warp). */
static bool ensure_capacity(Worker* w, unsigned nthreads, unsigned nwarps) {
    while (w->stacks.size() < nthreads) {
        Stack s;
        if (!alloc_stack(&s)) return false;
        w->stacks.push_back(s);
    }
    if (w->fibers.size() < nthreads) w->fibers.resize(nthreads);
    if (w->warps.size() < nwarps) w->warps.resize(nwarps);
    return true;
}

/* Runs cluster `unit` of the launch (a plain launch: block `unit`) to its end on this worker. */
static void run_cluster(Worker* w, unsigned long long unit) {
    Launch* L = w->launch;
    Cluster& C = w->cluster;
    const uint3 g = L->grid, bd = L->block, cd = L->cluster;
    const unsigned nt = bd.x * bd.y * bd.z;
    const unsigned nwpb = (nt + 31) / 32; /* warps per block */
    /* The cluster's position in the grid of clusters, then each block's by its rank (x fastest). */
    const unsigned long long ux = g.x / cd.x, uy = g.y / cd.y;
    const uint3 cu = uint3{static_cast<unsigned>(unit % ux), static_cast<unsigned>(unit / ux % uy),
                           static_cast<unsigned>(unit / (ux * uy))};
    C.size = L->cluster_size;
    C.nthreads = C.size * nt;
    C.live = C.nthreads;
    C.bar_gen = 0;
    C.bar_arrived = 0;
    C.aborted = false;
    const unsigned long long serial = g_block_serial.fetch_add(1, std::memory_order_relaxed);
    for (unsigned r = 0; r < C.size; ++r) {
        Block& B = w->blocks[r];
        B.idx = uint3{cu.x * cd.x + r % cd.x, cu.y * cd.y + r / cd.x % cd.y, cu.z * cd.z + r / (cd.x * cd.y)};
        B.rank = r;
        B.nthreads = nt;
        B.live = nt;
        B.bar_gen = 0;
        B.bar_arrived = 0;
        B.linear = B.idx.x + 1ull * g.x * (B.idx.y + 1ull * g.y * B.idx.z);
        B.serial = serial;
        w->pubs[r].block_idx = B.idx;
        if (w->dyn_smem_bytes) std::memset(w->pubs[r].dyn_smem, 0xff, w->dyn_smem_bytes);
    }
#if DK_EMU_CHECK
    san_block_begin(serial);
#endif
    const unsigned nw = C.size * nwpb;
    w->seeded = L->seed != 0;
    if (w->seeded) {
        w->rng = L->seed * 0x9e3779b97f4a7c15ull ^ (L->serial << 32) ^ unit;
        w->warp_order.resize(nw);
        for (unsigned i = 0; i < nw; ++i) w->warp_order[i] = i;
        for (unsigned i = nw; i > 1; --i) std::swap(w->warp_order[i - 1], w->warp_order[splitmix64(w->rng) % i]);
    }

    /* Fibers and warps rank-major: fiber r * nt + t is thread t of block r. */
    for (unsigned i = 0; i < nw; ++i) {
        Warp& wp = w->warps[i];
        const unsigned in_block = i % nwpb * 32;
        wp.gen = 0;
        wp.arrived = 0;
        wp.index = i;
        wp.first = i / nwpb * nt + in_block;
        wp.nlanes = std::min(32u, nt - in_block);
        wp.mask = wp.nlanes == 32 ? 0xffffffffu : ((1u << wp.nlanes) - 1u);
    }
    const unsigned n = C.nthreads;
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = w->fibers[i];
        const unsigned r = i / nt, t = i % nt;
        f.thread_idx = uint3{t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y)};
        f.lane = t & 31u;
        f.warp = &w->warps[r * nwpb + (t >> 5)];
        f.warp_lanes = f.warp->nlanes;
        f.warp_mask = f.warp->mask;
        f.block = &w->pubs[r];
        f.blk = &w->blocks[r];
        f.worker = w;
        f.next = &w->fibers[i + 1 == n ? 0 : i + 1];
        f.prev = &w->fibers[i == 0 ? n - 1 : i - 1];
        f.wait_word = &kRunnable;
        f.wait_value = 0;
        f.wait_op = OP_NONE;
        f.exited = false;
        f.fake_stack = nullptr;
        char* lo;
        size_t size;
        fiber_stack_range(w->stacks[i], i, &lo, &size);
        f.stack.lo = lo;
        f.stack.size = size;
        header_of(w->stacks[i])->fiber = &f; /* the fibers vector may have moved since last time */
        ctx_make(&f.ctx, lo, size, &f);
    }

    Fiber* first = &w->fibers[0];
#if DK_EMU_ASAN
    __sanitizer_start_switch_fiber(&w->main_fake_stack, first->stack.lo, first->stack.size);
#endif
    w->in_block.store(true, std::memory_order_release);
    ctx_swap(&w->main_ctx, &first->ctx);
    w->in_block.store(false, std::memory_order_release);
    w->running.store(nullptr, std::memory_order_relaxed);
#if DK_EMU_ASAN
    __sanitizer_finish_switch_fiber(w->main_fake_stack, nullptr, nullptr);
#endif

#if DK_EMU_ASAN
    /* Abandoned fibers leave poisoned redzones on their stacks; the next block reuses them. */
    if (C.aborted)
        for (unsigned i = 0; i < n; ++i) __asan_unpoison_memory_region(w->stacks[i].lo, w->stacks[i].size);
#endif
}

static thread_local Worker* t_worker = nullptr; /* for the watchdog's signal handler */

static void run_blocks(Worker* w, Launch* L) {
    w->launch = L;
    w->thread = pthread_self();
    t_worker = w;
    const unsigned csize = L->cluster_size;
    for (unsigned r = 0; r < csize; ++r) {
        BlockPublic& pb = w->pubs[r];
        pb.block_dim = L->block;
        pb.grid_dim = L->grid;
        pb.cluster_rank = r;
        pb.cluster_size = csize;
        pb.cluster_dim = L->cluster;
        pb.dyn_smem = nullptr;
    }
#if DK_EMU_ASAN
    this_thread_stack(&w->main_stack_lo, &w->main_stack_size);
#endif
    const unsigned block_threads = L->block.x * L->block.y * L->block.z;
    const unsigned nthreads = csize * block_threads;
    if (!ensure_capacity(w, nthreads, csize * ((block_threads + 31) / 32))) {
        L->fail(kErrOutOfMemory, strfmt("kernel %s: cannot allocate %u fiber stacks of %zu KiB (DISTILL_EMU_STACK_KB)",
                                        L->kernel->name.c_str(), nthreads, static_cast<size_t>(g_stack_bytes / 1024)));
        return;
    }
    /* Exact-size, so that AddressSanitizer sees overruns of dynamic shared memory. The check
     * build puts guard zones around it, so that memcheck sees overruns as shared-memory faults.
     * One buffer per block of a cluster. */
    void* smem[kMaxClusterBlocks] = {};
    const size_t guard = DK_EMU_CHECK ? kSmemGuardBytes : 0;
    for (unsigned r = 0; r < csize && L->smem; ++r) {
        if (posix_memalign(&smem[r], 16, L->smem + 2 * guard) != 0) {
            L->fail(kErrOutOfMemory, strfmt("kernel %s: cannot allocate %u bytes of dynamic shared memory",
                                            L->kernel->name.c_str(), L->smem));
            for (unsigned q = 0; q < r; ++q) free(smem[q]);
            return;
        }
        w->pubs[r].dyn_smem = static_cast<unsigned char*>(smem[r]) + guard;
    }
    w->dyn_smem_bytes = L->smem;
#if DK_EMU_CHECK
    LaunchView view{};
    view.kernel = L->kernel->name.c_str();
    view.params = L->params;
    view.param_struct = L->params[0];
    view.param_bytes = L->kernel->param_bytes;
    view.fibers_lo = w->fibers.data();
    view.fibers_bytes = w->fibers.size() * sizeof(Fiber);
    view.warps_lo = w->warps.data();
    view.warps_bytes = w->warps.size() * sizeof(Warp);
    view.worker_lo = w;
    view.worker_bytes = sizeof(Worker);
    for (unsigned r = 0; r < csize; ++r) view.dyn_smem[r] = w->pubs[r].dyn_smem;
    view.dyn_smem_bytes = L->smem;
    view.cluster_size = csize;
    view.block_x = L->block.x;
    view.block_y = L->block.y;
    view.block_z = L->block.z;
    view.grid_x = L->grid.x;
    view.grid_y = L->grid.y;
    san_launch_begin(view);
#endif

    while (!L->failed.load(std::memory_order_relaxed)) {
        const unsigned long long i = L->next_block.fetch_add(1, std::memory_order_relaxed);
        if (i >= L->nclusters) break;
        run_cluster(w, L->block_order.empty() ? i : L->block_order[i]);
    }

#if DK_EMU_CHECK
    san_launch_end();
#endif
    for (unsigned r = 0; r < csize; ++r) {
        free(smem[r]);
        w->pubs[r].dyn_smem = nullptr;
    }
    w->dyn_smem_bytes = 0;
    w->launch = nullptr;
}

/* ------------------------------------------------------------------------------------------ */
/* Worker pool                                                                                 */
/* ------------------------------------------------------------------------------------------ */

struct Pool {
    unsigned nworkers = 1;
    std::vector<Worker*> workers; /* [0] is whichever thread is launching */
    std::mutex mu;
    std::condition_variable cv_start, cv_done;
    unsigned long long seq = 0; /* bumped per launch that uses helpers */
    Launch* current = nullptr;
    unsigned want = 0; /* workers taking part in `current`, the launcher included */
    unsigned done = 0; /* helpers finished with `current` */
};

static void helper_loop(Pool* P, unsigned index) {
    char name[16];
    snprintf(name, sizeof name, "dk-emu-%u", index);
    pthread_setname_np(pthread_self(), name);
    unsigned long long seen = 0;
    for (;;) {
        Launch* L;
        {
            std::unique_lock<std::mutex> lk(P->mu);
            P->cv_start.wait(lk, [&] { return P->seq != seen; });
            seen = P->seq;
            if (index >= P->want) continue;
            L = P->current;
        }
        run_blocks(P->workers[index], L);
        {
            std::lock_guard<std::mutex> lk(P->mu);
            if (++P->done == P->want - 1) P->cv_done.notify_one();
        }
    }
}

static unsigned default_workers() {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n > 0) return static_cast<unsigned>(n);
    }
    const unsigned hc = std::thread::hardware_concurrency();
    return hc ? hc : 1;
}

/* ---- Watchdog. Fibers are never preempted, so a thread that spins on memory another thread of
 * its block writes (legal on sm_70+, impossible here) would hang the process. A watchdog thread
 * checks every worker's progress counter; when one has not moved for DISTILL_EMU_WATCHDOG_S
 * seconds (default 60, 0 disables) while a block runs, it signals that worker, whose handler
 * fails the launch with CUDA_ERROR_LAUNCH_TIMEOUT naming the kernel, block and thread, and
 * abandons the block like any other failure. */

static const int kWatchdogSignal = SIGRTMIN + 5;

static unsigned watchdog_seconds() {
    static const unsigned s = env_unsigned("DISTILL_EMU_WATCHDOG_S", 60, 0, 86400);
    return s;
}

static void watchdog_handler(int) {
    Worker* w = t_worker;
    if (!w || !w->stuck.exchange(false) || !w->in_block.load(std::memory_order_acquire)) return;
    Fiber* f = w->running.load(std::memory_order_relaxed);
    if (!f) return;
    w->launch->fail(kErrLaunchTimeout,
                    thread_where("watchdog", w->launch, *f->blk, f) +
                        strfmt(": no progress for %u s (the thread runs without reaching a barrier, a warp primitive or "
                               "its end; a spin-wait on memory that another thread writes never ends here: threads of "
                               "the emulator are not preemptive)",
                               watchdog_seconds()));
    abandon_block(w, f);
}

static void watchdog_loop(std::vector<Worker*> workers) {
    pthread_setname_np(pthread_self(), "dk-emu-watchdog");
    const unsigned limit = watchdog_seconds();
    std::vector<unsigned long long> seen(workers.size(), 0);
    std::vector<unsigned> still(workers.size(), 0);
    for (;;) {
        std::this_thread::sleep_for(std::chrono::milliseconds(250));
        for (size_t i = 0; i < workers.size(); ++i) {
            Worker* w = workers[i];
            const unsigned long long p = w->progress.load(std::memory_order_relaxed);
            if (!w->in_block.load(std::memory_order_acquire) || p != seen[i]) {
                seen[i] = p;
                still[i] = 0;
                continue;
            }
            if (++still[i] >= 4 * limit) {
                still[i] = 0;
                w->stuck.store(true);
                pthread_kill(w->thread, kWatchdogSignal);
            }
        }
    }
}

static void start_watchdog(const std::vector<Worker*>& workers) {
    if (watchdog_seconds() == 0) return;
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_handler = watchdog_handler;
    sa.sa_flags = SA_NODEFER | SA_RESTART; /* the handler leaves by a context switch, never returns */
    sigemptyset(&sa.sa_mask);
    if (sigaction(kWatchdogSignal, &sa, nullptr) != 0) return;
    std::thread(watchdog_loop, workers).detach();
}

static Pool* pool() {
    static Pool* p = [] {
        /* Helper threads run code of this library: never let dlclose unmap it. */
        Dl_info info;
        if (dladdr(reinterpret_cast<void*>(&default_workers), &info) && info.dli_fname)
            dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
        g_stack_bytes = configured_stack_bytes(); /* before any fiber exists */
        Pool* P = new Pool; /* leaked on purpose: helpers outlive static destructors */
        P->nworkers = env_unsigned("DISTILL_EMU_THREADS", std::min(default_workers(), 64u), 1, 256);
        /* The check build keeps one shadow of static __shared__ memory: one worker runs every block. */
        if (DK_EMU_CHECK) P->nworkers = 1;
        for (unsigned i = 0; i < P->nworkers; ++i) {
            P->workers.push_back(new Worker);
            P->workers.back()->index = i;
        }
        for (unsigned i = 1; i < P->nworkers; ++i) std::thread(helper_loop, P, i).detach();
        start_watchdog(P->workers);
        return P;
    }();
    return p;
}

static std::mutex& launch_mutex() {
    static std::mutex* m = new std::mutex;
    return *m;
}

/* ------------------------------------------------------------------------------------------ */
/* Launch and errors                                                                           */
/* ------------------------------------------------------------------------------------------ */

static constexpr size_t kMsgCap = 2048;
static std::mutex& global_msg_mutex() {
    static std::mutex* m = new std::mutex;
    return *m;
}
static char g_last_msg[kMsgCap];
static bool g_has_msg = false;
static thread_local char t_last_msg[kMsgCap];
static thread_local bool t_has_msg = false;

int note_error(int code, const std::string& msg) {
    snprintf(t_last_msg, kMsgCap, "%s", msg.c_str());
    t_has_msg = true;
    {
        std::lock_guard<std::mutex> g(global_msg_mutex());
        snprintf(g_last_msg, kMsgCap, "%s", msg.c_str());
        g_has_msg = true;
    }
    if (getenv("DISTILL_EMU_VERBOSE")) fprintf(stderr, "distill emulator: %s\n", msg.c_str());
    return code;
}

const char* last_error() {
    if (t_has_msg) return t_last_msg;
    std::lock_guard<std::mutex> g(global_msg_mutex());
    return g_has_msg ? g_last_msg : nullptr;
}

int launch(KernelEntry* k, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
           unsigned smem, void** params, ClusterDim cluster) {
    if (!k) return note_error(kErrInvalidHandle, "launch of a null kernel handle");
    const unsigned long long nthreads = 1ull * bx * by * bz;
    if (bx == 0 || by == 0 || bz == 0 || gx == 0 || gy == 0 || gz == 0 || nthreads > kMaxThreadsPerBlock || bx > 1024 ||
        by > 1024 || bz > 64 || gx > 0x7fffffffu || gy > 65535 || gz > 65535) {
        return note_error(kErrInvalidValue,
                              strfmt("invalid launch configuration for kernel %s: grid (%u,%u,%u), block (%u,%u,%u) "
                                     "(at most 1024 threads per block, block.z <= 64, grid.y/z <= 65535)",
                                     k->name.c_str(), gx, gy, gz, bx, by, bz));
    }
    const int max_dyn = k->max_dynamic_smem.load();
    if (smem > static_cast<unsigned>(max_dyn)) {
        return note_error(kErrInvalidValue,
                              strfmt("kernel %s launched with %u bytes of dynamic shared memory, more than its limit of "
                                     "%d (raise it with cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), "
                                     "at most %d)",
                                     k->name.c_str(), smem, max_dyn, kMaxSharedPerBlockOptin));
    }
    if (!params) return note_error(kErrInvalidValue, strfmt("kernel %s launched without kernelParams", k->name.c_str()));
    const unsigned long long csize = 1ull * cluster.x * cluster.y * cluster.z;
    if (csize == 0 || csize > kMaxClusterBlocks || gx % cluster.x || gy % cluster.y || gz % cluster.z) {
        return note_error(kErrInvalidValue,
                          strfmt("invalid cluster dimension (%u,%u,%u) for kernel %s with grid (%u,%u,%u): every grid "
                                 "dimension must be a multiple of the cluster's, and a cluster holds 1 to %u blocks",
                                 cluster.x, cluster.y, cluster.z, k->name.c_str(), gx, gy, gz, kMaxClusterBlocks));
    }

    std::lock_guard<std::mutex> serial(launch_mutex());
    Pool* P = pool();
    Launch L;
    L.kernel = k;
    L.params = params;
    L.grid = uint3{gx, gy, gz};
    L.block = uint3{bx, by, bz};
    L.smem = smem;
    L.cluster = uint3{cluster.x, cluster.y, cluster.z};
    L.cluster_size = static_cast<unsigned>(csize);
    L.nblocks = 1ull * gx * gy * gz;
    L.nclusters = L.nblocks / csize;
    static unsigned long long launches = 0;
    L.serial = ++launches; /* under the launch mutex */
    L.seed = schedule_seed_slot().load(std::memory_order_relaxed);
    if (L.seed && L.nclusters > 1 && L.nclusters <= (1ull << 22)) {
        unsigned long long x = L.seed ^ (L.serial * 0xd1b54a32d192ed03ull);
        L.block_order.resize(L.nclusters);
        for (unsigned long long i = 0; i < L.nclusters; ++i) L.block_order[i] = i;
        for (unsigned long long i = L.nclusters; i > 1; --i) std::swap(L.block_order[i - 1], L.block_order[splitmix64(x) % i]);
    }

    const unsigned want = static_cast<unsigned>(std::min<unsigned long long>(P->nworkers, L.nclusters));
    if (want > 1) {
        {
            std::lock_guard<std::mutex> lk(P->mu);
            P->current = &L;
            P->want = want;
            P->done = 0;
            ++P->seq;
        }
        P->cv_start.notify_all();
    }
    run_blocks(P->workers[0], &L);
    if (want > 1) {
        std::unique_lock<std::mutex> lk(P->mu);
        P->cv_done.wait(lk, [&] { return P->done == want - 1; });
        P->current = nullptr;
    }
    if (L.err_code) {
#if DK_EMU_CHECK
        L.err_msg = san_symbolize(L.err_msg);
        if (L.err_msg.find("check: ") != std::string::npos) report_finding(L.err_msg);
#endif
        return note_error(L.err_code, L.err_msg);
    }
    return kSuccess;
}

/* ------------------------------------------------------------------------------------------ */
/* The running CUDA thread, for the sanitizer (emu_internal.h)                                 */
/* ------------------------------------------------------------------------------------------ */

void current_thread_view(ThreadView* out) {
    const Fiber* f = current_fiber();
    const Worker* w = f->worker;
    const Block& B = *f->blk;
    /* In a cluster: the thread's index among all the cluster's threads, and its block's barrier
     * count below the cluster's (see ThreadView). */
    out->tid = static_cast<unsigned>(f - w->fibers.data());
    out->bar_gen = w->cluster.size > 1 ? (w->cluster.bar_gen << 8) | (B.bar_gen & 0xffu) : B.bar_gen;
    out->warp_gen = f->warp->sync_gen;
    out->block_serial = B.serial;
    out->block_linear = B.linear;
}

std::string current_thread_where(const char* what) {
    const Fiber* f = current_fiber();
    return thread_where(what, f->worker->launch, *f->blk, f);
}

std::string thread_name(unsigned long long linear, unsigned tid) {
    const Fiber* f = current_fiber();
    const Worker* w = f->worker;
    const Launch* L = w->launch;
    const uint3 g = L->grid, b = L->block;
    if (w->cluster.size > 1) { /* tid counts the cluster's threads: name the block by its rank */
        const unsigned nt = w->blocks[0].nthreads;
        linear = w->blocks[tid / nt].linear;
        tid %= nt;
    }
    return strfmt("block (%llu,%llu,%llu), thread (%u,%u,%u)", linear % g.x, (linear / g.x) % g.y,
                  linear / (1ull * g.x * g.y), tid % b.x, (tid / b.x) % b.y, tid / (b.x * b.y));
}

void fail_current_thread(int code, const char* msg) {
    Fiber* f = current_fiber();
    Worker* w = f->worker;
    w->launch->fail(code, std::string(msg));
    abandon_block(w, f);
}

}  // namespace dk_emu

/* ------------------------------------------------------------------------------------------ */
/* Exported helpers                                                                            */
/* ------------------------------------------------------------------------------------------ */

/* Message of the last failed launch (this thread's, else the process's), or NULL. */
extern "C" DK_EMU_EXPORT const char* dkEmuLastError(void) { return dk_emu::last_error(); }

/* 'DEMU': lets the Rust side tell the emulator from a real libcuda. */
extern "C" DK_EMU_EXPORT int dkEmuIdentify(void) { return 0x44454d55; }

/* Sets the schedule seed of later launches (0: the default, fixed schedule); see
 * DISTILL_EMU_SCHEDULE_SEED. */
extern "C" DK_EMU_EXPORT void dkEmuSetScheduleSeed(unsigned long long seed) {
    dk_emu::schedule_seed_slot().store(seed, std::memory_order_relaxed);
}

/* Number of OS workers blocks are spread over. */
extern "C" DK_EMU_EXPORT int dkEmuWorkerCount(void) { return static_cast<int>(dk_emu::pool()->nworkers); }

/* Launch a registered kernel by name, synchronously. Returns a CUresult (0 on success). */
extern "C" DK_EMU_EXPORT int dkEmuLaunch(const char* kernel_name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                         unsigned by, unsigned bz, unsigned shared_bytes, void** params) {
    dk_emu::KernelEntry* k = dk_emu::find_kernel(kernel_name);
    if (!k) {
        std::string msg = std::string("no kernel named ") + (kernel_name ? kernel_name : "(null)") + " is registered";
        return dk_emu::note_error(dk_emu::kErrNotFound, msg);
    }
    return dk_emu::launch(k, gx, gy, gz, bx, by, bz, shared_bytes, params, dk_emu::ClusterDim{1, 1, 1});
}
