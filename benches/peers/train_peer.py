"""One PyTorch measurement of a distillation training step on the CPU, in its own process: the
peer of `distill bench train`.

    python train_peer.py [--config tiny] [--teacher-config small] [--batch 16] [--seq 64]
                         [--steps 20] [--warmup-steps 3] [--kind forward-kl] [--temperature 2]
                         [--alpha 0.5] [--threads 2] [--seed 0] [--compile [--no-eager]]
                         [--fixed-batch] [--check-hf]

Each timed step is what a plain PyTorch trainer would run for the step `distill bench train`
times, in float32, eagerly:

    with no_grad: t = teacher(x)                                   # (B*S, V) logits
    s = student(x)
    loss = alpha * T^2 * kl_div(log_softmax(s / T), log_softmax(t / T), log_target=True,
                                reduction="batchmean")            # forward KL, mean over rows
         + (1 - alpha) * cross_entropy(s, y)                       # y: next tokens
    loss.backward(); clip_grad_norm_(student, 1.0); AdamW.step(); zero_grad(set_to_none)

Student and teacher are randomly initialized Llama decoders written here as plain nn.Modules
(the math of Hugging Face's LlamaForCausalLM: RMSNorm, GQA attention with rotate-half RoPE and
a causal mask, SwiGLU MLP, no biases, tied embeddings), so the timing needs nothing but torch;
`--check-hf` compares the logits with transformers' LlamaForCausalLM when that is installed.

Batches are random tokens, drawn before the timing starts (a fresh batch every step unless
--fixed-batch, which trains on one batch and is the sanity check that the loss goes down).
Warm-up steps (and with --compile, the compilation in the first of them) are not timed.

Prints one JSON line: ms_per_step (median of the timed steps), tokens_per_s (batch * seq /
median step time), min/mean ms, the loss of every step, peak_rss_mb (getrusage ru_maxrss) and
baseline_rss_mb (after importing torch, before the models exist). With --compile the same
numbers for the models' forwards under torch.compile go into "compiled" (or, when compilation
or the compiled run fails, its reason into "compiled": {"error": ...}; the process still exits
0 so the caller can put the reason in its table). With --no-eager only the compiled run is
timed, and its numbers are the top-level ones (so each side can have its own process and RSS).
"""

import argparse
import json
import math
import sys
import time
import traceback

from peerlib import peak_rss_mb, reason, rss_now_mb

# Hugging Face LlamaConfig fields of the two model sizes `distill bench train` knows; the rest
# (vocab 512, 64 positions, eps 1e-5, theta 1e4, tied embeddings, init std 0.02) is shared.
CONFIGS = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4),
}
COMMON = dict(vocab_size=512, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
              initializer_range=0.02)


