"""Causal attention for the student's passes on a CPU: blocks of queries through batched GEMMs and
torch's fused softmax, forward and backward.

torch's CPU flash kernel is slow on the rows a round trains on, its backward most of all (SmolLM2's
heads, 9 query and 3 key/value heads of 64, bf16, 2 threads, 554 tokens, on an AMD EPYC: 4.7 ms
forward, 14.0 ms backward). Here, 64 queries at a time, the g query heads of a key/value group are folded into the
rows of one GEMM against that group's keys up to the block's end (so the causal upper half is never
computed and no key is copied per query head), the block's causal corner is masked, and the
probabilities come from one fused `torch.softmax` in the input dtype (fp32 inside). The forward
keeps no probabilities and no log-sum-exp: the backward recomputes each block's softmax the same
way and gets dS = P ∘ (dP − rowsum(dP ∘ P)) from torch's fused softmax backward, so a block's
elementwise work is two fused passes, not the eight casts and in-place ops of an unfused softmax.
The same 554 tokens: 3.2 + 6.6 ms; faster than torch's kernels at every length measured in bf16,
96 to 4,096 tokens, and in fp32 up to 800 (`python -m benchmarks.cpu_products`; MAX_TOKENS). On a
Xeon with AMX torch's forward is the faster one (its GEMMs run on the tile unit) while this
backward still is: there the forward is torch's (`_sdpa_forward_taken`).

`attention_ref` is the plain reference; the tests hold this to float64 through autograd.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

BLOCK = 64
# The longest rows it takes, per dtype, where it measured faster than torch's sdpa forward + backward
# (SmolLM2's heads, 2 threads; `python -m benchmarks.cpu_products` times both dtypes to 1,024): in bf16
# at every length up to 4,096 (2,048: 85 against 133 ms), so up to 8,192 (a block's four (g·64, T)
# products: 37 MB); in fp32 its forward is the slower one from about 800 tokens, even at 1,024 (0.97x)
# and past it (3,000: 372 against 329 ms), so 768 (800: 31 against 32 ms).
MAX_TOKENS = {torch.bfloat16: 8192, torch.float32: 768}


@functools.lru_cache(maxsize=8)
def _corner(rows: int, device: torch.device) -> torch.Tensor:
    """The causal mask inside a block, (rows, rows), True above the diagonal; read only."""
    return torch.ones(rows, rows, dtype=torch.bool, device=device).triu_(1)


def _block_probabilities(qb, k, start, rows, groups):
    """softmax(qb·kᵀ) over keys [0, start + rows) for one query block, causal inside it: qb (BH,
    g·rows, D) already scaled, k (BH, T, D); (BH, g·rows, start + rows) in q's dtype."""
    end = start + rows
    s = torch.bmm(qb, k[:, :end].transpose(1, 2))
    s.view(s.shape[0], groups, rows, end)[..., start:].masked_fill_(_corner(rows, s.device), float("-inf"))
    return torch.softmax(s, dim=-1)


