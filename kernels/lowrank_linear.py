"""Low-rank delta linear: y = x·W (+ b) + s·(x·A)·B, with W frozen.

The PyTorch reference below is the CPU path. Bracketing (x·A)·B keeps the delta's cost at
r·(in + out) per token and never builds the in × out matrix A·B; autograd then gives dx, dA
and dB, and no dW because W does not require grad.

`weight_layout` says how W is stored: "linear" is nn.Linear's [out, in]; "conv1d" is GPT-2's
Conv1D [in, out].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lowrank_linear_ref(
    x: torch.Tensor,              # (..., in)
    weight: torch.Tensor,         # (out, in) or (in, out), see weight_layout
    bias: torch.Tensor | None,    # (out,)
    A: torch.Tensor,              # (in, r)
    B: torch.Tensor,              # (r, out)
    scale: float,
    weight_layout: str = "linear",
) -> torch.Tensor:                # (..., out)
    if weight_layout == "linear":
        y = F.linear(x, weight, bias)
    elif weight_layout == "conv1d":
        y = torch.matmul(x, weight)
        if bias is not None:
            y = y + bias
    else:
        raise ValueError(f"weight_layout must be 'linear' or 'conv1d', got {weight_layout!r}")
    # The delta is kept in fp32 for the optimizer; compute it in the activations' dtype.
    xa = torch.matmul(x, A.to(x.dtype))                        # (..., r)
    return y + torch.matmul(xa, B.to(x.dtype)) * scale        # (..., out)
