/*
 * Private interface between the SIMT runtime (runtime.cpp) and the fake driver (driver.cpp).
 * Not for kernels: they include simt.h through common.cuh.
 */
#ifndef DISTILL_EMULATOR_INTERNAL_H
#define DISTILL_EMULATOR_INTERNAL_H

#include <atomic>
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
    kErrAssert = 710,
    kErrLaunchFailed = 719,
    kErrNotSupported = 801,
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

/* Registered kernel by name, or nullptr. Thread-safe. */
DK_EMU_HIDDEN KernelEntry* find_kernel(const char* name);

/* Runs a grid to completion on the worker pool. Returns a CUresult; on failure the message is
 * available from last_error(). Thread-safe (launches are serialised). */
DK_EMU_HIDDEN int launch(KernelEntry* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                         unsigned bz, unsigned shared_bytes, void** params);

/* Message of the calling thread's last failed launch, else of the process's last failed launch,
 * else nullptr. The pointer stays valid (the text may change with later failures). */
DK_EMU_HIDDEN const char* last_error();

/* Records `msg` as the last error (see last_error) and returns `code`. Used by the driver for
 * misuse it detects itself (bad pointers, unknown kernels) so the Rust side can show why. */
DK_EMU_HIDDEN int note_error(int code, const std::string& msg);

}  // namespace dk_emu

#endif /* DISTILL_EMULATOR_INTERNAL_H */
