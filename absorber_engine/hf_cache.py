"""A transformers KV cache: the keyword a decoder takes it under and where its output holds it
(`past_key_values` through transformers 5.24, `cache` from 5.25; the old name warns there and is to
go in 5.40; setup.py allows every 5.x, so the engine asks the model rather than the version), and
the tensors it holds."""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


def cache_keyword(decoder) -> str:
    """"cache" where `decoder.forward` names a parameter so, else "past_key_values" (also for a
    forward wrapped behind *args, **kwargs: transformers takes the old name until 5.40)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def returned_cache(out):
    """The cache a decoder's output carries (None when it carries none)."""
    return out["cache"] if "cache" in out else out.get("past_key_values")


def cache_tensors(cache: DynamicCache, keep: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer (keys, values) of `cache`, cut to the first `keep` positions."""
    out = []
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        if keep is not None:
            k, v = k[..., :keep, :], v[..., :keep, :]
        out.append((k, v))
    return out
