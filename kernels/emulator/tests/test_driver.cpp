/*
 * The fake driver through its C API, in the order cudarc calls it: init, device queries, primary
 * context, async alloc, copies and memsets (with range checks), module/function lookup, launch,
 * synchronize (with the pending launch error), events, streams, pointer attributes, errors.
 * Run with DISTILL_EMU_SYNC=1 (run_tests.sh does): launches complete, and report their faults,
 * before cuLaunchKernel returns. test_fidelity.cpp covers the default asynchronous mode.
 */
#include "emulator/simt.h"

#include <vector>

#include "test_util.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUhandle;

extern "C" {
CUresult cuInit(unsigned);
CUresult cuDriverGetVersion(int*);
CUresult cuDeviceGetCount(int*);
CUresult cuDeviceGet(CUdevice*, int);
CUresult cuDeviceGetName(char*, int, CUdevice);
CUresult cuDeviceGetAttribute(int*, int, CUdevice);
CUresult cuDeviceTotalMem_v2(size_t*, CUdevice);
CUresult cuDevicePrimaryCtxRetain(CUhandle*, CUdevice);
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice);
CUresult cuCtxSetCurrent(CUhandle);
CUresult cuCtxGetCurrent(CUhandle*);
CUresult cuCtxPushCurrent_v2(CUhandle);
CUresult cuCtxPopCurrent_v2(CUhandle*);
CUresult cuCtxSynchronize();
CUresult cuMemAllocAsync(CUdeviceptr*, size_t, CUhandle);
CUresult cuMemAlloc_v2(CUdeviceptr*, size_t);
CUresult cuMemFreeAsync(CUdeviceptr, CUhandle);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuMemsetD8Async(CUdeviceptr, unsigned char, size_t, CUhandle);
CUresult cuMemsetD32Async(CUdeviceptr, unsigned, size_t, CUhandle);
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr, const void*, size_t, CUhandle);
CUresult cuMemcpyDtoHAsync_v2(void*, CUdeviceptr, size_t, CUhandle);
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr, CUdeviceptr, size_t, CUhandle);
CUresult cuMemGetInfo_v2(size_t*, size_t*);
CUresult cuPointerGetAttribute(void*, int, CUdeviceptr);
CUresult cuModuleLoadData(CUhandle*, const void*);
CUresult cuModuleUnload(CUhandle);
CUresult cuModuleGetFunction(CUhandle*, CUhandle, const char*);
CUresult cuFuncGetAttribute(int*, int, CUhandle);
CUresult cuFuncSetAttribute(CUhandle, int, int);
CUresult cuLaunchKernel(CUhandle, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUhandle, void**,
                        void**);
CUresult cuStreamCreate(CUhandle*, unsigned);
CUresult cuStreamDestroy_v2(CUhandle);
CUresult cuStreamSynchronize(CUhandle);
CUresult cuStreamWaitEvent(CUhandle, CUhandle, unsigned);
CUresult cuEventCreate(CUhandle*, unsigned);
CUresult cuEventRecord(CUhandle, CUhandle);
CUresult cuEventSynchronize(CUhandle);
CUresult cuEventQuery(CUhandle);
CUresult cuEventElapsedTime(float*, CUhandle, CUhandle);
CUresult cuEventDestroy_v2(CUhandle);
CUresult cuGetErrorString(CUresult, const char**);
CUresult cuGetErrorName(CUresult, const char**);
}

struct SaxpyParams {
    const float* x;
    float* y;
    float a;
    int n;
};
extern "C" __global__ void dv_saxpy(SaxpyParams p) {
    const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    if (i < p.n) p.y[i] = p.a * p.x[i] + p.y[i];
}
DK_REGISTER_KERNEL(dv_saxpy, SaxpyParams)

extern "C" __global__ void dv_diverge(SaxpyParams p) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    p.y[0] = 1;
}
DK_REGISTER_KERNEL(dv_diverge, SaxpyParams)

