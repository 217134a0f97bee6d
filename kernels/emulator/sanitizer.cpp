/*
 * sanitizer.cpp: memcheck, initcheck and racecheck for the emulated GPU (the check build).
 *
 * The check build compiles the kernel sources with `-fsanitize=thread -fsanitize=bounds` but
 * links no sanitizer runtime: the compiler's instrumentation calls __tsan_read4(addr),
 * __tsan_write2(addr), ... before every memory access of device code, and
 * __ubsan_handle_out_of_bounds for an index past a fixed-size array, and this file implements
 * those entry points itself. Every access of a kernel is therefore seen with its address, size,
 * direction and code address, and checked against what a GPU would allow:
 *
 *   memcheck   the address lies inside one live device allocation (allocations carry guard
 *              zones and freed memory is quarantined, so an overrun or a use after free never
 *              lands in a neighbour), or in shared memory (static __shared__ variables, the
 *              launch's dynamic shared memory), or in the thread's own stack; anything else (a
 *              host pointer, an unallocated address) is an illegal address. A naturally aligned
 *              access type (float4, double, ...) at an address that is not a multiple of its
 *              size is a misaligned address, as the GPU faults. An index past a fixed-size array
 *              (UBSan bounds) is an illegal address too.
 *   initcheck  a read of device or shared memory that nothing has written: device allocations
 *              start uninitialised (and filled with 0xFF bytes), memsets and host copies
 *              initialise, device-to-device copies carry the state along; shared memory is
 *              uninitialised at the start of every block.
 *   racecheck  two accesses to the same bytes, at least one a write, by different threads with
 *              no ordering between them: different blocks of one launch are never ordered;
 *              threads of one block are ordered by a __syncthreads between the accesses, lanes
 *              of one warp also by a warp primitive between them. Shared and global memory.
 *
 * The first finding fails the launch (CUDA_ERROR_ILLEGAL_ADDRESS, CUDA_ERROR_MISALIGNED_ADDRESS,
 * or CUDA_ERROR_LAUNCH_FAILED for init and race findings) with a message naming the check, the
 * kernel, block, thread(s) and source lines; it is also printed to stderr.
 *
 * Shadow state. Each allocation gets, on first access, one init byte per byte and one race cell
 * per 2-byte granule (the smallest element the kernels store), so two threads writing
 * neighbouring halves never look like a race. Race cells are not reset between blocks or
 * launches: every record carries its launch number and block serial and a stale record simply
 * does not match. Allocations above kRaceShadowCap bytes get memcheck and initcheck only.
 *
 * Selection: DISTILL_EMU_CHECK=memcheck,initcheck,racecheck (or `all`) in the environment;
 * the Rust crate loads the check build whenever that variable is set. The check build runs every
 * block on one worker thread.
 */
#include "emu_internal.h"
#include "simt.h"

#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#ifndef DK_EMU_CHECK
#define DK_EMU_CHECK 0
#endif

namespace dk_emu {

static constexpr size_t kDeviceAlign = 256;

#if !DK_EMU_CHECK

/* The fast build: plain heap blocks, filled with 0xFF bytes (NaN as floats, -1 as integers) so
 * that a kernel that relies on fresh memory being zero fails here too. */
void* device_malloc(size_t bytes) {
    void* p = nullptr;
    if (posix_memalign(&p, kDeviceAlign, bytes) != 0) return nullptr;
    std::memset(p, 0xff, bytes);
    return p;
}
void device_free_memory(void* p) { free(p); }
void note_host_write(void*, size_t) {}
void note_device_copy(void*, const void*, size_t) {}
std::string note_host_read(const void*, size_t, const char*) { return std::string(); }
bool san_enabled() { return false; }
std::string san_symbolize(const std::string& msg) { return msg; }

}  // namespace dk_emu

#else /* DK_EMU_CHECK */

/* ------------------------------------------------------------------------------------------ */
/* Configuration                                                                               */
/* ------------------------------------------------------------------------------------------ */

enum : unsigned { kMemcheck = 1, kInitcheck = 2, kRacecheck = 4 };

static unsigned parse_checks() {
    const char* s = getenv("DISTILL_EMU_CHECK");
    if (!s || !*s || !strcmp(s, "1") || !strcmp(s, "all")) return kMemcheck | kInitcheck | kRacecheck;
    unsigned m = 0;
    std::string v(s);
    size_t i = 0;
    while (i <= v.size()) {
        size_t j = v.find(',', i);
        if (j == std::string::npos) j = v.size();
        const std::string w = v.substr(i, j - i);
        if (w == "memcheck") m |= kMemcheck;
        else if (w == "initcheck") m |= kInitcheck;
        else if (w == "racecheck") m |= kRacecheck;
        else if (w == "all") m |= kMemcheck | kInitcheck | kRacecheck;
        else if (!w.empty())
            fprintf(stderr, "distill emulator: DISTILL_EMU_CHECK: unknown check `%s` (memcheck, initcheck, racecheck, all)\n",
                    w.c_str());
        i = j + 1;
    }
    /* Bounds are what every other check stands on. */
    return m | kMemcheck;
}

static unsigned checks() {
    static const unsigned c = parse_checks();
    return c;
}

bool san_enabled() { return true; }

