"""Next-token cross-entropy straight from final hidden states, chunked over rows, optionally with
the KL to a kept teacher distribution read off the same logits.

    z = h·Wᵀ (+ b),   loss = 1/denom · Σ_{rows with a target} (lse(z) − z[target])
                           + kl_weight · Σ_rows KL(p_t ‖ softmax(z))                 (with teacher_p)
    dloss/dz = (1/denom)·[target](softmax(z) − onehot) + kl_weight·(softmax(z) − p_t)

The plain composition, F.cross_entropy(head(h), targets), keeps the rows × vocabulary logits and
their log-softmax alive until the backward: 150 MB for 512 tokens of SmolLM2's 49,152-token
vocabulary (bf16 logits, fp32 log-softmax). Here the gradient is formed in the forward, a chunk
of rows at a time, so at most chunk × V logits exist at once and only the (N, D) gradient is kept,
as for linear_kl. The logits' matmuls run in the autocast dtype when autocast is on (what the
plain composition does), the log-sum-exp and the gradient of z in fp32.

With `teacher_p` (linear_kl.teacher_side of the same rows, temperature 1) it also computes
linear_kl_ref's KL from the same product with the head: a recite probe's next-token loss on X and
its KL to the teacher then cost one pair of head GEMMs instead of two (the engine's default round).
A negative target leaves its row out of the cross-entropy (it takes the KL only).

This is the op of both backends: the chunked reference already reads W once per chunk with no
rows × vocabulary buffer, on a GPU as on the CPU.
"""

from __future__ import annotations

import torch

from ._common import grad_dtype
from .head_chunks import ROWS, HeadChunks, check_head_inputs, exp_rows_, gemm_dtype, row_dot, sub_


class LinearCERef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, targets, weight, bias, denom, chunk, teacher_p, kl_weight):
        dev = h.device.type
        gemm = gemm_dtype(h)
        with torch.autocast(dev, enabled=False):
            head = HeadChunks(weight, bias, gemm, min(chunk, h.shape[0]))
            total = torch.zeros((), dtype=head.acc, device=h.device)
            grad = torch.empty_like(h, dtype=grad_dtype(h)) if h.requires_grad else None
            for i in range(0, h.shape[0], chunk):
                tgt = targets[i:i + chunk]
                on = tgt >= 0
                ce_w = on.to(head.acc) / denom                      # each row's weight in the cross-entropy
                z = head.logits(h[i:i + chunk])
                picked = z.gather(1, tgt.clamp(min=0)[:, None]).squeeze(1)
                if teacher_p is not None:
                    pt, neg_entropy = teacher_p[0][i:i + chunk], teacher_p[1][i:i + chunk].to(head.acc)
                    dot = row_dot(pt, z)
                lse, sums = exp_rows_(z)                            # z is exp(z − max) from here on
                total += ((lse - picked) * ce_w).sum()
                if teacher_p is not None:
                    total += kl_weight * (neg_entropy - dot + lse).sum()
                if grad is not None:
                    dz = z.mul_(((ce_w + kl_weight) / sums)[:, None])   # (ce_w + kl_weight)·softmax(z)
                    if teacher_p is not None:
                        sub_(dz, pt, kl_weight)
                    rows = on.nonzero().squeeze(1)
                    dz[rows, tgt[rows]] -= ce_w[rows]
                    grad[i:i + chunk] = head.back(dz)
        ctx.save_for_backward(grad if grad is not None else h.new_empty(0))
        ctx.h_dtype = h.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.h_dtype), None, None, None, None, None, None, None


def linear_ce_ref(
    hidden: torch.Tensor,               # (N, D), with grad
    targets: torch.Tensor,              # (N,) token ids; negative: no cross-entropy on that row
    head_weight: torch.Tensor,          # (V, D), frozen
    head_bias: torch.Tensor | None = None,
    denom: float | None = None,         # the cross-entropy's mean is over this many rows; default: those with a target
    chunk: int = ROWS,
    teacher_p: tuple[torch.Tensor, torch.Tensor] | None = None,   # linear_kl.teacher_side of the N rows, T = 1
    kl_weight: float = 0.0,             # its KL's weight: the loss adds kl_weight · Σ_rows KL
) -> torch.Tensor:                      # scalar, fp32 (float64 for float64 inputs)
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, D) and targets (N,), got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if head_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"head weight {tuple(head_weight.shape)} does not match hidden size {hidden.shape[1]}")
    check_head_inputs("linear_ce", head_weight, head_bias, 1.0, hidden)
    if kl_weight and teacher_p is None:
        raise ValueError("kl_weight needs the teacher's distribution (teacher_p)")
    if teacher_p is not None and (teacher_p[0].shape != (hidden.shape[0], head_weight.shape[0])
                                  or teacher_p[1].shape != hidden.shape[:1]):
        raise ValueError(f"teacher_p is {tuple(teacher_p[0].shape)}, not (rows, vocabulary) of this call")
    if hidden.shape[0] == 0:
        return hidden.float().sum() * 0.0                     # no rows: no loss, and a zero gradient
    denom = denom if denom is not None else max(int((targets >= 0).sum()), 1)
    return LinearCERef.apply(hidden, targets, head_weight.detach(),
                             None if head_bias is None else head_bias.detach(), float(denom), int(chunk),
                             teacher_p if kl_weight else None, float(kl_weight))
