#!/usr/bin/env bash
# Offline top-k distillation on the demo's language: the demo's teacher (small, 800 steps) and
# students (tiny, 400 steps, T = 1, alpha = 0.9, the demo's settings) trained on hard labels,
# with the live dense teacher, and from top-k teacher caches with k = 8, 32 and 128. Prints one
# JSON line per run and a summary; the numbers go into BENCHMARKS.md.
#
# Usage: benches/topk_demo.sh [OUT]   (default runs/topk; needs `cargo build --release`)
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DISTILL:-target/release/distill}
OUT=${1:-runs/topk}
KS=${KS:-8 32 128}
STUDENT=(--config tiny --steps 400 --eval-every 25 --force)
KD=(--temperature 1 --alpha 0.9)
mkdir -p "$OUT"
log() { echo "$1" | tee -a "$OUT/results.jsonl"; }
: >"$OUT/results.jsonl"

log "$($D train --data synthetic --out "$OUT/teacher" --config small --steps 800 --eval-every 25 --vocab-size 512 --force | tail -1)"
log "$($D train --data synthetic --out "$OUT/student_hard" --vocab-size 512 "${STUDENT[@]}" | tail -1)"
log "$($D distill --teacher "$OUT/teacher" --data synthetic --out "$OUT/student_dense" "${STUDENT[@]}" "${KD[@]}" | tail -1)"
for k in $KS; do
    log "$($D cache-teacher --teacher "$OUT/teacher" --data synthetic --out "$OUT/cache_k$k" --top-k "$k" | tail -1)"
    log "$($D distill --teacher-cache "$OUT/cache_k$k" --data synthetic --out "$OUT/student_k$k" "${STUDENT[@]}" "${KD[@]}" | tail -1)"
done
