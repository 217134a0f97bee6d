#!/usr/bin/env bash
# CPU trainer throughput: `distill bench train` against the same distillation training step in
# PyTorch (train_peer.py: eager, and with torch.compile'd forwards), each measurement in its own
# process, the sides interleaved. Prints a markdown table (side, tokens/s, ms/step, ratio vs
# PyTorch eager) and writes it into BENCHMARKS.md between <!-- train-peers:begin --> and
# <!-- train-peers:end --> (a "## Trainer throughput (CPU)" section is appended when absent).
#
#   bash benches/peers/train.sh [train_compare.py options]   e.g. --steps 10 --skip-compiled --no-write
#
# Defaults: --config tiny --teacher-config small --batch 16 --seq 64 --steps 20
# --warmup-steps 3 --temperature 2 --alpha 0.5.
#
# A benchmark, not part of CI; run it on an otherwise idle machine (with the cores busy, torch's
# OpenMP threads stall at their barriers and its numbers fall apart). The venv is run.sh's
# (DISTILL_PEER_VENV, default ~/.cache/distill-kernels/peer-venv), reused when torch imports;
# otherwise it is created and torch installed from PyPI exactly as run.sh does (several GB the
# first time: see run.sh for DISTILL_PEER_TORCH and DISTILL_PEER_PIP_ARGS, e.g. PyTorch's
# CPU-only index).
#
# Environment: DISTILL_PEER_THREADS (default 2), DISTILL_PEER_REPEATS (2: processes per side,
# interleaved; the best median is kept), DISTILL_PEER_PYTHON (python3 that creates the venv),
# CARGO_TARGET_DIR (where the binary is built).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${DISTILL_PEER_VENV:-$HOME/.cache/distill-kernels/peer-venv}"
threads="${DISTILL_PEER_THREADS:-2}"
repeats="${DISTILL_PEER_REPEATS:-2}"
python="${DISTILL_PEER_PYTHON:-python3}"
torch_req="${DISTILL_PEER_TORCH:-torch}"
write=1
args=()
for arg in "$@"; do
  if [[ "$arg" == "--no-write" ]]; then write=0; else args+=("$arg"); fi
done

log() { printf '[train-peers] %s\n' "$*" >&2; }

# 1. The venv with torch (shared with run.sh; skipped when it already imports).
if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import torch' >/dev/null 2>&1; then
  log "reusing $venv ($("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null))"
else
  log "torch does not import from $venv: creating it and installing $torch_req from PyPI as"
  log "run.sh does (the first time: several GB, minutes; 'bash benches/peers/run.sh' makes the same venv)"
  mkdir -p "$(dirname "$venv")"
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  # shellcheck disable=SC2086
  if ! "$venv/bin/python" -m pip install --quiet ${DISTILL_PEER_PIP_ARGS:-} "$torch_req" numpy; then
    log "pip failed; create the venv by hand: $python -m venv $venv &&"
    log "  $venv/bin/python -m pip install torch numpy   (or point DISTILL_PEER_VENV at one with torch)"
    exit 1
  fi
  "$venv/bin/python" -c 'import torch; print("torch", torch.__version__)' >&2
fi

# torch.compile on the CPU compiles C++ with the system compiler.
if ! command -v "${CXX:-g++}" >/dev/null 2>&1; then
  log "warning: no C++ compiler (${CXX:-g++}) found; torch.compile will fail and the table says why"
fi

# 2. The distill binary (cargo honours CARGO_TARGET_DIR; so does the path below).
log "cargo build --release --bin distill"
(cd "$root" && cargo build --release --quiet --bin distill)
target="${CARGO_TARGET_DIR:-$root/target}"
[[ "$target" = /* ]] || target="$root/$target"
distill="$target/release/distill"
[[ -x "$distill" ]] || { log "no binary at $distill"; exit 1; }

# 3. The measurements and the table.
command="bash benches/peers/train.sh${*:+ $*}"
[[ "$threads" == 2 && "$repeats" == 2 ]] ||
  command="DISTILL_PEER_THREADS=$threads DISTILL_PEER_REPEATS=$repeats $command"
md=()
[[ $write == 1 ]] && md=(--benchmarks-md "$root/BENCHMARKS.md")
exec "$venv/bin/python" "$here/train_compare.py" \
  --distill "$distill" --python "$venv/bin/python" \
  --threads "$threads" --repeats "$repeats" \
  --command "$command" "${md[@]}" "${args[@]}"