/* Allocations larger than this get no race shadow (40 bytes per 2-byte granule). */
static constexpr size_t kRaceShadowCap = 16u << 20;
/* Guard zone on each side of a device allocation. */
static constexpr size_t kRedzone = 256;
/* Freed allocations stay mapped (and unusable) until this many bytes are quarantined. */
static constexpr size_t kQuarantineBytes = 256u << 20;

/* ------------------------------------------------------------------------------------------ */
/* Shadow state                                                                                */
/* ------------------------------------------------------------------------------------------ */

/* One access, as racecheck remembers it. launch == 0: empty. */
struct Access {
    uint32_t launch;
    uint32_t block; /* low bits of the block serial: unique among the blocks of a launch */
    uint32_t pc;    /* code address, relative to this library */
    uint16_t tid;
    uint16_t bar;   /* __syncthreads completed by the block before the access */
    uint16_t wgen;  /* warp primitives completed by the thread's warp before the access */
    uint16_t multi; /* reads only: bit 0, another thread read too in the same interval; bit 1,
                     * one of them in another warp */
};
struct RaceCell {
    Access w, r;
};

struct Alloc {
    uintptr_t base = 0; /* what the driver hands out */
    size_t size = 0;
    char* raw = nullptr; /* base - kRedzone */
    bool freed = false;
    unsigned char* init = nullptr; /* 1 per initialised byte, allocated on first need */
    RaceCell* race = nullptr;      /* per 2-byte granule, on first need */
};

struct Registry {
    std::mutex mu;
    std::map<uintptr_t, Alloc*> live; /* by base */
    std::deque<Alloc*> quarantine;    /* freed, still mapped, oldest first */
    size_t quarantined_bytes = 0;
    std::vector<Alloc*> graveyard;    /* evicted from quarantine, freed at the next launch */
};

static Registry& reg() {
    static Registry* r = new Registry; /* leaked: the driver may free during exit */
    return *r;
}

static void drop_alloc(Alloc* a) {
    free(a->raw);
    free(a->init);
    free(a->race);
    delete a;
}

void* device_malloc(size_t bytes) {
    void* raw = nullptr;
    if (posix_memalign(&raw, kDeviceAlign, bytes + 2 * kRedzone) != 0) return nullptr;
    std::memset(raw, 0xff, bytes + 2 * kRedzone);
    Alloc* a = new Alloc;
    a->raw = static_cast<char*>(raw);
    a->base = reinterpret_cast<uintptr_t>(raw) + kRedzone;
    a->size = bytes;
    /* Now, not on first access: stream workers mark bytes written while kernels read them. */
    a->init = static_cast<unsigned char*>(calloc(bytes ? bytes : 1, 1));
    std::lock_guard<std::mutex> g(reg().mu);
    reg().live[a->base] = a;
    return reinterpret_cast<void*>(a->base);
}

void device_free_memory(void* p) {
    if (!p) return;
    Registry& R = reg();
    std::lock_guard<std::mutex> g(R.mu);
    auto it = R.live.find(reinterpret_cast<uintptr_t>(p));
    if (it == R.live.end()) return; /* the driver has validated the pointer already */
    Alloc* a = it->second;
    R.live.erase(it);
    a->freed = true;
    std::memset(a->raw, 0xff, a->size + 2 * kRedzone);
    R.quarantine.push_back(a);
    R.quarantined_bytes += a->size;
    while (R.quarantined_bytes > kQuarantineBytes && !R.quarantine.empty()) {
        Alloc* old = R.quarantine.front();
        R.quarantine.pop_front();
        R.quarantined_bytes -= old->size;
        R.graveyard.push_back(old); /* a running launch may still hold it in its snapshot */
    }
}

static Alloc* find_live_locked(uintptr_t p) {
    auto& m = reg().live;
    auto it = m.upper_bound(p);
    if (it == m.begin()) return nullptr;
    --it;
    Alloc* a = it->second;
    return p - a->base < a->size ? a : nullptr;
}

static unsigned char* init_shadow(Alloc* a) {
    if (!a->init) a->init = static_cast<unsigned char*>(calloc(a->size ? a->size : 1, 1));
    return a->init;
}

void note_host_write(void* p, size_t n) {
    if (!n) return;
    std::lock_guard<std::mutex> g(reg().mu);
    const uintptr_t b = reinterpret_cast<uintptr_t>(p);
    Alloc* a = find_live_locked(b);
    if (!a) return;
    unsigned char* sh = init_shadow(a);
    if (sh) std::memset(sh + (b - a->base), 1, std::min(n, a->size - (b - a->base)));
}

void note_device_copy(void* dst, const void* src, size_t n) {
    if (!n) return;
    std::lock_guard<std::mutex> g(reg().mu);
    const uintptr_t d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
    Alloc* ad = find_live_locked(d);
    Alloc* as = find_live_locked(s);
    if (!ad) return;
    unsigned char* shd = init_shadow(ad);
    if (!as) { /* from host memory (cuMemcpy with unified addressing) */
        if (shd) std::memset(shd + (d - ad->base), 1, std::min(n, ad->size - (d - ad->base)));
        return;
    }
    unsigned char* shs = init_shadow(as);
    if (shd && shs) std::memmove(shd + (d - ad->base), shs + (s - as->base), n);
}

