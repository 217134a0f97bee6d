/*
 * Driver fidelity: the fake driver fails where a real CUDA driver fails, so GPU bugs show up on
 * the emulated device too.
 *
 *   test_fidelity async    (default environment) argument errors, module images, launch limits,
 *                          asynchronous streams and events, fault reporting
 *   test_fidelity sticky   (DISTILL_EMU_STICKY=1) a kernel fault poisons its context until reset
 *   test_fidelity sync     (DISTILL_EMU_SYNC=1) the old synchronous behaviour
 *
 * run_tests.sh runs all three (and `async` once more with DISTILL_EMU_THREADS=1).
 */
#include "emulator/simt.h"

#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUhandle;

extern "C" {
CUresult cuInit(unsigned);
CUresult cuDevicePrimaryCtxRetain(CUhandle*, CUdevice);
CUresult cuDevicePrimaryCtxReset(CUdevice);
CUresult cuCtxSetCurrent(CUhandle);
CUresult cuCtxGetCurrent(CUhandle*);
CUresult cuCtxCreate_v2(CUhandle*, unsigned, CUdevice);
CUresult cuCtxDestroy_v2(CUhandle);
CUresult cuCtxSynchronize();
CUresult cuMemAlloc_v2(CUdeviceptr*, size_t);
CUresult cuMemAllocAsync(CUdeviceptr*, size_t, CUhandle);
CUresult cuMemAllocManaged(CUdeviceptr*, size_t, unsigned);
CUresult cuMemAllocFromPoolAsync(CUdeviceptr*, size_t, CUhandle, CUhandle);
CUresult cuMemAllocPitch_v2(CUdeviceptr*, size_t*, size_t, size_t, unsigned);
CUresult cuDeviceGetDefaultMemPool(CUhandle*, CUdevice);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuMemFreeAsync(CUdeviceptr, CUhandle);
CUresult cuMemHostAlloc(void**, size_t, unsigned);
CUresult cuMemFreeHost(void*);
CUresult cuMemHostRegister_v2(void*, size_t, unsigned);
CUresult cuMemHostUnregister(void*);
CUresult cuMemsetD8Async(CUdeviceptr, unsigned char, size_t, CUhandle);
CUresult cuMemsetD32Async(CUdeviceptr, unsigned, size_t, CUhandle);
CUresult cuMemsetD16_v2(CUdeviceptr, unsigned short, size_t);
CUresult cuMemcpyHtoD_v2(CUdeviceptr, const void*, size_t);
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr, const void*, size_t, CUhandle);
CUresult cuMemcpyDtoHAsync_v2(void*, CUdeviceptr, size_t, CUhandle);
CUresult cuMemcpyDtoH_v2(void*, CUdeviceptr, size_t);
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr, CUdeviceptr, size_t, CUhandle);
CUresult cuMemcpy(CUdeviceptr, CUdeviceptr, size_t);
CUresult cuPointerGetAttribute(void*, int, CUdeviceptr);
CUresult cuModuleLoadData(CUhandle*, const void*);
CUresult cuModuleLoad(CUhandle*, const char*);
CUresult cuModuleLoadFatBinary(CUhandle*, const void*);
CUresult cuModuleUnload(CUhandle);
CUresult cuModuleGetFunction(CUhandle*, CUhandle, const char*);
CUresult cuFuncGetAttribute(int*, int, CUhandle);
CUresult cuFuncSetAttribute(CUhandle, int, int);
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int*, CUhandle, int, size_t);
CUresult cuLaunchKernel(CUhandle, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUhandle, void**,
                        void**);
CUresult cuStreamCreate(CUhandle*, unsigned);
CUresult cuStreamDestroy_v2(CUhandle);
CUresult cuStreamSynchronize(CUhandle);
CUresult cuStreamQuery(CUhandle);
CUresult cuStreamWaitEvent(CUhandle, CUhandle, unsigned);
CUresult cuStreamAddCallback(CUhandle, void (*)(CUhandle, CUresult, void*), void*, unsigned);
CUresult cuLaunchHostFunc(CUhandle, void (*)(void*), void*);
CUresult cuEventCreate(CUhandle*, unsigned);
CUresult cuEventRecord(CUhandle, CUhandle);
CUresult cuEventSynchronize(CUhandle);
CUresult cuEventQuery(CUhandle);
CUresult cuEventElapsedTime(float*, CUhandle, CUhandle);
CUresult cuEventDestroy_v2(CUhandle);
int dkEmuSetKernelLimits(const char*, int, int, int);
const char* dkEmuModuleImage(void);
int dkEmuDriverMode(void);
}

enum : int {
    kOk = 0,
    kInvalidValue = 1,
    kInvalidImage = 200,
    kInvalidContext = 201,
    kNoBinary = 209,
    kInvalidPtx = 218,
    kInvalidHandle = 400,
    kNotFound = 500,
    kNotReady = 600,
    kOutOfResources = 701,
    kLaunchFailed = 719,
};

/* ---- Kernels (registered in this program; the module images below decide which are visible). */

struct FvParams {
    float* out;
    float* in;
    float a;
    float b;
    unsigned us; /* fv_sleep: microseconds thread 0 sleeps before writing */
};

/* out[i] = a (thread 0 of block 0 first sleeps `us`). */
extern "C" __global__ void fv_sleep(FvParams p) {
    if (blockIdx.x == 0 && threadIdx.x == 0 && p.us) usleep(p.us);
    __syncthreads();
    if (blockIdx.x == 0) p.out[threadIdx.x] = p.a;
}
DK_REGISTER_KERNEL(fv_sleep, FvParams)

/* out[i] = out[i] * a + b: order-sensitive. */
extern "C" __global__ void fv_axpb(FvParams p) { p.out[threadIdx.x] = p.out[threadIdx.x] * p.a + p.b; }
DK_REGISTER_KERNEL(fv_axpb, FvParams)

/* out[i] = in[i]. */
extern "C" __global__ void fv_copy(FvParams p) { p.out[threadIdx.x] = p.in[threadIdx.x]; }
DK_REGISTER_KERNEL(fv_copy, FvParams)

extern "C" __global__ void fv_trap(FvParams p) {
    if (threadIdx.x == 0) __trap();
    p.out[threadIdx.x] = 1.0f;
}
DK_REGISTER_KERNEL(fv_trap, FvParams)

