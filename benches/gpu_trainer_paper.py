#!/usr/bin/env python3
"""The on-paper FLOP and byte counts of BENCHMARKS.md's "GPU trainer, on paper" section.

Nothing here is measured: shapes in, arithmetic out. A matmul of P weights costs 2P FLOPs per
token forward and 4P backward; causal attention 2 x 2 x (T/2) x NH x D per token per layer forward
(QK^T and PV over on average T/2 keys) and twice that backward.
"""

H100_BF16 = 989e12  # dense bf16 FLOP/s, H100 SXM datasheet


def model(layers, c, nh, nkv, d, inter, vocab, seq, batch):
    matmul = layers * (c * nh * d * 2 + c * nkv * d * 2 + 3 * c * inter) + vocab * c
    att_fwd = layers * 2 * 2 * (seq / 2) * nh * d
    tokens = seq * batch
    fwd = (2 * matmul + att_fwd) * tokens
    return matmul, fwd, 3 * fwd, 3 * att_fwd * tokens


def main():
    rows = [
        ("demo student", (2, 64, 4, 2, 16, 176, 512, 64, 16)),
        ("demo teacher (forward)", (4, 128, 8, 4, 16, 352, 512, 64, 16)),
        ("SmolLM2-135M shape", (30, 576, 9, 3, 64, 1536, 49152, 2048, 8)),
    ]
    for name, shape in rows:
        matmul, fwd, train, att = model(*shape)
        print(f"{name}: matmul weights {matmul / 1e6:.3f} M, forward {fwd / 1e9:.3f} GFLOP, "
              f"train {train / 1e9:.3f} GFLOP, attention {att / train:.1%} of train")
    layers, c, nh, nkv, d, inter, vocab, seq, batch = rows[2][1]
    _, _, train, _ = model(*rows[2][1])
    print(f"135M step at 40% MFU: {train / (0.4 * H100_BF16) * 1e3:.1f} ms")
    # The warp-per-row attention reads every earlier key and value row (f32) once per query row.
    kv_bytes = batch * layers * nh * sum(range(1, seq + 1)) * d * 4 * 2
    print(f"warp-per-row attention K/V reads: forward {kv_bytes / 1e12:.2f} TB, "
          f"forward + backward {3 * kv_bytes / 1e12:.2f} TB per step")


if __name__ == "__main__":
    main()
