"""Side-by-side CPU trainer throughput: `distill bench train` against the same distillation step
in PyTorch (train_peer.py), eager and with torch.compile'd forwards, every measurement in its
own process and the sides interleaved. Called by train.sh (which makes the venv and builds the
binary); stdlib only (with peerlib.py beside it), so it also runs outside the venv.

Prints a markdown table and, with --benchmarks-md, puts it into that file between
`<!-- train-peers:begin -->` and `<!-- train-peers:end -->` (nothing else in the file changes;
a "## Trainer throughput (CPU)" section with the markers is appended when they are absent).
"""

import argparse
import datetime
import os
import sys

from peerlib import better, machine, run_one, write_block

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN = "<!-- train-peers:begin -->"
END = "<!-- train-peers:end -->"
SECTION = "## Trainer throughput (CPU)"


def fmt(r, key, spec):
    if r is None:
        return "–"
    if "error" in r:
        return "n/a"
    v = r.get(key)
    return "–" if v is None else format(v, spec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--distill", required=True, help="path of the distill binary")
    ap.add_argument("--python", default=sys.executable, help="python with torch installed")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--teacher-config", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2,
                    help="processes per side, interleaved; the best median is kept (evens out "
                         "a machine that slows down for a while)")
    ap.add_argument("--skip-compiled", action="store_true")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    ap.add_argument("--benchmarks-md", default=None, help="file to update (default: none)")
    ap.add_argument("--command", default=None, help="the command line to record")
    a = ap.parse_args()

    shape = ["--config", a.config, "--teacher-config", a.teacher_config,
             "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps),
             "--warmup-steps", str(a.warmup_steps), "--kind", "forward-kl",
             "--temperature", f"{a.temperature:g}", "--alpha", f"{a.alpha:g}",
             "--threads", str(a.threads)]
    peer = os.path.join(HERE, "train_peer.py")
    # Insertion order is the order of the runs within a repeat and of the table rows.
    sides = {
        "distill (ours)": [a.distill, "bench", "train", *shape],
        "PyTorch eager": [a.python, peer, *shape],
    }
    if not a.skip_compiled:
        sides["PyTorch torch.compile"] = [a.python, peer, *shape, "--compile", "--no-eager"]

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    best = {}
    for rep in range(max(1, a.repeats)):
        print(f"repeat {rep + 1}/{max(1, a.repeats)}", file=sys.stderr, flush=True)
        for name, cmd in sides.items():
            r = run_one(name, cmd, a.timeout, required="ms_per_step")
            if "error" in r:
                print(f"    {name}: {r['error']}", file=sys.stderr, flush=True)
            else:
                print(f"    {name}: {r['ms_per_step']:.2f} ms/step", file=sys.stderr, flush=True)
            best[name] = better(best.get(name), r, "ms_per_step")

    eager = best.get("PyTorch eager")
    torch_version = next((r["torch"] for r in best.values() if r and "torch" in r), None)

    lines = ["| side | tokens/s | ms/step | vs PyTorch eager (tokens/s) | peak RSS MB |",
             "|---|--:|--:|--:|--:|"]
    notes = []
    for name, r in best.items():
        rel = "–"
        if r and eager and "error" not in r and "error" not in eager:
            rel = f"{eager['ms_per_step'] / r['ms_per_step']:.2f}x"
        label = name
        if r and "error" not in r and r.get("compile_s") is not None:
            label += f" (compile {r['compile_s']:.0f} s)"
        lines.append(f"| {label} | {fmt(r, 'tokens_per_s', ',.0f')} | "
                     f"{fmt(r, 'ms_per_step', '.2f')} | {rel} | {fmt(r, 'peak_rss_mb', '.0f')} |")
        if r and "error" in r:
            notes.append(f"- {name}: {r['error']}")

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = "" if load_before is None else f", load average {load_before:.2f} at the start"
    block = [
        f"Measured {date} on {machine(details=False)}{load}.",
        "",
        f"Command: `{a.command or ' '.join(sys.argv)}`",
        "",
        f"One distillation training step of a randomly initialized `{a.config}` student from a "
        f"randomly initialized `{a.teacher_config}` teacher on random tokens (batch {a.batch}, "
        f"seq {a.seq}, vocab 512, f32): teacher forward without gradients, student forward, "
        f"alpha * T^2 * forward KL + (1 - alpha) * cross-entropy (T = {a.temperature:g}, "
        f"alpha = {a.alpha:g}, mean over the {a.batch * a.seq} positions), backward, global "
        "gradient-norm clip at 1, AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1 on 2-D "
        f"weights). {a.threads} threads on every side (`--threads`, `torch.set_num_threads`); "
        f"median of {a.steps} steps after {a.warmup_steps} warm-up steps, the best such median "
        f"of {max(1, a.repeats)} interleaved processes per side; tokens/s = batch * seq / "
        f"median step. PyTorch {torch_version or '(not available)'} from PyPI, a plain "
        "`nn.Module` Llama (HF LlamaForCausalLM math, SDPA attention), eager and with the "
        "student's and teacher's forwards under `torch.compile` (inductor, C++ for the CPU; "
        "loss, clipping and AdamW eager; compilation not timed). Peak RSS: each process's "
        "`ru_maxrss` (torch starts at about 0.5 GB of libraries).",
        "",
        *lines,
        "",
    ]
    if notes:
        block += ["Failures:", "", *notes, ""]
    text = "\n".join(block).rstrip() + "\n"
    print(text)
    if a.benchmarks_md:
        write_block(a.benchmarks_md, text, BEGIN, END, SECTION)
        print(f"updated {a.benchmarks_md}", file=sys.stderr)
    # A failed side is in the table; exit non-zero only when nothing was measured.
    return 0 if any(r and "error" not in r for r in best.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
