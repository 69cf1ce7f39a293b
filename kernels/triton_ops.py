"""The Triton backend's op table: the fused kernels with their references' signatures.

Importing this module imports Triton; `get_ops("triton")` turns a missing Triton into an
ImportError that says so. Each op checks its tensors when called: CUDA tensors run the compiled
kernels; CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1 set before Triton is
first imported: slow, for tests); anything else raises a RuntimeError naming the fix.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - only where triton is absent
    raise ImportError("backend 'triton' needs the triton package (pip install triton, or "
                      "pip install absorber-engine[triton]); backend='torch' runs without it") from e

from .attention import attention_triton
from .hidden_sync import hidden_l1_triton
from .linear_kl import linear_kl_triton
from .lowrank_batched import lowrank_linear_batched_triton
from .lowrank_linear import lowrank_linear_triton
from .ops import Ops

TRITON_OPS = Ops("triton", lowrank_linear_triton, hidden_l1_triton, linear_kl_triton, attention_triton,
                 lowrank_linear_batched_triton)

__all__ = ["TRITON_OPS"]
