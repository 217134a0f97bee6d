/*
 * Failures are reported, never hangs: barrier divergence, warp primitive misuse, __trap,
 * device assert, bad launch configurations. After each failure the runtime keeps working, and
 * concurrent launches from several host threads do not disturb each other.
 * run_tests.sh runs this under `timeout`, so a hang fails the suite.
 */
#include "emulator/simt.h"

#include <atomic>
#include <thread>
#include <vector>

#include "test_util.h"

#define FULL 0xffffffffu

struct P {
    int* out;
    int x;
};

extern "C" __global__ void e_ok(P p) {
    float v = static_cast<float>(threadIdx.x);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) atomicAdd(p.out, static_cast<int>(v));
}
DK_REGISTER_KERNEL(e_ok, P)

/* 17 of 256 threads return before a __syncthreads the others wait at. */
extern "C" __global__ void e_barrier_divergence(P p) {
    if (threadIdx.x >= 239) return;
    __syncthreads();
    p.out[threadIdx.x] = 1;
}
DK_REGISTER_KERNEL(e_barrier_divergence, P)

/* Only some threads of the block reach a __syncthreads inside a branch; the others wait at a
 * later one: also divergence (the emulator requires every thread at every barrier). */
extern "C" __global__ void e_barrier_in_branch(P p) {
    if (threadIdx.x < 64) {
        __syncthreads();
    }
    p.out[threadIdx.x] = 1;
}
DK_REGISTER_KERNEL(e_barrier_in_branch, P)

extern "C" __global__ void e_partial_mask(P p) {
    int v = threadIdx.x;
    v = __shfl_xor_sync(0x0000ffffu, v, 1);
    p.out[threadIdx.x] = v;
}
DK_REGISTER_KERNEL(e_partial_mask, P)

/* The last warp of a 40-thread block has 8 lanes: its own mask 0xff is accepted, 0xf is not. */
extern "C" __global__ void e_partial_warp_mask(P p) {
    int v = threadIdx.x;
    if (threadIdx.x >= 32) v = __shfl_xor_sync(0xffu, v, 1);
    if (threadIdx.x >= 32) v = __shfl_xor_sync(0xfu, v, 1);
    p.out[threadIdx.x] = v;
}
DK_REGISTER_KERNEL(e_partial_warp_mask, P)

extern "C" __global__ void e_mixed_primitives(P p) {
    int v = threadIdx.x;
    if ((threadIdx.x & 31) < 16)
        v = __shfl_xor_sync(FULL, v, 1);
    else
        v = __shfl_down_sync(FULL, v, 1);
    p.out[threadIdx.x] = v;
}
DK_REGISTER_KERNEL(e_mixed_primitives, P)

extern "C" __global__ void e_lane_exited(P p) {
    if (threadIdx.x == 5) return;
    int v = __shfl_xor_sync(FULL, static_cast<int>(threadIdx.x), 1);
    p.out[threadIdx.x] = v;
}
DK_REGISTER_KERNEL(e_lane_exited, P)

/* Half a warp at __syncthreads, the other half at a shuffle: nobody can progress. */
extern "C" __global__ void e_bar_vs_shfl(P p) {
    int v = threadIdx.x;
    if ((threadIdx.x & 31) < 16) {
        __syncthreads();
    } else {
        v = __shfl_xor_sync(FULL, v, 1);
        __syncthreads();
    }
    p.out[threadIdx.x] = v;
}
DK_REGISTER_KERNEL(e_bar_vs_shfl, P)

extern "C" __global__ void e_trap(P p) {
    if (blockIdx.x == 2 && threadIdx.x == 7) __trap();
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(p.out, 1);
}
DK_REGISTER_KERNEL(e_trap, P)

extern "C" __global__ void e_assert(P p) {
    if (threadIdx.x == 3) assert(p.x != 42);
    if (threadIdx.x == 0) atomicAdd(p.out, 1);
}
DK_REGISTER_KERNEL(e_assert, P)

extern "C" __global__ void e_bad_width(P p) {
    p.out[threadIdx.x] = __shfl_sync(FULL, 1, 0, 12);
}
DK_REGISTER_KERNEL(e_bad_width, P)

/* Counts started blocks; block 0 traps: the launch stops handing out blocks. */
extern "C" __global__ void e_stop_early(P p) {
    if (threadIdx.x == 0) atomicAdd(p.out, 1);
    if (blockIdx.x == 0) __trap();
}
DK_REGISTER_KERNEL(e_stop_early, P)

extern "C" __global__ void e_dyn_smem(P p) {
    DK_DYNAMIC_SHARED(int, buf);
    buf[threadIdx.x] = 1;
    p.out[0] = buf[0];
}
DK_REGISTER_KERNEL(e_dyn_smem, P)

static void expect_ok_after(const char* what) {
    int sum = 0;
    P p{&sum, 0};
    const int rc = launch("e_ok", 3, 64, p);
    /* per warp: sum of lanes 0..31 of that warp */
    int expect = 0;
    for (int b = 0; b < 3; ++b)
        for (int t = 0; t < 64; ++t) expect += t;
    CHECK_MSG(rc == 0 && sum == expect, "after %s: rc %d sum %d (expected %d): %s", what, rc, sum, expect,
              last_error().c_str());
}