/* Kernels whose limits the tests set (each test its own: limits are per kernel). */
extern "C" __global__ void fv_limits(FvParams p) { p.out[threadIdx.x] = p.a; }
DK_REGISTER_KERNEL(fv_limits, FvParams)
extern "C" __global__ void fv_bounded(FvParams p) { p.out[threadIdx.x] = p.a; }
DK_REGISTER_KERNEL(fv_bounded, FvParams)
extern "C" __global__ void fv_ptx_bounded(FvParams p) { p.out[threadIdx.x] = p.a; }
DK_REGISTER_KERNEL(fv_ptx_bounded, FvParams)

/* ---- Helpers */

static CUhandle g_ctx = nullptr;
static CUhandle g_all = nullptr; /* the emulator-only module: every kernel */

static CUhandle fn(const char* name) {
    CUhandle f = nullptr;
    CHECK_MSG(cuModuleGetFunction(&f, g_all, name) == kOk, "%s", name);
    return f;
}

static CUresult run(CUhandle f, unsigned threads, FvParams p, CUhandle stream = nullptr, unsigned blocks = 1,
                    unsigned smem = 0) {
    void* args[] = {&p};
    return cuLaunchKernel(f, blocks, 1, 1, threads, 1, 1, smem, stream, args, nullptr);
}

static CUdeviceptr dalloc(size_t bytes) {
    CUdeviceptr d = 0;
    CHECK(cuMemAlloc_v2(&d, bytes) == kOk);
    CHECK(cuMemsetD8Async(d, 0, bytes, nullptr) == kOk);
    return d;
}

static float* f(CUdeviceptr d) { return reinterpret_cast<float*>(d); }

static float read1(CUdeviceptr d, size_t i = 0) {
    float v = -1.0f;
    CHECK(cuMemcpyDtoH_v2(&v, d + i * sizeof(float), sizeof v) == kOk);
    return v;
}

/* ---- A minimal CUDA ELF (cubin) and fatbin, as nvcc lays them out. */

struct Elf {
    std::vector<unsigned char> bytes;
};

template <class T>
static void put(std::vector<unsigned char>& v, size_t at, T x) {
    if (v.size() < at + sizeof x) v.resize(at + sizeof x);
    std::memcpy(v.data() + at, &x, sizeof x);
}
static uint32_t add_str(std::string& tab, const std::string& s) {
    const uint32_t at = static_cast<uint32_t>(tab.size());
    tab += s;
    tab.push_back('\0');
    return at;
}

/* Entries: fv_bounded (__launch_bounds__(256), 128 registers), fv_axpb (40 registers), and a
 * non-entry function fv_helper. `arch` goes into e_flags like nvcc 13 writes it. */
static Elf make_cubin(int arch) {
    std::string shstr(1, '\0'), str(1, '\0');
    std::vector<std::string> secnames = {"", ".shstrtab", ".strtab", ".symtab", ".nv.info", ".nv.info.fv_bounded"};
    std::vector<uint32_t> secname_off;
    for (const std::string& s : secnames) secname_off.push_back(s.empty() ? 0 : add_str(shstr, s));
    /* symbols: 0 null, 1 fv_bounded, 2 fv_axpb, 3 fv_helper */
    std::vector<unsigned char> symtab(24 * 4, 0);
    const char* syms[] = {"fv_bounded", "fv_axpb", "fv_helper"};
    for (int i = 0; i < 3; ++i) {
        put<uint32_t>(symtab, 24 * (i + 1), add_str(str, syms[i]));
        symtab[24 * (i + 1) + 4] = 0x12;                /* STB_GLOBAL | STT_FUNC */
        symtab[24 * (i + 1) + 5] = i < 2 ? 0x10 : 0x00; /* STO_CUDA_ENTRY for kernels */
    }
    std::vector<unsigned char> info; /* EIATTR_REGCOUNT (0x2f): symbol, registers */
    auto regcount = [&](uint32_t sym, uint32_t regs) {
        const size_t o = info.size();
        info.resize(o + 12);
        info[o] = 4;
        info[o + 1] = 0x2f;
        put<uint16_t>(info, o + 2, 8);
        put<uint32_t>(info, o + 4, sym);
        put<uint32_t>(info, o + 8, regs);
    };
    regcount(1, 128);
    regcount(2, 40);
    std::vector<unsigned char> kinfo(4, 0); /* EIATTR_MAXREG_COUNT (HVAL), then EIATTR_MAX_THREADS */
    kinfo[0] = 3;
    kinfo[1] = 0x1b;
    put<uint16_t>(kinfo, 2, 255);
    kinfo.resize(4 + 16);
    kinfo[4] = 4;
    kinfo[5] = 0x05;
    put<uint16_t>(kinfo, 6, 12);
    put<uint32_t>(kinfo, 8, 256);
    put<uint32_t>(kinfo, 12, 1);
    put<uint32_t>(kinfo, 16, 1);

    std::vector<std::vector<unsigned char>> data = {{},
                                                    std::vector<unsigned char>(shstr.begin(), shstr.end()),
                                                    std::vector<unsigned char>(str.begin(), str.end()),
                                                    symtab,
                                                    info,
                                                    kinfo};
    const uint32_t types[] = {0, 3, 3, 2, 0x70000000, 0x70000000};
    Elf e;
    std::vector<unsigned char>& b = e.bytes;
    b.assign(64, 0);
    size_t off = 64;
    std::vector<size_t> offs;
    for (auto& d : data) {
        offs.push_back(off);
        b.resize(off + d.size());
        if (!d.empty()) std::memcpy(b.data() + off, d.data(), d.size());
        off += d.size();
        off = (off + 7) / 8 * 8;
    }
    const size_t shoff = off;
    b.resize(shoff + 64 * data.size(), 0);
    for (size_t i = 0; i < data.size(); ++i) {
        const size_t h = shoff + 64 * i;
        put<uint32_t>(b, h, secname_off[i]);
        put<uint32_t>(b, h + 4, types[i]);
        put<uint64_t>(b, h + 24, i ? offs[i] : 0);
        put<uint64_t>(b, h + 32, data[i].size());
        put<uint32_t>(b, h + 40, i == 3 ? 2u : (i >= 4 ? 3u : 0u)); /* symtab -> strtab */
        put<uint64_t>(b, h + 56, i == 3 ? 24u : 0u);
    }
    const unsigned char ident[16] = {0x7f, 'E', 'L', 'F', 2, 1, 1, 0x41, 8};
    std::memcpy(b.data(), ident, 16);
    put<uint16_t>(b, 16, 2);   /* ET_EXEC */
    put<uint16_t>(b, 18, 190); /* EM_CUDA */
    put<uint32_t>(b, 20, 1);
    put<uint64_t>(b, 40, shoff);
    put<uint32_t>(b, 48, 0x6000004u | (static_cast<uint32_t>(arch) << 8));
    put<uint16_t>(b, 52, 64);
    put<uint16_t>(b, 58, 64);
    put<uint16_t>(b, 60, static_cast<uint16_t>(data.size()));
    put<uint16_t>(b, 62, 1);
    return e;
}

