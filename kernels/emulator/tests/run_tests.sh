#!/usr/bin/env bash
# Builds and runs the emulator's C++ tests. Exit status non-zero if any test fails.
#
#   kernels/emulator/tests/run_tests.sh [build-dir]
#
# Compiler: $CXX (default c++). Every test runs under `timeout`, so a hang (the thing barrier
# divergence detection exists to prevent) fails the suite instead of blocking it.
#   test_simt     reductions for many block shapes, shuffle/vote semantics, shared memory,
#                 atomics from parallel blocks, timings
#   test_errors   divergence / misuse / trap / assert reported with the kernel's name, recovery,
#                 concurrent launches from several host threads
#   test_fp16     half/bfloat16 rounding, bit-exact against an independent reference
#   test_numerics FMA contraction as build.rs compiles kernels, fast-math intrinsics within their
#                 documented error (DISTILL_EMU_APPROX=exact|perturb|max), special values
#   test_driver   the fake driver's C API as cudarc uses it (in DISTILL_EMU_SYNC=1 mode)
#   test_schedule seeded warp-priority schedules expose a missing barrier the default hides
#   test_watchdog a spin-wait that cannot end here fails the launch (LAUNCH_TIMEOUT) instead of hanging
#   test_fidelity the driver fails where CUDA fails: argument errors, module images, launch
#                 limits, asynchronous streams and events, fault reporting; sticky errors
#                 (DISTILL_EMU_STICKY=1) and the synchronous mode (DISTILL_EMU_SYNC=1)
#   test_dlopen   the shared library as the Rust crate loads it (by path, then as libcuda.so.1)
#   asan_check.sh an out-of-bounds kernel read caught by AddressSanitizer, the clean one clean
# The scheduler is also exercised with one worker thread and with the ucontext fallback.
set -u
CXX="${CXX:-c++}"
read -r -a cxx <<<"$CXX" # allows e.g. CXX="ccache g++"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
emu="$(cd "$here/.." && pwd)"
kernels="$(cd "$emu/.." && pwd)"
out="${1:-}"
if [ -z "$out" ]; then out="$(mktemp -d)"; fi
mkdir -p "$out"
echo "emulator tests: building in $out with $CXX"

CXXFLAGS=(-std=c++17 -O2 -Wall -Wextra -Wno-unknown-pragmas -fno-strict-aliasing -I "$kernels")
failures=0
fail() {
    echo "FAILED: $*" >&2
    failures=$((failures + 1))
}

# Every program is compiled first, in the background, as many compilers at a time as there are
# cores (the suite is mostly compile time); then the tests run one after another.
running=0
spawn() { # spawn <name> <command...>: runs the command in the background, log in <name>.build.log
    local bin="$1"
    shift
    while [ "$running" -ge "$(nproc)" ]; do
        wait -n
        running=$((running - 1))
    done
    rm -f "$out/$bin.ok"
    ("$@" >"$out/$bin.build.log" 2>&1 && touch "$out/$bin.ok") &
    running=$((running + 1))
}
start() { # start <output> <sources...> [extra flags]: a test program, linked with the runtime
    local bin="$1"
    shift
    spawn "$bin" "${cxx[@]}" "${CXXFLAGS[@]}" "$@" -o "$out/$bin" -pthread -ldl
}
built() { # built <name>: 0 when it compiled (its warnings shown), else its log and a failure
    if [ -s "$out/$1.build.log" ]; then cat "$out/$1.build.log" >&2; fi
    if [ ! -f "$out/$1.ok" ]; then
        fail "build of $1"
        return 1
    fi
}

run() { # run <label> <timeout-seconds> <command...>
    local label="$1" limit="$2"
    shift 2
    echo "--- $label"
    timeout "$limit" "$@"
    local rc=$?
    if [ $rc -eq 124 ]; then
        fail "$label timed out after ${limit}s (hang?)"
    elif [ $rc -ne 0 ]; then
        fail "$label (exit $rc)"
    fi
}

# Runtime and driver objects, shared by the test programs.
for unit in runtime driver sanitizer; do
    spawn "$unit" "${cxx[@]}" "${CXXFLAGS[@]}" -fPIC -c "$emu/$unit.cpp" -o "$out/$unit.o"
done
wait
running=0
for unit in runtime driver sanitizer; do
    built "$unit" || exit 1
done
objs=("$out/runtime.o" "$out/driver.o" "$out/sanitizer.o")

