"""Static SASS report of the compiled kernels (issue 12, item 5, first part): for every `dk_*`
kernel of the embedded fatbin and each architecture, its registers, local memory, MUFU count,
widest global load and store, and its innermost loops, with the instructions per element of the
fused-loss kernels' loops.

    python3 benches/sass_report.py [--arch 80,90] [--filter REGEX] [--fatbin PATH] [--cuobjdump PATH]

cuobjdump comes from the PyPI wheel `nvidia-cuda-cuobjdump` (13.x reads the CUDA 13.0 cubins
build.rs makes): `python3 -m venv V && V/bin/pip install nvidia-cuda-cuobjdump`, then pass
`--cuobjdump V/lib/python3*/site-packages/nvidia/cu13/bin/cuobjdump` or put it on PATH.

What the numbers are: static counts over the SASS text, not a profile. A loop is a backward
branch and the instructions between its target and itself; "innermost" loops contain no other
loop. A loop body's count includes both sides of any branch inside it (the accumulate and the
overwrite store, say), so it is an upper bound on the instructions one iteration issues.

The fused-loss kernels (kernels/kd_loss.cu) read a row in chunks of 16 bytes of the wider input
(8 elements of a 16-bit pair, 4 when either side is f32); their hot loops are the innermost loops
with a vector load (8 bytes or more) and at least one MUFU op per element. A reading loop handles
two chunks per iteration (two named buffers), a writing loop one. Per element: loop count /
elements.
A kernel's total per element is an upper bound on its common path (soft and hard loss with a
gradient): the costliest reading loop (pass 1) plus the costliest writing loop (pass 2; JSD adds
its second-costliest reading loop, pass 2's sums, to its writing pass 3).

The row-on-chip kernels (`dk_kdc_*`, sm_90 clusters) run the same passes, but pass 1 copies each
chunk into shared memory asynchronously (LDGSTS, one commit group, LDGDEPBAR, per chunk: one chunk
per iteration) and computes it from there, and the later passes load it from there (LDS) instead
of from DRAM: their hot loops are found and counted the same way, with a vector LDS standing for
a chunk's load. Their pass 1 is the costliest loop with LDGSTS; JSD of 16-bit rows keeps its
mixture, so its pass 2 is a writing loop too (STS, no LDG: "write smem") and its total is pass 1,
the costliest "write smem" and the costliest gradient-writing loop. On sm_80-89 their bodies are
a trap (no clusters there): no loops, not gated.

--check gates them (CI runs it): no local memory in any `dk_*` kernel; every same-dtype `dk_kd_*`
(and on sm_90 `dk_kdc_*`) kernel (the issue's targets are stated for bf16 and f32 pairs) has hot loops that load 16 bytes
at a time and a total within LIMITS. Mixed pairs are reported, not gated: their 16-bit side
loads 8 bytes per chunk of 4, and their totals run a few instructions higher.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SIZE = {"f32": 4, "f16": 2, "bf16": 2}
# Instructions per element on the common path, per kind: issue 12 asked for 50, 60 and 75,
# tightened to a few percent above the costliest gated kernel of 2026-12-08 (forward KL 44.0, the
# f32 row on chip; reverse KL 49.8, the same; JSD 71.5, two-pass f16 on sm_90).
LIMITS = {"fkl": 46, "rkl": 52, "jsd": 74}
INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def width(op):
    """Bytes moved by one LDG/STG/LDS/STS/LDL/STL from its opcode's suffixes (no suffix: 32 bits)."""
    parts = op.split(".")
    for p in parts[1:]:
        if p in ("128", "64"):
            return int(p) // 8
        if p in ("U16", "S16"):
            return 2
        if p in ("U8", "S8"):
            return 1
    return 4


def parse(sass):
    """{kernel: [(address, opcode, text)]} of a `cuobjdump -sass` listing."""
    kernels, cur = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = kernels.setdefault(m.group(1), [])
            continue
        m = INSN.search(line)
        if m and cur is not None:
            text = m.group(2).strip()
            body = re.sub(r"^@!?U?P[T0-9]+\s+", "", text)
            op = body.split()[0] if body else ""
            cur.append((int(m.group(1), 16), op, text))
    return kernels