struct Entry {
    unsigned kind; /* 1 PTX, 2 ELF */
    int arch;
    std::vector<unsigned char> payload;
};
static std::vector<unsigned char> make_fatbin(const std::vector<Entry>& entries) {
    std::vector<unsigned char> b(16, 0);
    put<uint32_t>(b, 0, 0xBA55ED50u);
    put<uint16_t>(b, 4, 1);
    put<uint16_t>(b, 6, 16);
    for (const Entry& e : entries) {
        const size_t o = b.size();
        const size_t padded = (e.payload.size() + 7) / 8 * 8;
        b.resize(o + 64 + padded, 0);
        put<uint16_t>(b, o, static_cast<uint16_t>(e.kind));
        put<uint16_t>(b, o + 2, 0x101);
        put<uint32_t>(b, o + 4, 64);
        put<uint64_t>(b, o + 8, padded);
        put<uint32_t>(b, o + 28, static_cast<uint32_t>(e.arch));
        put<uint32_t>(b, o + 40, 0x11);
        std::memcpy(b.data() + o + 64, e.payload.data(), e.payload.size());
    }
    put<uint64_t>(b, 8, b.size() - 16);
    return b;
}

static const char* kPtx =
    "//\n// Generated by hand\n//\n.version 8.0\n.target sm_90\n.address_size 64\n\n"
    ".visible .entry fv_ptx_bounded(\n\t.param .align 8 .b8 fv_ptx_bounded_param_0[32]\n)\n.maxntid 128, 1, 1\n{\n\tret;\n}\n"
    ".visible .entry fv_copy(\n\t.param .align 8 .b8 fv_copy_param_0[32]\n)\n{\n\tret;\n}\n";

/* ------------------------------------------------------------------------------------------ */
/* async (default): argument errors                                                            */
/* ------------------------------------------------------------------------------------------ */

static void test_argument_errors() {
    CUdeviceptr d = 123;
    /* zero-byte allocations fail like on the device, with a message */
    CHECK(cuMemAlloc_v2(&d, 0) == kInvalidValue);
    CHECK(contains(last_error(), "size 0"));
    CHECK(cuMemAllocAsync(&d, 0, nullptr) == kInvalidValue);
    CHECK(cuMemAllocManaged(&d, 0, 1) == kInvalidValue);
    CUhandle pool = nullptr;
    CHECK(cuDeviceGetDefaultMemPool(&pool, 0) == kOk);
    CHECK(cuMemAllocFromPoolAsync(&d, 0, pool, nullptr) == kInvalidValue);
    CHECK(cuMemAllocFromPoolAsync(&d, 64, reinterpret_cast<CUhandle>(&d), nullptr) == kInvalidValue); /* not a pool */
    CHECK(cuMemAllocFromPoolAsync(&d, 64, pool, nullptr) == kOk && cuMemFreeAsync(d, nullptr) == kOk);
    CHECK(cuMemAlloc_v2(nullptr, 16) == kInvalidValue);
    CHECK(cuMemAllocManaged(&d, 64, 0) == kInvalidValue); /* flags: ATTACH_GLOBAL or ATTACH_HOST */
    CHECK(cuMemAllocManaged(&d, 64, 1) == kOk && cuMemFree_v2(d) == kOk);
    size_t pitch = 0;
    CHECK(cuMemAllocPitch_v2(&d, &pitch, 100, 4, 3) == kInvalidValue); /* element size 4, 8 or 16 */
    CHECK(cuMemAllocPitch_v2(&d, &pitch, 0, 4, 4) == kInvalidValue);   /* zero bytes */
    CHECK(cuMemAllocPitch_v2(&d, &pitch, 100, 4, 4) == kOk && pitch == 512 && cuMemFree_v2(d) == kOk);
    CHECK(cuMemAllocAsync(&d, 64, reinterpret_cast<CUhandle>(0x1234)) == kInvalidHandle);

    /* frees: twice, interior pointers, through a dead stream */
    CUdeviceptr a = dalloc(256);
    CHECK(cuMemFree_v2(a + 4) == kInvalidValue);
    CHECK(cuMemFree_v2(a) == kOk);
    CHECK(cuMemFree_v2(a) == kInvalidValue);
    CHECK(contains(last_error(), "freed twice"));
    a = dalloc(256);
    CHECK(cuMemFreeAsync(a, nullptr) == kOk);
    CHECK(cuMemFreeAsync(a, nullptr) == kInvalidValue);
    CHECK(cuMemFree_v2(0) == kOk);
    a = dalloc(256);
    CHECK(cuMemFreeAsync(a, reinterpret_cast<CUhandle>(0x1234)) == kInvalidHandle);
    CHECK(cuMemFree_v2(a) == kOk);
    /* the freed pointer is not usable for new work */
    float h[64] = {};
    CHECK(cuMemcpyHtoD_v2(a, h, sizeof h) == kInvalidValue);

    /* copies and memsets */
    CUdeviceptr x = dalloc(1024), y = dalloc(1024);
    CHECK(cuMemcpyDtoDAsync_v2(x + 16, x, 64, nullptr) == kInvalidValue); /* overlap */
    CHECK(contains(last_error(), "overlap"));
    CHECK(cuMemcpyDtoDAsync_v2(x, x, 64, nullptr) == kInvalidValue);
    CHECK(cuMemcpyDtoDAsync_v2(x + 64, x, 64, nullptr) == kOk); /* adjacent is fine */
    CHECK(cuMemcpyDtoDAsync_v2(y, x, 1025, nullptr) == kInvalidValue);
    CHECK(cuMemcpy(x + 8, x, 16) == kInvalidValue); /* unified, overlapping */
    CHECK(cuMemcpy(y, x, 16) == kOk);
    CHECK(cuMemcpy(y + 1020, x, 16) == kInvalidValue); /* crosses the end of an allocation */
    CHECK(cuMemcpyHtoDAsync_v2(x, nullptr, 16, nullptr) == kInvalidValue);
    CHECK(cuMemcpyDtoHAsync_v2(nullptr, x, 16, nullptr) == kInvalidValue);
    CHECK(cuMemcpyHtoDAsync_v2(x, nullptr, 0, nullptr) == kOk); /* nothing to copy */
    CHECK(cuMemsetD32Async(x + 2, 0, 4, nullptr) == kInvalidValue); /* misaligned */
    CHECK(contains(last_error(), "aligned"));
    CHECK(cuMemsetD16_v2(x + 1, 0, 4) == kInvalidValue);
    CHECK(cuMemsetD32Async(x + 4, 7, 4, nullptr) == kOk);

    /* pinned host memory */
    void* pinned = nullptr;
    CHECK(cuMemHostAlloc(&pinned, 64, 8) == kInvalidValue);
    CHECK(cuMemHostAlloc(&pinned, 64, 0) == kOk);
    CHECK(cuMemFreeHost(pinned) == kOk && cuMemFreeHost(pinned) == kInvalidValue);
    std::vector<float> reg(64);
    CHECK(cuMemHostRegister_v2(reg.data(), 256, 0) == kOk);
    CHECK(cuMemHostRegister_v2(reg.data() + 4, 16, 0) == 712); /* already registered */
    CHECK(cuMemHostUnregister(reg.data()) == kOk && cuMemHostUnregister(reg.data()) == 713);

    /* flags */
    CUhandle s = nullptr, e = nullptr;
    CHECK(cuStreamCreate(&s, 2) == kInvalidValue);
    CHECK(cuEventCreate(&e, 8) == kInvalidValue);
    CHECK(cuEventCreate(&e, 4) == kInvalidValue); /* INTERPROCESS needs DISABLE_TIMING */
    CHECK(cuEventCreate(&e, 6) == kOk && cuEventDestroy_v2(e) == kOk);
    CHECK(cuEventCreate(&e, 0) == kOk);
    CHECK(cuStreamWaitEvent(nullptr, e, 2) == kInvalidValue);
    CHECK(cuStreamAddCallback(nullptr, [](CUhandle, CUresult, void*) {}, nullptr, 1) == kInvalidValue);
    CHECK(cuEventDestroy_v2(e) == kOk);

    /* functions and launches */
    CUhandle k = fn("fv_axpb");
    int v = 0;
    CHECK(cuFuncSetAttribute(k, 4, 32) == kInvalidValue); /* NUM_REGS is read-only */
    CHECK(cuFuncSetAttribute(k, 0, 32) == kInvalidValue);
    CHECK(cuFuncSetAttribute(k, 16, 0) == kInvalidValue);
    CHECK(cuFuncGetAttribute(&v, 16, k) == kInvalidValue);
    CHECK(cuFuncGetAttribute(&v, 0, reinterpret_cast<CUhandle>(&v)) == kInvalidHandle); /* not a function */
    FvParams p{f(x), f(y), 1.0f, 0.0f, 0};
    void* args[] = {&p};
    void* extra[] = {nullptr};
    CHECK(cuLaunchKernel(k, 1, 1, 1, 32, 1, 1, 0, nullptr, args, extra) == kInvalidValue); /* both */
    CHECK(cuLaunchKernel(nullptr, 1, 1, 1, 32, 1, 1, 0, nullptr, args, nullptr) == kInvalidHandle);
    CHECK(cuLaunchKernel(reinterpret_cast<CUhandle>(&p), 1, 1, 1, 32, 1, 1, 0, nullptr, args, nullptr) == kInvalidHandle);
    CHECK(cuLaunchKernel(k, 1, 1, 1, 32, 1, 1, 0, nullptr, nullptr, nullptr) == kInvalidValue);
    CHECK(cuLaunchKernel(k, 0, 1, 1, 32, 1, 1, 0, nullptr, args, nullptr) == kInvalidValue);
    CHECK(cuLaunchKernel(k, 1, 1, 1, 32, 1, 1, 0, reinterpret_cast<CUhandle>(0x99), args, nullptr) == kInvalidHandle);
    CHECK(cuStreamSynchronize(nullptr) == kOk);
    CHECK(cuMemFree_v2(x) == kOk && cuMemFree_v2(y) == kOk);

    /* a thread without a current context */
    std::thread([] {
        CUdeviceptr p = 0;
        CHECK(cuMemAlloc_v2(&p, 64) == kInvalidContext);
        CHECK(contains(last_error(), "no current CUDA context"));
        CHECK(cuStreamSynchronize(nullptr) == kInvalidContext);
        CHECK(cuCtxSynchronize() == kInvalidContext);
        CUhandle m = nullptr;
        CHECK(cuModuleLoadData(&m, dkEmuModuleImage()) == kInvalidContext);
    }).join();
}

