"""Summarizes benches/defaults_sweep.sh: the markdown tables of BENCHMARKS.md and a bar chart
(SVG, no plotting library needed) of the fraction of the hard-label-to-teacher gap each setting
closes.

    python3 benches/defaults_sweep.py OUT   (reads OUT/results.tsv, writes OUT/sweep.svg)
"""
import collections
import os
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "runs/defaults_sweep"
rows = [line.rstrip("\n").split("\t") for line in open(os.path.join(out, "results.tsv"))]
loss = {(r[0], r[1], r[2]): float(r[7]) for r in rows}
corpora = [c for c in ["gutenberg", "shakespeare", "synthetic"] if (c, "teacher", "teacher") in loss]
settings = collections.OrderedDict()
for r in rows:
    if r[1] != "teacher" and r[2] != "hard":
        settings.setdefault(r[2], (r[3], r[4] if r[5] == "-" else r[4] + " -> " + r[5], r[6]))


def closed(corpus, size, name):
    teacher, hard = loss[(corpus, "teacher", "teacher")], loss.get((corpus, size, "hard"))
    got = loss.get((corpus, size, name))
    if hard is None or got is None:
        return None
    return (hard - got) / (hard - teacher)


def cell(corpus, size, name):
    v, c = loss.get((corpus, size, name)), closed(corpus, size, name)
    if v is None:
        return "-"
    return "%.3f (%+.0f%%)" % (v, 100 * c) if c is not None else "%.3f" % v


for size, title in [("tiny", "tiny student (2 x 64)"), ("half", "half student (2 x 128)")]:
    print("\n%s: held-out loss, nats/token (gap closed)\n" % title)
    print("| kind | T | alpha | " + " | ".join(corpora) + " |")
    print("|---|---|---|" + "---|" * len(corpora))
    print("| teacher (4 x 128) | | | " + " | ".join("%.3f" % loss[(c, "teacher", "teacher")] for c in corpora) + " |")
    print("| hard labels only | | 0 | " + " | ".join(cell(c, size, "hard") for c in corpora) + " |")
    for name, (kind, t, alpha) in settings.items():
        if any((c, size, name) in loss for c in corpora):
            print("| %s | %s | %s | %s |" % (kind, t, alpha, " | ".join(cell(c, size, name) for c in corpora)))

# Grouped bars: one group per setting (tiny student), one bar per corpus.
names = [n for n in settings if any(closed(c, "tiny", n) is not None for c in corpora)]
colors = ["#1f77b4", "#d62728", "#2ca02c"]
W, H, left, top, bottom = 900, 420, 60, 30, 110
lo = min([0.0] + [closed(c, "tiny", n) or 0.0 for c in corpora for n in names])
hi = max([1.0] + [closed(c, "tiny", n) or 0.0 for c in corpora for n in names])
y = lambda v: top + (hi - v) / (hi - lo) * (H - top - bottom)
group = (W - left - 20) / max(1, len(names))
bar = group * 0.8 / max(1, len(corpora))
svg = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">' % (W, H),
       '<rect width="100%" height="100%" fill="white"/>',
       '<text x="%d" y="18" font-size="13">Fraction of the hard-label-to-teacher gap closed (tiny student, held-out text)</text>' % left]
for v in [x / 4 for x in range(int(lo * 4) - 1, int(hi * 4) + 2)]:
    if lo <= v <= hi:
        svg.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="%s"/>' % (left, W - 20, y(v), y(v), "#000" if v == 0 else "#ddd"))
        svg.append('<text x="%d" y="%.1f" text-anchor="end">%d%%</text>' % (left - 4, y(v) + 4, round(100 * v)))
for i, n in enumerate(names):
    x0 = left + i * group + group * 0.1
    for j, c in enumerate(corpora):
        v = closed(c, "tiny", n)
        if v is None:
            continue
        ya, yb = sorted([y(0), y(v)])
        svg.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>' % (x0 + j * bar, ya, bar - 1, max(yb - ya, 0.5), colors[j]))
    kind, t, alpha = settings[n]
    label = "%s T=%s a=%s" % ({"forward-kl": "FKL", "reverse-kl": "RKL", "jsd": "JSD"}[kind], t.replace(" -> ", ">"), alpha)
    cx = left + i * group + group / 2
    svg.append('<text transform="translate(%.1f,%d) rotate(40)">%s</text>' % (cx - 10, H - bottom + 12, label))
for j, c in enumerate(corpora):
    svg.append('<rect x="%d" y="%d" width="10" height="10" fill="%s"/><text x="%d" y="%d">%s</text>' % (W - 150, top + 14 * j, colors[j], W - 136, top + 9 + 14 * j, c))
svg.append("</svg>")
open(os.path.join(out, "sweep.svg"), "w").write("\n".join(svg))
print("\nwrote", os.path.join(out, "sweep.svg"))