std::string note_host_read(const void* src, size_t n, const char* reader) {
    if (!n || !(checks() & kInitcheck)) return std::string();
    std::lock_guard<std::mutex> g(reg().mu);
    const uintptr_t s = reinterpret_cast<uintptr_t>(src);
    Alloc* a = find_live_locked(s);
    if (!a || !a->init) return std::string();
    const size_t off = s - a->base, len = std::min(n, a->size - off);
    size_t first = len, count = 0;
    for (size_t i = 0; i < len; ++i) {
        if (!a->init[off + i]) {
            if (first == len) first = i;
            ++count;
        }
    }
    if (!count) return std::string();
    return strfmt("initcheck: %s reads %zu uninitialised bytes (never written by a kernel, memset or "
                  "copy), the first at byte %zu of the %zu read, byte %zu of a device allocation of %zu bytes",
        reader, count, first, n, off + first, a->size);
}

/* ------------------------------------------------------------------------------------------ */
/* The running launch                                                                          */
/* ------------------------------------------------------------------------------------------ */

/* A span of memory that device code may touch without it being device memory. */
struct Span {
    uintptr_t lo, n;
    bool has(uintptr_t a) const { return a - lo < n; }
};

/* Shared memory of the running block: init tags (block serial per byte) and race cells. */
struct SharedShadow {
    uintptr_t lo = 0;
    size_t bytes = 0;
    std::vector<uint32_t> init_tag;
    std::vector<RaceCell> race;
    void reset(uintptr_t l, size_t n) {
        lo = l;
        bytes = n;
        init_tag.assign(n, 0);
        race.assign((n + 1) / 2, RaceCell{});
    }
};

struct LaunchState {
    bool active = false;
    const char* kernel = "";
    uint32_t launch_id = 0;
    uint32_t block_serial = 0;
    std::vector<Alloc*> allocs; /* live and quarantined, sorted by base */
    Alloc* last = nullptr;
    Span params{0, 0}, param_struct{0, 0}, fibers{0, 0}, warps{0, 0}, worker{0, 0};
    SharedShadow tls;  /* this library's thread-local block: static __shared__ variables */
    /* The launch's dynamic shared memory: one buffer per block of a cluster (one for a plain
     * launch), each with its guard zones, and whether that block has exited. */
    SharedShadow dyn[8];
    uintptr_t dyn_guard_lo[8] = {}, dyn_guard_n[8] = {};
    bool dyn_exited[8] = {};
    unsigned ndyn = 0;
    unsigned cluster_bt = 0; /* threads per block in a cluster launch, else 0 (see ThreadView) */
};

static LaunchState g; /* one launch at a time (launches are serialised), one worker */

/* This library's loaded segments and TLS size, found once. */
struct Image {
    uintptr_t base = 0;
    std::vector<Span> segments;
    size_t tls_bytes = 0;
    std::string path;
    void* handle = nullptr;
};

static Image& image() {
    static Image* im = [] {
        Image* m = new Image;
        Dl_info info;
        if (dladdr(reinterpret_cast<void*>(&checks), &info) && info.dli_fname) {
            m->base = reinterpret_cast<uintptr_t>(info.dli_fbase);
            m->path = info.dli_fname;
            m->handle = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
        }
        dl_iterate_phdr(
            [](dl_phdr_info* pi, size_t, void* data) -> int {
                Image* im2 = static_cast<Image*>(data);
                if (pi->dlpi_addr != im2->base) return 0;
                for (int i = 0; i < pi->dlpi_phnum; ++i) {
                    const ElfW(Phdr)& ph = pi->dlpi_phdr[i];
                    if (ph.p_type == PT_LOAD) im2->segments.push_back(Span{pi->dlpi_addr + ph.p_vaddr, ph.p_memsz});
                    if (ph.p_type == PT_TLS) im2->tls_bytes = ph.p_memsz;
                }
                return 1;
            },
            m);
        return m;
    }();
    return *im;
}

/* Any of this library's thread-locals: touching one makes sure the thread's TLS block exists. */
static thread_local int t_tls_anchor = 0;

static Span tls_block_of_this_thread() {
    Image& im = image();
    t_tls_anchor = 1;
    void* data = nullptr;
    if (!im.handle || im.tls_bytes == 0 || dlinfo(im.handle, RTLD_DI_TLS_DATA, &data) != 0 || !data) return Span{0, 0};
    return Span{reinterpret_cast<uintptr_t>(data), im.tls_bytes};
}

