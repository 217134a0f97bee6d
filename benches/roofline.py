#!/usr/bin/env python3
"""The fused loss's issue-slot roofline on an H100 SXM, from the compiled SASS (issue 12, item 6).

    python3 benches/roofline.py --cuobjdump PATH [--fatbin PATH] [--write]

For each kind (forward KL, reverse KL, JSD) and dtype (bf16 in place, f32), predicted time =
max(bytes / bandwidth, instructions / issue rate, MUFU ops / MUFU rate) + reductions + launches,
with instructions and MUFU ops per element read off the sm_90 SASS of the embedded fatbin
(benches/sass_report.py: the hot loops of the common path, soft and hard loss with a gradient;
static counts, both sides of every branch, so upper bounds). Two shapes: many rows
(16,384 x 131,072, one block per row) and few rows (8 x 131,072, each row split over blocks:
src/cuda/ops.rs `split_for`). The "before" column is the same model fed with the counts of the
kernels before the rewrite (BENCHMARKS.md, "Static SASS counts ... first measurement").

A second table models the row-on-chip kernels (`dk_kdc_*`, sm_90 thread-block clusters,
src/cuda/row_schedule.rs): the row is read from DRAM once and kept in the cluster's shared memory,
so the bytes per element are those of one read and the gradient's store, and each block pays its
reductions and cluster.sync()s on a slice of the row (the cluster's blocks per row as
`RowSchedule::Auto` picks them).

Nothing here is measured: no GPU has been lent. With --write the Markdown replaces the block
between `<!-- roofline:begin -->` and `<!-- roofline:end -->` in BENCHMARKS.md.
"""
import argparse
import glob
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_report  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BEGIN, END = "<!-- roofline:begin -->", "<!-- roofline:end -->"

# ---- H100 SXM5 (datasheet; CUDA C++ Programming Guide's throughput table for cc 9.0)
SMS = 132
CLOCK = 1.98e9                  # Hz, max boost
BW = 3.35e12                    # B/s, HBM3 peak
ISSUE = SMS * 4 * CLOCK * 32    # thread-instructions/s: 4 schedulers x 1 warp-instruction/clk
MUFU = SMS * 16 * CLOCK         # MUFU results/s: 16/clk/SM
# ---- costs the model adds (assumed, not measured): a launch on a busy stream, and one block
# reduction (shuffle tree, three barriers, warp 0's tree: ~500 cycles) per row and pass.
LAUNCH_S = 3e-6
REDUCTION_S = 500 / CLOCK

MANY = (16384, 131072)
FEW = (8, 131072)
SPLIT_MIN_ELEMS = 8192  # src/cuda/ops.rs

# Per-element static counts of the kernels before the rewrite (sm_90, main loops of DK_UNROLL = 4
# elements, scalar loads), from the table "Static SASS counts of the fused-loss kernels" in
# BENCHMARKS.md: (sum of the passes' insns / 4, sum of their MUFU / 4). Forward KL bf16: loops
# 461 (24 MUFU) and 380 (16) -> 115 + 95 insns, 6 + 4 MUFU per element.
BEFORE = {("fkl", "bf16"): (115 + 95, 6 + 4), ("fkl", "f32"): (110 + 87, 6 + 4),
          ("rkl", "bf16"): (164 + 90, 8 + 3), ("rkl", "f32"): (160 + 82, 8 + 3),
          ("jsd", "bf16"): (115 + 97 + 111, 6 + 3 + 3), ("jsd", "f32"): (110 + 93 + 106, 6 + 3 + 3)}
# bytes per element with the gradient written (bf16 in place; f32 with an f32 gradient):
# two reads of student and teacher plus the store; JSD three reads.
BYTES = {("fkl", "bf16"): 10, ("rkl", "bf16"): 10, ("jsd", "bf16"): 14,
         ("fkl", "f32"): 20, ("rkl", "f32"): 20, ("jsd", "f32"): 28}
PASSES = {"fkl": 2, "rkl": 2, "jsd": 3}  # block reductions per row: statistics, sums (JSD: + pass 3)
# Row on chip: one read and the store (bf16 in place; f32 into an f32 gradient), every kind.
BYTES_ON_CHIP = {"bf16": 6, "f32": 12}
# (blocks per row, blocks per SM) that RowSchedule::Auto picks at V = 131,072
# (src/cuda/row_schedule.rs): bf16 five 512-thread blocks of 107 KiB, two per SM; f32, and bf16
# JSD with its mixture stash (8 bytes per element), five 1,024-thread blocks of about 209 KiB, one
# per SM.
CLUSTER_BLOCKS = {("fkl", "bf16"): (5, 2), ("rkl", "bf16"): (5, 2), ("jsd", "bf16"): (5, 1),
                  ("fkl", "f32"): (5, 1), ("rkl", "f32"): (5, 1), ("jsd", "f32"): (5, 1)}