/* ------------------------------------------------------------------------------------------ */
/* async: module images                                                                        */
/* ------------------------------------------------------------------------------------------ */

static void test_module_images() {
    CUhandle m = nullptr, k = nullptr;
    int v = 0;
    CHECK(std::strcmp(dkEmuModuleImage(), "distill-emulator-module") == 0);

    /* A fatbin with an sm_90 cubin: only its entry functions, with its limits. */
    const Elf sm90 = make_cubin(90), sm80 = make_cubin(80);
    std::vector<unsigned char> fat = make_fatbin({{2, 80, sm80.bytes}, {2, 90, sm90.bytes}});
    CHECK(cuModuleLoadData(&m, fat.data()) == kOk);
    CHECK(cuModuleGetFunction(&k, m, "fv_axpb") == kOk);
    CHECK(cuFuncGetAttribute(&v, 4, k) == kOk && v == 40); /* NUM_REGS from EIATTR_REGCOUNT */
    CHECK(cuFuncGetAttribute(&v, 0, k) == kOk && v == 1024);
    CHECK(cuModuleGetFunction(&k, m, "fv_copy") == kNotFound); /* compiled in, not in the image */
    CHECK(contains(last_error(), "fv_copy") && contains(last_error(), "distill-emulator-module"));
    CHECK(cuModuleGetFunction(&k, m, "fv_helper") == kNotFound); /* in the image, not a kernel */
    CHECK(cuModuleGetFunction(&k, m, "fv_bounded") == kOk);
    CHECK(cuFuncGetAttribute(&v, 0, k) == kOk && v == 256); /* __launch_bounds__(256) */
    CHECK(cuFuncGetAttribute(&v, 4, k) == kOk && v == 128);
    CUdeviceptr out = dalloc(1024 * sizeof(float));
    CHECK(run(k, 512, FvParams{f(out), nullptr, 3.0f, 0, 0}) == kOutOfResources);
    CHECK(contains(last_error(), "fv_bounded") && contains(last_error(), "__launch_bounds__"));
    CHECK(run(k, 256, FvParams{f(out), nullptr, 3.0f, 0, 0}) == kOk);
    CHECK(read1(out, 255) == 3.0f);
    CHECK(cuModuleUnload(m) == kOk && cuModuleUnload(m) == kInvalidHandle);

    /* Code for other architectures only: nothing can run on sm_90. */
    fat = make_fatbin({{2, 80, sm80.bytes}, {2, 86, sm80.bytes}});
    CHECK(cuModuleLoadData(&m, fat.data()) == kNoBinary);
    CHECK(contains(last_error(), "sm_80, sm_86"));
    /* A compressed sm_90 entry: loads, names unchecked (the emulator cannot decompress). */
    fat = make_fatbin({{2, 90, std::vector<unsigned char>(64, 0x28)}});
    CHECK(cuModuleLoadData(&m, fat.data()) == kOk && cuModuleGetFunction(&k, m, "fv_copy") == kOk);
    CHECK(cuModuleUnload(m) == kOk);
    /* PTX inside a fatbin (no sm_90 cubin): JIT path, names from the PTX. */
    std::vector<unsigned char> ptx(kPtx, kPtx + std::strlen(kPtx) + 1);
    fat = make_fatbin({{2, 80, sm80.bytes}, {1, 90, ptx}});
    CHECK(cuModuleLoadData(&m, fat.data()) == kOk);
    CHECK(cuModuleGetFunction(&k, m, "fv_copy") == kOk && cuModuleGetFunction(&k, m, "fv_axpb") == kNotFound);
    CHECK(cuModuleUnload(m) == kOk);
    /* The fatbin wrapper struct of cuModuleLoadFatBinary. */
    fat = make_fatbin({{2, 90, sm90.bytes}});
    struct {
        int magic, version;
        const void* data;
        void* unused;
    } wrapper{0x466243B1, 1, fat.data(), nullptr};
    CHECK(cuModuleLoadFatBinary(&m, &wrapper) == kOk && cuModuleGetFunction(&k, m, "fv_bounded") == kOk);
    CHECK(cuModuleUnload(m) == kOk);

    /* A bare cubin. */
    CHECK(cuModuleLoadData(&m, sm90.bytes.data()) == kOk && cuModuleGetFunction(&k, m, "fv_axpb") == kOk);
    CHECK(cuModuleUnload(m) == kOk);
    CHECK(cuModuleLoadData(&m, sm80.bytes.data()) == kNoBinary);

    /* PTX text: .entry names, .maxntid as the launch bound. */
    CHECK(cuModuleLoadData(&m, kPtx) == kOk);
    CHECK(cuModuleGetFunction(&k, m, "fv_axpb") == kNotFound);
    CHECK(cuModuleGetFunction(&k, m, "fv_ptx_bounded") == kOk);
    CHECK(cuFuncGetAttribute(&v, 0, k) == kOk && v == 128);
    CHECK(run(k, 160, FvParams{f(out), nullptr, 1.0f, 0, 0}) == kOutOfResources);
    CHECK(run(k, 128, FvParams{f(out), nullptr, 1.0f, 0, 0}) == kOk);
    CHECK(cuModuleUnload(m) == kOk);
    const std::string path = "/tmp/dk_fidelity_" + std::to_string(getpid()) + ".ptx";
    FILE* file = fopen(path.c_str(), "w");
    CHECK(file != nullptr);
    if (file) {
        fputs(kPtx, file);
        fclose(file);
        CHECK(cuModuleLoad(&m, path.c_str()) == kOk && cuModuleGetFunction(&k, m, "fv_copy") == kOk);
        CHECK(cuModuleUnload(m) == kOk);
        unlink(path.c_str());
    }
    CHECK(cuModuleLoad(&m, "/nonexistent/x.ptx") == 301);
    std::string newer(kPtx);
    newer.replace(newer.find("sm_90"), 5, "sm_100");
    CHECK(cuModuleLoadData(&m, newer.c_str()) == kInvalidPtx);

    /* Not an image: text (a JIT failure on the device) and binary garbage. */
    CHECK(cuModuleLoadData(&m, "selftest") == kInvalidPtx);
    CHECK(contains(last_error(), "distill-emulator-module"));
    const unsigned char garbage[16] = {0x01, 0x02, 0x03, 0x04};
    CHECK(cuModuleLoadData(&m, garbage) == kInvalidImage);
    unsigned char bad_elf[64] = {0x7f, 'E', 'L', 'F', 2, 1, 1};
    CHECK(cuModuleLoadData(&m, bad_elf) == kInvalidImage);

    /* The emulator-only image: every compiled kernel. */
    CHECK(cuModuleLoadData(&m, dkEmuModuleImage()) == kOk);
    CHECK(cuModuleGetFunction(&k, m, "fv_trap") == kOk && cuModuleGetFunction(&k, m, "fv_nope") == kNotFound);
    CHECK(cuModuleUnload(m) == kOk);
    CHECK(cuMemFree_v2(out) == kOk);
}

