#!/usr/bin/env bash
# Downstream builds (issue 10): a lean consumer with default-features = false, and a consumer
# whose cudarc links the CUDA driver at build time (as candle-core's `cuda` feature does).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(cd ../.. && pwd)
# The repository's target directory: dependencies built for the feature sets above are reused.
export CARGO_TARGET_DIR=$ROOT/target
# Neither build may need nvcc; the lean one not even a C++ compiler.
unset NVCC DISTILL_REQUIRE_NVCC CUDA_HOME CUDA_PATH

# 1. The lean library: at most 40 crates, no C/C++ compiler, builds and computes a loss.
crates=$(cd lean && cargo tree -e normal --prefix none | sed 's/ (\*)$//' | sort -u | wc -l)
echo "consumers: lean consumer depends on $crates crates (cargo tree -e normal, itself included)"
if [ "$crates" -gt 40 ]; then
  (cd lean && cargo tree -e normal)
  echo "consumers: the lean library pulls more than 40 crates" >&2
  exit 1
fi
t=$(date +%s)
(cd lean && CC=/nonexistent/cc CXX=/nonexistent/c++ cargo build --release --quiet)
echo "consumers: lean consumer built in $(( $(date +%s) - t )) s with CC and CXX pointing nowhere"
"$CARGO_TARGET_DIR/release/lean-consumer"

# 2. cudarc `dynamic-linking` next to distill-kernels' `cuda`: link against stand-ins for
#    libcuda (the emulator's driver, without kernels), libcublas (the emulator's), and libnvrtc
#    and libcublasLt (empty), then run.
stub=$CARGO_TARGET_DIR/cuda-stub
mkdir -p "$stub/lib64"
if [ ! -f "$stub/lib64/libcuda.so" ]; then
  c++ -std=c++17 -O1 -fPIC -pthread -w -shared -Wl,-soname,libcuda.so.1 -I "$ROOT/kernels" \
    "$ROOT"/kernels/emulator/{runtime,driver,sanitizer}.cpp -o "$stub/lib64/libcuda.so"
  ln -sf libcuda.so "$stub/lib64/libcuda.so.1"
  echo "" | cc -shared -x c - -Wl,-soname,libnvrtc.so -o "$stub/lib64/libnvrtc.so"
fi
if [ ! -f "$stub/lib64/libcublas.so" ]; then
  c++ -std=c++17 -O1 -fPIC -pthread -w -shared -Wl,-soname,libcublas.so \
    "$ROOT"/kernels/emulator/cublas.cpp -ldl -o "$stub/lib64/libcublas.so"
  echo "" | cc -shared -x c - -Wl,-soname,libcublasLt.so -o "$stub/lib64/libcublasLt.so"
fi
t=$(date +%s)
(cd dynamic-linking && CUDA_HOME=$stub cargo build --release --quiet)
echo "consumers: dynamic-linking consumer built in $(( $(date +%s) - t )) s"
bin=$CARGO_TARGET_DIR/release/dynamic-linking-consumer
readelf -d "$bin" | grep -q 'NEEDED.*libcuda.so' ||
  { echo "consumers: the dynamic-linking consumer does not link libcuda" >&2; exit 1; }
LD_LIBRARY_PATH=$stub/lib64 "$bin"