def loops(insns):
    """Innermost loops: (first index, last index) of each backward branch's span."""
    index = {a: i for i, (a, _, _) in enumerate(insns)}
    spans = []
    for i, (addr, op, text) in enumerate(insns):
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1])
            if m and int(m.group(1), 16) <= addr and int(m.group(1), 16) in index:
                spans.append((index[int(m.group(1), 16)], i))
    return [s for s in spans
            if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]


def summary(insns, lo=0, hi=None):
    body = insns[lo:(len(insns) if hi is None else hi + 1)]
    ops = [op for _, op, _ in body]
    ld = [width(op) for op in ops if op.startswith("LDG")]
    st = [width(op) for op in ops if op.startswith("STG")]
    lds = [width(op) for op in ops if op.startswith("LDS")]
    return {
        "ldg": len(ld),
        "insns": len(body),
        "mufu": sum(op.startswith("MUFU") for op in ops),
        "ldg_bytes": sum(ld),
        "ldg_max": max(ld, default=0),
        # the narrowest vector (8 B or more) load: a chunk's loads (from shared memory in the
        # row-on-chip kernels' later passes)
        "ldg_min_vec": min((w for w in ld + lds if w >= 8), default=0),
        "lds_max": max(lds, default=0),
        "sts_max": max((width(op) for op in ops if op.startswith("STS")), default=0),
        "stg_max": max(st, default=0),
        "stg": len(st),
        "sts": sum(op.startswith("STS") for op in ops),
        "commits": sum(op == "LDGDEPBAR" for op in ops),
        "local": sum(op.startswith(("LDL", "STL")) for op in ops),
    }


def registers(cuobjdump, fatbin, arch):
    out = subprocess.run([cuobjdump, "-res-usage", "-arch", f"sm_{arch}", fatbin],
                         capture_output=True, text=True, check=True).stdout
    regs, name = {}, None
    for line in out.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
        m = re.search(r"REG:(\d+)", line)
        if m and name:
            regs[name] = int(m.group(1))
    return regs


def is_kd(name):
    return name.startswith(("dk_kd_", "dk_kdc_"))


def kd_dtypes(name):
    """(kind, student, teacher, grad) of a `dk_kd_<kind>_<s>_<t>_<g>` (or `dk_kdc_...`) name."""
    kind, sd, td, gd = name.split("_", 2)[2].split("_")
    return kind, sd, td, gd


def hot_loops(name, insns, arch):
    """[(summary, elements per iteration, role)] of a dk_kd_* kernel's vector loops; role is
    "read", "write" (the gradient, STG) or "write smem" (JSD's mixture stash, row on chip)."""
    _, sd, td, _ = kd_dtypes(name)
    chunk = 16 // max(SIZE[sd], SIZE[td])
    out = []
    for lo, hi in loops(insns):
        l = summary(insns, lo, hi)
        if max(l["ldg_max"], l["lds_max"]) < 8:
            continue
        # A writing loop handles one chunk per iteration: it stores the gradient (STG), or in a
        # row-on-chip JSD kernel the log2 mixture to shared memory (STS and no LDG: pass 1's
        # stash stores come with LDG).
        role = "write" if l["stg"] else "write smem" if l["sts"] and not l["ldg"] else "read"
        elements = (2 if role == "read" else 1) * chunk
        # The row on chip's pass 1 copies chunks into shared memory asynchronously (LDGSTS), one
        # commit group (LDGDEPBAR) per chunk.
        if l["commits"]:
            elements = l["commits"] * chunk
        # Every hot loop takes at least one exponential per element; a loop with vector loads
        # and fewer MUFU ops is something else (a split row's merge of its parts' partials).
        if l["mufu"] < elements:
            continue
        out.append((l, elements, role))
    return out