/* ------------------------------------------------------------------------------------------ */
/* async: launch limits from ptxas (dkEmuSetKernelLimits)                                      */
/* ------------------------------------------------------------------------------------------ */

static void test_launch_limits() {
    CUhandle k = fn("fv_limits");
    int v = 0;
    CHECK(cuFuncGetAttribute(&v, 0, k) == kOk && v == 1024); /* nothing known yet */
    CHECK(cuFuncGetAttribute(&v, 8, k) == kOk && v == 48 * 1024);
    CHECK(dkEmuSetKernelLimits("fv_limits", 0, 1024, 128) == kOk);
    CHECK(cuFuncGetAttribute(&v, 0, k) == kOk && v == 512); /* 128 regs x 32 = 4096 per warp: 16 warps */
    CHECK(cuFuncGetAttribute(&v, 4, k) == kOk && v == 128);
    CHECK(cuFuncGetAttribute(&v, 1, k) == kOk && v == 1024);
    CHECK(cuFuncGetAttribute(&v, 8, k) == kOk && v == 48 * 1024 - 1024);
    CUdeviceptr out = dalloc(1024 * sizeof(float));
    const FvParams p{f(out), nullptr, 5.0f, 0, 0};
    CHECK(run(k, 1024, p) == kOutOfResources);
    CHECK(contains(last_error(), "fv_limits") && contains(last_error(), "128 registers") && contains(last_error(), "512"));
    CHECK(run(k, 513, p) == kOutOfResources);
    CHECK(run(k, 512, p) == kOk);
    CHECK(read1(out, 511) == 5.0f);
    /* shared memory: the static part counts against 48 KiB and against the opt-in maximum */
    CHECK(run(k, 32, p, nullptr, 1, 48 * 1024 - 1024 + 1) == kInvalidValue);
    CHECK(run(k, 32, p, nullptr, 1, 48 * 1024 - 1024) == kOk);
    CHECK(cuFuncSetAttribute(k, 8, 227 * 1024 - 1024 + 1) == kInvalidValue);
    CHECK(cuFuncSetAttribute(k, 8, 227 * 1024 - 1024) == kOk);
    CHECK(run(k, 32, p, nullptr, 1, 227 * 1024 - 1024) == kOk);
    int blocks = -1;
    CHECK(cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, k, 512, 0) == kOk && blocks == 1);
    CHECK(cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, k, 1024, 0) == kOk && blocks == 0);
    CHECK(cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, k, 256, 0) == kOk && blocks == 2);

    /* the register rule of the occupancy calculator (per-warp allocation in units of 256) */
    const struct {
        int regs, threads;
    } cases[] = {{255, 256}, {128, 512}, {72, 896}, {64, 1024}, {40, 1024}, {0, 1024}};
    for (const auto& c : cases) {
        CHECK(dkEmuSetKernelLimits("fv_limits", 0, 0, c.regs) == kOk);
        CHECK_MSG(cuFuncGetAttribute(&v, 0, k) == kOk && v == c.threads, "%d regs: %d threads", c.regs, v);
    }
    CHECK(dkEmuSetKernelLimits("fv_limits", 100, 0, 32) == kOk); /* an explicit cap */
    CHECK(cuFuncGetAttribute(&v, 0, k) == kOk && v == 100);
    CHECK(run(k, 128, p) == kOutOfResources);
    CHECK(dkEmuSetKernelLimits("fv_nope", 0, 0, 32) == kNotFound);
    CHECK(dkEmuSetKernelLimits("fv_limits", 0, 0, 256) == kInvalidValue);
    CHECK(dkEmuSetKernelLimits("fv_limits", 0, 49 * 1024, 32) == kInvalidValue);
    CHECK(dkEmuSetKernelLimits("fv_limits", 2048, 0, 32) == kInvalidValue);
    CHECK(dkEmuSetKernelLimits(nullptr, 0, 0, 32) == kInvalidValue);
    CHECK(dkEmuSetKernelLimits("fv_limits", 0, 0, 32) == kOk);
    CHECK(cuStreamSynchronize(nullptr) == kOk);
    CHECK(cuMemFree_v2(out) == kOk);
}