# Per block, in units of one block reduction: the statistics' reduction and its cluster merge
# (one warp, one barrier: half), the sums' two (reverse KL has no sums: its loss comes from pass
# 1), and three cluster.sync()s costed like a reduction each.
SYNCS_ON_CHIP = {"fkl": 6, "rkl": 4.5, "jsd": 6}
LIGER = "Liger-Kernel's published `kl_div` at 16,384 x 131,072 on an H100 PCIe (2.0 TB/s): forward 8.70 ms, forward + backward 59.70 ms (liger 0.2.1; BENCHMARKS.md, 'Next to Liger-Kernel')"


def counts(cuobjdump, fatbin, prefix="dk_kd"):
    """{(kind, dtype): (insns/element, MUFU/element)} of the common path on sm_90."""
    sass = subprocess.run([cuobjdump, "-sass", "-arch", "sm_90", fatbin],
                          capture_output=True, text=True, check=True).stdout
    kernels = sass_report.parse(sass)
    out = {}
    for kind in ("fkl", "rkl", "jsd"):
        for dt, name in (("bf16", f"{prefix}_{kind}_bf16_bf16_bf16"), ("f32", f"{prefix}_{kind}_f32_f32_f32")):
            path = sass_report.common_path(name, sass_report.hot_loops(name, kernels[name], "90"))
            out[(kind, dt)] = (sum(l["insns"] / e for l, e in path), sum(l["mufu"] / e for l, e in path))
    return out