static void expect_failure(const char* kernel, unsigned grid, unsigned block, int code, const char* const* needles,
                           int x = 0) {
    std::vector<int> out(4096, 0);
    P p{out.data(), x};
    const double t0 = now_ms();
    const int rc = launch(kernel, grid, block, p);
    const double ms = now_ms() - t0;
    const std::string msg = last_error();
    CHECK_MSG(rc == code, "%s: rc %d, expected %d (%s)", kernel, rc, code, msg.c_str());
    for (const char* const* n = needles; *n; ++n)
        CHECK_MSG(contains(msg, *n), "%s: message lacks \"%s\": %s", kernel, *n, msg.c_str());
    std::printf("  %-22s rc %d after %.1f ms: %s\n", kernel, rc, ms, msg.c_str());
    expect_ok_after(kernel);
}

static void test_divergence() {
    {
        const char* n[] = {"barrier divergence in kernel e_barrier_divergence", "block (",
                           "17 of 256 threads exited while 239 wait at __syncthreads", nullptr};
        expect_failure("e_barrier_divergence", 5, 256, 719, n);
    }
    {
        const char* n[] = {"barrier divergence in kernel e_barrier_in_branch", "64 wait at __syncthreads", nullptr};
        expect_failure("e_barrier_in_branch", 1, 128, 719, n);
    }
    {
        const char* n[] = {"e_partial_mask", "mask 0x0000ffff", "__shfl_xor_sync", nullptr};
        expect_failure("e_partial_mask", 2, 64, 999, n);
    }
    {
        const char* n[] = {"e_partial_warp_mask", "thread (3", "mask 0x0000000f",
                           "or 0x000000ff for this partial warp", nullptr};
        expect_failure("e_partial_warp_mask", 1, 40, 999, n);
    }
    {
        const char* n[] = {"warp divergence in kernel e_mixed_primitives", "__shfl_down_sync", "__shfl_xor_sync", nullptr};
        expect_failure("e_mixed_primitives", 1, 64, 719, n);
    }
    {
        const char* n[] = {"warp divergence in kernel e_lane_exited", "exited while 31 wait at __shfl_xor_sync",
                           "warp 0: 31 of 32 lanes arrived", nullptr};
        expect_failure("e_lane_exited", 1, 64, 719, n);
    }
    {
        const char* n[] = {"barrier divergence in kernel e_bar_vs_shfl", "16 of 32 threads wait at __syncthreads",
                           "16 wait at __shfl_xor_sync", nullptr};
        expect_failure("e_bar_vs_shfl", 1, 32, 719, n);
    }
    {
        const char* n[] = {"__trap() in kernel e_trap: block (2,0,0), thread (7,0,0)", nullptr};
        expect_failure("e_trap", 4, 32, 719, n);
    }
    {
        const char* n[] = {"device assertion failed in kernel e_assert", "thread (3,0,0)", "Assertion `p.x != 42` failed",
                           nullptr};
        expect_failure("e_assert", 1, 32, 710, n, 42);
    }
    {
        const char* n[] = {"e_bad_width", "width", nullptr};
        expect_failure("e_bad_width", 1, 32, 999, n);
    }
    {
        /* Assert that holds: no failure. */
        int count = 0;
        P p{&count, 1};
        CHECK(launch("e_assert", 2, 32, p) == 0 && count == 2);
    }
}

static void test_stop_early() {
    int started = 0;
    P p{&started, 0};
    const int rc = launch("e_stop_early", 5000, 32, p);
    CHECK(rc == 719);
    CHECK_MSG(started < 5000, "all %d blocks ran although block 0 failed", started);
    std::printf("  e_stop_early: %d of 5000 blocks started before the failure stopped the launch\n", started);
}

static void test_launch_config() {
    int out[64] = {};
    P p{out, 0};
    CHECK(launch("e_ok", 1, 2048, p) == 1);
    CHECK(contains(last_error(), "invalid launch configuration for kernel e_ok"));
    CHECK(launch("e_ok", 1, 1, p, 0, 1, 1, 1, 65) == 1);
    CHECK(launch("e_ok", 0, 32, p) == 1);
    CHECK(launch("e_ok", 1, 32, p, 0, 65536) == 1);
    CHECK(launch("e_dyn_smem", 1, 32, p, 64 * 1024) == 1);
    CHECK(contains(last_error(), "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES"));
    CHECK(launch("e_dyn_smem", 1, 32, p, 48 * 1024) == 0 && out[0] == 1);
    CHECK(launch("no_such_kernel", 1, 32, p) == 500);
    CHECK(contains(last_error(), "no_such_kernel"));
    CHECK(dkEmuLaunch("e_ok", 1, 1, 1, 32, 1, 1, 0, nullptr) == 1);
    expect_ok_after("launch configuration errors");
}

/* Several host threads launching at once (cargo test runs tests in parallel threads): results
 * stay right and each thread sees its own failure message. */
static void test_concurrent_launches() {
    std::atomic<int> bad{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([t, &bad] {
            for (int i = 0; i < 30; ++i) {
                if (t == 0 && i % 3 == 0) {
                    std::vector<int> out(256);
                    P p{out.data(), 0};
                    if (launch("e_barrier_divergence", 2, 256, p) != 719) ++bad;
                    if (!contains(last_error(), "e_barrier_divergence")) ++bad;
                    continue;
                }
                int sum = 0;
                P p{&sum, 0};
                const int rc = launch("e_ok", 4, 128, p);
                int expect = 0;
                for (int b = 0; b < 4; ++b)
                    for (int k = 0; k < 128; ++k) expect += k;
                if (rc != 0 || sum != expect) ++bad;
            }
        });
    }
    for (auto& th : threads) th.join();
    CHECK_MSG(bad.load() == 0, "%d bad results from concurrent launches", bad.load());
}

int main() {
    std::printf("failures reported by the emulator:\n");
    test_divergence();
    test_stop_early();
    test_launch_config();
    test_concurrent_launches();
    return finish("test_errors");
}
