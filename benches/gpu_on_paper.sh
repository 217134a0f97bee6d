#!/usr/bin/env bash
# Regenerates the "GPU, on paper" block of BENCHMARKS.md (between the gpu-on-paper markers; the
# rest of the file is left alone): builds the crate with nvcc so build.rs records ptxas's report,
# prints it with `distill ptxas --arch 80,90` and feeds it to benches/gpu_on_paper.py.
#
#   bash benches/gpu_on_paper.sh            # rewrite the block
#   bash benches/gpu_on_paper.sh --stdout   # print the block instead (extra args go to the .py)
#
# nvcc: $NVCC if set, else the CUDA 13 venv `.ci/run` creates (${DISTILL_CUDA_VENV:-
# $HOME/.cache/distill-kernels/cuda13-venv}), else /opt/cuda-venv, else nvcc on PATH.
# LIGER_CSV=path/to/all_benchmark_data.csv re-reads Liger's rows instead of the quoted ones.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${NVCC:-}" ]; then
  VENV="${DISTILL_CUDA_VENV:-$HOME/.cache/distill-kernels/cuda13-venv}"
  for c in "$VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc \
           /opt/cuda-venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
    if [ -x "$c" ]; then NVCC="$c"; break; fi
  done
fi
if [ -z "${NVCC:-}" ] && command -v nvcc >/dev/null 2>&1; then NVCC="$(command -v nvcc)"; fi
if [ -z "${NVCC:-}" ]; then
  echo "gpu_on_paper.sh: no nvcc found; run 'bash .ci/run' once (it installs CUDA 13 nvcc into" \
       "${DISTILL_CUDA_VENV:-$HOME/.cache/distill-kernels/cuda13-venv}) or set NVCC" >&2
  exit 1
fi
export NVCC
export DISTILL_REQUIRE_NVCC=1  # a build without nvcc has no ptxas report: fail, don't guess
nvcc_version="$("$NVCC" --version | grep -m1 'release' || true)"

cargo build --release --quiet --bin distill
report="$("${CARGO_TARGET_DIR:-target}/release/distill" ptxas --arch 80,90)"

liger=()
if [ -n "${LIGER_CSV:-}" ]; then liger=(--liger-csv "$LIGER_CSV"); fi
printf '%s\n' "$report" |
  python3 benches/gpu_on_paper.py --ptxas - --benchmarks BENCHMARKS.md \
    --nvcc-version "$nvcc_version" ${liger[@]+"${liger[@]}"} "$@"