void san_launch_begin(const LaunchView& v) {
    Registry& R = reg();
    {
        std::lock_guard<std::mutex> lk(R.mu);
        for (Alloc* a : R.graveyard) drop_alloc(a);
        R.graveyard.clear();
        g.allocs.clear();
        for (auto& kv : R.live) g.allocs.push_back(kv.second);
        for (Alloc* a : R.quarantine) g.allocs.push_back(a);
    }
    std::sort(g.allocs.begin(), g.allocs.end(), [](const Alloc* a, const Alloc* b) { return a->base < b->base; });
    g.last = nullptr;
    g.kernel = v.kernel;
    if (++g.launch_id == 0) g.launch_id = 1;
    g.params = Span{reinterpret_cast<uintptr_t>(v.params), sizeof(void*)};
    g.param_struct = Span{reinterpret_cast<uintptr_t>(v.param_struct), v.param_bytes};
    g.fibers = Span{reinterpret_cast<uintptr_t>(v.fibers_lo), v.fibers_bytes};
    g.warps = Span{reinterpret_cast<uintptr_t>(v.warps_lo), v.warps_bytes};
    g.worker = Span{reinterpret_cast<uintptr_t>(v.worker_lo), v.worker_bytes};
    const Span tls = tls_block_of_this_thread();
    if (g.tls.lo != tls.lo || g.tls.bytes != tls.n) g.tls.reset(tls.lo, tls.n);
    g.ndyn = v.cluster_size;
    g.cluster_bt = v.cluster_size > 1 ? v.block_x * v.block_y * v.block_z : 0;
    for (unsigned r = 0; r < g.ndyn; ++r) {
        g.dyn[r].reset(reinterpret_cast<uintptr_t>(v.dyn_smem[r]), v.dyn_smem_bytes);
        g.dyn_guard_lo[r] = v.dyn_smem[r] ? reinterpret_cast<uintptr_t>(v.dyn_smem[r]) - 4096 : 0;
        g.dyn_guard_n[r] = v.dyn_smem[r] ? v.dyn_smem_bytes + 2 * 4096 : 0;
    }
    (void)image();
    g.active = true;
}

void san_block_begin(unsigned long long serial) {
    g.block_serial = static_cast<uint32_t>(serial);
    for (bool& e : g.dyn_exited) e = false;
}

void san_cluster_block_exited(unsigned rank) {
    if (rank < 8) g.dyn_exited[rank] = true;
}

void san_launch_end() {
    g.active = false;
    g.allocs.clear();
}

/* ------------------------------------------------------------------------------------------ */
/* Reports                                                                                     */
/* ------------------------------------------------------------------------------------------ */

static uint32_t pc_offset(const void* pc) {
    return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(pc) - image().base);
}

/* A code address in a message; san_symbolize turns it into file:line once off the fiber. */
static std::string pc_token(uint32_t off) { return strfmt("{pc:%" PRIx32 "}", off); }

[[noreturn]] __attribute__((noinline, cold)) static void report(int code, const std::string& msg) {
    /* Built in a scope of its own: nothing that owns memory may be alive when the block is
     * abandoned (fail_current_thread never returns). */
    char buf[2048];
    snprintf(buf, sizeof buf, "%s", msg.c_str());
    fail_current_thread(code, buf);
}

/* One addr2line run per code address (error path only: two at most); -i prints the inline chain,
 * innermost first. The recorded address is the return address of the check call: one byte back
 * is inside the access's line. */
static std::string source_line(const std::string& pc_hex) {
    const std::string cmd = "addr2line -i -s -e '" + image().path + "'" +
                            strfmt(" 0x%llx 2>/dev/null", strtoull(pc_hex.c_str(), nullptr, 16) - 1);
    std::string chain;
    if (FILE* f = popen(cmd.c_str(), "r")) {
        char line[512];
        while (fgets(line, sizeof line, f)) {
            std::string l(line);
            while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) l.pop_back();
            const size_t d = l.find(" (discriminator");
            if (d != std::string::npos) l.erase(d);
            if (l.empty() || l.find("??") == 0) continue;
            chain += chain.empty() ? l : " inlined into " + l;
        }
        pclose(f);
    }
    return chain.empty() ? "+0x" + pc_hex : chain;
}

std::string san_symbolize(const std::string& msg) {
    std::string r = msg;
    for (size_t i = r.find("{pc:"); i != std::string::npos; i = r.find("{pc:", i)) {
        const size_t j = r.find('}', i);
        if (j == std::string::npos) break;
        const std::string where = source_line(r.substr(i + 4, j - i - 4));
        r.replace(i, j + 1 - i, where);
        i += where.size();
    }
    return r;
}

/* ------------------------------------------------------------------------------------------ */
/* The checks                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* kAsyncWrite: a cp.async destination at the copy's issue, whose bytes may land any time until
 * the wait: racecheck counts it as a write, initcheck not (the wait's real write initialises). */
enum Kind { kRead = 0, kWrite = 1, kAtomic = 2, kAsyncWrite = 3 };

static const char* verb(int kind) {
    return kind == kRead ? "read" : kind == kWrite ? "write" : kind == kAtomic ? "atomic" : "asynchronous copy into";
}

static Alloc* find_near(uintptr_t a) {
    if (g.last && a - (g.last->base - kRedzone) < g.last->size + 2 * kRedzone) return g.last;
    auto& v = g.allocs;
    size_t lo = 0, hi = v.size();
    while (lo < hi) {
        const size_t mid = (lo + hi) / 2;
        if (v[mid]->base - kRedzone <= a) lo = mid + 1;
        else hi = mid;
    }
    if (lo == 0) return nullptr;
    Alloc* c = v[lo - 1];
    if (a - (c->base - kRedzone) < c->size + 2 * kRedzone) {
        g.last = c;
        return c;
    }
    return nullptr;
}

