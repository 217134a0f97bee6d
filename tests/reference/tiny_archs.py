"""Writes tests/data/tiny_qwen2/ and tests/data/tiny_mistral/: tiny random Qwen2 and Mistral
models saved by transformers with their default config.json fields (Qwen2: q/k/v biases, tied
head, `use_sliding_window: false`; Mistral: `sliding_window: 4096`, untied), a byte-level BPE
tokenizer.json trained on tests/data/two_cities.txt, and the logits transformers gives for a
fixed sequence (expected.json).

    /tmp/refenv/bin/python tests/reference/tiny_archs.py   (torch 2.15.0, transformers 5.25.0)
"""
import json
import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

here = os.path.dirname(__file__)
text = open(os.path.join(here, "..", "data", "two_cities.txt")).read()

tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator([text], trainer)
vocab = tok.get_vocab_size()
eos = tok.token_to_id("<|endoftext|>")

shapes = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, bos_token_id=eos, eos_token_id=eos)
for name, cfg, cls in [
    ("tiny_qwen2", Qwen2Config(tie_word_embeddings=True, **shapes), Qwen2ForCausalLM),
    ("tiny_mistral", MistralConfig(**shapes), MistralForCausalLM),
]:
    out = os.path.join(here, "..", "data", name)
    torch.manual_seed(0)
    model = cls(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    tok.save(os.path.join(out, "tokenizer.json"))
    ids = tok.encode(text[:400]).ids[:32]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    json.dump({"ids": ids, "logits": [round(x, 6) for x in logits.flatten().tolist()]},
              open(os.path.join(out, "expected.json"), "w"))
    print(name, vocab, len(ids), sorted(n for n, _ in model.named_parameters())[:6])