def _grouped(x: torch.Tensor, heads_k: int) -> torch.Tensor:
    """(B, H, T, D) -> (B·Hk, H/Hk, T, D): the query heads of each key/value group side by side."""
    B, H, T, D = x.shape
    return x.reshape(B * heads_k, H // heads_k, T, D)


class CausalAttention(torch.autograd.Function):
    """q (B, Hq, T, D), k and v (B, Hk, T, D) with Hq a multiple of Hk; causal, no mask. The output
    is a (B, Hq, T, D) view of a (B, T, Hq, D) tensor: the layout the attention's output projection
    reads, so transformers' transpose back needs no copy."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        B, Hq, T, D = q.shape
        out = _sdpa_forward(q, k, v, scale) if _sdpa_forward_taken(q) else _blocks_forward(q, k, v, scale)
        return out.view(B, T, Hq, D).transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        B, Hq, T, D = q.shape
        Hk = k.shape[1]
        g = Hq // Hk
        need_q, need_k, need_v = ctx.needs_input_grad[:3]     # the first layer's q and k may need none
        qs = _grouped(q * ctx.scale, Hk)
        do = _grouped(dout.to(q.dtype), Hk)
        kk, vv = k.reshape(B * Hk, T, D), v.reshape(B * Hk, T, D)
        dq = torch.empty(B * Hk, g, T, D, dtype=q.dtype, device=q.device) if need_q else None
        # dK and dV sum over query blocks (and a group's query heads): fp32 accumulators
        dk = torch.zeros(B * Hk, T, D, dtype=torch.float32, device=q.device) if need_k else None
        dv = torch.zeros(B * Hk, T, D, dtype=torch.float32, device=q.device) if need_v else None
        for start in range(0, T, BLOCK):
            rows = min(BLOCK, T - start)
            end = start + rows
            qb = qs[:, :, start:end].reshape(B * Hk, g * rows, D)
            dob = do[:, :, start:end].reshape(B * Hk, g * rows, D)
            p = _block_probabilities(qb, kk, start, rows, g)
            if need_v:
                dv[:, :end] += torch.bmm(p.transpose(1, 2), dob)
            if not (need_q or need_k):
                continue
            dp = torch.bmm(dob, vv[:, :end].transpose(1, 2))
            ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)
            if need_q:
                dq[:, :, start:end] = torch.bmm(ds, kk[:, :end]).view(B * Hk, g, rows, D)
            if need_k:
                dk[:, :end] += torch.bmm(ds.transpose(1, 2), qb)      # qb carries the scale dK needs
        return (dq.view(B, Hq, T, D).mul_(ctx.scale) if need_q else None,
                dk.view(B, Hk, T, D).to(k.dtype) if need_k else None,
                dv.view(B, Hk, T, D).to(v.dtype) if need_v else None, None)


def _blocks_forward(q, k, v, scale):
    """The blocks' forward: (B, T, Hk, g, D)."""
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    g = Hq // Hk
    qs = _grouped(q * scale, Hk)
    kk, vv = k.reshape(B * Hk, T, D), v.reshape(B * Hk, T, D)
    out = q.new_empty(B, T, Hk, g, D)
    for start in range(0, T, BLOCK):
        rows = min(BLOCK, T - start)
        p = _block_probabilities(qs[:, :, start:start + rows].reshape(B * Hk, g * rows, D), kk, start, rows, g)
        o = torch.bmm(p, vv[:, :start + rows]).view(B, Hk, g, rows, D)
        out[:, start:start + rows] = o.permute(0, 3, 1, 2, 4)
    return out


def _sdpa_forward(q, k, v, scale):
    """torch's fused forward, laid out as the blocks' (B, T, Hq, D)."""
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).contiguous()


@functools.cache
def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:                                    # not Linux: no way to tell, the blocks' forward
        return False


def _sdpa_forward_taken(q: torch.Tensor) -> bool:
    """Whether the forward is torch's sdpa rather than the blocks': in bf16 on a CPU with AMX tiles.
    torch's flash forward runs its GEMMs on the tile unit there: on a Xeon with AMX 3x faster than
    the blocks (SmolLM2's heads, bf16: 0.23 against 0.74 ms at 256 tokens, 0.95 against 2.62 at 554,
    2.27 against 7.79 at 1,024), while on the EPYC this project measured first (AVX512-BF16, no
    AMX) the blocks' was the faster (3.2 against 4.7 ms at 554). In fp32 the margin is thin on the
    Xeon at a round's lengths (2x at 256 tokens, 1.25x at 554) and reversed on the EPYC: the blocks.
    A rule, not a timing: the two forwards round differently, and a stream must absorb to the same
    delta in every process. $ABSORBER_CPU_ATTENTION_FORWARD = "sdpa" or "blocks" overrides it. The
    backward is the blocks' either way: torch's CPU backward is the slower on both CPUs, and the
    blocks' needs nothing from the forward but q, k and v."""
    pinned = os.environ.get("ABSORBER_CPU_ATTENTION_FORWARD")
    if pinned in ("sdpa", "blocks"):
        return pinned == "sdpa"
    return q.dtype == torch.bfloat16 and _cpu_has_amx()


def usable(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `causal_attention` takes these: a CPU pass in grad mode (a training pass; in the first
    layer only v may need a gradient), no cache (as many keys as queries), at most MAX_TOKENS of its
    dtype, query heads a multiple of key heads."""
    return (q.device.type == "cpu" and torch.is_grad_enabled() and q.dim() == 4 and q.dtype in MAX_TOKENS
            and 1 < q.shape[2] == k.shape[2] <= MAX_TOKENS[q.dtype] and q.shape[1] % k.shape[1] == 0
            and k.dtype == q.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + causal mask)·v, (B, Hq, T, D); scale defaults to D^-1/2."""
    if not usable(q, k):
        raise ValueError("causal_attention takes CPU training passes in bf16 or fp32 of 2 to "
                         f"{MAX_TOKENS.get(q.dtype)} tokens with as many keys as queries")
    return CausalAttention.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
