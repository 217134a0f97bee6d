"""Writes tests/data/tiny_llama3/: a tiny random Llama with Llama 3.1's RoPE scaling, saved by
transformers (config.json, model.safetensors), and the logits transformers' LlamaForCausalLM
gives for a fixed sequence that runs past original_max_position_embeddings (expected.json).

    /tmp/refenv/bin/python tests/reference/tiny_llama3.py   (torch 2.15.0, transformers 5.25.0)
"""
import json
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

out = os.path.join(os.path.dirname(__file__), "..", "data", "tiny_llama3")
torch.manual_seed(0)
cfg = LlamaConfig(
    vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    bos_token_id=1, eos_token_id=2,
)
model = LlamaForCausalLM(cfg).float().eval()
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0.0, 0.2)
model.save_pretrained(out)
ids = [(i * 7 + 3) % 40 for i in range(48)]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
json.dump({"ids": ids, "logits": logits.flatten().tolist()}, open(os.path.join(out, "expected.json"), "w"))
print(json.load(open(os.path.join(out, "config.json"))))
