"""KL(teacher || student) on next-token distributions, straight from final hidden states.

Both distributions come from the same frozen LM head W (V × D), so the loss is a function of the
two hidden states only:

    z_s = h_s·Wᵀ/T,  z_t = h_t·Wᵀ/T,  p_t = softmax(z_t) (optionally kept to its top k and renormalised)
    KL  = Σ_v p_t (log p_t − log_softmax(z_s)),    loss = T² / N · Σ_rows KL

    dloss/dh_s = T² / N · (softmax(z_s) − p_t)·W / T      (Σ_v p_t = 1)

The reference walks the rows in chunks and computes that gradient in the forward pass, so at most
chunk × V logits exist at once and backward is one multiply. It is the CPU path.
"""

from __future__ import annotations

import torch


def _kl_chunk(hs, ht, weight, bias, temperature, top_k):
    zs = torch.matmul(hs.float(), weight.float().t())
    zt = torch.matmul(ht.float(), weight.float().t())
    if bias is not None:
        zs = zs + bias.float()
        zt = zt + bias.float()
    zs = zs / temperature
    zt = zt / temperature
    if top_k and top_k < zt.shape[-1]:
        keep = torch.topk(zt, top_k, dim=-1).indices
        masked = torch.full_like(zt, float("-inf"))
        zt = masked.scatter(-1, keep, zt.gather(-1, keep))
    log_pt = torch.log_softmax(zt, dim=-1)
    pt = log_pt.exp()
    log_ps = torch.log_softmax(zs, dim=-1)
    # 0·log 0 = 0 outside the teacher's top k.
    kl = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt)).sum(-1)
    dz = log_ps.exp() - pt
    return kl, dz


class LinearKLRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ht, weight, bias, temperature, top_k, denom, chunk):
        n = hs.shape[0]
        coef = temperature * temperature / denom
        total = torch.zeros((), dtype=torch.float32, device=hs.device)
        grad = torch.empty_like(hs) if hs.requires_grad else None
        for i in range(0, n, chunk):
            kl, dz = _kl_chunk(hs[i:i + chunk], ht[i:i + chunk], weight, bias, temperature, top_k)
            total += kl.sum()
            if grad is not None:
                grad[i:i + chunk] = (torch.matmul(dz, weight.float()) * (coef / temperature)).to(hs.dtype)
        ctx.save_for_backward(grad if grad is not None else hs.new_empty(0))
        return total * coef

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None, None, None


def linear_kl_ref(
    student_h: torch.Tensor,            # (N, D), with grad
    teacher_h: torch.Tensor,            # (N, D)
    head_weight: torch.Tensor,          # (V, D), frozen
    head_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    denom: int | None = None,           # rows the mean is over; default N
    chunk: int = 256,
) -> torch.Tensor:                      # scalar
    if student_h.shape != teacher_h.shape or student_h.dim() != 2:
        raise ValueError(f"hidden states must both be (N, D), got {tuple(student_h.shape)} and {tuple(teacher_h.shape)}")
    if head_weight.shape[1] != student_h.shape[1]:
        raise ValueError(f"head weight {tuple(head_weight.shape)} does not match hidden size {student_h.shape[1]}")
    denom = denom if denom is not None else student_h.shape[0]
    return LinearKLRef.apply(student_h, teacher_h.detach(), head_weight.detach(),
                             None if head_bias is None else head_bias.detach(),
                             float(temperature), int(top_k), int(denom), int(chunk))
