#!/usr/bin/env python3
"""Regenerate the "GPU, on paper" block of BENCHMARKS.md.

Input: the table `distill ptxas --arch 80,90` prints (ptxas's registers, spills, stack and
shared memory per kernel, written by build.rs when nvcc compiled the kernels). Output: the
Markdown between `<!-- gpu-on-paper:begin -->` and `<!-- gpu-on-paper:end -->` in BENCHMARKS.md,
and nothing else in that file (other blocks are written by other tools, possibly concurrently:
the file is re-read right before it is replaced).

Nothing here is measured. The model: DRAM bytes per element, read off the kernels' loads and
stores (kernels/*.cu), divided by a bandwidth; occupancy from ptxas's numbers and the launch
configuration in src/cuda/ops.rs. Python 3 standard library only.

    bash benches/gpu_on_paper.sh                       # build, run ptxas report, rewrite block
    distill ptxas --arch 80,90 | python3 benches/gpu_on_paper.py --stdout   # print, write nothing
"""

import argparse
import csv
import math
import os
import re
import stat
import sys
import tempfile

BEGIN = "<!-- gpu-on-paper:begin -->"
END = "<!-- gpu-on-paper:end -->"

# ---- the shape the issue asks about
ROWS = 16384
VOCAB = 131072
HIDDEN = 4096  # hidden-state MSE runs over [rows, H], not V; H of a Llama-3-8B-sized model
ELEMS = ROWS * VOCAB
H_ELEMS = ROWS * HIDDEN

# ---- bandwidths (bytes/s, 1 TB = 1e12 B)
PEAK_BW = 3.35e12   # H100 SXM5 HBM3, datasheet peak
QUACK_BW = 3.0e12   # what quack reaches for softmax / cross-entropy (DESIGN.md section 5)
PCIE_BW = 2.0e12    # H100 PCIe HBM2e, datasheet peak (the GPU of Liger's published KL rows)

MIB = 1 << 20

# ---- per-SM limits used by the occupancy model (CUDA occupancy calculator / cuda_occupancy.h)
ARCHS = {
    "sm_80": dict(gpu="A100", sms=108, regs=65536, subparts=4, reg_unit=256, threads=2048,
                  warps=64, blocks=32, smem=164 * 1024, smem_reserved=1024, l2=40 * MIB),
    "sm_90": dict(gpu="H100 SXM", sms=132, regs=65536, subparts=4, reg_unit=256, threads=2048,
                  warps=64, blocks=32, smem=228 * 1024, smem_reserved=1024, l2=50 * MIB),
}
H100 = ARCHS["sm_90"]

# ---- compute cross-check: special-function unit (MUFU) rate on sm_90
MUFU_PER_CLK_PER_SM = 16   # CUDA C++ Programming Guide, arithmetic instruction throughput, cc 9.0
H100_CLOCK = 1.98e9        # H100 SXM5 max boost clock (Hz)

DK_UNROLL = 4  # kernels/common.cuh: loads of each input issued before any is used

DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2}

# ---- Liger-Kernel's published KL-divergence rows at this shape. Source: liger-kernel 0.8.5 sdist
# (`pip download liger-kernel --no-deps --no-binary :all:`), file
# benchmark/data/all_benchmark_data.csv; rows kernel_name=kl_div, metric speed (ms), x = V = 131072,
# extra config {"B": 8, "T": 2048} (B*T = 16384 rows), gpu_name "NVIDIA H100 PCIe",
# liger_version 0.2.1, timestamp 2024-09-04. Can be re-read from the CSV with --liger-csv.
LIGER_SOURCE = ("liger-kernel 0.8.5 sdist, benchmark/data/all_benchmark_data.csv "
                "(rows written by liger 0.2.1 on 2024-09-04)")
LIGER_KL = {
    "gpu": "NVIDIA H100 PCIe",
    "rows": 16384,
    "vocab": 131072,
    # (provider, mode): (p50, p20, p80) in ms
    "speed": {
        ("liger", "forward"): (8.697919845581055, 8.690688133239746, 8.703583717346191),
        ("torch", "forward"): (40.818641662597656, 40.816402435302734, 40.82087707519531),
        ("liger", "full"): (59.70220947265625, 59.70220947265625, 59.70220947265625),
        ("torch", "full"): (92.06393432617188, 92.06393432617188, 92.06393432617188),
    },
}


