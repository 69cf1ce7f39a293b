"""The benchmark models: random-weight Llama configs built locally (nothing is downloaded).

- tiny:      2 layers, d 64, vocab 32000. Per-call overheads dominate; the LM head is most of the FLOPs.
- llama-56m: 8 layers, d 512, GQA 8/4 heads, vocab 32000 (Llama-2's): the largest Llama-family config
             whose end-to-end comparison (baseline included) runs in minutes on a 2-core CPU.
- stream:    4 layers, d 128, GQA 4/2, vocab 32000: the streaming benchmark's model, small enough to
             absorb 128k tokens in a few minutes and to hold a full KV cache of 10^4-10^5 tokens.
Weights are the transformers initialisation under torch.manual_seed(seed), fp32.
"""

from __future__ import annotations

import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SPECS: dict[str, dict] = {
    "tiny": dict(vocab_size=32000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "llama-56m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4),
    "stream": dict(vocab_size=32000, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2),
}


def model_config(name: str) -> LlamaConfig:
    return LlamaConfig(**SPECS[name], max_position_embeddings=1 << 18, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, tie_word_embeddings=False)


def build_model(name: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(model_config(name)).eval()


def describe(name: str) -> dict:
    model = build_model(name)
    layers = sum(p.numel() for p in model.model.layers.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"name": name, "arch": "llama", **SPECS[name], "params": total, "layer_params": layers,
            "dtype": "float32"}


def token_stream(length: int, vocab: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(length)]
