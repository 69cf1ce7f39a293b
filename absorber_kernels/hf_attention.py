"""The Triton attention as a transformers attention implementation (AttentionInterface), for
models whose attention reads plainly causal masks: prefill, decode over a cache, training."""

from __future__ import annotations

import torch

from .attention import attention_triton

HF_ATTENTION_NAME = "absorber_triton"


def _mask_is_causal(mask: torch.Tensor, t: int, s: int) -> bool:
    """True if a (B|1, 1|H, T, S) mask allows exactly what bottom-right-aligned causal attention
    allows (key j visible to query i iff j ≤ S − T + i) for every batch row and head."""
    if mask.shape[-2] != t or mask.shape[-1] != s:
        return False
    rows = torch.arange(t, device=mask.device)[:, None] + (s - t)
    causal = torch.arange(s, device=mask.device)[None, :] <= rows
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return bool((allowed == causal).all())


def hf_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers AttentionInterface entry: query (B, Hq, T, D), key/value (B, Hkv, S, D) (grouped-
    query heads come with fewer key/value heads), returns ((B, T, Hq, D) contiguous, None).

    Honours exactly causal attention over a cached prefix (the queries are the last T of the S keys).
    The mask function registered beside it (transformers' sdpa_mask) returns None when the mask is
    plainly causal and a boolean (B, 1, T, S) mask otherwise; a mask that is not the causal pattern
    (padding, packed sequences, sliding windows) is refused, as are dropout, softcapping, sinks and
    position biases."""
    t, s = query.shape[2], key.shape[2]
    if dropout:
        raise ValueError("absorber_triton attention has no dropout; call model.eval() or set attention_dropout=0")
    for name in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"absorber_triton attention does not support {name}")
    window = kwargs.get("sliding_window")
    if window is not None and window < s:
        raise ValueError(f"absorber_triton attention does not support a sliding window ({window} < {s} keys)")
    is_causal = kwargs.get("is_causal")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None:
        if not _mask_is_causal(attention_mask, t, s):
            raise ValueError("absorber_triton attention got an attention mask that is not plain causal "
                             "(padding or a custom pattern); it honours only causal attention over a "
                             "cached prefix: pass unpadded sequences, or use attn_implementation='sdpa'")
    elif t > 1 and s > t:
        # transformers only omits the mask here for a prefill into an empty static cache, where the
        # keys past T are unused slots (sdpa slices them off the same way)
        key, value, s = key[:, :, :t], value[:, :, :t], t
    if not is_causal and t > 1:
        raise ValueError("absorber_triton attention is causal only; this module asks for bidirectional attention")
    out = attention_triton(query, key, value, scale=scaling, causal=True)   # (B, Hq, T, D) view
    return out.transpose(1, 2).contiguous(), None                          # already contiguous: no copy


def register_hf_attention(name: str = HF_ATTENTION_NAME) -> str:
    """Register the kernel with transformers under `name` (attention and mask functions) and return
    the name. Switch a model with `model.set_attn_implementation(name)`, back with the old value."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, hf_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
