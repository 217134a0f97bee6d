"""Does a run directory written by `distill train`/`distill distill` load unchanged in Hugging Face
transformers and compute the same logits?

    python benches/peers/hf_check.py RUN_DIR [--distill PATH] [--prompt TEXT] [--tokens N]

It asks `distill sample --json --temperature 0` for a greedy continuation with per-token
log-probabilities, then loads RUN_DIR with `LlamaForCausalLM.from_pretrained` and the tokenizer
with `tokenizers.Tokenizer.from_file`, re-encodes the prompt, runs the whole sequence once and
compares: the prompt's ids, every greedy choice, and every log-probability. Exits 1 on a mismatch.
Needs torch, transformers and tokenizers (the peer venv of benches/peers/run.sh plus
`pip install transformers`); not part of CI.
"""

import argparse
import json
import subprocess
import sys

import torch
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--distill", default="target/release/distill")
    ap.add_argument("--prompt", default="The")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--tol", type=float, default=1e-4, help="max |logprob difference|")
    a = ap.parse_args()

    ours = json.loads(
        subprocess.run(
            [a.distill, "sample", "--model", a.run_dir, "--prompt", a.prompt,
             "--tokens", str(a.tokens), "--temperature", "0", "--json"],
            check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
    )
    tok = Tokenizer.from_file(f"{a.run_dir}/tokenizer.json")
    hf_prompt = tok.encode(a.prompt, add_special_tokens=False).ids
    model = LlamaForCausalLM.from_pretrained(a.run_dir, torch_dtype=torch.float32)
    model.eval()

    ids = ours["prompt_ids"] + ours["ids"]
    # Our sampler recomputes a window of at most max_position_embeddings tokens.
    ctx = model.config.max_position_embeddings
    if len(ids) > ctx:
        print(f"use --tokens so that prompt + tokens <= {ctx}", file=sys.stderr)
        return 2
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    p = len(ours["prompt_ids"])
    worst, greedy_ok = 0.0, True
    for k, (tid, lp) in enumerate(zip(ours["ids"], ours["logprobs"])):
        row = logprobs[p - 1 + k]
        worst = max(worst, abs(row[tid].item() - lp))
        greedy_ok &= int(row.argmax()) == tid
    report = {
        "run_dir": a.run_dir,
        "transformers_class": type(model).__name__,
        "prompt_ids_match": hf_prompt == ours["prompt_ids"],
        "greedy_tokens_match": greedy_ok,
        "max_abs_logprob_diff": worst,
        "tokens": len(ours["ids"]),
        "decoded_match": tok.decode(ours["ids"], skip_special_tokens=False)
        == ours["text"][len(a.prompt):],
    }
    print(json.dumps(report))
    ok = report["prompt_ids_match"] and greedy_ok and worst <= a.tol and report["decoded_match"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
