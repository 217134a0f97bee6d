"""Side-by-side CPU comparison: PyTorch eager, torch.compile, `distill bench loss --device cpu`
and `distill bench floor`, each measurement in its own process. Called by run.sh (which makes
the venv and builds the binary); stdlib only (with peerlib.py beside it), so it also runs
outside the venv.

Prints a markdown table and, unless --no-write, puts it into BENCHMARKS.md between
`<!-- cpu-peers:begin -->` and `<!-- cpu-peers:end -->` (nothing else in the file changes).
"""

import argparse
import datetime
import os
import sys

from peerlib import better, machine, run_one, write_block

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN = "<!-- cpu-peers:begin -->"
END = "<!-- cpu-peers:end -->"
SECTION = "## CPU: fused distillation loss vs PyTorch"

# (rows, vocab, dtype, kind), in the order of the table.
DEFAULT_SHAPES = [
    (256, 32000, "f32", "forward-kl"),
    (256, 32000, "bf16", "forward-kl"),
    (256, 128256, "f32", "forward-kl"),
    (256, 128256, "bf16", "forward-kl"),
    (256, 128256, "f32", "reverse-kl"),
    (256, 128256, "f32", "jsd"),
]


def parse_shape(text):
    # "256x128256:bf16:forward-kl"
    parts = text.split(":")
    rows, vocab = parts[0].lower().split("x")
    dtype = parts[1] if len(parts) > 1 else "f32"
    kind = parts[2] if len(parts) > 2 else "forward-kl"
    return int(rows), int(vocab), dtype, kind


def fmt_ms(r):
    if r is None:
        return "–"
    if "error" in r:
        return "n/a"
    return f"{r['median_ms']:.1f}"


def ratio(num, den):
    if not num or not den or "error" in num or "error" in den:
        return "–"
    return f"{num['median_ms'] / den['median_ms']:.2f}x"


def fmt_mb(x):
    return "–" if x is None else f"{x:.0f}"


def extra_mb(r):
    """Peak RSS of `distill bench loss` beyond its start and its inputs + gradient."""
    if r is None or "error" in r or None in (r.get("peak_rss_mb"), r.get("baseline_rss_mb"),
                                             r.get("io_mb")):
        return None
    return r["peak_rss_mb"] - r["baseline_rss_mb"] - r["io_mb"]


def fmt_extra(r):
    x = extra_mb(r)
    return "–" if x is None else f"{x:.1f}"


