"""x·Wᵀ (+ b) for a frozen W held in oneDNN's blocked layout: the CPU decode step's products.

A decode step multiplies a few rows by every weight once, so its time is the time to read the
weights. torch's F.linear on a CPU reads them at 7-12 GB/s at 1-4 rows (MKL's sgemm and oneDNN's
bf16 path are tuned for many rows); the same products on weights reordered once by
`torch.ops.mkldnn._reorder_linear_weight` (what inductor's CPU backend does for frozen linears)
read them at 12-26 GB/s. SmolLM2-135M's 211 matrices, 2 threads: fp32 at 4 rows 21.1 against
62.8 ms, at 1 row 28.4 against 42.9 ms; bf16 at 4 rows 14.8 against 26.6 ms, at 1 row 15.8
against 23.7 ms (`python -m benchmarks.cpu_products`). The results equal the float64 product as
F.linear's do, up to the order of the sums (fp32: within 6e-6 at K = 576).

`packed(modules)` reorders the weights of the given linears for the length of a block (one
sampling or one generation: the reorder is one pass over the weights, a step of many) and routes
their products here: nn.Linear modules through their forward, the engine's delta linears through
`lookup` in `frozen_linear.base_linear`. Outside grad mode only; the reordered copy is freed when
the block ends. `supported(dtype)` says whether this torch build and CPU have the op.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch import nn

_active = threading.local()


@functools.cache
def supported(dtype: torch.dtype) -> bool:
    """True if torch's oneDNN linear with prepacked weights runs here in `dtype` (fp32 or bf16)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:                        # an op that exists can still be unbuilt for this dtype or CPU
        w = torch.ones(8, 16, dtype=dtype)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16, dtype=dtype),
                                               torch.ops.mkldnn._reorder_linear_weight(w, 2), None, "none", [], "")
        return bool((y == 16).all())
    except RuntimeError:
        return False


class Packed:
    """One weight in oneDNN's layout, and what it is applied in."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, rows: int):
        self.dtype, self.out_features = dtype, weight.shape[0]
        self.data = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), rows)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        b = None if bias is None else bias.to(self.dtype)
        return self.rows(x.reshape(-1, x.shape[-1]).to(self.dtype), b).view(*lead, self.out_features)

    def rows(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, in) and bias already in the weight's dtype -> (N, out): the product alone, for a
        caller that keeps its rows two-dimensional (the fused decode step)."""
        return torch.ops.mkldnn._linear_pointwise(x, self.data, bias, "none", [], "")


def lookup(weight: torch.Tensor) -> Packed | None:
    """The packed form of `weight` inside a `packed` block (and outside grad mode), else None."""
    table = getattr(_active, "table", None)
    if not table or torch.is_grad_enabled():
        return None
    hit = table.get(id(weight))
    return hit[1] if hit is not None and hit[0] is weight else None


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    p = lookup(module.weight)
    return p(x, module.bias) if p is not None else nn.Linear.forward(module, x)


def packable(module: nn.Module) -> bool:
    """Whether `packed` takes this module: a plain nn.Linear (not a subclass such as a quantized
    linear), frozen, on the CPU, whose forward is not already its own attribute (a hook such as
    accelerate's, or an enclosing block's), which the block must neither replace nor remove."""
    return (type(module) is nn.Linear and module.weight.device.type == "cpu" and not module.weight.requires_grad
            and "forward" not in module.__dict__)


@contextlib.contextmanager
def packed(modules: list[nn.Linear], dtype: torch.dtype, rows: int, weight_of=None):
    """Inside the block the products of `modules` (plain nn.Linear, frozen, on the CPU) run on their
    weights reordered for oneDNN in `dtype`, tuned for `rows` rows a call; `weight_of(module)`, when
    given, is the weight to reorder in place of the module's own (a delta merged into it), made one
    module at a time. Where the op is not supported, or a module is not `packable`, nothing changes
    for it."""
    if not supported(dtype) or torch.is_grad_enabled():
        yield
        return
    chosen = [m for m in modules if packable(m)]
    before = getattr(_active, "table", None)
    table = dict(before or {})
    for m in chosen:
        table[id(m.weight)] = (m.weight, Packed(weight_of(m) if weight_of else m.weight, dtype, rows))
    _active.table = table
    for m in chosen:
        m.forward = functools.partial(_linear_forward, m)          # an instance attribute: the class is untouched
    try:
        yield
    finally:
        for m in chosen:
            m.__dict__.pop("forward", None)
        _active.table = before
