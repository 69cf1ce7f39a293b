"""A decode step through Llama-family layers (llama, mistral, qwen2, qwen3) written as a few torch
ops per layer: the static decoder's step on a CPU (static_decode.decode_weights builds it).

Why: a decode step of a few rows reads every weight once and does little arithmetic besides, yet
through transformers' modules each layer also pays for module calls, the attention interface's
dispatch, the cache's bookkeeping and seven separate products. The random Llama's probe step (4
rows, bf16, 4 layers) took 7.7-8.3 ms for 3.35 ms of products, SmolLM2's (30 layers) 43-45 ms.
Here q, k and v are one product and the MLP's gate and up another, on weights concatenated and
reordered for oneDNN once per sampling (with the delta merged in, as decode_weights does for the
separate ones); oneDNN's product on the concatenated weight equals the separate products to the
bit. Everything else is written as transformers writes it (RMSNorm in fp32, rotary positions from
the model's own rotary module, the attention through sdpa with GQA heads packed into the query
length as transformers' sdpa path does at one query token), so the logits and states equal the
module path's to the bit (tests/test_static_decode.py).

Taken only where the module path would compute nothing else: a model of the family with a SiLU
MLP, no layer or submodule with a forward of its own or a hook (accelerate's placement, compiled
layers, a user's probe), and every delta either merged into the weights (one delta bound to all
rows) or stacked one a row, added to the products as lowrank_linear_batched_ref adds it (a bank's
recitals, a batch of sessions): `build` returns None otherwise and the steps go through the modules.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from absorber_kernels.packed_linear import Packed

FAMILY = ("llama", "mistral", "qwen2", "qwen3")


def build(runner, weight_of: Callable[[nn.Linear], torch.Tensor], dtype: torch.dtype,
          rows: int, per_row: dict | None = None) -> "FusedLayers | None":
    """The fused step of runner's model for steps of `rows` rows in `dtype`, `weight_of(linear)`
    the weight to use for each frozen linear (a delta merged in), `per_row` {linear: (A, B)} the
    deltas applied one a row, (rows, in, r) and (rows, r, out) in `dtype`; None where it does not apply."""
    cfg = runner.model.config
    per_row = per_row or {}
    if runner.model_type not in FAMILY or getattr(cfg, "hidden_act", None) != "silu":
        return None
    if any(w.A is not None and w.base not in per_row for w in runner.wrappers.values()):
        return None                                   # a delta bound that is neither merged nor given per row
    for m in runner.base.modules():
        if "forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks:
            return None
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return None
    projections = [_base(getattr(getattr(layer, part, None), name, None)) for layer in runner.layers
                   for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                       ("mlp", ("gate_proj", "up_proj", "down_proj"))) for name in names]
    if any(type(lin) is not nn.Linear or lin.weight.device.type != "cpu" for lin in projections):
        return None                                   # a quantized or offloaded linear: only its module knows
    if not all(hasattr(runner.base, name) for name in ("rotary_emb", "norm")) or not all(
            hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")
            and hasattr(layer.self_attn, "head_dim") and hasattr(layer.self_attn, "scaling") for layer in runner.layers):
        return None                                   # a layout this step does not know (another transformers)
    if _sdpa_takes_gqa():
        return None
    return FusedLayers(runner, weight_of, dtype, rows, per_row)


def _sdpa_takes_gqa() -> bool:
    """Whether transformers' sdpa path hands a masked step's grouped heads to sdpa (enable_gqa, as
    TRANSFORMERS_SDPA_FORCE_GQA=1 makes it do on a CPU) instead of packing them into the query
    length as this step does: the sums, and so the bits, would then differ. Unknown: assume it does."""
    try:
        from transformers.integrations.sdpa_attention import use_gqa_in_sdpa
    except ImportError:
        return True
    probe = torch.zeros(1, 1, 1, 64)
    return bool(use_gqa_in_sdpa(torch.ones(1, 1, 1, 1, dtype=torch.bool), probe, probe))


class FusedLayers:
    """The whole model's decode step: embedding, rotary positions, every layer, the final norm."""

    def __init__(self, runner, weight_of, dtype: torch.dtype, rows: int, per_row: dict):
        self.embed = runner.model.get_input_embeddings()
        self.rotary, self.norm = runner.base.rotary_emb, runner.base.norm
        fuse = functools.partial(_fused, weight_of=weight_of, dtype=dtype, rows=rows, per_row=per_row,
                                 scale=runner.binding.scale)
        self.layers = [_Layer(layer, fuse) for layer in runner.layers]

    def rotary_table(self, position: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos and sin (B, steps, Dh) of the positions position + 0..steps-1, each what the model's
        rotary module gives that step alone (a product and a cos or sin an element: the same bits
        at any shape); None for a rope whose frequencies follow the longest position seen
        (dynamic, longrope), which a table of every step would change. Why: per step the module is
        ten ops and its Python, a tenth of the random Llama's step beside its products."""
        rope = getattr(self.rotary, "rope_type", "default")
        if not isinstance(rope, str) or "dynamic" in rope or rope == "longrope":
            return None
        cos, sin = self.rotary(self.embed.weight, position + torch.arange(steps, device=position.device))
        return cos, _signed(sin)

    def step(self, tokens: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, caches: list,
             slot: torch.Tensor, live: int, rotary: tuple[torch.Tensor, torch.Tensor] | None = None
             ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """tokens and position (B, 1), mask (B, 1, 1, S) the attention's additive mask (0 where a
        row attends, -inf elsewhere, in the states' dtype: what sdpa makes of a boolean one at every
        call) over the static cache `caches` (one transformers StaticLayer per layer; the step
        writes its keys and values at `slot`; the attention reads its first `live` slots, those
        written so far), `rotary` this step's cos and signed sin (B, 1, Dh)
        where a table holds them -> the residual states h^0..h^L and the final normed states, each
        (B, D): one row a sequence, so every product takes its input as it is."""
        h = self.embed(tokens[:, 0])
        if rotary is None:
            cos, sin = self.rotary(h, position)
            rotary = cos, _signed(sin)
        cos, sin = rotary                                                          # (B, 1, Dh): over the heads
        states = [h]
        # Over the written slots only, as transformers' growing cache reads them: the sums of a
        # longer, masked row round otherwise in bf16 (an answer then depended on max_new_tokens).
        mask = mask[..., :live]
        for layer, cache in zip(self.layers, caches):
            h = layer(h, cos, sin, mask, cache, slot, live)
            states.append(h)
        return states, _rms_norm(h, self.norm)


class _Layer:
    """One decoder layer's step: the weights fused and reordered, the norms read from the modules
    (their weights are what decode_weights cast them to)."""

    def __init__(self, layer: nn.Module, fuse):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = fuse([attn.o_proj])
        self.gate_up = fuse([mlp.gate_proj, mlp.up_proj])
        self.down = fuse([mlp.down_proj])
        self.norms = layer.input_layernorm, layer.post_attention_layernorm
        self.qk_norms = (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else None
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.heads = _base(attn.q_proj).out_features // self.head_dim
        self.kv_heads = _base(attn.k_proj).out_features // self.head_dim
        self.inner = _base(mlp.gate_proj).out_features

    def __call__(self, h, cos, sin, mask, cache, slot, live):
        B, Dh, H, KV = h.shape[0], self.head_dim, self.heads, self.kv_heads
        qkv = self.qkv(_rms_norm(h, self.norms[0])).view(B, -1, Dh)          # (B, H + 2 KV, Dh)
        qk, v = qkv[:, :H + KV], qkv[:, H + KV:]
        if self.qk_norms is not None:
            qk = torch.cat((_rms_norm(qk[:, :H], self.qk_norms[0]), _rms_norm(qk[:, H:], self.qk_norms[1])), dim=1)
        # q's and k's heads turned together: the same ops an element as apart, half the ops. The
        # rotated half as a roll times the signed sin: the modules' products to the bit (negation is
        # exact), in two ops where rotate_half took four.
        qk = qk * cos + torch.roll(qk, Dh // 2, dims=-1) * sin
        cache.keys.index_copy_(2, slot, qk[:, H:].unsqueeze(2))
        cache.values.index_copy_(2, slot, v.unsqueeze(2))
        # At one query token the query heads sharing a key head become its query rows: the CPU's
        # flash kernel pays per (row, head) pair (4 rows, 555 positions: 8 heads of one query 1.04 ms,
        # the same as 4 groups of two queries 0.17 ms).
        q = qk[:, :H].reshape(B, KV, H // KV, Dh)
        out = F.scaled_dot_product_attention(q, cache.keys[:, :, :live], cache.values[:, :, :live], attn_mask=mask,
                                             scale=self.scale)
        h = h + self.o(out.reshape(B, H * Dh))
        gate, up = self.gate_up(_rms_norm(h, self.norms[1])).split(self.inner, dim=-1)
        # contiguous: torch's SiLU rounds differently on a strided tensor at some widths (80: yes,
        # 1,536: no); the copy keeps the step equal to the modules' to the bit at every width.
        return h + self.down(F.silu(gate.contiguous()) * up)


def _base(module: nn.Module) -> nn.Linear:
    """The frozen nn.Linear of a target (inside its delta wrapper) or of any other projection."""
    return getattr(module, "base", module)


def _fused(modules: list[nn.Module], weight_of, dtype: torch.dtype, rows: int, per_row: dict, scale: float):
    """x (B, in) -> the products of every module's linear, concatenated on the last dimension, as one,
    each linear's per-row delta added on its own columns."""
    linears = [_base(m) for m in modules]
    packed = Packed(torch.cat([weight_of(lin) for lin in linears]), dtype, rows)
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                          for lin in linears]).detach().to(dtype)
    ends = [0]
    for lin in linears:
        ends.append(ends[-1] + lin.out_features)
    deltas = [(lo, hi, *per_row[lin]) for lin, lo, hi in zip(linears, ends, ends[1:]) if lin in per_row]
    if not deltas:
        return lambda x: packed.rows(x, bias)

    def product(x):
        y, x3 = packed.rows(x, bias), x[:, None]
        for lo, hi, a, b in deltas:        # lowrank_linear_batched_ref's ops on these columns: the same bits
            y[:, lo:hi] = torch.baddbmm(y[:, None, lo:hi], torch.bmm(x3, a).mul_(scale), b)[:, 0]
        return y
    return product


def _rms_norm(h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    # torch.rms_norm without a weight is the modules' fp32 pow, mean, rsqrt and product, to the bit
    # (tests/test_static_decode.py), in one call; the weight multiplies after the cast, as theirs does.
    return norm.weight * torch.rms_norm(h.float(), h.shape[-1:], None, norm.variance_epsilon).to(h.dtype)


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == roll(x, half) * _signed(sin)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
