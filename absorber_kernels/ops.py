"""The op tables: one per backend, so the engine names an op once and the backend decides which
implementation runs. Every entry has the signature of its plain PyTorch reference.

The Triton table is built on first request: importing this module never imports Triton, and a
missing Triton becomes an ImportError that says what to do.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from .attention import attention_ref
from .hidden_sync import hidden_l1_ref
from .linear_ce import linear_ce_ref
from .linear_kl import linear_kl_ref
from .lowrank_batched import lowrank_linear_batched_ref
from .lowrank_linear import lowrank_linear_torch


@dataclass(frozen=True)
class Ops:
    name: str
    lowrank_linear: Callable
    hidden_l1: Callable
    linear_kl: Callable
    attention: Callable
    lowrank_linear_batched: Callable
    linear_ce: Callable


TORCH_OPS = Ops("torch", lowrank_linear_torch, hidden_l1_ref, linear_kl_ref, attention_ref, lowrank_linear_batched_ref,
                linear_ce_ref)


@functools.cache
def _triton_ops() -> Ops:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - only where triton is absent
        raise ImportError("backend 'triton' needs the triton package (pip install triton, or "
                          "pip install absorber-engine[triton]); backend='torch' runs without it") from e
    # Each op checks its tensors when called: CUDA tensors run the compiled kernels; CPU tensors run
    # only under the Triton interpreter (TRITON_INTERPRET=1 set before Triton is first imported).
    from .attention import attention_triton
    from .hidden_sync import hidden_l1_triton
    from .linear_kl import linear_kl_triton
    from .lowrank_batched import lowrank_linear_batched_triton
    from .lowrank_linear import lowrank_linear_triton

    # The cross-entropy is the chunked reference on both backends (linear_ce.py says why).
    return Ops("triton", lowrank_linear_triton, hidden_l1_triton, linear_kl_triton, attention_triton,
               lowrank_linear_batched_triton, linear_ce_ref)


def get_ops(backend: str) -> Ops:
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        return _triton_ops()
    raise ValueError(f"unknown backend {backend!r}; expected 'torch' or 'triton'")