/* ------------------------------------------------------------------------------------------ */
/* async: streams, events, faults                                                              */
/* ------------------------------------------------------------------------------------------ */

static std::atomic<int> g_host_calls{0};
static float g_host_seen = 0.0f;

static void test_async_streams() {
    CHECK(dkEmuDriverMode() == 1);
    CUhandle sleep = fn("fv_sleep"), axpb = fn("fv_axpb"), cpy = fn("fv_copy");
    CUhandle s = nullptr, s2 = nullptr, nb = nullptr;
    CHECK(cuStreamCreate(&s, 0) == kOk && cuStreamCreate(&s2, 0) == kOk && cuStreamCreate(&nb, 1) == kOk);
    CUdeviceptr a = dalloc(256 * sizeof(float)), b = dalloc(256 * sizeof(float));
    CHECK(cuStreamSynchronize(nullptr) == kOk);

    /* work is queued: queries say NOT_READY until it has run */
    CUhandle t0 = nullptr, t1 = nullptr;
    CHECK(cuEventCreate(&t0, 0) == kOk && cuEventCreate(&t1, 0) == kOk);
    CHECK(cuEventQuery(t1) == kOk); /* never recorded */
    CHECK(cuEventRecord(t0, s) == kOk);
    const double start = now_ms();
    CHECK(run(sleep, 32, FvParams{f(a), nullptr, 1.0f, 0, 300000}, s) == kOk);
    CHECK(now_ms() - start < 250); /* the launch did not wait for the kernel */
    CHECK(cuEventRecord(t1, s) == kOk);
    CHECK(cuStreamQuery(s) == kNotReady);
    CHECK(cuEventQuery(t1) == kNotReady);
    float ms = 0;
    CHECK(cuEventElapsedTime(&ms, t0, t1) == kNotReady);
    CHECK(cuEventSynchronize(t1) == kOk && cuEventQuery(t1) == kOk && cuStreamQuery(s) == kOk);
    CHECK(cuEventElapsedTime(&ms, t0, t1) == kOk && ms >= 250.0f);

    /* FIFO per stream, and parameters copied at the launch (the struct is reused at once) */
    CHECK(run(sleep, 32, FvParams{f(a), nullptr, 1.0f, 0, 100000}, s) == kOk);
    FvParams p{f(a), nullptr, 2.0f, 0.0f, 0};
    for (int i = 1; i <= 6; ++i) {
        p.b = static_cast<float>(i);
        CHECK(run(axpb, 32, p, s) == kOk); /* a = 2a + i */
    }
    float expect = 1.0f;
    for (int i = 1; i <= 6; ++i) expect = 2.0f * expect + static_cast<float>(i);
    /* a copy to pageable memory waits for the stream's work */
    float got = 0;
    CHECK(cuMemcpyDtoHAsync_v2(&got, a, sizeof got, s) == kOk && got == expect);

    /* a copy to pinned memory is asynchronous */
    float* pinned = nullptr;
    CHECK(cuMemHostAlloc(reinterpret_cast<void**>(&pinned), 64 * sizeof(float), 0) == kOk);
    pinned[0] = -1.0f;
    CHECK(run(sleep, 32, FvParams{f(a), nullptr, 9.0f, 0, 200000}, s) == kOk);
    CHECK(cuMemcpyDtoHAsync_v2(pinned, a, 64 * sizeof(float), s) == kOk);
    CHECK(cuStreamQuery(s) == kNotReady);
    CHECK(cuStreamSynchronize(s) == kOk && pinned[0] == 9.0f && pinned[31] == 9.0f);
    CHECK(cuMemFreeHost(pinned) == kOk);

    /* an event orders work across streams */
    CUhandle e = nullptr;
    CHECK(cuEventCreate(&e, 2) == kOk);
    CHECK(run(sleep, 32, FvParams{f(a), nullptr, 5.0f, 0, 200000}, s) == kOk);
    CHECK(cuEventRecord(e, s) == kOk);
    CHECK(cuStreamWaitEvent(s2, e, 0) == kOk);
    CHECK(run(cpy, 32, FvParams{f(b), f(a), 0, 0, 0}, s2) == kOk);
    CHECK(cuStreamQuery(s2) == kNotReady);
    CHECK(cuStreamSynchronize(s2) == kOk && read1(b, 7) == 5.0f);

    /* the legacy stream waits for blocking streams, and they wait for it */
    CHECK(run(sleep, 32, FvParams{f(a), nullptr, 3.0f, 0, 200000}, s) == kOk);
    CHECK(cuMemcpyDtoDAsync_v2(b, a, 32 * sizeof(float), nullptr) == kOk);
    CHECK(cuStreamSynchronize(nullptr) == kOk && read1(b, 3) == 3.0f);
    CHECK(run(sleep, 32, FvParams{f(a), nullptr, 4.0f, 0, 200000}, nullptr) == kOk);
    CHECK(run(cpy, 32, FvParams{f(b), f(a), 0, 0, 0}, s2) == kOk);
    CHECK(cuStreamSynchronize(s2) == kOk && read1(b, 3) == 4.0f);
    /* ... but not for a non-blocking stream */
    CHECK(run(sleep, 32, FvParams{f(a), nullptr, 6.0f, 0, 300000}, nb) == kOk);
    CHECK(cuMemsetD32Async(b, 0, 32, nullptr) == kOk);
    CHECK(cuStreamSynchronize(nullptr) == kOk);
    CHECK(cuStreamQuery(nb) == kNotReady);
    CHECK(cuCtxSynchronize() == kOk && cuStreamQuery(nb) == kOk && read1(a, 0) == 6.0f);

    /* host functions and callbacks run in stream order, on the worker */
    CHECK(run(sleep, 32, FvParams{f(a), nullptr, 8.0f, 0, 100000}, s) == kOk);
    CHECK(cuLaunchHostFunc(
              s,
              [](void* d) {
                  g_host_seen = *static_cast<float*>(d);
                  ++g_host_calls;
              },
              f(a)) == kOk);
    CHECK(cuStreamAddCallback(
              s, [](CUhandle, CUresult status, void*) { g_host_calls += status == 0 ? 10 : 100; }, nullptr, 0) == kOk);
    CHECK(cuStreamSynchronize(s) == kOk && g_host_seen == 8.0f && g_host_calls == 11);

    /* cuMemFreeAsync is stream-ordered: queued work still reads the memory */
    CUdeviceptr tmp = dalloc(64 * sizeof(float));
    CHECK(run(sleep, 32, FvParams{f(tmp), nullptr, 7.0f, 0, 100000}, s) == kOk);
    CHECK(run(cpy, 32, FvParams{f(b), f(tmp), 0, 0, 0}, s) == kOk);
    CHECK(cuMemFreeAsync(tmp, s) == kOk);
    CHECK(cuMemFreeAsync(tmp, s) == kInvalidValue);
    CHECK(cuStreamSynchronize(s) == kOk && read1(b, 31) == 7.0f);

    /* a destroyed stream still finishes its work */
    CHECK(run(sleep, 32, FvParams{f(a), nullptr, 11.0f, 0, 100000}, s2) == kOk);
    CHECK(cuEventRecord(e, s2) == kOk);
    CHECK(cuStreamDestroy_v2(s2) == kOk && cuStreamSynchronize(s2) == kInvalidHandle);
    CHECK(cuEventSynchronize(e) == kOk && read1(a, 0) == 11.0f);

    /* events and streams of different contexts do not mix */
    CUhandle other = nullptr, foreign = nullptr;
    CHECK(cuCtxCreate_v2(&other, 0, 0) == kOk);
    CHECK(cuEventCreate(&foreign, 0) == kOk);
    CHECK(cuCtxSetCurrent(g_ctx) == kOk);
    CHECK(cuEventRecord(foreign, s) == kInvalidHandle);
    CHECK(cuCtxDestroy_v2(other) == kOk);
    CHECK(cuEventRecord(foreign, s) == kInvalidHandle); /* destroyed with its context */

    CHECK(cuEventDestroy_v2(e) == kOk && cuEventDestroy_v2(t0) == kOk && cuEventDestroy_v2(t1) == kOk);
    CHECK(cuStreamDestroy_v2(s) == kOk && cuStreamDestroy_v2(nb) == kOk);
    CHECK(cuMemFree_v2(a) == kOk && cuMemFree_v2(b) == kOk);
}

