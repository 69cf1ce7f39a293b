"""Causal attention with grouped-query heads and an optional prefix of cached keys/values.

The T queries are the last T of the S key positions (S − T cached ones come first), so query i
sees keys 0 .. S − T + i. That one shape serves the teacher (X's cache, then Y), the student
(no prefix, S = T) and generate() (the window's cache, then the new tokens).
"""

from __future__ import annotations

import math

import torch


def attention_ref(
    q: torch.Tensor,   # (B, Hq, T, D)
    k: torch.Tensor,   # (B, Hkv, S, D), S >= T, Hq % Hkv == 0
    v: torch.Tensor,   # (B, Hkv, S, D)
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:     # (B, Hq, T, D)
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if hq % hkv or s < t:
        raise ValueError(f"bad attention shapes q {tuple(q.shape)} k {tuple(k.shape)}")
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale            # (B, Hq, T, S)
    if causal:
        rows = torch.arange(t, device=q.device)[:, None] + (s - t)
        cols = torch.arange(s, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)
