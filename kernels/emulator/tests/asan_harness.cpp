/*
 * Runs dk_asan_sum (asan_oob.cu) through the fake driver with exact-size device allocations.
 *   asan_harness clean   -> in-bounds variant, must run clean and print "clean run ok"
 *   asan_harness oob     -> reads one float past the end; AddressSanitizer must abort it
 */
#include <cstdio>
#include <cstring>
#include <vector>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
extern "C" {
CUresult cuInit(unsigned);
CUresult cuDevicePrimaryCtxRetain(void**, int);
CUresult cuCtxSetCurrent(void*);
CUresult cuMemAlloc_v2(CUdeviceptr*, size_t);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuMemcpyHtoD_v2(CUdeviceptr, const void*, size_t);
CUresult cuMemcpyDtoH_v2(void*, CUdeviceptr, size_t);
CUresult cuModuleLoadData(void**, const void*);
CUresult cuModuleGetFunction(void**, void*, const char*);
CUresult cuLaunchKernel(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**, void**);
const char* dkEmuLastError(void);
}

struct AsanParams {
    const float* x;
    float* out;
    int n;
    int overrun;
};

int main(int argc, char** argv) {
    const bool overrun = argc > 1 && std::strcmp(argv[1], "oob") == 0;
    const int n = 1000, threads = 128, blocks = (n + threads - 1) / threads;
    void* ctx = nullptr;
    void* mod = nullptr;
    void* fn = nullptr;
    if (cuInit(0) || cuDevicePrimaryCtxRetain(&ctx, 0) || cuCtxSetCurrent(ctx) || cuModuleLoadData(&mod, "distill-emulator-module") ||
        cuModuleGetFunction(&fn, mod, "dk_asan_sum")) {
        std::fprintf(stderr, "driver setup failed\n");
        return 3;
    }
    CUdeviceptr x = 0, out = 0;
    if (cuMemAlloc_v2(&x, n * sizeof(float)) || cuMemAlloc_v2(&out, blocks * sizeof(float))) return 3;
    std::vector<float> hx(n, 1.0f), hout(blocks, 0.0f);
    cuMemcpyHtoD_v2(x, hx.data(), n * sizeof(float));
    AsanParams p{reinterpret_cast<const float*>(x), reinterpret_cast<float*>(out), n, overrun ? 1 : 0};
    void* args[] = {&p};
    const CUresult rc = cuLaunchKernel(fn, blocks, 1, 1, threads, 1, 1, 0, nullptr, args, nullptr);
    if (rc) {
        std::fprintf(stderr, "launch failed: %d %s\n", rc, dkEmuLastError() ? dkEmuLastError() : "");
        return 4;
    }
    cuMemcpyDtoH_v2(hout.data(), out, blocks * sizeof(float));
    float total = 0;
    for (float v : hout) total += v;
    cuMemFree_v2(x);
    cuMemFree_v2(out);
    if (!overrun && total != static_cast<float>(n)) {
        std::fprintf(stderr, "wrong sum %f\n", total);
        return 5;
    }
    std::printf("%s run ok (sum %.0f)\n", overrun ? "overrunning" : "clean", total);
    return 0;
}
