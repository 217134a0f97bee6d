/*
 * Private interface between the SIMT runtime (runtime.cpp) and the fake driver (driver.cpp).
 * Not for kernels: they include simt.h through common.cuh.
 */
#ifndef DISTILL_EMULATOR_INTERNAL_H
#define DISTILL_EMULATOR_INTERNAL_H

#include <atomic>
#include <cstddef>
#include <string>

#define DK_EMU_HIDDEN __attribute__((visibility("hidden")))
#define DK_EMU_EXPORT __attribute__((visibility("default")))

namespace dk_emu {

/* CUresult values used by the emulator (the numbers of CUDA's cudaError_enum). */
enum : int {
    kSuccess = 0,
    kErrInvalidValue = 1,
    kErrOutOfMemory = 2,
    kErrNotInitialized = 3,
    kErrNoDevice = 100,
    kErrInvalidDevice = 101,
    kErrInvalidImage = 200,
    kErrInvalidContext = 201,
    kErrInvalidHandle = 400,
    kErrNotFound = 500,
    kErrNotReady = 600,
    kErrIllegalAddress = 700,
    kErrLaunchOutOfResources = 701,
    kErrLaunchTimeout = 702,
    kErrAssert = 710,
    kErrLaunchFailed = 719,
    kErrNotSupported = 801,
    kErrInvalidClusterSize = 912,
    kErrUnknown = 999,
};

/* Default and opt-in limits of the emulated device (sm_90-like). */
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kDefaultSharedPerBlock = 48 * 1024;
constexpr int kMaxSharedPerBlockOptin = 227 * 1024;

typedef void (*KernelTrampoline)(void** kernel_params);

/* One registered kernel. Its address is the CUfunction handle the driver hands out. */
struct KernelEntry {
    std::string name;
    KernelTrampoline fn = nullptr;
    unsigned param_bytes = 0;
    /* CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: launches asking for more dynamic shared
     * memory fail like on the device, so a missing cuFuncSetAttribute shows up in tests. */
    std::atomic<int> max_dynamic_smem{kDefaultSharedPerBlock};
    std::atomic<int> preferred_carveout{-1};
};

/* printf into a std::string (messages of at most 1 KiB). */
DK_EMU_HIDDEN std::string strfmt(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

/* Registered kernel by name, or nullptr. Thread-safe. */
DK_EMU_HIDDEN KernelEntry* find_kernel(const char* name);

/* Blocks per thread-block cluster in x, y, z. */
struct ClusterDim {
    unsigned x, y, z;
};

/* Runs a grid to completion on the worker pool, in thread-block clusters of `cluster` blocks
 * ({1, 1, 1}: a plain launch). Returns a CUresult; on failure the message is available from
 * last_error(). Thread-safe (launches are serialised). */
DK_EMU_HIDDEN int launch(KernelEntry* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                         unsigned bz, unsigned shared_bytes, void** params, ClusterDim cluster);

/* Message of the calling thread's last failed launch, else of the process's last failed launch,
 * else nullptr. The pointer stays valid (the text may change with later failures). */
DK_EMU_HIDDEN const char* last_error();

/* Records `msg` as the last error (see last_error) and returns `code`. Used by the driver for
 * misuse it detects itself (bad pointers, unknown kernels) so the Rust side can show why. */
DK_EMU_HIDDEN int note_error(int code, const std::string& msg);
/* Prints a finding of the checks; DISTILL_EMU_HALT_ON_ERROR=1 ends the process there (status 66). */
DK_EMU_HIDDEN void report_finding(const std::string& msg);

/* ------------------------------------------------------------------------------------------ */
/* The check build (DK_EMU_CHECK=1: kernels instrumented, sanitizer.cpp active).                 */
/* In the fast build the memory functions are plain and the hooks do nothing.                  */
/* ------------------------------------------------------------------------------------------ */

/* Device memory for the driver: in the check build with guard zones around it, poisoned, and
 * registered with memcheck/initcheck/racecheck. `device_free_memory` takes what
 * `device_malloc` returned. */
DK_EMU_HIDDEN void* device_malloc(size_t bytes);
DK_EMU_HIDDEN void device_free_memory(void* p);
/* The host (driver) wrote [p, p + n) of device memory: a memset or a copy from the host. */
DK_EMU_HIDDEN void note_host_write(void* p, size_t n);
/* A device-to-device copy: initialisation state travels with the bytes. */
DK_EMU_HIDDEN void note_device_copy(void* dst, const void* src, size_t n);
/* The host reads [p, p + n) of device memory (a copy to the host; `reader` names who, for the
 * report). Under initcheck: a report when any of those bytes was never written (a missing store
 * the host would see as garbage; stricter than compute-sanitizer, which checks device reads
 * only), else empty. */
DK_EMU_HIDDEN std::string note_host_read(const void* p, size_t n, const char* reader = "a copy to the host");

/* What the sanitizer knows about the CUDA thread making an access (runtime.cpp fills it). */
/* In a cluster launch, tid counts all the cluster's threads (block rank * block size + the
 * thread's index) and bar_gen is (cluster.sync() completed << 8) | (the block's __syncthreads
 * completed & 0xff), so that one 16-bit epoch orders both. */
struct ThreadView {
    unsigned tid;        /* linear thread index in the block */
    unsigned bar_gen;    /* __syncthreads completed by this block so far */
    unsigned warp_gen;   /* __syncwarp barriers completed by this thread's warp so far (shuffles,
                          * votes and reductions exchange values but do not order memory) */
    unsigned long long block_serial; /* unique per block run in this process */
    unsigned long long block_linear; /* linear block index in the grid */
};
DK_EMU_HIDDEN void current_thread_view(ThreadView* out);
/* "in kernel K: block (x,y,z), thread (x,y,z)" of the running CUDA thread. */
DK_EMU_HIDDEN std::string current_thread_where(const char* what);
/* Fails the running launch with `code` and `msg` and abandons the block (never returns). The
 * message is copied before anything is unwound. */
[[noreturn]] DK_EMU_HIDDEN void fail_current_thread(int code, const char* msg);
/* "block (x,y,z), thread (x,y,z)" for a linear thread index of the running block. */
DK_EMU_HIDDEN std::string thread_name(unsigned long long block_linear, unsigned tid);

/* Lifecycle hooks the runtime calls on the launching worker (check build only). */
struct LaunchView {
    const char* kernel;
    const void* params;       /* the argument array cuLaunchKernel got */
    const void* param_struct; /* params[0] */
    unsigned param_bytes;
    const void* fibers_lo; size_t fibers_bytes; /* runtime structures device code reads */
    const void* warps_lo; size_t warps_bytes;
    const void* worker_lo; size_t worker_bytes;
    unsigned char* dyn_smem[8]; size_t dyn_smem_bytes; /* per block of a cluster, by rank */
    unsigned cluster_size; /* 1: a plain launch */
    unsigned block_x, block_y, block_z, grid_x, grid_y;
};
DK_EMU_HIDDEN void san_launch_begin(const LaunchView& v);
DK_EMU_HIDDEN void san_block_begin(unsigned long long serial);
DK_EMU_HIDDEN void san_launch_end();
/* Every thread of block `rank` of the running cluster has exited: its shared memory is gone. */
DK_EMU_HIDDEN void san_cluster_block_exited(unsigned rank);
/* Rewrites code addresses in a failure message into source lines (off the fiber stacks). */
DK_EMU_HIDDEN std::string san_symbolize(const std::string& msg);
/* Whether this library is the check build, and which checks are on (DISTILL_EMU_CHECK). */
DK_EMU_HIDDEN bool san_enabled();

}  // namespace dk_emu

#endif /* DISTILL_EMULATOR_INTERNAL_H */
