"""Writes tests/data/tiny_qwen2.gguf and tests/data/tiny_llama_bpe.gguf from the tiny models of
tiny_archs.py, the way llama.cpp's converter lays them out, and records what Hugging Face
transformers (an independent GGUF reader) makes of them in tests/data/tiny_gguf_expected.json:
the logits of a fixed sequence and the token ids of a text chosen to tell pre-tokenizers apart.

- tiny_qwen2.gguf: architecture `qwen2` (q/k/v biases, rows as in HF), pre-tokenizer `qwen2`.
- tiny_llama_bpe.gguf: the tiny Mistral model written as architecture `llama` (Q and K rows
  permuted as the converter does), pre-tokenizer `llama-bpe` (Llama 3's split).

Both carry a byte-level BPE of 300 tokens (the models' vocabulary size) trained here on
two_cities.txt and runs of digits, so that it has merges of digits (which the two splits cut
differently); the merges are the same under every split, so only the split differs.

    /tmp/refenv/bin/python tests/reference/tiny_gguf.py   (transformers 5.25.0, gguf 0.17)
"""
import json
import os

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

here = os.path.dirname(__file__)
data = os.path.join(here, "..", "data")

# Digits in runs (Qwen2 splits every digit, Llama 3 groups of three), contractions in both cases
# (Llama 3 matches them case-insensitively), letters after punctuation, accents, CJK, an emoji,
# CR LF, tabs, runs of spaces and punctuation, and the end-of-text token.
TRICKY = (
    "In 1775, 12345678 men said: \"I'M here, we'Ll go; they'd\tNOT.\"\r\n\r\n"
    "  naïve café -- 日本語 ok 🙂!!! (x+y)*2=z...   end  \n<|endoftext|>Next."
)


def permute(w, heads):
    """llama.cpp's converter: HF row h*d + half*d/2 + i goes to row h*d + 2*i + half."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{NAMES[module]}.{kind}"


def train_tokenizer():
    text = open(os.path.join(data, "two_cities.txt")).read()
    digits = " ".join(str(n * 7919 % 100000) for n in range(20000))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text, digits], trainer)
    return json.loads(tok.to_str())


TOKENIZER = train_tokenizer()


def write(src, arch, pre, out):
    cfg = json.load(open(os.path.join(src, "config.json")))
    tj = TOKENIZER
    assert len(tj["model"]["vocab"]) == cfg["vocab_size"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tj["added_tokens"]}
    w = gguf.GGUFWriter(out, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(64)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_vocab_size(len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_add_bos_token(False)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg["tie_word_embeddings"]:
            continue
        a = t.numpy().astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            a = permute(a, cfg["num_attention_heads"])
        elif arch == "llama" and name.endswith("k_proj.weight"):
            a = permute(a, cfg["num_key_value_heads"])
        w.add_tensor(gguf_name(name), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


expected = {"text": TRICKY}
for src, arch, pre, name in [
    ("tiny_qwen2", "qwen2", "qwen2", "tiny_qwen2.gguf"),
    ("tiny_mistral", "llama", "llama-bpe", "tiny_llama_bpe.gguf"),
]:
    write(os.path.join(data, src), arch, pre, os.path.join(data, name))
    tok = AutoTokenizer.from_pretrained(data, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(data, gguf_file=name, dtype=torch.float32).eval()
    ids = json.load(open(os.path.join(data, src, "expected.json")))["ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    hf = json.load(open(os.path.join(data, src, "expected.json")))["logits"]
    assert max(abs(a - b) for a, b in zip(logits.flatten().tolist(), hf)) < 1e-5
    text_ids = tok(TRICKY, add_special_tokens=False)["input_ids"]
    assert tok.decode(text_ids) == TRICKY
    expected[name] = {
        "ids": ids,
        "logits": [round(x, 6) for x in logits.flatten().tolist()],
        "text_ids": text_ids,
    }
    print(name, type(model).__name__, len(text_ids), "tokens")
ids = {k: v["text_ids"] for k, v in expected.items() if k != "text"}
assert ids["tiny_qwen2.gguf"] != ids["tiny_llama_bpe.gguf"], "the text should tell the splits apart"
json.dump(expected, open(os.path.join(data, "tiny_gguf_expected.json"), "w"))
