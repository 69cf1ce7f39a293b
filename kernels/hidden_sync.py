"""Hidden-state synchronization loss: the paper's L1 between student and teacher residual states.

    L = w / (N·L·D) · Σ_layers Σ_positions Σ_dims |s − t|

with N the number of synchronized positions of the whole round (`denom`; several groups of
sequences may share one round), L the number of layers compared (h^0..h^L) and D the hidden size.
dL/ds = w·sign(s − t) / (N·L·D). The reference lets autograd derive that; it is the CPU path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def hidden_l1_ref(
    student: Sequence[torch.Tensor],   # L tensors (B, T, D), with grad
    teacher: Sequence[torch.Tensor],   # L tensors (B, T, D), or one (L, B, T, D), no grad
    weight: float = 1.0,
    denom: int | None = None,          # positions the mean is over; default: B·T of this call
) -> torch.Tensor:                     # scalar
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} layers of states, teacher {len(teacher)}")
    if len(student) == 0:
        raise ValueError("no hidden states to compare")
    first = student[0]
    n_pos = denom if denom is not None else first.shape[0] * first.shape[1]
    norm = weight / (n_pos * len(student) * first.shape[-1])
    total = first.new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"student states {tuple(s.shape)} and teacher states {tuple(t.shape)} differ")
        total = total + (s.float() - t.float()).abs().sum()
    return total * norm