def common_path(name, hot):
    """The hot loops of the common path as [(summary, elements per iteration)], the costliest
    instantiation of each pass (see the header), or None when one is missing."""
    kind, sd, _, _ = kd_dtypes(name)

    def costliest(keep, n=1):
        found = sorted(((l, e) for l, e, role in hot if keep(l, role)), key=lambda x: -x[0]["insns"] / x[1])
        return found[:n] if len(found) >= n else None

    read = lambda l, role: role == "read"  # noqa: E731
    if name.startswith("dk_kdc_"):
        passes = [costliest(lambda l, role: l["commits"] > 0)]  # pass 1 into the stash
        if kind == "jsd" and SIZE[sd] == 2:  # pass 2 keeps the mixture, pass 3 writes
            passes += [costliest(lambda l, role: role == "write smem"), costliest(lambda l, role: role == "write")]
        elif kind == "jsd":  # pass 2's sums, pass 3 writes
            passes += [costliest(lambda l, role: read(l, role) and not l["commits"]),
                       costliest(lambda l, role: role == "write")]
        else:
            passes += [costliest(lambda l, role: role == "write")]
    else:
        passes = [costliest(read, 2 if kind == "jsd" else 1), costliest(lambda l, role: role == "write")]
    if any(p is None for p in passes):
        return None
    return [x for p in passes for x in p]


def kd_total(name, hot):
    """Upper bound on the common path's instructions per element (see the header)."""
    path = common_path(name, hot)
    return None if path is None else sum(l["insns"] / e for l, e in path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="80,90")
    ap.add_argument("--filter", default="^dk_")
    ap.add_argument("--fatbin")
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump"))
    ap.add_argument("--check", action="store_true", help="fail on the gates (see the header)")
    a = ap.parse_args()
    if not a.cuobjdump:
        sys.exit("cuobjdump not found: pass --cuobjdump (see this script's header)")
    fatbin = a.fatbin or max(glob.glob("target/release/build/distill-kernels-*/out/kernels.fatbin"),
                             key=os.path.getmtime, default=None)
    if not fatbin:
        sys.exit("no kernels.fatbin under target/release/build: build with nvcc first")
    print(f"fatbin: {fatbin}\n")
    failures = []
    for arch in a.arch.split(","):
        sass = subprocess.run([a.cuobjdump, "-sass", "-arch", f"sm_{arch}", fatbin],
                              capture_output=True, text=True, check=True).stdout
        regs = registers(a.cuobjdump, fatbin, arch)
        print(f"### sm_{arch}\n")
        print("| kernel | regs | SASS insns | MUFU | widest LDG / STG (B) | local ld/st | "
              "hot loops: insns (MUFU) [insns/element, narrowest vector LDG] | total/el |")
        print("|---|--:|--:|--:|--:|--:|---|--:|")
        for name, insns in sorted(parse(sass).items()):
            if not re.search(a.filter, name):
                continue
            s = summary(insns)
            if s["local"]:
                failures.append(f"{name} sm_{arch}: {s['local']} local loads/stores")
            cells, total = [], None
            if is_kd(name) and not (name.startswith("dk_kdc_") and arch != "90"):
                hot = hot_loops(name, insns, arch)
                for l, e, role in hot:
                    load = "LDG/LDS" if name.startswith("dk_kdc_") else "LDG"
                    cells.append(f"{l['insns']} ({l['mufu']}) [{l['insns'] / e:.1f}/el, "
                                 f"{load} {l['ldg_min_vec']} B{'' if role == 'read' else ', ' + role}]")
                total = kd_total(name, hot)
                kind, sd, td, _ = kd_dtypes(name)
                if total is None:
                    failures.append(f"{name} sm_{arch}: no vectorised reading and writing loops")
                elif sd == td and total > LIMITS[kind]:
                    failures.append(f"{name} sm_{arch}: {total:.1f} instructions per element "
                                    f"(limit {LIMITS[kind]})")
                if sd == td and any(l["ldg_min_vec"] < 16 for l, _, _ in hot):
                    failures.append(f"{name} sm_{arch}: a hot loop loads narrower than 16 bytes")
            print(f"| `{name}` | {regs.get(name, '?')} | {s['insns']} | {s['mufu']} | "
                  f"{s['ldg_max']} / {s['stg_max']} | {s['local']} | {'; '.join(cells) or '-'} | "
                  f"{'' if total is None else f'{total:.1f}'} |")
        print()
    if a.check:
        for f in failures:
            print(f"sass_report: {f}", file=sys.stderr)
        if failures:
            sys.exit(1)
        print("sass_report: every gate passes")


if __name__ == "__main__":
    main()
