"""The engine's attentions as transformers attention implementations (AttentionInterface): the
Triton kernel, for models whose attention reads plainly causal masks (prefill, decode over a cache,
training), and on a CPU the student's training passes through cpu_attention (torch's sdpa for
everything else)."""

from __future__ import annotations

import torch

from .attention import attention_triton
from .cpu_attention import CausalAttention, usable

HF_ATTENTION_NAME = "absorber_triton"
CPU_ATTENTION_NAME = "absorber_cpu"


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


def _right_padded_causal(mask: torch.Tensor, t: int) -> bool:
    """True if a boolean (B, 1, T, T) mask is causal attention over each row's first L_b keys (right
    padding): every real query then sees exactly its causal keys, and only padded queries, whose
    outputs no loss reads, differ from plain causal attention."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (t, t):
        return False
    valid = mask.any(dim=-2, keepdim=True)                                   # (B, 1, 1, T) keys some query sees
    causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril_()
    prefix = bool((valid[..., 1:] <= valid[..., :-1]).all())                 # no real key after padding
    return prefix and bool((mask == (causal & valid)).all())


def hf_cpu_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers AttentionInterface entry on a CPU: a training pass (grad on, no cache, at most
    cpu_attention.MAX_TOKENS of its dtype, causal, unmasked or right-padded) runs cpu_attention's
    forward and backward; anything else, torch's sdpa as transformers calls it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    t = query.shape[2]
    if torch.is_autocast_enabled("cpu"):       # as sdpa would under autocast (RoPE leaves q and k in fp32)
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    is_causal = kwargs.get("is_causal")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = not dropout and is_causal and all(kwargs.get(n) is None for n in
                                              ("softcap", "s_aux", "sinks", "position_bias", "sliding_window"))
    if (plain and usable(query, key) and not torch.compiler.is_compiling()
            and (attention_mask is None or _right_padded_causal(attention_mask, t))):
        out = CausalAttention.apply(query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register_hf_attention(name: str = HF_ATTENTION_NAME) -> str:
    """Register the kernel with transformers under `name` (attention and mask functions) and return
    the name. Switch a model with `model.set_attn_implementation(name)`, back with the old value.
    CPU_ATTENTION_NAME registers the CPU training attention instead."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, hf_cpu_attention_forward if name == CPU_ATTENTION_NAME else hf_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
