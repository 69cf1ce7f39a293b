"""One table of the engine's compute ops per backend, so the engine names an op once and the
backend decides which implementation runs. Every entry has the signature of its reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .attention import attention_ref
from .hidden_sync import hidden_l1_ref
from .linear_kl import linear_kl_ref
from .lowrank_batched import lowrank_linear_batched_ref
from .lowrank_linear import lowrank_linear_ref


@dataclass(frozen=True)
class Ops:
    name: str
    lowrank_linear: Callable
    hidden_l1: Callable
    linear_kl: Callable
    attention: Callable
    lowrank_linear_batched: Callable


TORCH_OPS = Ops("torch", lowrank_linear_ref, hidden_l1_ref, linear_kl_ref, attention_ref, lowrank_linear_batched_ref)


def get_ops(backend: str) -> Ops:
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        from .triton_ops import TRITON_OPS  # imports triton; raises ImportError with the reason

        return TRITON_OPS
    raise ValueError(f"unknown backend {backend!r}; expected 'torch' or 'triton'")