static inline bool ordered(const Access& prev, const ThreadView& t, uint32_t block) {
    if (prev.block != block) return false; /* another block of the same launch (or cluster) */
    if (prev.tid == t.tid) return true;
    if (g.cluster_bt) {
        /* bar is (cluster.sync count << 8) | the block's __syncthreads count: a cluster.sync
         * between orders any two threads of the cluster, a __syncthreads two of one block. */
        if ((prev.bar >> 8) != (static_cast<uint16_t>(t.bar_gen) >> 8)) return true;
        if (prev.tid / g.cluster_bt != t.tid / g.cluster_bt) return false;
    }
    if (static_cast<uint16_t>(t.bar_gen) != prev.bar) return true; /* a __syncthreads between */
    if (prev.tid / 32 == t.tid / 32 && static_cast<uint16_t>(t.warp_gen) != prev.wgen) return true;
    return false;
}

[[noreturn]] static void race_report(const char* space, const std::string& where, const char* hazard,
                                     const Access& prev, bool prev_write, int kind, const ThreadView& t,
                                     uint32_t pc, uint32_t block) {
    std::string msg;
    {
        const bool same_block = prev.block == block;
        msg = current_thread_where(strfmt("racecheck: %s hazard on %s memory", hazard, space).c_str());
        msg += strfmt(": it %ss %s at %s", verb(kind), where.c_str(), pc_token(pc).c_str());
        msg += strfmt("; %s %s the same bytes at %s", same_block ? thread_name(t.block_linear, prev.tid).c_str() : "another block",
                   prev_write ? "wrote" : "read", pc_token(prev.pc).c_str());
        msg += same_block ? (prev.multi ? " (and other threads did too)" : "") + std::string(", with no __syncthreads between them")
                          : std::string(" in the same launch (blocks are not ordered)");
    }
    report(kErrLaunchFailed, msg);
}

static void race_check(RaceCell* cells, size_t first, size_t last, int kind, const char* space,
                       const std::string& (*where_fn)(uintptr_t), uintptr_t addr, uint32_t pc, bool shared) {
    ThreadView t;
    current_thread_view(&t);
    const uint32_t block = g.block_serial;
    for (size_t i = first; i <= last; ++i) {
        RaceCell& c = cells[i];
        /* Shared memory belongs to one block: a record of another block is stale. */
        const bool w_live = c.w.launch == g.launch_id && (!shared || c.w.block == block);
        const bool r_live = c.r.launch == g.launch_id && (!shared || c.r.block == block);
        if (w_live && !ordered(c.w, t, block)) {
            race_report(space, where_fn(addr), kind == kRead ? "read-after-write" : "write-after-write", c.w, true, kind,
                        t, pc, block);
        }
        if (kind == kWrite) {
            if (r_live) {
                bool same_interval = c.r.block == block && c.r.bar == static_cast<uint16_t>(t.bar_gen);
                /* Readers in several blocks of a cluster since its last cluster.sync: only another
                 * cluster.sync orders a write after all of them. */
                if ((c.r.multi & 4) && (c.r.bar >> 8) == (static_cast<uint16_t>(t.bar_gen) >> 8)) same_interval = true;
                /* Readers all of the writer's warp, the last of them before a warp barrier the
                 * writer has passed (a warp-private slot reused after __syncwarp). */
                const bool warp_ordered = !(c.r.multi & 2) && c.r.tid / 32 == t.tid / 32 &&
                                          static_cast<uint16_t>(t.warp_gen) != c.r.wgen;
                if (!ordered(c.r, t, block) || (c.r.multi && same_interval && !warp_ordered))
                    race_report(space, where_fn(addr), "write-after-read", c.r, false, kind, t, pc, block);
            }
            c.w = Access{g.launch_id, block, pc, static_cast<uint16_t>(t.tid), static_cast<uint16_t>(t.bar_gen),
                         static_cast<uint16_t>(t.warp_gen), 0};
            c.r.launch = 0;
        } else {
            if (r_live && c.r.block == block && c.r.bar == static_cast<uint16_t>(t.bar_gen)) {
                if (c.r.tid != t.tid) c.r.multi |= 1;
                if (c.r.tid / 32 != t.tid / 32) c.r.multi |= 2;
                if (g.cluster_bt && c.r.tid / g.cluster_bt != t.tid / g.cluster_bt) c.r.multi |= 4;
                /* Within one warp the latest read's warp generation is the one a writer must be
                 * past (warp barriers only increase it). */
                if (!(c.r.multi & 2)) c.r.wgen = static_cast<uint16_t>(t.warp_gen);
            } else {
                c.r = Access{g.launch_id, block, pc, static_cast<uint16_t>(t.tid), static_cast<uint16_t>(t.bar_gen),
                             static_cast<uint16_t>(t.warp_gen), 0};
            }
        }
    }
}

static std::string g_where;
static Alloc* g_where_alloc = nullptr;
static const std::string& global_where(uintptr_t a) {
    g_where = strfmt("byte %zu of a %zu-byte device allocation", static_cast<size_t>(a - g_where_alloc->base),
                  g_where_alloc->size);
    return g_where;
}
static const std::string& tls_where(uintptr_t a) {
    g_where = strfmt("static __shared__ memory (byte %zu of the thread-local block)", static_cast<size_t>(a - g.tls.lo));
    return g_where;
}
static unsigned g_where_rank = 0;
static const std::string& dyn_where(uintptr_t a) {
    const SharedShadow& d = g.dyn[g_where_rank];
    g_where = strfmt("dynamic shared byte %zu of %zu", static_cast<size_t>(a - d.lo), d.bytes);
    if (g.cluster_bt) g_where += strfmt(" of cluster block rank %u", g_where_rank);
    return g_where;
}

