"""Causal attention for the student's passes on a CPU: torch's flash kernel forward, a backward of
query blocks in GEMMs.

torch's CPU flash backward is slow on the short rows a round trains on: SmolLM2's heads (9 query,
3 key/value heads of 64), bf16, 2 threads, forward + backward: 4 rows of 96 tokens 0.9 + 4.1 ms, 1
row of 256 1.1 + 3.8 ms, 1 row of 512 4.2 + 11.9 ms. This backward recomputes the probabilities
one block of 128 queries at a time from the forward's log-sum-exp (only the keys up to the block's
end, so the causal half is never computed), with every product a batched GEMM over the key/value
heads (the query heads of a group folded into rows) and the softmax algebra in fp32:
1.8, 2.4 and 7.7 ms for the same three. From about 700 tokens on the blocks' probabilities no
longer stay in cache and torch's backward is as fast (768: 17.7 against 16.7 ms), so longer rows
keep it (`MAX_TOKENS`). `python -m benchmarks.cpu_products`.

`attention_ref` is the plain reference; the tests hold this to float64 through autograd.
"""

from __future__ import annotations

import torch

BLOCK = 128
MAX_TOKENS = 640


def _probabilities(qb, k, lse_b, scale, start, tri):
    """exp(q·kᵀ·scale − lse) for one query block [start, start + rows) over keys [0, start + rows),
    fp32, causal inside the block. qb (B, Hk, g, rows, D), k (B, Hk, S, D), lse_b (B, Hk, g, rows, 1)."""
    rows = qb.shape[3]
    s = torch.matmul(qb, k[:, :, None, :start + rows].transpose(-1, -2)).float().mul_(scale)
    s[..., start:].masked_fill_(tri[:rows, :rows], float("-inf"))
    return s.sub_(lse_b).exp_()


class CausalAttention(torch.autograd.Function):
    """q (B, Hq, T, D), k and v (B, Hk, T, D) with Hq a multiple of Hk; causal, no mask."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        B, Hq, T, D = q.shape
        Hk = k.shape[1]
        g = Hq // Hk
        qg = q.view(B, Hk, g, T, D)
        do = dout.contiguous().to(q.dtype).view(B, Hk, g, T, D)
        lse = lse.view(B, Hk, g, T, 1)
        # rowsum(dO ∘ O): the softmax's Jacobian term, once for all blocks
        delta = (do.float() * out.view(B, Hk, g, T, D).float()).sum(-1, keepdim=True)
        dq = torch.empty_like(qg)
        dk = torch.zeros(B, Hk, T, D, dtype=torch.float32)
        dv = torch.zeros(B, Hk, T, D, dtype=torch.float32)
        tri = torch.ones(BLOCK, BLOCK, dtype=torch.bool).triu_(1)
        for start in range(0, T, BLOCK):
            end = min(start + BLOCK, T)
            rows = end - start
            p = _probabilities(qg[:, :, :, start:end], k, lse[:, :, :, start:end], ctx.scale, start, tri)
            dob = do[:, :, :, start:end]
            # dV += Pᵀ·dO and dK += dSᵀ·Q, the g query heads of a group summed as extra rows of one GEMM
            pt = p.to(q.dtype).permute(0, 1, 4, 2, 3).reshape(B, Hk, end, g * rows)
            dv[:, :, :end] += torch.matmul(pt, dob.reshape(B, Hk, g * rows, D)).float()
            dp = torch.matmul(dob, v[:, :, None, :end].transpose(-1, -2)).float()
            ds = p.mul_(dp.sub_(delta[:, :, :, start:end])).mul_(ctx.scale).to(q.dtype)
            dq[:, :, :, start:end] = torch.matmul(ds, k[:, :, None, :end])
            dst = ds.permute(0, 1, 4, 2, 3).reshape(B, Hk, end, g * rows)
            dk[:, :, :end] += torch.matmul(dst, qg[:, :, :, start:end].reshape(B, Hk, g * rows, D)).float()
        return dq.view(B, Hq, T, D), dk.to(k.dtype), dv.to(v.dtype), None


def usable(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `causal_attention` takes these: a CPU pass in grad mode (a training pass; in the first
    layer only v may need a gradient), no cache (as many keys as queries), at most MAX_TOKENS,
    query heads a multiple of key heads."""
    return (q.device.type == "cpu" and torch.is_grad_enabled() and q.dim() == 4
            and 1 < q.shape[2] == k.shape[2] <= MAX_TOKENS and q.shape[1] % k.shape[1] == 0
            and q.dtype in (torch.float32, torch.bfloat16) and k.dtype == q.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + causal mask)·v, (B, Hq, T, D); scale defaults to D^-1/2."""
    if not usable(q, k):
        raise ValueError("causal_attention takes CPU training passes of 2 to "
                         f"{MAX_TOKENS} tokens with as many keys as queries")
    return CausalAttention.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