def build_model_classes(torch):
    """The Llama modules; defined once torch is imported (the import is timed apart)."""
    nn = torch.nn
    F = torch.nn.functional

    class RMSNorm(nn.Module):
        def __init__(self, dim, eps):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))
            self.eps = eps

        def forward(self, x):
            # HF LlamaRMSNorm: x * rsqrt(mean(x^2) + eps) * weight (in f32, as the inputs are).
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    class Attention(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.nh = c["num_attention_heads"]
            self.nkv = c["num_key_value_heads"]
            self.hd = c["hidden_size"] // self.nh
            h = c["hidden_size"]
            self.q_proj = nn.Linear(h, self.nh * self.hd, bias=False)
            self.k_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
            self.v_proj = nn.Linear(h, self.nkv * self.hd, bias=False)
            self.o_proj = nn.Linear(self.nh * self.hd, h, bias=False)

        def forward(self, x, cos, sin):
            b, s, _ = x.shape
            q = self.q_proj(x).view(b, s, self.nh, self.hd).transpose(1, 2)
            k = self.k_proj(x).view(b, s, self.nkv, self.hd).transpose(1, 2)
            v = self.v_proj(x).view(b, s, self.nkv, self.hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            # GQA as HF repeat_kv: query head h reads key/value head h // (nh / nkv).
            rep = self.nh // self.nkv
            if rep > 1:
                k = k[:, :, None].expand(b, self.nkv, rep, s, self.hd).reshape(b, self.nh, s,
                                                                               self.hd)
                v = v[:, :, None].expand(b, self.nkv, rep, s, self.hd).reshape(b, self.nh, s,
                                                                               self.hd)
            # HF's default attention implementation is SDPA too; scale 1/sqrt(head_dim).
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(o.transpose(1, 2).reshape(b, s, self.nh * self.hd))

    class MLP(nn.Module):
        def __init__(self, c):
            super().__init__()
            h, i = c["hidden_size"], c["intermediate_size"]
            self.gate_proj = nn.Linear(h, i, bias=False)
            self.up_proj = nn.Linear(h, i, bias=False)
            self.down_proj = nn.Linear(i, h, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
            self.self_attn = Attention(c)
            self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
            self.mlp = MLP(c)

        def forward(self, x, cos, sin):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            return x + self.mlp(self.post_attention_layernorm(x))

    class Llama(nn.Module):
        """LlamaForCausalLM with tied embeddings; forward returns (B, S, V) logits."""

        def __init__(self, c):
            super().__init__()
            self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
            self.layers = nn.ModuleList(Block(c) for _ in range(c["num_hidden_layers"]))
            self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
            # RoPE tables for every position, as HF LlamaRotaryEmbedding computes them:
            # inv_freq[i] = theta^(-2i/d), emb = cat(freqs, freqs). Buffers, not parameters.
            hd = c["hidden_size"] // c["num_attention_heads"]
            inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64)
                                                  .float() / hd))
            pos = torch.arange(c["max_position_embeddings"], dtype=torch.float32)
            freqs = torch.outer(pos, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.register_buffer("cos", emb.cos(), persistent=False)
            self.register_buffer("sin", emb.sin(), persistent=False)
            self.max_pos = c["max_position_embeddings"]
            std = c["initializer_range"]
            # HF _init_weights: every Linear and the embedding normal(0, std), norms at one.
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, mean=0.0, std=std)

        def forward(self, ids):
            s = ids.shape[1]
            cos, sin = self.cos[:s], self.sin[:s]
            x = self.embed_tokens(ids)
            for layer in self.layers:
                x = layer(x, cos, sin)
            # Tied lm_head: the embedding matrix, one tensor and one gradient.
            return F.linear(self.norm(x), self.embed_tokens.weight)

    return Llama