static void test_async_faults() {
    CUhandle trap = fn("fv_trap"), sleep = fn("fv_sleep");
    CUdeviceptr out = dalloc(64 * sizeof(float));
    /* a stale message on this thread must not hide the fault's */
    CUhandle m = nullptr, k = nullptr;
    CHECK(cuModuleLoadData(&m, dkEmuModuleImage()) == kOk && cuModuleGetFunction(&k, m, "fv_stale") == kNotFound);
    CHECK(cuModuleUnload(m) == kOk);

    /* the launch succeeds; the fault comes with the next synchronising call, once */
    CHECK(run(sleep, 32, FvParams{f(out), nullptr, 1.0f, 0, 100000}) == kOk);
    CHECK(run(trap, 32, FvParams{f(out), nullptr, 0, 0, 0}) == kOk);
    CHECK(cuStreamSynchronize(nullptr) == kLaunchFailed);
    CHECK(contains(last_error(), "fv_trap"));
    CHECK(cuStreamSynchronize(nullptr) == kOk);
    /* ... also when that call is a copy back, or a context synchronize */
    CHECK(run(trap, 32, FvParams{f(out), nullptr, 0, 0, 0}) == kOk);
    float h = 0;
    CHECK(cuMemcpyDtoHAsync_v2(&h, out, sizeof h, nullptr) == kLaunchFailed);
    CHECK(run(trap, 32, FvParams{f(out), nullptr, 0, 0, 0}) == kOk);
    CHECK(cuCtxSynchronize() == kLaunchFailed && cuCtxSynchronize() == kOk);
    /* the context stays usable (not sticky by default) */
    CHECK(run(sleep, 32, FvParams{f(out), nullptr, 2.0f, 0, 0}) == kOk && read1(out) == 2.0f);

    /* the fault goes to the thread that queued the kernel, not to whoever synchronises first */
    std::atomic<int> phase{0};
    std::thread t([&] {
        CHECK(cuCtxSetCurrent(g_ctx) == kOk);
        CHECK(run(sleep, 32, FvParams{f(out), nullptr, 1.0f, 0, 100000}) == kOk);
        CHECK(run(trap, 32, FvParams{f(out), nullptr, 0, 0, 0}) == kOk);
        phase = 1;
        while (phase != 2) std::this_thread::yield();
        CHECK(cuStreamSynchronize(nullptr) == kLaunchFailed);
        CHECK(contains(last_error(), "fv_trap"));
    });
    while (phase != 1) std::this_thread::yield();
    CHECK(cuStreamSynchronize(nullptr) == kOk); /* waits for the trap, but it is not ours */
    phase = 2;
    t.join();
    CHECK(cuMemFree_v2(out) == kOk);
}