[[noreturn]] static void illegal(int code, const std::string& what, uint32_t pc) {
    std::string msg;
    msg = current_thread_where(strfmt("memcheck: %s", what.c_str()).c_str()) + " at " + pc_token(pc);
    report(code, msg);
}

static void shared_access(SharedShadow& s, uintptr_t a, unsigned n, int kind, uint32_t pc,
                          const std::string& (*where_fn)(uintptr_t)) {
    const size_t off = a - s.lo;
    if ((checks() & kInitcheck) && kind != kAsyncWrite) {
        if (kind != kWrite) {
            for (unsigned i = 0; i < n; ++i) {
                if (s.init_tag[off + i] != g.block_serial) {
                    std::string msg;
                    msg = current_thread_where("initcheck: read of uninitialised shared memory") +
                          strfmt(": %u bytes at %s (nothing in this block wrote them) at %s", n, where_fn(a).c_str(),
                              pc_token(pc).c_str());
                    report(kErrLaunchFailed, msg);
                }
            }
        }
        if (kind != kRead)
            for (unsigned i = 0; i < n; ++i) s.init_tag[off + i] = g.block_serial;
    }
    if ((checks() & kRacecheck) && kind != kAtomic)
        race_check(s.race.data(), off / 2, (off + n - 1) / 2, kind == kAsyncWrite ? kWrite : kind, "__shared__", where_fn, a,
                   pc, true);
}

static void global_access(Alloc* al, uintptr_t a, unsigned n, int kind, uint32_t pc) {
    const size_t off = a - al->base;
    g_where_alloc = al;
    if (checks() & kInitcheck) {
        unsigned char* sh = init_shadow(al);
        if (kind != kWrite) {
            for (unsigned i = 0; i < n; ++i) {
                if (!sh[off + i]) {
                    std::string msg;
                    msg = current_thread_where("initcheck: read of uninitialised __global__ memory") +
                          strfmt(": %u bytes at %s (never written by a kernel, memset or copy) at %s", n,
                              global_where(a).c_str(), pc_token(pc).c_str());
                    report(kErrLaunchFailed, msg);
                }
            }
        }
        if (kind != kRead) std::memset(sh + off, 1, n);
    }
    if ((checks() & kRacecheck) && kind != kAtomic && al->size <= kRaceShadowCap) {
        if (!al->race) al->race = static_cast<RaceCell*>(calloc((al->size + 1) / 2, sizeof(RaceCell)));
        if (al->race) race_check(al->race, off / 2, (off + n - 1) / 2, kind, "__global__", global_where, a, pc, false);
    }
}