def predict(rows, vocab, insns, mufu, bytes_el, passes):
    elems = rows * vocab
    split = 1
    if rows < 2 * SMS:
        split = max(1, min(-(-2 * SMS // rows), vocab // SPLIT_MIN_ELEMS, 1024 // rows))
    blocks = rows * split
    # Blocks run one per SM (registers: 50% occupancy): a shape with fewer blocks than SMs gets
    # that share of the bandwidth and of the issue slots.
    share = min(1.0, blocks / SMS)
    t_mem = elems * bytes_el / (BW * share)
    t_issue = elems * insns / (ISSUE * share)
    t_mufu = elems * mufu / (MUFU * share)
    # Many rows run two 512-thread blocks per SM (src/cuda/row_schedule.rs, fused_threads): one
    # block's reductions overlap the other's streaming, so a wave of two exposes one (assumed, as
    # for the row on chip).
    per_sm = 2 if split == 1 and rows >= 2 * SMS else 1
    waves = -(-blocks // (SMS * per_sm))
    t_red = waves * passes * REDUCTION_S
    # prepare, kd, reduce; split: prepare, one launch per pass, finish, reduce
    launches = 3 if split == 1 else 3 + passes
    t = max(t_mem, t_issue, t_mufu) + t_red + launches * LAUNCH_S
    bound = max((t_mem, "bytes"), (t_issue, "issue"), (t_mufu, "MUFU"))[1]
    return t, bound, split, t_mem, t_issue, t_mufu


def fmt_t(s):
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def table(now):
    lines = ["| kind | dtype | shape | insns/el before -> now | MUFU/el now | B/el | bytes / issue / MUFU time (now) | predicted before | predicted now | bound now |",
             "|---|---|---|--:|--:|--:|---|--:|--:|---|"]
    for kind in ("fkl", "rkl", "jsd"):
        for dt in ("bf16", "f32"):
            ins, mu = now[(kind, dt)]
            ins_b, mu_b = BEFORE[(kind, dt)]
            b = BYTES[(kind, dt)]
            for shape in (MANY, FEW):
                rows, vocab = shape
                t_now, bound, split, tm, ti, tu = predict(rows, vocab, ins, mu, b, PASSES[kind])
                # Before the rewrite every row was one block, whatever the row count.
                tb = predict_before(rows, vocab, ins_b, mu_b, b, PASSES[kind])
                lines.append(
                    f"| {kind} | {dt} | {rows} x {vocab:,}{f' (split {split})' if split > 1 else ''} | "
                    f"{ins_b:.0f} -> {ins:.1f} | {mu:.1f} | {b} | {fmt_t(tm)} / {fmt_t(ti)} / {fmt_t(tu)} | "
                    f"{fmt_t(tb)} | **{fmt_t(t_now)}** | {bound} |")
    return "\n".join(lines)


def table_on_chip(now, two_pass):
    lines = ["| kind | dtype | shape | blocks per row (per SM) | insns/el | MUFU/el | B/el | bytes / issue / MUFU time | "
             "reductions and syncs | predicted (two-pass path) | predicted (row on chip) | bound |",
             "|---|---|---|--:|--:|--:|--:|---|--:|--:|--:|---|"]
    rows, vocab = MANY
    for kind in ("fkl", "rkl", "jsd"):
        for dt in ("bf16", "f32"):
            ins, mu = now[(kind, dt)]
            b = BYTES_ON_CHIP[dt]
            c, per_sm = CLUSTER_BLOCKS[(kind, dt)]
            elems = rows * vocab
            t_mem, t_issue, t_mufu = elems * b / BW, elems * ins / ISSUE, elems * mu / MUFU
            # Every SM busy; with two blocks per SM one streams while the other synchronises, so
            # a wave of two exposes one block's synchronisation (assumed: full overlap).
            waves = -(-rows * c // (SMS * per_sm))
            t_sync = waves * SYNCS_ON_CHIP[kind] * REDUCTION_S
            t = max(t_mem, t_issue, t_mufu) + t_sync + 3 * LAUNCH_S
            bound = max((t_mem, "bytes"), (t_issue, "issue"), (t_mufu, "MUFU"))[1]
            t2, _, _, _, _, _ = predict(rows, vocab, *two_pass[(kind, dt)], BYTES[(kind, dt)], PASSES[kind])
            lines.append(
                f"| {kind} | {dt} | {rows} x {vocab:,} | {c} ({per_sm}) | {ins:.1f} | {mu:.1f} | {b} | "
                f"{fmt_t(t_mem)} / {fmt_t(t_issue)} / {fmt_t(t_mufu)} | {fmt_t(t_sync)} | {fmt_t(t2)} | "
                f"**{fmt_t(t)}** | {bound} |")
    return "\n".join(lines)


def predict_before(rows, vocab, insns, mufu, bytes_el, passes):
    share = min(1.0, rows / SMS)
    elems = rows * vocab
    t = max(elems * bytes_el / (BW * share), elems * insns / (ISSUE * share), elems * mufu / (MUFU * share))
    return t + -(-rows // SMS) * passes * REDUCTION_S + 3 * LAUNCH_S


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuobjdump", required=True)
    ap.add_argument("--fatbin")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    fatbin = a.fatbin or max(glob.glob(os.path.join(ROOT, "target/release/build/distill-kernels-*/out/kernels.fatbin")),
                             key=os.path.getmtime)
    now = counts(a.cuobjdump, fatbin)
    on_chip = counts(a.cuobjdump, fatbin, "dk_kdc")
    md = "\n".join([
        BEGIN,
        "**On paper: nothing here was measured** (no GPU has been lent). Regenerate: "
        "`python3 benches/roofline.py --cuobjdump PATH --write` after a build with nvcc.",
        "",
        f"Model: predicted time = max(bytes / {BW / 1e12:.2f} TB/s, instructions / {ISSUE / 1e12:.1f} T thread-instructions/s "
        f"(132 SMs x 4 schedulers x 32 lanes x {CLOCK / 1e9:.2f} GHz), MUFU ops / {MUFU / 1e12:.2f} T/s (16/clk/SM)) "
        f"+ block reductions ({REDUCTION_S * 1e9:.0f} ns each, per row and pass, per wave of 132 blocks; many rows run two "
        "512-thread blocks per SM, whose waves of 264 expose one block's reductions) "
        f"+ launches ({LAUNCH_S * 1e6:.0f} us each, assumed). Instructions and MUFU per element: the sm_90 SASS of the "
        "common path (soft and hard loss, gradient written), static counts with both sides of every branch, so upper "
        "bounds; `before` uses the counts of the kernels before this rewrite. Bytes: two reads of student and teacher "
        "plus the gradient (JSD: three reads), i.e. the rows do not fit L2 at V = 131,072. A shape with fewer blocks than "
        "SMs gets that share of the GPU (one block per SM: 50% occupancy, register-limited). Few rows are split over "
        f"blocks (at least {SPLIT_MIN_ELEMS:,} elements each, about two blocks per SM).",
        "",
        table(now),
        "",
        "The row on chip (`dk_kdc_*`, sm_90 clusters, `RowSchedule::Auto` at this shape): one DRAM read of "
        "student and teacher and the gradient's store; instructions and MUFU from the sm_90 SASS of the "
        "dk_kdc kernels the same way. Each block holds a slice (V / blocks per row) in shared memory, so it "
        f"pays its reductions and cluster.sync()s ({REDUCTION_S * 1e9:.0f} ns per reduction, assumed) over fewer "
        "elements than the two-pass path's one block per row: exposed in full with one block per SM, once per pair "
        "with two (assumed: the other block streams meanwhile).",
        "",
        table_on_chip(on_chip, now),
        "",
        f"For comparison: {LIGER}.",
        END,
    ])
    if not a.write:
        print(md)
        return
    path = os.path.join(ROOT, "BENCHMARKS.md")
    text = open(path).read()
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + md + text[text.index(END) + len(END):]
    else:
        sys.exit("BENCHMARKS.md has no roofline markers")
    open(path, "w").write(text)


if __name__ == "__main__":
    main()
