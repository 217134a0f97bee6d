"""One PyTorch measurement of the fused distillation loss on the CPU, in its own process.

    python torch_peer.py --mode eager|compiled --rows N --vocab V --dtype f32|bf16
                         [--kind forward-kl|reverse-kl|jsd] [--temperature 2] [--alpha 0.5]
                         [--iters 10] [--warmup 2] [--threads 2] [--seed 0]

Times what a PyTorch trainer runs for the loss that `distill bench loss` computes:

    soft = T^2 * kl_div(log_softmax(s / T), log_softmax(t / T), log_target=True,
                        reduction="batchmean")                       # forward KL
    loss = alpha * soft + (1 - alpha) * cross_entropy(s, y)
    loss.backward()                                                  # d loss / d s

(reverse KL swaps the two arguments of kl_div; JSD(beta = 0.5) goes through the mixture's
log-probabilities), either eagerly or under torch.compile (inductor generates fused C++ for the
CPU). Input generation, warm-up and compilation are not timed; compilation is reported on its
own. Prints one JSON line: median_ms, min_ms, compile_s, baseline_rss_mb (after importing torch,
before the inputs exist), peak_rss_mb (getrusage ru_maxrss), or `error` when the mode cannot run
here (the process then still exits 0, so the caller can put the reason in its table).
"""

import argparse
import json
import math
import sys
import time
import traceback

from peerlib import peak_rss_mb, reason, rss_now_mb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["eager", "compiled"], required=True)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32")
    ap.add_argument("--kind", choices=["forward-kl", "reverse-kl", "jsd"], default="forward-kl")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    result = {
        "side": "torch-" + a.mode,
        "rows": a.rows,
        "vocab": a.vocab,
        "dtype": a.dtype,
        "kind": a.kind,
        "threads": a.threads,
    }

    def emit(**extra):
        result.update(extra)
        result["peak_rss_mb"] = round(peak_rss_mb(), 3)
        print(json.dumps(result), flush=True)

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    result["torch"] = torch.__version__
    baseline = rss_now_mb()
    result["baseline_rss_mb"] = None if baseline is None else round(baseline, 3)

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    T, alpha, beta = a.temperature, a.alpha, a.beta
    kind = a.kind

    def loss_fn(s, t, y):
        ls = F.log_softmax(s / T, dim=-1)
        lt = F.log_softmax(t / T, dim=-1)
        if kind == "forward-kl":
            soft = F.kl_div(ls, lt, log_target=True, reduction="batchmean")
        elif kind == "reverse-kl":
            soft = F.kl_div(lt, ls, log_target=True, reduction="batchmean")
        else:
            # log m = log(beta p_t + (1 - beta) p_s), stably.
            lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1.0 - beta))
            soft = beta * F.kl_div(lm, lt, log_target=True, reduction="batchmean") + (
                1.0 - beta
            ) * F.kl_div(lm, ls, log_target=True, reduction="batchmean")
        hard = F.cross_entropy(s, y)
        return alpha * (T * T) * soft + (1.0 - alpha) * hard

    # Inputs: teacher 2 z, student 0.8 teacher + z' (as `distill bench loss`), labels uniform.
    g = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():
        t32 = 2.0 * torch.randn(a.rows, a.vocab, generator=g)
        s32 = 0.8 * t32 + torch.randn(a.rows, a.vocab, generator=g)
        teacher = t32.to(dtype)
        student = s32.to(dtype)
        del t32, s32
    student.requires_grad_(True)
    labels = torch.randint(0, a.vocab, (a.rows,), generator=g)

    fn = loss_fn
    compile_s = None
    if a.mode == "compiled":
        try:
            fn = torch.compile(loss_fn, dynamic=False)
            t0 = time.perf_counter()
            student.grad = None
            fn(student, teacher, labels).backward()
            compile_s = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - the reason goes into the table
            traceback.print_exc()
            emit(error="torch.compile failed: " + reason(e))
            return 0

    def step():
        student.grad = None
        loss = fn(student, teacher, labels)
        loss.backward()
        return loss

    times = []
    loss = None
    try:
        for _ in range(a.warmup):
            step()
        for _ in range(a.iters):
            t0 = time.perf_counter()
            loss = step()
            times.append((time.perf_counter() - t0) * 1e3)
    except Exception as e:  # noqa: BLE001
        if a.mode != "compiled":
            raise
        traceback.print_exc()
        emit(error="torch.compile run failed: " + reason(e))
        return 0
    times.sort()
    n = len(times)
    median = times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])
    emit(
        iters=n,
        median_ms=round(median, 3),
        min_ms=round(times[0], 3),
        mean_ms=round(sum(times) / n, 3),
        compile_s=None if compile_s is None else round(compile_s, 2),
        loss=float(loss.detach().float()),
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