static void check_access(uintptr_t a, unsigned n, int kind, bool natural, const void* pcp) {
    if (!g.active || n == 0) return;
    /* The thread's own stack: locals. */
    if (((a ^ stack_pointer()) & ~(g_stack_bytes - 1)) == 0) return;
    const uint32_t pc = pc_offset(pcp);
    /* A naturally aligned access type must be aligned on the device (float4 -> 16 bytes). */
    const bool misaligned = natural && (n & (n - 1)) == 0 && n > 1 && (a & (n - 1)) != 0;

    if (g.tls.bytes && a - g.tls.lo < g.tls.bytes) {
        if (g.cluster_bt) {
            illegal(kErrLaunchFailed,
                    strfmt("%s of %u bytes of static __shared__ memory in a cluster launch: the emulator runs a cluster's "
                           "blocks on one OS thread, where static __shared__ would be one variable for all of them; "
                           "cluster kernels keep their shared memory in dynamic shared memory",
                           verb(kind), n),
                    pc);
        }
        if (a + n - g.tls.lo > g.tls.bytes) illegal(kErrIllegalAddress, strfmt("out-of-bounds %s of %u bytes in static shared memory", verb(kind), n), pc);
        if (misaligned) illegal(716, strfmt("misaligned %s of %u bytes at static shared byte %zu", verb(kind), n, static_cast<size_t>(a - g.tls.lo)), pc);
        shared_access(g.tls, a, n, kind, pc, tls_where);
        return;
    }
    for (unsigned r = 0; r < g.ndyn; ++r) {
        if (!g.dyn_guard_n[r] || a - g.dyn_guard_lo[r] >= g.dyn_guard_n[r]) continue;
        const SharedShadow& d = g.dyn[r];
        const bool oob = a < d.lo || a + n > d.lo + d.bytes;
        char of_rank[40] = "";
        if (g.cluster_bt && (oob || misaligned)) snprintf(of_rank, sizeof of_rank, " of cluster block rank %u", r);
        if (oob) {
            illegal(kErrIllegalAddress,
                    strfmt("out-of-bounds %s of %u bytes at dynamic shared offset %lld%s (the launch has %zu bytes)", verb(kind), n,
                        static_cast<long long>(a - d.lo), of_rank, d.bytes),
                    pc);
        }
        if (g.dyn_exited[r]) {
            illegal(kErrIllegalAddress,
                    strfmt("%s of %u bytes at dynamic shared byte %zu of cluster block rank %u, which has exited (its "
                           "shared memory is gone: a cluster.sync() before exit keeps it for the others)",
                           verb(kind), n, static_cast<size_t>(a - d.lo), r),
                    pc);
        }
        if (misaligned) illegal(716, strfmt("misaligned %s of %u bytes at dynamic shared byte %zu%s", verb(kind), n, static_cast<size_t>(a - d.lo), of_rank), pc);
        if (kind == kAsyncWrite && g.cluster_bt) {
            /* cp.async writes .shared::cta: the block's own memory, not a cluster peer's. */
            ThreadView t;
            current_thread_view(&t);
            if (t.tid / g.cluster_bt != r) {
                illegal(kErrIllegalAddress,
                        strfmt("asynchronous copy (cp.async) into the shared memory of cluster block rank %u, not its own "
                               "(rank %u)",
                               r, t.tid / g.cluster_bt),
                        pc);
            }
        }
        g_where_rank = r;
        shared_access(g.dyn[r], a, n, kind, pc, dyn_where);
        return;
    }
    if (kind == kAsyncWrite) {
        illegal(kErrIllegalAddress,
                strfmt("asynchronous copy (cp.async) into 0x%llx, which is not this block's shared memory",
                       static_cast<unsigned long long>(a)),
                pc);
    }
    if (Alloc* al = find_near(a)) {
        if (al->freed) {
            illegal(kErrIllegalAddress,
                    strfmt("%s of %u bytes at byte %lld of a freed %zu-byte device allocation (use after free)", verb(kind), n,
                        static_cast<long long>(a - al->base), al->size),
                    pc);
        }
        if (a < al->base || a + n > al->base + al->size) {
            const long long off = static_cast<long long>(a - al->base);
            illegal(kErrIllegalAddress,
                    off < 0 ? strfmt("out-of-bounds %s of %u bytes, %lld bytes before a %zu-byte device allocation", verb(kind), n, -off, al->size)
                            : strfmt("out-of-bounds %s of %u bytes at byte %lld of a %zu-byte device allocation (%lld bytes past its end)",
                                  verb(kind), n, off, al->size, static_cast<long long>(a + n - al->base - al->size)),
                    pc);
        }
        if (misaligned) illegal(716, strfmt("misaligned %s of %u bytes at byte %zu of a device allocation", verb(kind), n, static_cast<size_t>(a - al->base)), pc);
        global_access(al, a, n, kind, pc);
        return;
    }
    /* Runtime structures that inline device code reads (threadIdx, warp exchange slots, the
     * kernel's parameter struct) and this library's constants. */
    if (g.fibers.has(a) || g.warps.has(a) || g.worker.has(a) || g.params.has(a) || g.param_struct.has(a)) return;
    for (const Span& s : image().segments)
        if (s.has(a)) return;
    illegal(kErrIllegalAddress,
            strfmt("%s of %u bytes at 0x%llx, which is not device memory (a host pointer, or no live allocation)", verb(kind), n,
                static_cast<unsigned long long>(a)),
            pc);
}

}  // namespace dk_emu

/* ------------------------------------------------------------------------------------------ */
/* The entry points the instrumented kernels call                                              */
/* ------------------------------------------------------------------------------------------ */

#define DK_SAN extern "C" DK_EMU_EXPORT __attribute__((noinline))
#define DK_PC __builtin_return_address(0)
using dk_emu::check_access;

DK_SAN void __tsan_init() {}
DK_SAN void __tsan_func_entry(void*) {}
DK_SAN void __tsan_func_exit() {}
DK_SAN void __tsan_vptr_update(void**, void*) {}
DK_SAN void __tsan_vptr_read(void**) {}

#define DK_SAN_RW(N)                                                                                           \
    DK_SAN void __tsan_read##N(void* a) { check_access(reinterpret_cast<uintptr_t>(a), N, dk_emu::kRead, true, DK_PC); }      \
    DK_SAN void __tsan_write##N(void* a) { check_access(reinterpret_cast<uintptr_t>(a), N, dk_emu::kWrite, true, DK_PC); }    \
    DK_SAN void __tsan_unaligned_read##N(void* a) {                                                            \
        check_access(reinterpret_cast<uintptr_t>(a), N, dk_emu::kRead, false, DK_PC);                          \
    }                                                                                                          \
    DK_SAN void __tsan_unaligned_write##N(void* a) {                                                           \
        check_access(reinterpret_cast<uintptr_t>(a), N, dk_emu::kWrite, false, DK_PC);                         \
    }                                                                                                          \
    DK_SAN void __tsan_volatile_read##N(void* a) { check_access(reinterpret_cast<uintptr_t>(a), N, dk_emu::kRead, true, DK_PC); } \
    DK_SAN void __tsan_volatile_write##N(void* a) { check_access(reinterpret_cast<uintptr_t>(a), N, dk_emu::kWrite, true, DK_PC); }
DK_SAN_RW(1)
DK_SAN_RW(2)
DK_SAN_RW(4)
DK_SAN_RW(8)
DK_SAN_RW(16)

/* simt.h's cp.async, at the issue: the destination as a write in flight (see kAsyncWrite). */
DK_SAN void dk_emu_check_async_write(void* a, unsigned n) {
    check_access(reinterpret_cast<uintptr_t>(a), n, dk_emu::kAsyncWrite, true, DK_PC);
}

DK_SAN void __tsan_read_range(void* a, unsigned long n) {
    check_access(reinterpret_cast<uintptr_t>(a), static_cast<unsigned>(n), dk_emu::kRead, false, DK_PC);
}
DK_SAN void __tsan_write_range(void* a, unsigned long n) {
    check_access(reinterpret_cast<uintptr_t>(a), static_cast<unsigned>(n), dk_emu::kWrite, false, DK_PC);
}

