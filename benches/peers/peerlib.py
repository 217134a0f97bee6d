"""What the peer scripts share: compare.py and train_compare.py (running measurements in their
own processes, describing the machine, writing a marked block of BENCHMARKS.md) and
torch_peer.py and train_peer.py (resident-memory readings, one-line failure reasons).

Stdlib only and no torch import: compare.py and train_compare.py also run outside the venv.
The scripts import it as `from peerlib import ...`, which works because Python puts a script's
own directory first on sys.path (`python benches/peers/compare.py`, as run.sh and train.sh do).
"""

import json
import os
import platform
import resource
import subprocess
import sys
import time

# ---- the comparing side (compare.py, train_compare.py) ----


def last_json(stdout):
    """The last line of stdout that starts with `{`, parsed (None when absent or not JSON)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def run_one(label, cmd, timeout, required=None):
    """Runs one measurement; returns its JSON object, or {"error": ...}.

    With `required` (a key), a JSON object without an error whose value there is not a number
    is an error too.
    """
    print(f"  {label}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    except OSError as e:
        return {"error": f"cannot run: {e}"}
    obj = last_json(p.stdout)
    if p.returncode != 0 or obj is None:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {p.returncode}: {tail[:300]}"}
    if (required is not None and "error" not in obj
            and not isinstance(obj.get(required), (int, float))):
        return {"error": f"no {required} in its JSON"}
    obj["_wall_s"] = round(time.time() - t0, 1)
    return obj


def better(old, new, key):
    """The run with the lower `key` (a time); an error only when every run failed."""
    if old is None or "error" in old:
        return new
    if "error" in new:
        return old
    return new if new[key] < old[key] else old


def machine(details=True):
    """The CPU from lscpu (model name, CPU count; falls back to os.cpu_count).

    details=True (compare.py): also os.cpu_count, total RAM and the OS release.
    details=False (train_compare.py): also the physical core count (cores per socket * sockets).
    """
    model = cpus = cores = sockets = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "Model name" and model is None:
                model = value
            elif key == "CPU(s)" and cpus is None:
                cpus = value
            elif key == "Core(s) per socket" and cores is None:
                cores = value
            elif key == "Socket(s)" and sockets is None:
                sockets = value
    except OSError:
        pass
    if not details:
        phys = ""
        if cores and sockets and cores.isdigit() and sockets.isdigit():
            phys = f", {int(cores) * int(sockets)} cores"
        return f"{model or 'unknown CPU'}, {cpus or os.cpu_count()} CPUs{phys}"
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    return (
        f"{model or platform.processor() or 'unknown CPU'}, {cpus or os.cpu_count()} CPUs "
        f"(os.cpu_count {os.cpu_count()}), {mem or '? GiB'} RAM, {platform.system()} "
        f"{platform.release()}"
    )


def write_block(path, text, begin, end, section_title=None):
    """Replaces what lies between the `begin` and `end` markers of the file at `path` with text
    (nothing else in the file changes). When the markers are absent, appends a section with
    them, headed `section_title` (a markdown heading line); a missing file starts as
    "# Benchmarks". Written through a temporary file and a rename.
    """
    try:
        with open(path) as f:
            doc = f.read()
    except FileNotFoundError:
        doc = "# Benchmarks\n"
    start = doc.find(begin)
    stop = doc.find(end, start + len(begin)) if start >= 0 else -1
    if start >= 0 and stop >= 0:
        doc = doc[: start + len(begin)] + "\n" + text + doc[stop:]
    else:
        heading = "" if section_title is None else "\n\n" + section_title
        doc = doc.rstrip("\n") + heading + "\n\n" + begin + "\n" + text + end + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, path)


# ---- the measured side (torch_peer.py, train_peer.py) ----


def rss_now_mb():
    """This process's resident memory now in MB (VmRSS), None where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb():
    """This process's peak resident memory in MB (getrusage ru_maxrss)."""
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reason(e):
    """The first informative line of an exception, for one table cell."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return (type(e).__name__ + (": " + lines[0] if lines else ""))[:300]
