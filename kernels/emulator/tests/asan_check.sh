#!/usr/bin/env bash
# AddressSanitizer check of the emulator: builds asan_oob.cu + asan_harness.cpp with the runtime
# and the fake driver under -fsanitize=address, then
#   - the in-bounds variant must run clean (exit 0, no sanitizer report), and
#   - the variant that reads one element past a device buffer must be stopped by ASan with a
#     heap-buffer-overflow report.
# Usage: asan_check.sh [build-dir]   (compiler: $CXX, default c++). Exit 0 only if both hold;
# 1 if a check failed, 2 if the build failed.
set -u
CXX="${CXX:-c++}"
read -r -a cxx <<<"$CXX" # allows e.g. CXX="ccache g++"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kernels="$(cd "$here/../.." && pwd)"
out="${1:-}"
if [ -z "$out" ]; then out="$(mktemp -d)"; fi
mkdir -p "$out"

bin="$out/asan_oob"
if ! "${cxx[@]}" -std=c++17 -O1 -g -fsanitize=address -fno-omit-frame-pointer -I "$kernels" \
    "$kernels/emulator/runtime.cpp" "$kernels/emulator/driver.cpp" "$kernels/emulator/sanitizer.cpp" \
    -x c++ "$here/asan_oob.cu" -x none "$here/asan_harness.cpp" \
    -o "$bin" -lpthread -ldl >"$out/build.log" 2>&1; then
    echo "asan_check: build failed (see $out/build.log)" >&2
    cat "$out/build.log" >&2
    exit 2
fi

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0}"
status=0

timeout 120 "$bin" clean >"$out/clean.log" 2>&1
rc=$?
if [ $rc -ne 0 ] || grep -q "AddressSanitizer" "$out/clean.log"; then
    echo "asan_check: FAIL: the in-bounds variant did not run clean (exit $rc):" >&2
    cat "$out/clean.log" >&2
    status=1
else
    echo "asan_check: in-bounds variant ran clean under AddressSanitizer"
fi

timeout 120 "$bin" oob >"$out/oob.log" 2>&1
rc=$?
if [ $rc -ne 0 ] && grep -q "ERROR: AddressSanitizer: heap-buffer-overflow" "$out/oob.log"; then
    echo "asan_check: out-of-bounds read caught: $(grep -m1 'ERROR: AddressSanitizer' "$out/oob.log" | sed 's/^==[0-9]*==//')"
    if grep -q "dk_asan_sum" "$out/oob.log"; then
        echo "asan_check: the report names the kernel: $(grep -m1 'dk_asan_sum' "$out/oob.log" | sed 's/^ *//')"
    fi
else
    echo "asan_check: FAIL: AddressSanitizer did not report the out-of-bounds read (exit $rc):" >&2
    cat "$out/oob.log" >&2
    status=1
fi
exit $status
