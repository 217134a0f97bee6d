/*
 * The watchdog (DISTILL_EMU_WATCHDOG_S) turns a kernel that can make no progress on the emulator
 * (a spin-wait on a flag another thread of the block sets) into CUDA_ERROR_LAUNCH_TIMEOUT naming
 * the kernel, block and thread, instead of a hung process; the emulator keeps working afterwards.
 * Run with DISTILL_EMU_WATCHDOG_S=1.
 */
#include "test_util.h"

#include <vector>

struct P {
    float* out;
};

int main() {
    std::vector<float> out(64, 0.0f);
    const double t0 = now_ms();
    const int rc = launch("dk_selftest_spin", 1, 64, P{out.data()});
    const double waited = now_ms() - t0;
    const std::string msg = last_error();
    CHECK_MSG(rc == 702, "rc %d", rc);
    CHECK_MSG(contains(msg, "watchdog") && contains(msg, "dk_selftest_spin") && contains(msg, "thread (0,0,0)"), "%s",
              msg.c_str());
    CHECK_MSG(waited < 10000.0, "took %.0f ms", waited);
    /* A correct kernel runs afterwards. */
    CHECK(launch("dk_selftest_ok", 1, 64, P{out.data()}) == 0);
    CHECK(out[0] == 64.0f);
    std::printf("test_watchdog: %d checks, %d failures (stall reported after %.1f s)\n", g_checks, g_failures,
                waited / 1000.0);
    return g_failures ? 1 : 0;
}