start test_simt -x c++ "$here/test_simt.cu" -x none "${objs[@]}"
start test_errors -x c++ "$here/test_errors.cu" -x none "${objs[@]}"
start test_fp16 "$here/test_fp16.cpp" "${objs[@]}"
# Compiled the way build.rs compiles the kernels: contraction on, -mfma where the x86 host has FMA.
numerics_flags=(-ffp-contract=fast)
case "$(uname -m)" in x86_64 | i?86) if grep -qw fma /proc/cpuinfo 2>/dev/null; then numerics_flags+=(-mfma); fi ;; esac
start test_numerics "${numerics_flags[@]}" -x c++ "$here/test_numerics.cu" -x none "${objs[@]}"
start test_driver "$here/test_driver.cpp" "${objs[@]}"
start test_schedule "$here/test_schedule.cpp" -x c++ "$emu/selftest.cu" -x none "${objs[@]}"
start test_watchdog "$here/test_watchdog.cpp" -x c++ "$emu/selftest.cu" -x none "${objs[@]}"
start test_fidelity "$here/test_fidelity.cpp" "${objs[@]}"
# The shared library as build.rs makes it: the kernels' and selftest.cu's translation units,
# runtime and driver, SONAME libcuda.so.1. It must not need static TLS (dlopen would fail).
lib="$out/libdistill_emu_test.so"
spawn lib "${cxx[@]}" -std=c++17 -O2 -fPIC -pthread -fno-strict-aliasing -w -shared -Wl,-soname,libcuda.so.1 -I "$kernels" \
    "$emu/runtime.cpp" "$emu/driver.cpp" "$emu/sanitizer.cpp" -x c++ "$emu/selftest.cu" -x none -o "$lib"
start test_dlopen "$here/test_dlopen.cpp"
# The portable context-switch fallback.
start test_errors_ucontext -DDK_EMU_USE_UCONTEXT "$emu/runtime.cpp" "$emu/driver.cpp" "$emu/sanitizer.cpp" \
    -x c++ "$here/test_errors.cu" -x none
wait

built test_simt &&
    run test_simt 300 "$out/test_simt" &&
    run "test_simt (DISTILL_EMU_THREADS=1)" 300 env DISTILL_EMU_THREADS=1 "$out/test_simt"
built test_errors &&
    run test_errors 120 "$out/test_errors" &&
    run "test_errors (DISTILL_EMU_THREADS=1)" 120 env DISTILL_EMU_THREADS=1 "$out/test_errors"
built test_fp16 && run test_fp16 120 "$out/test_fp16"
built test_numerics &&
    run "test_numerics exact" 120 env -u DISTILL_EMU_APPROX "$out/test_numerics" exact &&
    run "test_numerics perturb (DISTILL_EMU_APPROX=perturb)" 120 env DISTILL_EMU_APPROX=perturb "$out/test_numerics" perturb &&
    run "test_numerics max (DISTILL_EMU_APPROX=max)" 120 env DISTILL_EMU_APPROX=max "$out/test_numerics" max
built test_driver &&
    run "test_driver (DISTILL_EMU_SYNC=1)" 120 env DISTILL_EMU_SYNC=1 "$out/test_driver"
built test_schedule && run test_schedule 120 "$out/test_schedule"
built test_watchdog &&
    run "test_watchdog (DISTILL_EMU_WATCHDOG_S=1)" 60 env DISTILL_EMU_WATCHDOG_S=1 "$out/test_watchdog"
built test_fidelity &&
    run "test_fidelity async" 120 "$out/test_fidelity" async &&
    run "test_fidelity async (DISTILL_EMU_THREADS=1)" 120 env DISTILL_EMU_THREADS=1 "$out/test_fidelity" async &&
    run "test_fidelity sticky (DISTILL_EMU_STICKY=1)" 120 env DISTILL_EMU_STICKY=1 "$out/test_fidelity" sticky &&
    run "test_fidelity sync (DISTILL_EMU_SYNC=1)" 120 env DISTILL_EMU_SYNC=1 "$out/test_fidelity" sync
if built lib; then
    if readelf -d "$lib" 2>/dev/null | grep -q STATIC_TLS; then
        fail "the library needs static TLS (dlopen from Rust would fail)"
    fi
    built test_dlopen && run test_dlopen 60 "$out/test_dlopen" "$lib"
fi
built test_errors_ucontext && run "test_errors (ucontext fallback)" 120 "$out/test_errors_ucontext"

echo "--- asan_check.sh"
if ! CXX="$CXX" timeout 600 "$here/asan_check.sh" "$out/asan"; then fail "asan_check.sh"; fi

if [ $failures -ne 0 ]; then
    echo "emulator tests: $failures FAILED" >&2
    exit 1
fi
echo "emulator tests: all passed"
