"""Tiny random causal LMs of every supported architecture, built from configs (no downloads)."""

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

VOCAB = 97   # deliberately not a power of two

_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

BUILDERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_COMMON)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=12)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=4096,
                                               bos_token_id=1, eos_token_id=2)),
}
ARCHS = tuple(BUILDERS)


def make_model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = BUILDERS[arch]()
    # Random init leaves tiny weights and near-uniform outputs; scale them up so contexts
    # actually change what the model says and the tests have something to measure.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model.eval()


def random_ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def base_logits(model, ids: list[int]) -> torch.Tensor:
    """The bare model's next-token logits at each of `ids`, read after its BOS token, as the
    engine reads every sequence it starts (AbsorberConfig.prefix_bos)."""
    with torch.no_grad():
        return model(torch.tensor([[model.config.bos_token_id] + list(ids)])).logits[0, 1:].float()
