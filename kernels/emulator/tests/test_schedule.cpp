/*
 * Seeded schedules (DISTILL_EMU_SCHEDULE_SEED / dkEmuSetScheduleSeed) expose order-dependent
 * bugs that the default schedule hides, and leave correct kernels correct.
 *
 * dk_selftest_reuse_without_barrier (selftest.cu) reuses a shared buffer for a second reduction
 * without the barrier that must separate the first reduction's reads from the second one's
 * writes: on the default schedule every warp reads before any warp writes, so its output is the
 * intended 3 * blockDim.x; under a priority schedule a warp runs ahead and overwrites a slot another
 * warp has not read yet.
 */
#include "test_util.h"

#include <vector>

extern "C" void dkEmuSetScheduleSeed(unsigned long long seed);

struct P {
    float* out;
};

static std::vector<float> run(const char* kernel, unsigned threads, int* rc) {
    std::vector<float> out(threads, -1.0f);
    *rc = launch(kernel, 1, threads, P{out.data()});
    return out;
}

static bool all_equal(const std::vector<float>& v, float x) {
    for (float y : v)
        if (y != x) return false;
    return true;
}

int main() {
    const unsigned threads = 256;
    int rc = 0;
    dkEmuSetScheduleSeed(0);
    std::vector<float> out = run("dk_selftest_reuse_without_barrier", threads, &rc);
    CHECK(rc == 0);
    CHECK_MSG(all_equal(out, 3.0f * threads), "the default schedule hides the missing barrier (out[0] = %g)", out[0]);

    int exposed = 0;
    const int seeds = 8;
    for (int seed = 1; seed <= seeds; ++seed) {
        dkEmuSetScheduleSeed(static_cast<unsigned long long>(seed));
        out = run("dk_selftest_reuse_without_barrier", threads, &rc);
        CHECK(rc == 0);
        if (!all_equal(out, 3.0f * threads)) ++exposed;
        /* A correct kernel stays correct under every schedule. */
        std::vector<float> ok = run("dk_selftest_ok", threads, &rc);
        CHECK(rc == 0);
        CHECK_MSG(all_equal(ok, static_cast<float>(threads)), "seed %d: dk_selftest_ok gave %g", seed, ok[0]);
    }
    CHECK_MSG(exposed == seeds, "the missing barrier changed the result under %d of %d seeds", exposed, seeds);
    dkEmuSetScheduleSeed(0);
    std::printf("test_schedule: %d checks, %d failures (missing barrier exposed by %d of %d seeds)\n", g_checks,
                g_failures, exposed, seeds);
    return g_failures ? 1 : 0;
}