def hf_check(torch, Llama, cfg, seed):
    """Max |logit difference| between our Llama and transformers' LlamaForCausalLM, same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(**cfg, tie_word_embeddings=True, hidden_act="silu", attention_bias=False,
                     mlp_bias=False)
    torch.manual_seed(seed)
    ours = Llama(cfg)
    hf = LlamaForCausalLM(hc).eval()
    # Our parameter names are HF's without the "model." prefix (lm_head is tied).
    state = {"model." + k: v for k, v in ours.state_dict().items()}
    state["lm_head.weight"] = ours.embed_tokens.weight
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    ids = torch.randint(0, cfg["vocab_size"], (2, cfg["max_position_embeddings"]),
                        generator=torch.Generator().manual_seed(seed + 7))
    with torch.no_grad():
        a = ours(ids)
        b = hf(ids).logits
    return float((a - b).abs().max())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--teacher-config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--kind", choices=["forward-kl"], default="forward-kl")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true",
                    help="also time the step with torch.compile'd student and teacher forwards")
    ap.add_argument("--no-eager", action="store_true",
                    help="with --compile: time only the compiled step")
    ap.add_argument("--fixed-batch", action="store_true",
                    help="train on one batch (sanity check: the loss should go down)")
    ap.add_argument("--check-hf", action="store_true",
                    help="compare the logits with transformers' LlamaForCausalLM (needs it)")
    a = ap.parse_args()
    if a.no_eager and not a.compile:
        ap.error("--no-eager needs --compile")
    if a.steps < 1 or a.warmup_steps < 0 or a.batch < 1 or a.seq < 1:
        ap.error("--steps, --batch and --seq must be positive, --warmup-steps not negative")
    if a.seq > COMMON["max_position_embeddings"]:
        ap.error(f"--seq must be at most {COMMON['max_position_embeddings']}")

    scfg = dict(CONFIGS[a.config], **COMMON)
    tcfg = dict(CONFIGS[a.teacher_config], **COMMON)
    vocab = COMMON["vocab_size"]
    result = {
        "side": "torch-compiled" if a.no_eager else "torch-eager",
        "config": a.config,
        "teacher_config": a.teacher_config,
        "batch": a.batch,
        "seq": a.seq,
        "vocab": vocab,
        "steps": a.steps,
        "warmup_steps": a.warmup_steps,
        "kind": a.kind,
        "temperature": a.temperature,
        "alpha": a.alpha,
        "threads": a.threads,
        "fixed_batch": a.fixed_batch,
    }

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    result["torch"] = torch.__version__
    baseline = rss_now_mb()
    result["baseline_rss_mb"] = None if baseline is None else round(baseline, 3)
    Llama = build_model_classes(torch)

    if a.check_hf:
        try:
            result["hf_max_abs_diff"] = {
                name: hf_check(torch, Llama, dict(CONFIGS[name], **COMMON), a.seed)
                for name in sorted({a.config, a.teacher_config})
            }
        except Exception as e:  # noqa: BLE001 - an optional check; its reason goes in the JSON
            result["hf_max_abs_diff"] = {"error": reason(e)}

    T, alpha = a.temperature, a.alpha
    total = a.warmup_steps + a.steps

    # Every batch up front, so drawing them is not timed: seq + 1 random tokens per row, the
    # first seq are the input and the last seq the next-token labels, so all batch * seq
    # positions have a label (the mean of both terms is over all of them).
    g = torch.Generator().manual_seed(a.seed + 1000)
    nbatches = 1 if a.fixed_batch else total
    batches = []
    for _ in range(nbatches):
        tok = torch.randint(0, vocab, (a.batch, a.seq + 1), generator=g)
        batches.append((tok[:, :-1].contiguous(), tok[:, 1:].reshape(-1).contiguous()))

    def make_models():
        # Same seeds for the eager and the compiled run: they train the same models.
        torch.manual_seed(a.seed)
        student = Llama(scfg)
        torch.manual_seed(a.seed + 1)
        teacher = Llama(tcfg)
        teacher.requires_grad_(False)
        # AdamW's decoupled weight decay on 2-D weights only (linears and the tied embedding),
        # not on the RMSNorm gains, as the Rust trainer does.
        decay = [p for p in student.parameters() if p.dim() == 2]
        no_decay = [p for p in student.parameters() if p.dim() != 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
        return student, teacher, opt

    def loss_fn(s, t, y):
        ls = F.log_softmax(s / T, dim=-1)
        lt = F.log_softmax(t / T, dim=-1)
        # batchmean on (rows, V): the sum over the vocabulary, the mean over the rows.
        soft = F.kl_div(ls, lt, log_target=True, reduction="batchmean")
        hard = F.cross_entropy(s, y)
        return alpha * (T * T) * soft + (1.0 - alpha) * hard

    def run(compiled):
        student, teacher, opt = make_models()
        params = [p for p in student.parameters()]
        s_fwd, t_fwd = student, teacher
        if compiled:
            # Only the models' forwards (and through AOTAutograd the student's backward) are
            # compiled; the loss, clipping and AdamW stay eager, as in a typical trainer.
            s_fwd = torch.compile(student, dynamic=False)
            t_fwd = torch.compile(teacher, dynamic=False)

        def step(i):
            ids, labels = batches[i % nbatches]
            with torch.no_grad():
                t = t_fwd(ids).view(-1, vocab)
            s = s_fwd(ids).view(-1, vocab)
            loss = loss_fn(s, t, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        losses, times = [], []
        first_s = None
        for i in range(total):
            t0 = time.perf_counter()
            losses.append(step(i))
            dt = time.perf_counter() - t0
            if i == 0:
                first_s = dt
            if i >= a.warmup_steps:
                times.append(dt * 1e3)
        losses = [float(l) for l in losses]
        if not all(math.isfinite(l) for l in losses):
            raise FloatingPointError(f"non-finite loss: {losses}")
        times.sort()
        n = len(times)
        median = times[n // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2])
        out = {
            "ms_per_step": round(median, 3),
            "tokens_per_s": round(a.batch * a.seq / (median / 1e3), 1),
            "min_ms": round(times[0], 3),
            "mean_ms": round(sum(times) / n, 3),
            "first_step_s": round(first_s, 3),
            "losses": [round(l, 5) for l in losses],
        }
        if compiled:
            # The first step compiles forward and backward of both models; the rest runs the
            # compiled code, so its time minus a normal step is the compilation.
            out["compile_s"] = round(first_s - median / 1e3, 2)
        return out

    nparams = lambda c: sum(p.numel() for p in Llama(c).parameters())  # noqa: E731
    result["student_params"] = nparams(scfg)
    result["teacher_params"] = nparams(tcfg)

    if not a.no_eager:
        result.update(run(False))
    if a.compile:
        try:
            comp = run(True)
        except Exception as e:  # noqa: BLE001 - the reason goes into the table
            traceback.print_exc()
            comp = {"error": "torch.compile failed: " + reason(e)}
        if a.no_eager:
            result.update(comp)
        else:
            result["compiled"] = comp
    result["peak_rss_mb"] = round(peak_rss_mb(), 3)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