def rss(r):
    """`peak (+above start)` in MB."""
    if r is None or "error" in r or r.get("peak_rss_mb") is None:
        return "–"
    peak = r["peak_rss_mb"]
    base = r.get("baseline_rss_mb")
    if base is None:
        return fmt_mb(peak)
    return f"{peak:.0f} (+{peak - base:.0f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--distill", required=True, help="path of the distill binary")
    ap.add_argument("--python", default=sys.executable, help="python with torch installed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--shape", action="append", default=[],
                    help="ROWSxVOCAB[:DTYPE[:KIND]], repeatable (default: the standard set)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="measure every side this many times, interleaved, and keep the best "
                         "median (evens out a machine that slows down for a while)")
    ap.add_argument("--skip-compiled", action="store_true")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    ap.add_argument("--benchmarks-md", default=None, help="file to update (default: none)")
    ap.add_argument("--command", default=None, help="the command line to record")
    a = ap.parse_args()

    shapes = [parse_shape(s) for s in a.shape] or DEFAULT_SHAPES
    common = ["--iters", str(a.iters), "--warmup", str(a.warmup)]
    peer = os.path.join(HERE, "torch_peer.py")
    rows_out = []
    torch_version = None
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for rows, vocab, dtype, kind in shapes:
        print(f"{rows} x {vocab} {dtype} {kind}", file=sys.stderr, flush=True)
        shape = ["--rows", str(rows), "--vocab", str(vocab), "--dtype", dtype]
        t_args = ["--kind", kind, "--temperature", str(a.temperature), "--alpha", "0.5",
                  "--threads", str(a.threads)]
        sides = {
            "eager": [a.python, peer, "--mode", "eager", *shape, *t_args, *common],
            "ours": [a.distill, "bench", "loss", "--device", "cpu", *shape, "--kind", kind,
                     "--temperature", str(a.temperature), "--threads", str(a.threads),
                     *common],
        }
        if not a.skip_compiled:
            sides["compiled"] = [a.python, peer, "--mode", "compiled", *shape, *t_args, *common]
        # The floor is measured again for every row, interleaved with the other sides, so that
        # ours/floor compares two measurements of the same minutes (this machine's speed drifts
        # by 10-20% over minutes).
        sides["floor"] = [a.distill, "bench", "floor", *shape, "--threads", str(a.threads),
                          *common]
        best = {}
        for _ in range(max(1, a.repeats)):
            for name, cmd in sides.items():
                best[name] = better(best.get(name), run_one(name, cmd, a.timeout), "median_ms")
        eager, compiled, ours = best["eager"], best.get("compiled"), best["ours"]
        floor = best["floor"]
        for r in (eager, compiled):
            if r and "torch" in r:
                torch_version = r["torch"]
        rows_out.append((rows, vocab, dtype, kind, eager, compiled, ours, floor))
        print(f"    eager {fmt_ms(eager)} ms, compiled {fmt_ms(compiled)} ms, "
              f"ours {fmt_ms(ours)} ms, floor {fmt_ms(floor)} ms", file=sys.stderr, flush=True)

    # ---- the table ----
    lines = []
    lines.append(
        "| rows x V | dtype | kind | eager ms | compiled ms (compile s) | ours ms | floor ms "
        "| eager/ours | compiled/ours | ours/floor | eager RSS MB "
        "| compiled RSS MB | ours RSS MB | floor RSS MB | inputs + f32 grad MB "
        "| ours beyond inputs + grad MB |"
    )
    lines.append("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    extras = []
    notes = []
    for rows, vocab, dtype, kind, eager, compiled, ours, floor in rows_out:
        comp = fmt_ms(compiled)
        if compiled and "error" not in compiled and compiled.get("compile_s") is not None:
            comp += f" ({compiled['compile_s']:.0f})"
        io_mb = ours.get("io_mb") if ours and "error" not in ours else None
        if io_mb is None and floor and "error" not in floor:
            io_mb = floor.get("io_mb")
        lines.append(
            f"| {rows} x {vocab} | {dtype} | {kind} | {fmt_ms(eager)} | {comp} | {fmt_ms(ours)} "
            f"| {fmt_ms(floor)} | {ratio(eager, ours)} | {ratio(compiled, ours)} "
            f"| {ratio(ours, floor)} | {rss(eager)} | {rss(compiled)} | {rss(ours)} "
            f"| {rss(floor)} | {fmt_mb(io_mb)} | {fmt_extra(ours)} |"
        )
        if extra_mb(ours) is not None:
            extras.append(extra_mb(ours))
        for name, r in (("eager", eager), ("torch.compile", compiled), ("ours", ours),
                        ("floor", floor)):
            if r and "error" in r:
                notes.append(f"- {rows} x {vocab} {dtype} {kind}, {name}: {r['error']}")

    # ---- the targets of the benchmark issue ----
    def find(vocab, dtype, kind="forward-kl"):
        for r in rows_out:
            if r[0] == 256 and r[1] == vocab and r[2] == dtype and r[3] == kind:
                return r
        return None

    def check(label, num, den, op, bound):
        if not num or not den or "error" in num or "error" in den:
            return f"- {label}: not measured"
        x = num["median_ms"] / den["median_ms"]
        ok = x >= bound if op == ">=" else x <= bound
        return f"- {label}: {x:.2f} ({'met' if ok else 'NOT met'}, target {op} {bound})"

    targets = []
    for dtype in ("f32", "bf16"):
        r = find(128256, dtype)
        if r:
            targets.append(check(f"eager/ours at 256 x 128256 {dtype}", r[4], r[6], ">=", 8))
            targets.append(check(f"compiled/ours at 256 x 128256 {dtype}", r[5], r[6], ">=", 3))
            targets.append(check(f"ours/floor at 256 x 128256 {dtype}", r[6], r[7], "<=", 3))
    for dtype in ("f32", "bf16"):
        r = find(32000, dtype)
        if r:
            targets.append(check(f"eager/ours at 256 x 32000 {dtype}", r[4], r[6], ">=", 5))
    # The floor target holds for every loss, not only forward KL.
    for r in rows_out:
        if r[0] == 256 and r[1] == 128256 and r[3] != "forward-kl":
            targets.append(check(f"ours/floor at 256 x 128256 {r[2]} {r[3]}", r[6], r[7],
                                 "<=", 3))

    if extras:
        targets.append(
            f"- ours, peak memory beyond inputs and gradient: at most {max(extras):.1f} MB over "
            "these shapes (target: O(rows))"
        )

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = a.command or " ".join(sys.argv)
    block = []
    load = "" if load_before is None else f", load average {load_before:.2f} at the start"
    block.append(f"Measured {date} on {machine()}{load}.")
    block.append("")
    block.append(f"Command: `{command}`")
    block.append("")
    block.append(
        f"Fused forward + backward of the distillation loss (T = {a.temperature:g}, alpha = 0.5, "
        f"T^2 scaling, hard labels, mean over rows), {a.threads} threads on every side "
        f"(`torch.set_num_threads`, `--threads`), median of {a.iters} runs after {a.warmup} "
        f"warm-up runs, the best such median of {max(1, a.repeats)} interleaved processes per "
        f"side; input generation and compilation are not timed. PyTorch "
        f"{torch_version or '(not available)'} from PyPI: `log_softmax` + `kl_div` + "
        "`cross_entropy` + `.backward()`, eager and under `torch.compile` (inductor, C++ for "
        "the CPU); its gradient has the student's dtype, ours is f32. `floor`: `distill bench "
        "floor`, one pass that only reads both inputs and writes an f32 gradient-sized output, "
        "measured again for every row, interleaved with the other sides of that row. "
        "RSS columns: each process's peak resident memory in MB (torch: `ru_maxrss`; ours: "
        "`VmHWM`) and, in parentheses, its growth above the resident size before the inputs "
        "were made (torch starts at about 0.5 GB of libraries; torch.compile's growth includes "
        "the compiler's own memory). Every cell is its own process."
    )
    block.append("")
    block.extend(lines)
    block.append("")
    if targets:
        block.append("Targets of the benchmark issue:")
        block.append("")
        block.extend(targets)
        block.append("")
    if notes:
        block.append("Failures:")
        block.append("")
        block.extend(notes)
        block.append("")
    text = "\n".join(block).rstrip() + "\n"
    print(text)

    if a.benchmarks_md:
        write_block(a.benchmarks_md, text, BEGIN, END, SECTION)
        print(f"updated {a.benchmarks_md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
