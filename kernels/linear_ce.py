"""Next-token cross-entropy straight from final hidden states, chunked over rows.

    z = h·Wᵀ (+ b),   loss = 1/denom · Σ_rows (lse(z) − z[target]),   dloss/dh = 1/denom · (softmax(z) − onehot)·W

The plain composition, F.cross_entropy(head(h), targets), keeps the rows × vocabulary logits and
their log-softmax alive until the backward: 150 MB for 512 tokens of SmolLM2's 49,152-token
vocabulary (bf16 logits, fp32 log-softmax). Here the gradient is formed in the forward, a chunk
of rows at a time, so at most chunk × V logits exist at once and only the (N, D) gradient is kept,
as for linear_kl. The logits' matmuls run in the autocast dtype when autocast is on (what the
plain composition does), the log-sum-exp and the gradient of z in fp32.

This is the op of both backends: the chunked reference already reads W once per chunk with no
rows × vocabulary buffer, on a GPU as on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LinearCERef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, targets, weight, bias, denom, chunk):
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        acc = torch.promote_types(dtype, torch.float32)          # fp32 for 16-bit, float64 stays float64
        with torch.autocast(dev, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            total = torch.zeros((), dtype=acc, device=h.device)
            grad = torch.empty_like(h) if h.requires_grad else None
            for i in range(0, h.shape[0], chunk):
                tgt = targets[i:i + chunk]
                z = F.linear(h[i:i + chunk].to(dtype), w, b).to(acc)
                lse = torch.logsumexp(z, dim=-1)
                total += (lse - z.gather(1, tgt[:, None]).squeeze(1)).sum()
                if grad is not None:
                    dz = z.sub_(lse[:, None]).exp_()
                    dz[torch.arange(len(tgt), device=h.device), tgt] -= 1.0
                    grad[i:i + chunk] = (torch.matmul(dz.to(dtype), w).to(acc) / denom).to(h.dtype)
        ctx.save_for_backward(grad if grad is not None else h.new_empty(0))
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None


def linear_ce_ref(
    hidden: torch.Tensor,               # (N, D), with grad
    targets: torch.Tensor,              # (N,) token ids
    head_weight: torch.Tensor,          # (V, D), frozen
    head_bias: torch.Tensor | None = None,
    denom: int | None = None,           # rows the mean is over; default N
    chunk: int = 128,
) -> torch.Tensor:                      # scalar, fp32 (float64 for float64 inputs)
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, D) and targets (N,), got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if head_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"head weight {tuple(head_weight.shape)} does not match hidden size {hidden.shape[1]}")
    if hidden.shape[0] == 0:
        return hidden.float().sum() * 0.0                     # no rows: no loss, and a zero gradient
    denom = denom if denom is not None else hidden.shape[0]
    return LinearCERef.apply(hidden, targets, head_weight.detach(),
                             None if head_bias is None else head_bias.detach(), int(denom), int(chunk))
