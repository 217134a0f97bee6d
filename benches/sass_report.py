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
loop. A loop body's count includes both sides of any branch inside it, so for a branchy body it
is an upper bound on the instructions one iteration issues. The fused-loss kernels' main loops
(kernels/common.cuh) handle DK_UNROLL elements per iteration, each reading a student and a
teacher logit: an innermost loop of a `dk_kd_*` kernel with at least 2 x DK_UNROLL global loads
is taken as a main loop, and its count / DK_UNROLL as its (upper-bound) instructions per
element. The loads of a loop are listed by width, as the compiler may repeat a load on both
sides of a branch, they are not a count of elements.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
UNROLL = int(re.search(r"#define DK_UNROLL (\d+)",
                       open(os.path.join(ROOT, "kernels", "common.cuh")).read()).group(1))
INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def width(op):
    """Bytes moved by one LDG/STG/LDL/STL from its opcode's suffixes (no suffix: 32 bits)."""
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
    return {
        "ldg": len(ld),
        "insns": len(body),
        "mufu": sum(op.startswith("MUFU") for op in ops),
        "ldg_bytes": sum(ld),
        "ldg_max": max(ld, default=0),
        "stg_max": max(st, default=0),
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="80,90")
    ap.add_argument("--filter", default="^dk_")
    ap.add_argument("--fatbin")
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump"))
    a = ap.parse_args()
    if not a.cuobjdump:
        sys.exit("cuobjdump not found: pass --cuobjdump (see this script's header)")
    fatbin = a.fatbin or max(glob.glob("target/release/build/distill-kernels-*/out/kernels.fatbin"),
                             key=os.path.getmtime, default=None)
    if not fatbin:
        sys.exit("no kernels.fatbin under target/release/build: build with nvcc first")
    print(f"fatbin: {fatbin}\n")
    for arch in a.arch.split(","):
        sass = subprocess.run([a.cuobjdump, "-sass", "-arch", f"sm_{arch}", fatbin],
                              capture_output=True, text=True, check=True).stdout
        regs = registers(a.cuobjdump, fatbin, arch)
        print(f"### sm_{arch}\n")
        print("| kernel | regs | SASS insns | MUFU | widest LDG / STG (B) | local ld/st | "
              "innermost loops with global loads: insns (MUFU) [insns/element] |")
        print("|---|--:|--:|--:|--:|--:|---|")
        for name, insns in sorted(parse(sass).items()):
            if not re.search(a.filter, name):
                continue
            s = summary(insns)
            cells = []
            kd = name.startswith("dk_kd_")
            for lo, hi in loops(insns):
                l = summary(insns, lo, hi)
                if l["ldg"] == 0:
                    continue
                cell = f"{l['insns']} ({l['mufu']})"
                if kd and l["ldg"] >= 2 * UNROLL:
                    cell = f"**{cell} [{l['insns'] / UNROLL:.0f}/el, LDG <= {l['ldg_max']} B]**"
                cells.append(cell)
            print(f"| `{name}` | {regs.get(name, '?')} | {s['insns']} | {s['mufu']} | "
                  f"{s['ldg_max']} / {s['stg_max']} | {s['local']} | {'; '.join(cells) or '-'} |")
        print()


if __name__ == "__main__":
    main()
