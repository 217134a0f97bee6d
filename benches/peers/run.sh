#!/usr/bin/env bash
# CPU peer comparison of the fused distillation loss: PyTorch eager and torch.compile against
# `distill bench loss --device cpu` and the machine's memory floor (`distill bench floor`),
# each measurement in its own process. Prints a markdown table and writes it into BENCHMARKS.md
# between <!-- cpu-peers:begin --> and <!-- cpu-peers:end -->.
#
#   bash benches/peers/run.sh [compare.py options]   e.g. --shape 256x32000:bf16 --iters 5 --no-write
#
# A benchmark, not part of CI. It needs network access to PyPI the first time only: the venv
# (DISTILL_PEER_VENV, default ~/.cache/distill-kernels/peer-venv) is reused when torch imports.
# PyPI carries one torch wheel for Linux x86_64, the CUDA build, whose CUDA libraries (about
# 4 GB) come along as dependencies and are needed to import it even on the CPU; CPU-only wheels
# are only on PyTorch's own index. Set DISTILL_PEER_TORCH (pip requirement, default `torch`) and
# DISTILL_PEER_PIP_ARGS (extra pip options, e.g. another index) to choose otherwise.
#
# Environment: DISTILL_PEER_THREADS (default 2), DISTILL_PEER_ITERS (10), DISTILL_PEER_WARMUP (2),
# DISTILL_PEER_REPEATS (2: processes per side and shape, interleaved; the best median is kept),
# DISTILL_PEER_PYTHON (python3 that creates the venv), CARGO_TARGET_DIR (where the binary is built).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${DISTILL_PEER_VENV:-$HOME/.cache/distill-kernels/peer-venv}"
threads="${DISTILL_PEER_THREADS:-2}"
iters="${DISTILL_PEER_ITERS:-10}"
warmup="${DISTILL_PEER_WARMUP:-2}"
repeats="${DISTILL_PEER_REPEATS:-2}"
python="${DISTILL_PEER_PYTHON:-python3}"
torch_req="${DISTILL_PEER_TORCH:-torch}"
write=1
args=()
for arg in "$@"; do
  if [[ "$arg" == "--no-write" ]]; then write=0; else args+=("$arg"); fi
done

log() { printf '[peers] %s\n' "$*" >&2; }

# 1. The venv with torch (skipped when it already imports).
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
  log "reusing $venv ($("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null))"
else
  log "creating $venv and installing $torch_req from PyPI (the first time: several GB, minutes)"
  mkdir -p "$(dirname "$venv")"
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install --quiet ${DISTILL_PEER_PIP_ARGS:-} "$torch_req" numpy
  "$venv/bin/python" -c 'import torch; print("torch", torch.__version__)' >&2
fi

# torch.compile on the CPU compiles C++ with the system compiler.
if ! command -v "${CXX:-g++}" >/dev/null 2>&1; then
  log "warning: no C++ compiler (${CXX:-g++}) found; torch.compile will fail and the table says why"
fi

# 2. The distill binary.
log "cargo build --release"
(cd "$root" && cargo build --release --quiet --bin distill)
target="${CARGO_TARGET_DIR:-$root/target}"
[[ "$target" = /* ]] || target="$root/$target"
distill="$target/release/distill"
[[ -x "$distill" ]] || { log "no binary at $distill"; exit 1; }

# 3. The measurements and the table.
command="bash benches/peers/run.sh${*:+ $*}"
[[ "$threads" == 2 && "$iters" == 10 && "$warmup" == 2 && "$repeats" == 2 ]] ||
  command="DISTILL_PEER_THREADS=$threads DISTILL_PEER_ITERS=$iters DISTILL_PEER_WARMUP=$warmup DISTILL_PEER_REPEATS=$repeats $command"
md=()
[[ $write == 1 ]] && md=(--benchmarks-md "$root/BENCHMARKS.md")
exec "$venv/bin/python" "$here/compare.py" \
  --distill "$distill" --python "$venv/bin/python" \
  --threads "$threads" --iters "$iters" --warmup "$warmup" --repeats "$repeats" \
  --command "$command" "${md[@]}" "${args[@]}"