extern "C" __global__ void dv_big_smem(SaxpyParams p) {
    DK_DYNAMIC_SHARED(float, buf);
    buf[threadIdx.x * 700] = p.a;
    __syncthreads();
    if (threadIdx.x == 0) p.y[0] = buf[700];
}
DK_REGISTER_KERNEL(dv_big_smem, SaxpyParams)

int main() {
    CHECK(cuDeviceGet(nullptr, 0) == 1);
    CUdevice dev = -1;
    CHECK(cuDeviceGet(&dev, 0) == 3); /* not initialised yet */
    CHECK(cuInit(0) == 0);
    int v = 0, count = 0;
    CHECK(cuDriverGetVersion(&v) == 0 && v >= 12080);
    CHECK(cuDeviceGetCount(&count) == 0 && count == 1);
    CHECK(cuDeviceGet(&dev, 0) == 0 && dev == 0);
    CHECK(cuDeviceGet(&dev, 1) == 101);
    char name[128];
    CHECK(cuDeviceGetName(name, sizeof name, 0) == 0 && contains(name, "emulated"));
    CHECK(cuDeviceGetAttribute(&v, 75, 0) == 0 && v == 9);
    CHECK(cuDeviceGetAttribute(&v, 76, 0) == 0 && v == 0);
    CHECK(cuDeviceGetAttribute(&v, 115, 0) == 0 && v == 1);
    CHECK(cuDeviceGetAttribute(&v, 16, 0) == 0 && v == 132);
    CHECK(cuDeviceGetAttribute(&v, 97, 0) == 0 && v == 227 * 1024);
    CHECK(cuDeviceGetAttribute(&v, 10, 0) == 0 && v == 32);
    size_t total = 0, free_b = 0;
    CHECK(cuDeviceTotalMem_v2(&total, 0) == 0 && total > (1u << 30));

    CUhandle ctx = nullptr, cur = nullptr;
    CHECK(cuCtxGetCurrent(&cur) == 0 && cur == nullptr);
    CHECK(cuDevicePrimaryCtxRetain(&ctx, 0) == 0 && ctx != nullptr);
    CHECK(cuCtxSetCurrent(ctx) == 0);
    CHECK(cuCtxGetCurrent(&cur) == 0 && cur == ctx);
    CHECK(cuCtxPushCurrent_v2(ctx) == 0 && cuCtxPopCurrent_v2(&cur) == 0 && cur == ctx);
    CHECK(cuCtxGetCurrent(&cur) == 0 && cur == ctx);

    /* memory */
    const int n = 1000;
    CUdeviceptr dx = 0, dy = 0, dz = 0;
    CHECK(cuMemAllocAsync(&dx, n * sizeof(float), nullptr) == 0 && dx % 256 == 0);
    CHECK(cuMemAllocAsync(&dy, n * sizeof(float), nullptr) == 0);
    CHECK(cuMemAlloc_v2(&dz, n * sizeof(float)) == 0);
    CUdeviceptr d0 = 123;
    CHECK(cuMemAllocAsync(&d0, 0, nullptr) == 1 && cuMemFreeAsync(0, nullptr) == 0); /* zero bytes: invalid */
    CHECK(cuMemGetInfo_v2(&free_b, &total) == 0 && free_b <= total);
    std::vector<float> hx(n), hy(n), back(n);
    for (int i = 0; i < n; ++i) {
        hx[i] = static_cast<float>(i);
        hy[i] = 1.0f;
    }
    CHECK(cuMemsetD8Async(dy, 0, n * sizeof(float), nullptr) == 0);
    CHECK(cuMemcpyDtoHAsync_v2(back.data(), dy, n * sizeof(float), nullptr) == 0 && back[0] == 0.0f && back[n - 1] == 0.0f);
    CHECK(cuMemcpyHtoDAsync_v2(dx, hx.data(), n * sizeof(float), nullptr) == 0);
    CHECK(cuMemcpyHtoDAsync_v2(dy, hy.data(), n * sizeof(float), nullptr) == 0);
    CHECK(cuMemsetD32Async(dz, 0x3f800000u, n, nullptr) == 0);
    CHECK(cuMemcpyDtoHAsync_v2(back.data(), dz, n * sizeof(float), nullptr) == 0 && back[7] == 1.0f);
    CHECK(cuMemcpyDtoDAsync_v2(dz, dx, n * sizeof(float), nullptr) == 0);
    CHECK(cuMemcpyDtoHAsync_v2(back.data(), dz, n * sizeof(float), nullptr) == 0 && back[999] == 999.0f);
    /* out of range copies are refused, with a message */
    CHECK(cuMemcpyHtoDAsync_v2(dx + 4, hx.data(), n * sizeof(float), nullptr) == 1);
    CHECK(contains(last_error(), "not inside one device allocation"));
    CHECK(cuMemcpyDtoHAsync_v2(back.data(), dx, n * sizeof(float) + 1, nullptr) == 1);
    CHECK(cuMemsetD8Async(dx + n * sizeof(float), 0, 1, nullptr) == 1);
    size_t range = 0;
    CHECK(cuPointerGetAttribute(&range, 12, dx + 40) == 0 && range == n * sizeof(float));
    CUdeviceptr base = 0;
    CHECK(cuPointerGetAttribute(&base, 11, dx + 40) == 0 && base == dx);
    CHECK(cuPointerGetAttribute(&base, 11, 8) == 1);

    /* module and function */
    CUhandle mod = nullptr, fn = nullptr, fn2 = nullptr, fn3 = nullptr, bad = nullptr;
    CHECK(cuModuleLoadData(&mod, "distill-emulator-module") == 0 && mod != nullptr);
    CHECK(cuModuleLoadData(&mod, nullptr) == 1);
    CHECK(cuModuleLoadData(&mod, "distill-emulator-module") == 0);
    CHECK(cuModuleGetFunction(&fn, mod, "dv_saxpy") == 0 && fn != nullptr);
    CHECK(cuModuleGetFunction(&fn2, mod, "dv_diverge") == 0);
    CHECK(cuModuleGetFunction(&fn3, mod, "dv_big_smem") == 0);
    CHECK(cuModuleGetFunction(&bad, mod, "dk_nope") == 500);
    CHECK(contains(last_error(), "dk_nope"));

    SaxpyParams p{reinterpret_cast<const float*>(dx), reinterpret_cast<float*>(dy), 2.0f, n};
    void* args[] = {&p};
    CHECK(cuLaunchKernel(fn, (n + 255) / 256, 1, 1, 256, 1, 1, 0, nullptr, args, nullptr) == 0);
    CHECK(cuStreamSynchronize(nullptr) == 0);
    CHECK(cuMemcpyDtoHAsync_v2(back.data(), dy, n * sizeof(float), nullptr) == 0);
    bool ok = true;
    for (int i = 0; i < n; ++i) ok &= back[i] == 2.0f * i + 1.0f;
    CHECK(ok);

    /* a failing launch: error now and once more at the next synchronize */
    CHECK(cuLaunchKernel(fn2, 2, 1, 1, 64, 1, 1, 0, nullptr, args, nullptr) == 719);
    CHECK(contains(last_error(), "barrier divergence in kernel dv_diverge"));
    CHECK(cuStreamSynchronize(nullptr) == 719);
    CHECK(cuStreamSynchronize(nullptr) == 0);
    CHECK(cuLaunchKernel(fn2, 1, 1, 1, 64, 1, 1, 0, nullptr, args, nullptr) == 719);
    CHECK(cuCtxSynchronize() == 719 && cuCtxSynchronize() == 0);
    CHECK(cuLaunchKernel(fn, 1, 1, 1, 2048, 1, 1, 0, nullptr, args, nullptr) == 1);
    CHECK(cuStreamSynchronize(nullptr) == 0);
    /* a caller that saw the launch error and moved on is not bothered again */
    CHECK(cuLaunchKernel(fn2, 1, 1, 1, 64, 1, 1, 0, nullptr, args, nullptr) == 719);
    CHECK(cuLaunchKernel(fn, 1, 1, 1, 32, 1, 1, 0, nullptr, args, nullptr) == 0);
    CHECK(cuStreamSynchronize(nullptr) == 0);

    /* dynamic shared memory beyond 48 KiB needs the attribute, like on the device */
    int attr = 0;
    CHECK(cuFuncGetAttribute(&attr, 8, fn3) == 0 && attr == 48 * 1024);
    CHECK(cuLaunchKernel(fn3, 1, 1, 1, 32, 1, 1, 100000, nullptr, args, nullptr) == 1);
    CHECK(cuFuncSetAttribute(fn3, 8, 100000) == 0);
    CHECK(cuFuncGetAttribute(&attr, 8, fn3) == 0 && attr == 100000);
    CHECK(cuLaunchKernel(fn3, 1, 1, 1, 32, 1, 1, 100000, nullptr, args, nullptr) == 0);
    CHECK(cuMemcpyDtoHAsync_v2(back.data(), dy, sizeof(float), nullptr) == 0 && back[0] == 2.0f);
    CHECK(cuFuncSetAttribute(fn3, 8, 300000) == 1);

    /* streams and events */
    CUhandle s = nullptr, e0 = nullptr, e1 = nullptr, et = nullptr;
    CHECK(cuStreamCreate(&s, 1) == 0 && s != nullptr);
    CHECK(cuEventCreate(&e0, 0) == 0 && cuEventCreate(&e1, 0) == 0 && cuEventCreate(&et, 2) == 0);
    CHECK(cuEventRecord(e0, s) == 0);
    CHECK(cuLaunchKernel(fn, 4, 1, 1, 256, 1, 1, 0, s, args, nullptr) == 0);
    CHECK(cuEventRecord(e1, s) == 0 && cuEventRecord(et, s) == 0);
    CHECK(cuStreamWaitEvent(nullptr, e1, 0) == 0);
    CHECK(cuEventSynchronize(e1) == 0 && cuEventQuery(e1) == 0);
    float ms = -1;
    CHECK(cuEventElapsedTime(&ms, e0, e1) == 0 && ms >= 0.0f);
    CHECK(cuEventElapsedTime(&ms, e0, et) == 400); /* CU_EVENT_DISABLE_TIMING */
    CHECK(cuEventDestroy_v2(e0) == 0 && cuEventDestroy_v2(e1) == 0 && cuEventDestroy_v2(et) == 0);
    CHECK(cuEventDestroy_v2(e0) == 400);
    CHECK(cuStreamSynchronize(s) == 0 && cuStreamDestroy_v2(s) == 0);
    CHECK(cuStreamSynchronize(s) == 400);

    /* errors */
    const char* str = nullptr;
    CHECK(cuGetErrorString(719, &str) == 0 && std::strcmp(str, "unspecified launch failure") == 0);
    CHECK(cuGetErrorName(500, &str) == 0 && std::strcmp(str, "CUDA_ERROR_NOT_FOUND") == 0);
    CHECK(cuGetErrorString(12345, &str) == 1);

    /* teardown */
    CHECK(cuMemFreeAsync(dx, nullptr) == 0 && cuMemFreeAsync(dy, nullptr) == 0 && cuMemFree_v2(dz) == 0);
    CHECK(cuMemFree_v2(dz) == 1);
    CHECK(cuModuleUnload(mod) == 0);
    CHECK(cuDevicePrimaryCtxRelease_v2(0) == 0);
    return finish("test_driver");
}
