/*
 * The library the way the Rust crate uses it: dlopen'd by absolute path (argv[1]), then found
 * again under its SONAME by a later dlopen("libcuda.so.1") (what cudarc does), and driven only
 * through dlsym'd driver entry points. Runs selftest.cu's kernels.
 */
#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <vector>

static int g_fail = 0;
#define EXPECT(c)                                                          \
    do {                                                                   \
        if (!(c)) {                                                        \
            ++g_fail;                                                      \
            std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__, __LINE__, #c); \
        }                                                                  \
    } while (0)

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

template <class F>
static F sym(void* lib, const char* name) {
    void* p = dlsym(lib, name);
    if (!p) {
        std::fprintf(stderr, "missing symbol %s\n", name);
        ++g_fail;
    }
    return reinterpret_cast<F>(p);
}

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s /abs/path/to/emulator.so\n", argv[0]);
        return 2;
    }
    void* first = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!first) {
        std::fprintf(stderr, "dlopen(%s): %s\n", argv[1], dlerror());
        return 1;
    }
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    EXPECT(lib == first); /* reused through the SONAME, no second copy */
    if (!lib) return 1;

    auto identify = sym<int (*)()>(lib, "dkEmuIdentify");
    auto last_error = sym<const char* (*)()>(lib, "dkEmuLastError");
    auto cuInit = sym<CUresult (*)(unsigned)>(lib, "cuInit");
    auto cuDevicePrimaryCtxRetain = sym<CUresult (*)(void**, int)>(lib, "cuDevicePrimaryCtxRetain");
    auto cuCtxSetCurrent = sym<CUresult (*)(void*)>(lib, "cuCtxSetCurrent");
    auto cuMemAllocAsync = sym<CUresult (*)(CUdeviceptr*, size_t, void*)>(lib, "cuMemAllocAsync");
    auto cuMemsetD8Async = sym<CUresult (*)(CUdeviceptr, unsigned char, size_t, void*)>(lib, "cuMemsetD8Async");
    auto cuMemcpyDtoHAsync = sym<CUresult (*)(void*, CUdeviceptr, size_t, void*)>(lib, "cuMemcpyDtoHAsync_v2");
    auto cuMemFreeAsync = sym<CUresult (*)(CUdeviceptr, void*)>(lib, "cuMemFreeAsync");
    auto cuModuleLoadData = sym<CUresult (*)(void**, const void*)>(lib, "cuModuleLoadData");
    auto cuModuleGetFunction = sym<CUresult (*)(void**, void*, const char*)>(lib, "cuModuleGetFunction");
    auto cuLaunchKernel = sym<CUresult (*)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                           void*, void**, void**)>(lib, "cuLaunchKernel");
    auto cuStreamSynchronize = sym<CUresult (*)(void*)>(lib, "cuStreamSynchronize");
    auto module_image = sym<const char* (*)()>(lib, "dkEmuModuleImage");
    auto driver_mode = sym<int (*)()>(lib, "dkEmuDriverMode");
    if (g_fail) return 1;

    EXPECT(identify() == 0x44454d55);
    void* ctx = nullptr;
    void* mod = nullptr;
    EXPECT(cuInit(0) == 0);
    EXPECT(cuDevicePrimaryCtxRetain(&ctx, 0) == 0 && cuCtxSetCurrent(ctx) == 0);
    EXPECT(cuModuleLoadData(&mod, module_image()) == 0); /* the emulator-only module */
    const unsigned threads = 96;
    CUdeviceptr out = 0;
    EXPECT(cuMemAllocAsync(&out, threads * sizeof(float), nullptr) == 0);
    EXPECT(cuMemsetD8Async(out, 0, threads * sizeof(float), nullptr) == 0);
    struct P {
        CUdeviceptr out;
    } p{out};
    void* args[] = {&p};

    void* ok = nullptr;
    void* diverge = nullptr;
    EXPECT(cuModuleGetFunction(&ok, mod, "dk_selftest_ok") == 0);
    EXPECT(cuModuleGetFunction(&diverge, mod, "dk_selftest_divergence") == 0);
    /* Asynchronous (the default): the launch is queued, the next synchronize reports the fault
     * once (not sticky by default). */
    const bool async = (driver_mode() & 1) != 0; /* DISTILL_EMU_SYNC=1: the launch itself fails */
    EXPECT(cuLaunchKernel(diverge, 2, 1, 1, 64, 1, 1, 0, nullptr, args, nullptr) == (async ? 0 : 719));
    EXPECT(cuStreamSynchronize(nullptr) == 719);
    EXPECT(last_error() && std::strstr(last_error(), "dk_selftest_divergence"));
    EXPECT(cuLaunchKernel(ok, 2, 1, 1, threads, 1, 1, 0, nullptr, args, nullptr) == 0);
    EXPECT(cuStreamSynchronize(nullptr) == 0);
    std::vector<float> host(threads, 0.0f);
    EXPECT(cuMemcpyDtoHAsync(host.data(), out, threads * sizeof(float), nullptr) == 0);
    for (float v : host) EXPECT(v == static_cast<float>(threads));
    EXPECT(cuMemFreeAsync(out, nullptr) == 0);

    /* dlclose must not unmap code the worker threads run: the library marks itself NODELETE. */
    dlclose(lib);
    dlclose(first);
    void* again = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    EXPECT(again != nullptr);

    if (g_fail) {
        std::fprintf(stderr, "test_dlopen: %d failures\n", g_fail);
        return 1;
    }
    std::printf("test_dlopen: library loaded by path and reused as libcuda.so.1; selftest kernels ran\n");
    return 0;
}