/* ------------------------------------------------------------------------------------------ */
/* sticky (DISTILL_EMU_STICKY=1)                                                               */
/* ------------------------------------------------------------------------------------------ */

static std::atomic<int> g_callback_status{-1};

static void test_sticky() {
    CHECK(dkEmuDriverMode() == 3);
    CUhandle trap = fn("fv_trap"), sleep = fn("fv_sleep");
    CUdeviceptr out = dalloc(64 * sizeof(float)), keep = dalloc(64);
    CHECK(cuStreamSynchronize(nullptr) == kOk);

    /* a fault in a non-primary context poisons that context only */
    CUhandle other = nullptr, om = nullptr, ok = nullptr;
    CHECK(cuCtxCreate_v2(&other, 0, 0) == kOk);
    CHECK(cuModuleLoadData(&om, dkEmuModuleImage()) == kOk && cuModuleGetFunction(&ok, om, "fv_trap") == kOk);
    CUdeviceptr o = 0;
    CHECK(cuMemAlloc_v2(&o, 256) == kOk);
    CHECK(run(ok, 32, FvParams{f(o), nullptr, 0, 0, 0}) == kOk);
    CHECK(cuCtxSynchronize() == kLaunchFailed && cuCtxSynchronize() == kLaunchFailed);
    CHECK(cuMemAlloc_v2(&o, 256) == kLaunchFailed);
    CHECK(cuCtxSetCurrent(g_ctx) == kOk);
    CHECK(run(sleep, 32, FvParams{f(out), nullptr, 1.0f, 0, 0}) == kOk && read1(out) == 1.0f);
    CHECK(cuCtxDestroy_v2(other) == kOk); /* the way out for a created context */
    CHECK(cuCtxSetCurrent(g_ctx) == kOk);

    /* a fault in the primary context: everything fails afterwards, with the same message; work
     * queued behind the fault is skipped (a callback still runs, with the error as its status) */
    CHECK(run(sleep, 32, FvParams{f(out), nullptr, 1.0f, 0, 200000}) == kOk);
    CHECK(run(trap, 32, FvParams{f(out), nullptr, 0, 0, 0}) == kOk);
    CHECK(cuLaunchHostFunc(nullptr, [](void*) { ++g_host_calls; }, nullptr) == kOk);
    CHECK(cuStreamAddCallback(
              nullptr, [](CUhandle, CUresult status, void*) { g_callback_status = status; }, nullptr, 0) == kOk);
    CHECK(cuStreamSynchronize(nullptr) == kLaunchFailed);
    CHECK(contains(last_error(), "fv_trap"));
    CHECK(g_host_calls == 0 && g_callback_status == kLaunchFailed);
    CHECK(cuStreamSynchronize(nullptr) == kLaunchFailed);
    CHECK(cuCtxSynchronize() == kLaunchFailed);
    CUdeviceptr d = 0;
    CHECK(cuMemAlloc_v2(&d, 64) == kLaunchFailed);
    CHECK(run(sleep, 32, FvParams{f(out), nullptr, 2.0f, 0, 0}) == kLaunchFailed);
    CUhandle e = nullptr;
    CHECK(cuEventCreate(&e, 0) == kLaunchFailed);
    float h = 0;
    CHECK(cuMemcpyDtoHAsync_v2(&h, out, sizeof h, nullptr) == kLaunchFailed);
    CHECK(contains(last_error(), "fv_trap"));
    /* another thread sees it too: the context is broken, not the thread */
    std::thread([] {
        CHECK(cuCtxSetCurrent(g_ctx) == kOk);
        CHECK(cuStreamSynchronize(nullptr) == kLaunchFailed);
        CHECK(contains(last_error(), "fv_trap"));
    }).join();

    /* cuDevicePrimaryCtxReset clears it and frees the context's memory */
    CHECK(cuDevicePrimaryCtxReset(0) == kOk);
    CHECK(cuStreamSynchronize(nullptr) == kOk);
    size_t range = 0;
    CHECK(cuPointerGetAttribute(&range, 12, keep) == kInvalidValue);
    out = dalloc(64 * sizeof(float));
    CHECK(run(sleep, 32, FvParams{f(out), nullptr, 4.0f, 0, 0}) == kOk && read1(out) == 4.0f);
    CHECK(cuMemFree_v2(out) == kOk);
}

/* ------------------------------------------------------------------------------------------ */
/* sync (DISTILL_EMU_SYNC=1): the old behaviour                                                */
/* ------------------------------------------------------------------------------------------ */

static void test_sync() {
    CHECK(dkEmuDriverMode() == 0);
    CUhandle trap = fn("fv_trap"), sleep = fn("fv_sleep");
    CUdeviceptr out = dalloc(64 * sizeof(float));
    CUhandle s = nullptr;
    CHECK(cuStreamCreate(&s, 0) == kOk);
    const double start = now_ms();
    CHECK(run(sleep, 32, FvParams{f(out), nullptr, 3.0f, 0, 100000}, s) == kOk);
    CHECK(now_ms() - start >= 90); /* done when the launch returns */
    CHECK(cuStreamQuery(s) == kOk && read1(out) == 3.0f);
    CHECK(run(trap, 32, FvParams{f(out), nullptr, 0, 0, 0}, s) == kLaunchFailed);
    CHECK(contains(last_error(), "fv_trap"));
    CHECK(cuStreamSynchronize(s) == kLaunchFailed && cuStreamSynchronize(s) == kOk);
    CHECK(cuStreamDestroy_v2(s) == kOk && cuMemFree_v2(out) == kOk);
}

int main(int argc, char** argv) {
    const std::string mode = argc > 1 ? argv[1] : "async";
    CHECK(cuInit(0) == kOk);
    CHECK(cuDevicePrimaryCtxRetain(&g_ctx, 0) == kOk && cuCtxSetCurrent(g_ctx) == kOk);
    CHECK(cuModuleLoadData(&g_all, dkEmuModuleImage()) == kOk);
    if (mode == "async") {
        test_argument_errors();
        test_module_images();
        test_launch_limits();
        test_async_streams();
        test_async_faults();
    } else if (mode == "sticky") {
        test_sticky();
    } else if (mode == "sync") {
        test_argument_errors();
        test_sync();
    } else {
        std::fprintf(stderr, "usage: %s [async|sticky|sync]\n", argv[0]);
        return 2;
    }
    return finish(("test_fidelity " + mode).c_str());
}
