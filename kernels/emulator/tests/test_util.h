/* Minimal test helpers for the emulator's C++ tests (no framework, no dependencies). */
#ifndef DISTILL_EMULATOR_TEST_UTIL_H
#define DISTILL_EMULATOR_TEST_UTIL_H

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

extern "C" int dkEmuLaunch(const char* kernel_name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                           unsigned bz, unsigned shared_bytes, void** params);
extern "C" const char* dkEmuLastError(void);
extern "C" int dkEmuIdentify(void);
extern "C" int dkEmuWorkerCount(void);

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond)                                                                     \
    do {                                                                                \
        ++g_checks;                                                                     \
        if (!(cond)) {                                                                  \
            ++g_failures;                                                               \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                               \
    } while (0)

#define CHECK_MSG(cond, ...)                                                            \
    do {                                                                                \
        ++g_checks;                                                                     \
        if (!(cond)) {                                                                  \
            ++g_failures;                                                               \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
            std::fprintf(stderr, __VA_ARGS__);                                          \
            std::fprintf(stderr, "\n");                                                 \
        }                                                                               \
    } while (0)

/* Launches kernel `name` with one parameter struct, like cuLaunchKernel would. */
template <class P>
[[maybe_unused]] static int launch(const char* name, unsigned gx, unsigned bx, const P& p, unsigned smem = 0, unsigned gy = 1,
                  unsigned gz = 1, unsigned by = 1, unsigned bz = 1) {
    P copy = p;
    void* params[1] = {&copy};
    return dkEmuLaunch(name, gx, gy, gz, bx, by, bz, smem, params);
}

[[maybe_unused]] static std::string last_error() {
    const char* e = dkEmuLastError();
    return e ? std::string(e) : std::string();
}

[[maybe_unused]] static bool contains(const std::string& hay, const char* needle) { return hay.find(needle) != std::string::npos; }

[[maybe_unused]] static double now_ms() {
    using clock = std::chrono::steady_clock;
    return std::chrono::duration<double, std::milli>(clock::now().time_since_epoch()).count();
}

static int finish(const char* name) {
    if (g_failures) {
        std::fprintf(stderr, "%s: %d of %d checks FAILED\n", name, g_failures, g_checks);
        return 1;
    }
    std::printf("%s: all %d checks passed\n", name, g_checks);
    return 0;
}

#endif