class Fail(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# input


def parse_ptxas(text):
    """The table `distill ptxas` prints: arch registers spill_stores spill_loads stack_bytes
    smem_bytes kernel."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise Fail("empty ptxas report (was the crate built with nvcc?)")
    header = lines[0].split()
    want = ["arch", "registers", "spill_stores", "spill_loads", "stack_bytes", "smem_bytes", "kernel"]
    if header != want:
        raise Fail(f"unexpected ptxas table header {header}, expected {want}")
    out = {}
    for ln in lines[1:]:
        f = ln.split()
        if len(f) != 7:
            raise Fail(f"malformed ptxas line: {ln!r}")
        arch, regs, sst, sld, stack, smem, kernel = f
        out[(arch, kernel)] = dict(regs=int(regs), spill_st=int(sst), spill_ld=int(sld),
                                   stack=int(stack), smem=int(smem))
    for a in ARCHS:
        if not any(k[0] == a for k in out):
            raise Fail(f"the ptxas report has no {a} kernels (run `distill ptxas --arch 80,90`)")
    return out


def read_liger_csv(path):
    """The kl_div speed rows at the V closest to VOCAB from Liger's benchmark CSV."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["kernel_name"] == "kl_div" and r["metric_name"] == "speed" and r["x_name"] == "V":
                rows.append(r)
    if not rows:
        raise Fail(f"{path}: no kl_div speed rows")
    v = min({int(float(r["x_value"])) for r in rows}, key=lambda x: abs(x - VOCAB))
    speed, gpu, bt = {}, set(), set()
    for r in rows:
        if int(float(r["x_value"])) != v:
            continue
        speed[(r["kernel_provider"], r["kernel_operation_mode"])] = (
            float(r["y_value_50"]), float(r["y_value_20"]), float(r["y_value_80"]))
        gpu.add(r["gpu_name"])
        cfg = re.findall(r'"(B|T)": (\d+)', r["extra_benchmark_config_str"])
        d = dict(cfg)
        if "B" in d and "T" in d:
            bt.add(int(d["B"]) * int(d["T"]))
    if len(gpu) != 1 or len(bt) != 1:
        raise Fail(f"{path}: kl_div rows at V={v} mix GPUs {gpu} or shapes {bt}")
    return {"gpu": gpu.pop(), "rows": bt.pop(), "vocab": v, "speed": speed}


# ------------------------------------------------------------------------------------------------
# model


def threads_for(n):
    """src/cuda/ops.rs: about 8 elements per thread, whole warps, 32..1024 threads."""
    t = -(-n // 8)
    t = -(-t // 32) * 32
    return max(32, min(1024, t))


def occupancy(arch, regs, smem_static, threads):
    """Resident blocks per SM, as cuda_occupancy.h computes it: registers are allocated per warp
    in units of 256 and split evenly over the SM's 4 sub-partitions; each block also reserves
    1 KB of shared memory."""
    a = ARCHS[arch]
    warps_per_block = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // a["reg_unit"]) * a["reg_unit"]
    warps_per_sub = (a["regs"] // a["subparts"]) // regs_per_warp
    limits = {
        "registers": (warps_per_sub * a["subparts"]) // warps_per_block,
        "threads": a["threads"] // (warps_per_block * 32),
        "shared memory": a["smem"] // (smem_static + a["smem_reserved"]),
        "blocks/SM cap": a["blocks"],
    }
    blocks = min(limits.values())
    warps = blocks * warps_per_block
    limiter = [k for k, v in limits.items() if v == blocks]
    return dict(blocks=blocks, warps=warps, occ=warps / a["warps"], limiter=limiter,
                regs_per_warp=regs_per_warp, by=limits)


KD_RE = re.compile(r"^dk_kd_(fkl|rkl|jsd)_(f32|f16|bf16)_(f32|f16|bf16)_(f32|f16|bf16)$")
SM_RE = re.compile(r"^dk_softmax_(fwd|bwd)_(f32|f16|bf16)$")
HID_RE = re.compile(r"^dk_hidden_mse_(f32|f16|bf16)_(f32|f16|bf16)_(f32|f16|bf16)$")

FAMILY_ORDER = ["dk_kd_fkl", "dk_kd_rkl", "dk_kd_jsd", "dk_softmax_fwd", "dk_softmax_bwd",
                "dk_hidden_mse", "dk_prepare", "dk_reduce"]


def family(kernel):
    for f in FAMILY_ORDER:
        if kernel == f or kernel.startswith(f + "_"):
            return f
    return "other"


def kernel_model(kernel):
    """Bytes per element (upper = every pass from DRAM, lower = only the first read from DRAM),
    the first pass's loaded bytes per element (what must stay in L2 for the lower bound), the
    element count at the modeled shape and the launch block size. None for O(rows) kernels."""
    m = KD_RE.match(kernel)
    if m:
        kind, s, t, g = m.groups()
        S, T, G = DTYPE_BYTES[s], DTYPE_BYTES[t], DTYPE_BYTES[g]
        reads = 3 if kind == "jsd" else 2
        return dict(upper=reads * (S + T) + G, lower=S + T + G, first=S + T, elems=ELEMS,
                    threads=threads_for(VOCAB), n=VOCAB,
                    formula=f"{reads}(S+T)+G")
    m = SM_RE.match(kernel)
    if m:
        d, x = m.groups()
        X = DTYPE_BYTES[x]
        if d == "fwd":
            return dict(upper=3 * X, lower=2 * X, first=X, elems=ELEMS, threads=threads_for(VOCAB),
                        n=VOCAB, formula="2X+X")
        return dict(upper=5 * X, lower=3 * X, first=2 * X, elems=ELEMS, threads=threads_for(VOCAB),
                    n=VOCAB, formula="2(Y+dY)+dX")
    m = HID_RE.match(kernel)
    if m:
        S, T, G = (DTYPE_BYTES[x] for x in m.groups())
        return dict(upper=S + T + G, lower=S + T + G, first=None, elems=H_ELEMS,
                    threads=threads_for(HIDDEN), n=HIDDEN, formula="S+T+G")
    return None


def ms(nbytes, bw):
    return nbytes / bw * 1e3


# ------------------------------------------------------------------------------------------------
# rendering helpers


def fmt_ms(x):
    return f"{x:.2f}"


def fmt_gb(nbytes):
    return f"{nbytes / 1e9:.2f}"


def fmt_mib(nbytes):
    return f"{nbytes / MIB:.0f} MiB"


def fmt_kib(nbytes):
    return f"{nbytes / 1024:.0f} KiB"


def table(header, rows, align=None):
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


ONE_BLOCK = ("dk_prepare", "dk_reduce")  # launched as a single block (ops.rs `one_block`)


def pct_range(values):
    lo, hi = min(values), max(values)
    return f"{lo:.0%}" if lo == hi else f"{lo:.0%}-{hi:.0%}"


def rng(values):
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


# ------------------------------------------------------------------------------------------------
# the block


def render(ptx, liger, nvcc_version):
    kernels = sorted({k for (_, k) in ptx})
    unknown = [k for k in kernels if family(k) == "other"]
    occ = {}
    for (arch, k), e in ptx.items():
        mdl = kernel_model(k)
        threads = mdl["threads"] if mdl else 1024
        occ[(arch, k)] = occupancy(arch, e["regs"], e["smem"], threads)

    def kd_blocks(kinds, combo, arch="sm_90"):
        names = [f"dk_kd_{kd}_{combo}" for kd in kinds]
        return min(occ[(arch, n)]["blocks"] for n in names if (arch, n) in occ)

    out = []
    w = out.append

    # -- intro
    w("**On paper: no number in this section was measured.** No GPU has been lent to this project "
      "yet. Every figure below comes from a model: DRAM bytes per element read off the kernels' "
      "loads and stores (`kernels/*.cu`), ptxas's register and shared-memory report, the launch "
      "configuration of `src/cuda/ops.rs`, and datasheet bandwidths. The arithmetic is shown so it "
      "can be checked and replaced by measurements when a GPU is available.")
    w("")
    w("Regenerate: `bash benches/gpu_on_paper.sh`. It builds the crate with nvcc (`$NVCC`, or the "
      "CUDA 13 venv that `.ci/run` creates), runs `target/release/distill ptxas --arch 80,90` and "
      "pipes the report to `benches/gpu_on_paper.py`, which rewrites only this block "
      "(between the `gpu-on-paper` markers). "
      f"ptxas numbers below: {nvcc_version or 'nvcc version not recorded'}.")
    w("")

    # -- assumptions
    w("### Assumptions")
    w("")
    w(f"- Shape: rows = {ROWS:,}, V = {VOCAB:,}, so rows x V = {ELEMS:,} elements (2^31). "
      f"Hidden-state MSE: rows x H with H = {HIDDEN:,}.")
    w(f"- Launch (`src/cuda/ops.rs`): one block per row, `threads_for(n)` = clamp(roundup32(ceil(n/8)), "
      f"32, 1024); at V = {VOCAB:,} that is {threads_for(VOCAB)} threads ({VOCAB // threads_for(VOCAB)} "
      f"elements per thread); hidden MSE at H = {HIDDEN:,}: {threads_for(HIDDEN)} threads.")
    w(f"- H100 SXM: {PEAK_BW / 1e12:.2f} TB/s peak HBM3, {H100['sms']} SMs, "
      f"{H100['l2'] // MIB} MiB L2. quack's measured softmax/cross-entropy bandwidth, "
      f"{QUACK_BW / 1e12:.1f} TB/s (DESIGN.md section 5), is used as the attainable rate. "
      f"A100 ({ARCHS['sm_80']['sms']} SMs, {ARCHS['sm_80']['l2'] // MIB} MiB L2) appears only for "
      "occupancy.")
    w("- Time = bytes / bandwidth: the kernels are assumed bandwidth-bound (a compute cross-check "
      "follows). Launch overhead and the O(rows) traffic (label 8 B/row, row loss 4 B/row, the "
      "`dk_prepare` and `dk_reduce` launches) are left out: at 16,384 rows the labels are read "
      "twice and the row losses written and read once, about 0.4 MB, against gigabytes for "
      "the logits.")
    w("- Units: 1 GB = 1e9 B, 1 TB/s = 1e12 B/s, MiB = 2^20 B; times in ms.")
    w("")

    # -- bytes per element
    w("### DRAM bytes per element, from the code")
    w("")
    w("S, T, G, X, Y, dY, dX: bytes per element of the student logits, teacher logits, gradient, "
      "softmax input, output, output gradient, input gradient (f32 = 4, f16/bf16 = 2). "
      "Upper bound: every pass over the row comes from DRAM. Lower bound: only the first read "
      "does, the re-reads hit L2.")
    w("")
    w(table(
        ["kernel family", "what the code does per row", "upper", "lower"],
        [
            ["`dk_kd_fkl_*`, `dk_kd_rkl_*` (loss + gradient)",
             "pass 1 reads s and t (online max/sum; reverse KL also its running KL); pass 2 reads "
             "both again, recomputes the probabilities, writes the gradient (over s when in place)",
             "2(S+T)+G", "S+T+G"],
            ["`dk_kd_jsd_*` (loss + gradient)",
             "pass 1 statistics; pass 2 re-reads for the loss and sum_k p_s(k)(log p_s - log m); "
             "pass 3 re-reads and writes the gradient",
             "3(S+T)+G", "S+T+G"],
            ["`dk_kd_*`, loss only (no gradient buffer)",
             "passes 1 and 2, no store (JSD skips pass 3)", "2(S+T)", "S+T"],
            ["`dk_kd_*`, alpha = 0 (cross-entropy only)",
             "the teacher pointer is never read (`t_read = nullptr`); with a gradient the student is "
             "read twice (JSD: passes 1 and 3), without one once",
             "2S+G (S)", "S+G (S)"],
            ["`dk_kd_*`, ignored row (label = ignore_index)",
             "writes a zero gradient row, reads nothing", "G", "G"],
            ["`dk_softmax_fwd_*`",
             "pass 1 reads x (online max/sum); pass 2 reads x, writes y", "2X+X", "X+X"],
            ["`dk_softmax_bwd_*`",
             "softmax: pass 1 reads y and dy (the dot); pass 2 reads both, writes dx. "
             "log_softmax: pass 1 reads dy only", "2(Y+dY)+dX (log: dY+Y+dY+dX)", "Y+dY+dX"],
            ["`dk_hidden_mse_*`",
             "one pass: reads s and t, writes the gradient (if asked)", "S+T+G", "S+T+G"],
            ["`dk_prepare`, `dk_reduce`",
             "one block: labels (8 B/row) / row losses (4 B/row); O(rows), latency-bound",
             "O(rows)", "O(rows)"],
        ],
        align=["l", "l", "l", "l"]))
    w("")
    w("Stores are whole coalesced 32-byte sectors (a warp writes 32 consecutive elements), so a "
      "store costs its bytes once, with no read-for-ownership. An in-place gradient (G = S) writes "
      "over lines pass 2 has just read: same DRAM bytes as a separate buffer of that dtype, no extra "
      "allocation. Probabilities are never stored.")
    w("")

    # -- which bound applies
    w("### Which bound applies at V = 131,072: rows in flight vs L2")
    w("")
    w("Between the first read of an element and its re-read, every other row in flight reads its own "
      "first pass, so the re-read hits L2 only if (blocks per SM x SMs x first-pass bytes per row) "
      "fits in L2. Blocks per SM come from the occupancy table below (sm_90).")
    w("")
    l2 = H100["l2"]
    crows = []
    cases_l2 = [
        ("KL (fkl, rkl)", ["fkl", "rkl"], "bf16_bf16_bf16"),
        ("KL (fkl, rkl)", ["fkl", "rkl"], "f32_f32_f32"),
        ("JSD", ["jsd"], "bf16_bf16_bf16"),
        ("JSD", ["jsd"], "f32_f32_f32"),
    ]
    for label, kinds, combo in cases_l2:
        s, t, _ = combo.split("_")
        first = DTYPE_BYTES[s] + DTYPE_BYTES[t]
        b = kd_blocks(kinds, combo)
        inflight = b * H100["sms"]
        ws = inflight * first * VOCAB
        vstar = l2 // (inflight * first)
        crows.append([f"{label}, {s}/{t}", f"{b} x {H100['sms']} = {inflight}",
                      f"{first} x {VOCAB:,} = {fmt_kib(first * VOCAB)}",
                      fmt_mib(ws), f"{ws / l2:.2f}",
                      "upper" if ws > l2 else "near lower", f"{vstar:,}"])
    for d in ["bf16", "f32"]:
        for kk, first_mult, lab in [("fwd", 1, "softmax fwd"), ("bwd", 2, "softmax bwd")]:
            k = f"dk_softmax_{kk}_{d}"
            if ("sm_90", k) not in occ:
                continue
            b = occ[("sm_90", k)]["blocks"]
            first = first_mult * DTYPE_BYTES[d]
            inflight = b * H100["sms"]
            ws = inflight * first * VOCAB
            vstar = l2 // (inflight * first)
            crows.append([f"{lab}, {d}", f"{b} x {H100['sms']} = {inflight}",
                          f"{first} x {VOCAB:,} = {fmt_kib(first * VOCAB)}",
                          fmt_mib(ws), f"{ws / l2:.2f}",
                          "upper" if ws > l2 else "near lower", f"{vstar:,}"])
    w(table(["kernel, inputs", "rows in flight (blocks/SM x SMs)", "first-pass bytes per row",
             "in flight", "/ 50 MiB L2", "bound at V = 131,072", "V below which it fits L2"],
            crows))
    w("")
    w("At V = 131,072 every row-kernel's working set exceeds the 50 MiB L2, so on paper the re-reads "
      "come from DRAM and the **upper bound is the prediction**; the lower bound is what keeping "
      "the row on chip (quack's approach) or a smaller V would give. The crossover V in the last "
      "column is soft: the L2 is not a perfect LRU and is split into two partitions, so partial "
      "hits above it and misses below it are both possible.")
    w("")

    # -- occupancy
    w("### Registers, spills, shared memory, occupancy (ptxas)")
    w("")
    w("Per-SM limits: 65,536 registers allocated per warp in units of 256 and split over 4 "
      "sub-partitions, 2,048 threads, 32 blocks, shared memory 164 KB (sm_80) / 228 KB (sm_90) "
      "with 1 KB reserved per block. Blocks/SM = min(register, thread, shared-memory, block "
      "limits); occupancy = active warps / 64. The block size is the launch size at V = 131,072 "
      f"(hidden MSE: at H = {HIDDEN:,}). `dk_prepare` and `dk_reduce` are launched as a single "
      "block (1,024 threads at 16,384 rows), so occupancy does not apply to them.")
    w("")
    frows = []
    for fam in FAMILY_ORDER + (["other"] if unknown else []):
        ks = [k for k in kernels if family(k) == fam]
        if not ks:
            continue
        for arch in ARCHS:
            es = [(k, ptx[(arch, k)]) for k in ks if (arch, k) in ptx]
            if not es:
                continue
            os_ = [occ[(arch, k)] for k, _ in es]
            mdl = kernel_model(ks[0])
            threads = mdl["threads"] if mdl else 1024
            spills = sum(e["spill_st"] + e["spill_ld"] for _, e in es)
            lim = sorted({x for o in os_ for x in o["limiter"]})
            frows.append([f"`{fam}`" + (f" ({len(ks)})" if len(ks) > 1 else ""), arch,
                          rng([e["regs"] for _, e in es]),
                          "none" if spills == 0 else f"{spills} B",
                          rng([e["stack"] for _, e in es]),
                          rng([e["smem"] for _, e in es]), threads,
                          "1 (grid of one)" if fam in ONE_BLOCK else rng([o["blocks"] for o in os_]),
                          "-" if fam in ONE_BLOCK else rng([o["warps"] for o in os_]),
                          "-" if fam in ONE_BLOCK else pct_range([o["occ"] for o in os_]),
                          "-" if fam in ONE_BLOCK else ", ".join(lim)])
    w(table(["kernels (instantiations)", "arch", "registers", "spills", "stack B", "smem B",
             "block", "blocks/SM", "warps/SM", "occupancy", "limited by"], frows))
    w("")

    # what it takes to get 2 blocks of 1024 threads
    w("Two 1,024-thread blocks per SM need at most 32 registers per thread "
      "(65,536 / 2,048); one block needs at most 64, which `__launch_bounds__(1024)` guarantees. "
      "Every `dk_kd_*` instantiation uses more than 32, so the fused loss runs **one row per SM, "
      "32 of 64 warps (50%)** on both architectures, limited by registers, not by threads or "
      "shared memory.")
    w("")
    odd = []
    for k in kernels:
        if family(k) in ("dk_softmax_fwd", "dk_softmax_bwd", "dk_hidden_mse"):
            o80, o90 = occ.get(("sm_80", k)), occ.get(("sm_90", k))
            if o80 and o90 and o80["blocks"] != o90["blocks"]:
                odd.append(f"`{k}` ({ptx[('sm_80', k)]['regs']} registers on sm_80: "
                           f"{o80['occ']:.0%}; {ptx[('sm_90', k)]['regs']} on sm_90: "
                           f"{o90['occ']:.0%})")
    if odd:
        w("The same register cliff differs between architectures for " + "; ".join(odd) + ".")
    w("")

    # -- predicted times
    w("### Predicted time on an H100 SXM, rows = 16,384, V = 131,072")
    w("")
    w(f"time = rows x V x (bytes per element) / bandwidth. Example, forward KL with bf16 student and "
      f"teacher and the gradient written in place: upper 2(2+2)+2 = 10 B/element; "
      f"{ELEMS:,} x 10 B = {fmt_gb(ELEMS * 10)} GB; / 3.35 TB/s = {fmt_ms(ms(ELEMS * 10, PEAK_BW))} ms, "
      f"/ 3.0 TB/s = {fmt_ms(ms(ELEMS * 10, QUACK_BW))} ms. Bold: the bound that applies at this "
      "shape (see the L2 table).")
    w("")
    combos = [("bf16", "bf16", "bf16", "bf16 s + bf16 t, bf16 grad in place"),
              ("bf16", "bf16", "f32", "bf16 s + bf16 t, f32 grad"),
              ("f32", "f32", "f32", "f32 s + f32 t, f32 grad")]
    prow = []

    def add(case, dt, formula, up, lo, elems, upper_applies=True):
        bu, bl = up * elems, lo * elems
        t = [ms(bu, PEAK_BW), ms(bl, PEAK_BW), ms(bu, QUACK_BW), ms(bl, QUACK_BW)]
        cells = [fmt_ms(x) for x in t]
        if up != lo:
            if upper_applies:
                cells[0], cells[2] = f"**{cells[0]}**", f"**{cells[2]}**"
            else:
                cells[1], cells[3] = f"**{cells[1]}**", f"**{cells[3]}**"
        prow.append([case, dt, formula, f"{up} / {lo}", f"{fmt_gb(bu)} / {fmt_gb(bl)}"] + cells)

    for s, t, g, lab in combos:
        S, T, G = DTYPE_BYTES[s], DTYPE_BYTES[t], DTYPE_BYTES[g]
        add("forward / reverse KL + CE, loss + gradient", lab, "2(S+T)+G / S+T+G",
            2 * (S + T) + G, S + T + G, ELEMS)
    for s, t, g, lab in combos:
        S, T, G = DTYPE_BYTES[s], DTYPE_BYTES[t], DTYPE_BYTES[g]
        add("JSD + CE, loss + gradient", lab, "3(S+T)+G / S+T+G", 3 * (S + T) + G, S + T + G, ELEMS)
    for s, t, _, lab in [combos[0], combos[2]]:
        S, T = DTYPE_BYTES[s], DTYPE_BYTES[t]
        add("any kind, loss only", f"{s} s + {t} t", "2(S+T) / S+T", 2 * (S + T), S + T, ELEMS)
    for s, t, g, lab in [combos[0], combos[2]]:
        S, G = DTYPE_BYTES[s], DTYPE_BYTES[g]
        add("alpha = 0 (CE only), loss + gradient", f"{s} s, {g} grad (teacher unread)",
            "2S+G / S+G", 2 * S + G, S + G, ELEMS)
    for d in ["bf16", "f32"]:
        X = DTYPE_BYTES[d]
        add("softmax forward", d, "2X+X / X+X", 3 * X, 2 * X, ELEMS)
    for d in ["bf16", "f32"]:
        X = DTYPE_BYTES[d]
        add("softmax backward", d, "2(Y+dY)+dX / Y+dY+dX", 5 * X, 3 * X, ELEMS)
    for d in ["bf16", "f32"]:
        X = DTYPE_BYTES[d]
        add(f"hidden MSE, rows x H = 16,384 x {HIDDEN:,}", f"{d} s + {d} t, {d} grad",
            "S+T+G", 3 * X, 3 * X, H_ELEMS)
    w(table(["case", "dtypes", "bytes/element (upper / lower)", "B/elem", "GB moved",
             "ms @ 3.35 TB/s upper", "lower", "ms @ 3.0 TB/s upper", "lower"], prow,
            align=["l", "l", "l", "r", "r", "r", "r", "r", "r"]))
    w("")
    w("log_softmax backward reads one dY fewer: 4X upper (bf16: "
      f"{fmt_ms(ms(ELEMS * 8, PEAK_BW))} / {fmt_ms(ms(ELEMS * 8, QUACK_BW))} ms at 3.35 / 3.0 TB/s). "
      "`dk_prepare` and `dk_reduce` are single-block launches over O(rows) data: microseconds, "
      "dominated by launch latency, not modeled.")
    w("")

    # -- cross-checks
    w("### Cross-checks the bandwidth model rests on (also on paper)")
    w("")
    # bytes in flight
    w("**Bytes in flight (Little's law).** Bandwidth needs bytes in flight = bandwidth x DRAM "
      "latency. Each thread issues `DK_UNROLL` = 4 loads of each input before using any "
      "(`kernels/common.cuh`); if the compiler keeps them in flight, an SM has resident threads x "
      "4 x (first-pass bytes per element) outstanding, and the latency that can be hidden at "
      "3.35 TB/s is that times 132 SMs / 3.35 TB/s:")
    w("")
    lrows = []
    lcases = [("KL / JSD, bf16 s + bf16 t", "dk_kd_fkl_bf16_bf16_bf16", 4),
              ("KL / JSD, f32 s + f32 t", "dk_kd_fkl_f32_f32_f32", 8),
              ("softmax fwd, bf16", "dk_softmax_fwd_bf16", 2),
              ("softmax fwd, f32", "dk_softmax_fwd_f32", 4),
              ("softmax bwd, bf16", "dk_softmax_bwd_bf16", 4),
              ("softmax bwd, f32", "dk_softmax_bwd_f32", 8)]
    for lab, k, first in lcases:
        if ("sm_90", k) not in occ:
            continue
        o = occ[("sm_90", k)]
        th = o["warps"] * 32
        per_sm = th * DK_UNROLL * first
        total = per_sm * H100["sms"]
        lrows.append([lab, th, f"{th} x 4 x {first} = {per_sm // 1024} KiB",
                      f"{total / 1e6:.1f} MB", f"{total / PEAK_BW * 1e9:.0f} ns"])
    w(table(["kernel (sm_90)", "resident threads/SM", "bytes in flight per SM", "x 132 SMs",
             "latency hidden at 3.35 TB/s"], lrows))
    w("")
    w("H100's loaded DRAM latency is several hundred ns (not measured here), so the bf16 kernels sit "
      "at the margin of what 50% occupancy with 4-deep unrolling can cover, and the f32 ones have "
      "about twice the headroom. The loads are scalar (2 or 4 bytes per thread per instruction); "
      "quack and llm.c use 16-byte vector loads, which put more bytes in flight per instruction.")
    w("")
    # MUFU
    rate = H100["sms"] * MUFU_PER_CLK_PER_SM * H100_CLOCK
    w("**Special functions.** Counting `expf`/`log1pf` calls per element in the source (labels "
      "present, 0 < alpha < 1, gradient written) and taking each as one special-function-unit "
      f"operation at {MUFU_PER_CLK_PER_SM}/clock/SM x {H100['sms']} SMs x {H100_CLOCK / 1e9:.2f} GHz "
      f"= {rate / 1e12:.2f} T/s:")
    w("")
    mrows = []
    mufu = [
        ("forward KL", "pass 1: 3 (s at T=1, s/T, t/T); pass 2: p_s, p_t, CE = 3", 6,
         2 * (2 + 2) + 2),
        ("reverse KL", "pass 1: 3 + 1 (CE); pass 2: p_s, CE = 2 (p_t is dead code)", 6,
         2 * (2 + 2) + 2),
        ("JSD", "pass 1: 3; pass 2: p_s, p_t, logaddexp (expf + log1pf) = 4; "
         "pass 3: p_s, logaddexp, CE = 4", 11, 3 * (2 + 2) + 2),
        ("softmax fwd (softmax)", "pass 1: 1; pass 2: 1", 2, 3 * 2),
    ]
    for lab, how, n, bpe in mufu:
        t_sfu = n * ELEMS / rate * 1e3
        t_mem = ms(bpe * ELEMS, PEAK_BW)
        mrows.append([lab, how, n, fmt_ms(t_sfu), fmt_ms(t_mem), f"{t_sfu / t_mem:.0%}"])
    w(table(["kernel", "calls per element", "total", "SFU ms", "DRAM ms (bf16, upper, 3.35 TB/s)",
             "SFU / DRAM"], mrows, align=["l", "l", "r", "r", "r", "r"]))
    w("")
    w("On paper the special functions stay under the DRAM time, but the fused loss has far less "
      "slack than a softmax: against the lower (L2-hit) byte bound forward KL's "
      f"{fmt_ms(6 * ELEMS / rate * 1e3)} ms would be {6 * ELEMS / rate * 1e3 / ms(6 * ELEMS, PEAK_BW):.0%} "
      f"of {fmt_ms(ms(6 * ELEMS, PEAK_BW))} ms, before counting the FMA-pipe instructions around "
      "each `expf` (range reduction, scaling), the "
      "online-max branches and the address arithmetic. A SASS instruction count is the next check; "
      "a measurement settles it.")
    w("")

    # -- Liger
    w("### Next to Liger-Kernel's published KL-divergence time")
    w("")
    lg = liger
    sp = lg["speed"]
    w(f"Source: {LIGER_SOURCE}. Rows `kl_div`, metric `speed`, V = {lg['vocab']:,}, "
      f"B x T = {lg['rows']:,} rows (exactly this shape, so no row scaling is needed), "
      f"GPU {lg['gpu']}. The benchmark script in that sdist (and an older version of it in the "
      "repository) builds float32 inputs: `torch.randn(BT, V).log_softmax(-1)` as the input and "
      "`torch.randn(BT, V).softmax(-1)` as the target, `reduction=\"batchmean\"`; the 0.2.1 script "
      "that wrote these rows was not read, so the dtype is an assumption. "
      "**Measured by Liger on their GPU, quoted, not reproduced here.**")
    w("")
    rows_l = []
    for prov, mode in [("liger", "forward"), ("torch", "forward"), ("liger", "full"), ("torch", "full")]:
        if (prov, mode) not in sp:
            continue
        p50, p20, p80 = sp[(prov, mode)]
        rows_l.append([prov, mode, f"{p50:.2f} ({p20:.2f}-{p80:.2f})",
                       f"{p50 / lg['rows'] * 1e3:.3f}",
                       fmt_ms(p50 * PCIE_BW / PEAK_BW)])
    w(table(["provider", "mode", "ms p50 (p20-p80), H100 PCIe", "us per row",
             "scaled to 3.35 TB/s (estimate)"], rows_l, align=["l", "l", "r", "r", "r"]))
    w("")
    if ("liger", "forward") in sp:
        f_ms = sp[("liger", "forward")][0]
        eff = 2 * 4 * lg["rows"] * lg["vocab"] / (f_ms * 1e-3)
        w(f"Liger's forward reads two f32 tensors once: 2 x 4 B x {lg['rows'] * lg['vocab']:,} = "
          f"{fmt_gb(8 * lg['rows'] * lg['vocab'])} GB in {f_ms:.2f} ms = {eff / 1e12:.2f} TB/s, "
          f"about {eff / PCIE_BW:.0%} of the H100 PCIe's {PCIE_BW / 1e12:.1f} TB/s: bandwidth-bound, "
          f"which is what justifies the scaled column (x {PCIE_BW / 1e12:.1f} / "
          f"{PEAK_BW / 1e12:.2f}, an estimate, not a measurement). \"full\" is forward + backward "
          "through autograd, which also runs PyTorch's log_softmax backward on the input and "
          "accumulates the leaf gradient, so it is several kernels, not one.")
        w("")
    f32_up = 20 * ELEMS
    f32_lo = 12 * ELEMS
    w("Not the same operation: Liger's KLDiv takes log-probabilities and probabilities already "
      "computed; `dk_kd_fkl` takes raw logits, computes both softmaxes with temperature, the KL, the "
      "cross-entropy and the gradient with respect to the logits in one launch. The comparable "
      "figures of this model, for f32 in and out at the same shape:")
    w("")
    w(table(["this crate, on paper", "bytes", "at 2.0 TB/s (their GPU)", "at 3.35 TB/s", "at 3.0 TB/s"], [
        ["forward KL + CE, loss + f32 gradient, upper 2(4+4)+4 = 20 B/elem",
         f"{fmt_gb(f32_up)} GB", fmt_ms(ms(f32_up, PCIE_BW)), fmt_ms(ms(f32_up, PEAK_BW)),
         fmt_ms(ms(f32_up, QUACK_BW))],
        ["same, lower (L2 hits) 12 B/elem", f"{fmt_gb(f32_lo)} GB", fmt_ms(ms(f32_lo, PCIE_BW)),
         fmt_ms(ms(f32_lo, PEAK_BW)), fmt_ms(ms(f32_lo, QUACK_BW))],
        ["forward KL, loss only, upper 2(4+4) = 16 B/elem", f"{fmt_gb(16 * ELEMS)} GB",
         fmt_ms(ms(16 * ELEMS, PCIE_BW)), fmt_ms(ms(16 * ELEMS, PEAK_BW)),
         fmt_ms(ms(16 * ELEMS, QUACK_BW))],
    ], align=["l", "r", "r", "r", "r"]))
    w("")
    if ("liger", "full") in sp and ("liger", "forward") in sp:
        w(f"On their GPU's bandwidth the fused loss + gradient would take {fmt_ms(ms(f32_up, PCIE_BW))} ms "
          f"on paper against Liger's measured {sp[('liger', 'full')][0]:.2f} ms for forward + backward "
          f"(which starts from probabilities). The loss alone is the other way round: "
          f"{fmt_ms(ms(16 * ELEMS, PCIE_BW))} ms on paper against Liger's "
          f"{sp[('liger', 'forward')][0]:.2f} ms, "
          "because `dk_kd_*` reads the logits twice to normalize them while Liger's input arrives "
          "normalized.")
        w("")

    # -- unknown kernels
    if unknown:
        w("Kernels in the ptxas report with no byte model in this script (add one): "
          + ", ".join(f"`{k}`" for k in unknown) + ".")
        w("")

    # -- full table
    w("<details><summary>Every kernel: ptxas report, occupancy and predicted time "
      "(sm_80 / sm_90)</summary>")
    w("")
    krows = []
    for k in kernels:
        e80, e90 = ptx.get(("sm_80", k)), ptx.get(("sm_90", k))
        o80, o90 = occ.get(("sm_80", k)), occ.get(("sm_90", k))
        mdl = kernel_model(k)

        def pair(f, a, b):
            return f"{f(a) if a else '-'} / {f(b) if b else '-'}"

        spill = pair(lambda e: f"{e['spill_st']}+{e['spill_ld']}", e80, e90)
        if mdl:
            tu = ms(mdl["upper"] * mdl["elems"], PEAK_BW)
            tl = ms(mdl["lower"] * mdl["elems"], PEAK_BW)
            bpe = f"{mdl['upper']} / {mdl['lower']}"
            tcell = f"{fmt_ms(tu)} / {fmt_ms(tl)}" if tu != tl else fmt_ms(tu)
            threads = mdl["threads"]
        else:
            bpe, tcell, threads = "O(rows)", "-", 1024
        one = family(k) in ONE_BLOCK
        krows.append([f"`{k}`", pair(lambda e: e["regs"], e80, e90), spill,
                      pair(lambda e: e["stack"], e80, e90), pair(lambda e: e["smem"], e80, e90),
                      threads, "grid of one" if one else pair(lambda o: o["blocks"], o80, o90),
                      "-" if one else pair(lambda o: f"{o['occ']:.0%}", o80, o90), bpe, tcell])
    w(table(["kernel", "registers", "spill st+ld B", "stack B", "smem B", "block", "blocks/SM",
             "occupancy", "B/elem upper / lower", "ms @ 3.35 TB/s upper / lower"], krows))
    w("")
    w("Kernel names are `dk_kd_<kind>_<student>_<teacher>_<grad>`, `dk_softmax_<fwd|bwd>_<dtype>`, "
      "`dk_hidden_mse_<student>_<teacher>_<grad>`. KD and softmax rows: rows x V = 16,384 x 131,072; "
      f"hidden MSE: 16,384 x {HIDDEN:,}; softmax backward: the softmax (not log_softmax) variant.")
    w("")
    w("</details>")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# output


def replace_block(text, block, path):
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise Fail(f"{path}: expected exactly one {BEGIN} and one {END}")
    i, j = text.index(BEGIN), text.index(END)
    if j < i:
        raise Fail(f"{path}: {END} comes before {BEGIN}")
    return text[: i + len(BEGIN)] + "\n" + block.rstrip("\n") + "\n" + text[j:]


def write_block(path, block):
    """Replace only our block. The file is re-read right before writing and replaced atomically;
    if it changed between that read and the replace (another writer), try again."""
    for _ in range(5):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = replace_block(text, block, path)
        if new == text:
            return False
        d = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".gpu-on-paper.", dir=d)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(new)
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
            with open(path, encoding="utf-8") as f:
                if f.read() != text:
                    os.unlink(tmp)
                    continue
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return True
    raise Fail(f"{path} kept changing while being written; run again")


def main(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ptxas", default="-", help="`distill ptxas --arch 80,90` output ('-': stdin)")
    ap.add_argument("--benchmarks", default=os.path.join(here, "..", "BENCHMARKS.md"))
    ap.add_argument("--liger-csv", help="Liger-Kernel's benchmark/data/all_benchmark_data.csv "
                    "(default: the rows quoted in this script)")
    ap.add_argument("--nvcc-version", default="", help="recorded in the block")
    ap.add_argument("--stdout", action="store_true", help="print the block, write nothing")
    args = ap.parse_args(argv)
    try:
        if args.ptxas == "-":
            text = sys.stdin.read()
        else:
            with open(args.ptxas, encoding="utf-8") as f:
                text = f.read()
        ptx = parse_ptxas(text)
        liger = read_liger_csv(args.liger_csv) if args.liger_csv else LIGER_KL
        block = render(ptx, liger, args.nvcc_version.strip())
        if args.stdout:
            print(block)
            return 0
        changed = write_block(args.benchmarks, block)
        print(f"gpu-on-paper: {'rewrote' if changed else 'unchanged'} the block in "
              f"{os.path.normpath(args.benchmarks)}", file=sys.stderr)
        return 0
    except (Fail, OSError) as e:
        print(f"gpu_on_paper.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
