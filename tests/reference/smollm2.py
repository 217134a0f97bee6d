"""Reference values for tests/smollm2.rs, from an independent implementation: Hugging Face
transformers loading the same GGUF file (its own GGUF reader, dequantization through gguf-py,
its own un-permutation of Q/K and its own LlamaForCausalLM), computed in float32 on the CPU.

    python -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch transformers gguf numpy
    /tmp/refenv/bin/python tests/reference/smollm2.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

Recorded with torch 2.15.0, transformers 5.25.0, gguf 0.19.0.
"""
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
text = open(os.path.join(os.path.dirname(__file__), "..", "data", "two_cities.txt")).read()
ids = tok(text, add_special_tokens=False)["input_ids"]
print("tokens", len(ids), "first", ids[:12], "last", ids[-4:])
with torch.no_grad():
    x = torch.tensor([ids])
    logits = model(x).logits[0].double()
    lp = torch.log_softmax(logits[:-1], dim=-1)
    nll = -lp[torch.arange(len(ids) - 1), x[0, 1:]]
    print("mean loss %.10f" % nll.mean().item())
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    print("prompt", prompt)
    print("greedy", out[0, len(prompt):].tolist())
    print("text", repr(tok.decode(out[0, len(prompt):])))
