"""Low-rank delta linear for a batch of streams, each row with its own delta (Punica's BGMV idea):

    y[b] = x[b]·W (+ bias) + s·(x[b]·A[index[b]])·B[index[b]]

A (S, in, r) and B (S, r, out) stack the deltas of S streams; index (rows,) names each row's
stream. The reference gathers each row's A and B and runs two batched matmuls: the gather copies
rows·r·(in + out) numbers, small next to the activations, and autograd scatters dA and dB back to
each stream. It is the CPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_layout: str) -> torch.Tensor:
    """x·W (+ bias) for either weight layout, without any delta."""
    if weight_layout == "linear":
        return F.linear(x, weight, bias)
    y = torch.matmul(x, weight)
    return y + bias if bias is not None else y


def lowrank_linear_batched_ref(
    x: torch.Tensor,              # (rows, T, in)
    weight: torch.Tensor,         # (out, in) or (in, out), see weight_layout
    bias: torch.Tensor | None,    # (out,)
    A: torch.Tensor,              # (S, in, r)
    B: torch.Tensor,              # (S, r, out)
    index: torch.Tensor,          # (rows,) long, in [0, S)
    scale: float,
    weight_layout: str = "linear",
) -> torch.Tensor:                # (rows, T, out)
    if x.dim() != 3 or index.shape != (x.shape[0],):
        raise ValueError(f"x must be (rows, T, in) with one index per row, got x {tuple(x.shape)}, "
                         f"index {tuple(index.shape)}")
    y = base_linear(x, weight, bias, weight_layout)
    a = A.index_select(0, index).to(x.dtype)                   # (rows, in, r)
    b = B.index_select(0, index).to(x.dtype)                   # (rows, r, out)
    return y + torch.bmm(torch.bmm(x, a), b) * scale