/* Atomics: bounds and initialisation are checked; atomics never race with each other. */
#define DK_SAN_ATOMIC(B, T)                                                                                    \
    DK_SAN T __tsan_atomic##B##_load(const volatile T* a, int) {                                              \
        check_access(reinterpret_cast<uintptr_t>(a), sizeof(T), dk_emu::kAtomic, true, DK_PC);                \
        return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                           \
    }                                                                                                          \
    DK_SAN void __tsan_atomic##B##_store(volatile T* a, T v, int) {                                           \
        check_access(reinterpret_cast<uintptr_t>(a), sizeof(T), dk_emu::kWrite, true, DK_PC);                 \
        __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                              \
    }                                                                                                          \
    DK_SAN T __tsan_atomic##B##_exchange(volatile T* a, T v, int) {                                           \
        check_access(reinterpret_cast<uintptr_t>(a), sizeof(T), dk_emu::kAtomic, true, DK_PC);                \
        return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                    \
    }                                                                                                          \
    DK_SAN T __tsan_atomic##B##_fetch_add(volatile T* a, T v, int) {                                          \
        check_access(reinterpret_cast<uintptr_t>(a), sizeof(T), dk_emu::kAtomic, true, DK_PC);                \
        return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                     \
    }                                                                                                          \
    DK_SAN T __tsan_atomic##B##_fetch_sub(volatile T* a, T v, int) {                                          \
        check_access(reinterpret_cast<uintptr_t>(a), sizeof(T), dk_emu::kAtomic, true, DK_PC);                \
        return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                     \
    }                                                                                                          \
    DK_SAN T __tsan_atomic##B##_fetch_and(volatile T* a, T v, int) {                                          \
        check_access(reinterpret_cast<uintptr_t>(a), sizeof(T), dk_emu::kAtomic, true, DK_PC);                \
        return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                     \
    }                                                                                                          \
    DK_SAN T __tsan_atomic##B##_fetch_or(volatile T* a, T v, int) {                                           \
        check_access(reinterpret_cast<uintptr_t>(a), sizeof(T), dk_emu::kAtomic, true, DK_PC);                \
        return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                      \
    }                                                                                                          \
    DK_SAN T __tsan_atomic##B##_fetch_xor(volatile T* a, T v, int) {                                          \
        check_access(reinterpret_cast<uintptr_t>(a), sizeof(T), dk_emu::kAtomic, true, DK_PC);                \
        return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                                     \
    }                                                                                                          \
    DK_SAN T __tsan_atomic##B##_fetch_nand(volatile T* a, T v, int) {                                         \
        check_access(reinterpret_cast<uintptr_t>(a), sizeof(T), dk_emu::kAtomic, true, DK_PC);                \
        return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                                    \
    }                                                                                                          \
    DK_SAN int __tsan_atomic##B##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {               \
        check_access(reinterpret_cast<uintptr_t>(a), sizeof(T), dk_emu::kAtomic, true, DK_PC);                \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                \
    }                                                                                                          \
    DK_SAN int __tsan_atomic##B##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                 \
        check_access(reinterpret_cast<uintptr_t>(a), sizeof(T), dk_emu::kAtomic, true, DK_PC);                \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                \
    }                                                                                                          \
    DK_SAN T __tsan_atomic##B##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                     \
        check_access(reinterpret_cast<uintptr_t>(a), sizeof(T), dk_emu::kAtomic, true, DK_PC);                \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                      \
        return c;                                                                                              \
    }
DK_SAN_ATOMIC(8, char)
DK_SAN_ATOMIC(16, short)
DK_SAN_ATOMIC(32, int)
DK_SAN_ATOMIC(64, long)

DK_SAN void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
DK_SAN void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

/* UBSan bounds: an index past a fixed-size array (static __shared__ arrays included). */
namespace {
struct UbsanLocation {
    const char* file;
    unsigned line, column;
};
struct UbsanType {
    unsigned short kind, info;
    char name[1];
};
struct UbsanOutOfBounds {
    UbsanLocation loc;
    const UbsanType* array_type;
    const UbsanType* index_type;
};
}  // namespace

DK_SAN void __ubsan_handle_out_of_bounds(void* data, void* index) {
    const UbsanOutOfBounds* d = static_cast<const UbsanOutOfBounds*>(data);
    const bool is_signed = d->index_type->kind == 0 && (d->index_type->info & 1);
    const long long idx = reinterpret_cast<long long>(index);
    std::string msg;
    {
        const char* file = strrchr(d->loc.file, '/');
        msg = dk_emu::current_thread_where("memcheck: index out of bounds") +
              dk_emu::strfmt(": index %lld%s is outside %s at %s:%u", is_signed ? idx : static_cast<long long>(reinterpret_cast<uintptr_t>(index)),
                          "", d->array_type->name, file ? file + 1 : d->loc.file, d->loc.line);
    }
    dk_emu::report(dk_emu::kErrIllegalAddress, msg);
}
DK_SAN void __ubsan_handle_out_of_bounds_abort(void* data, void* index) { __ubsan_handle_out_of_bounds(data, index); }

#endif /* DK_EMU_CHECK */
