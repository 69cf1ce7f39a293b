"""x·W (+ b) for a frozen W: the base half of every delta linear's PyTorch reference.

Under autocast, F.linear casts W to the compute dtype at every call and keeps that copy alive from
the forward to the backward (autocast caches no cast of a tensor without grad). A student pass
over a 135M model holds one such copy of every target weight per forward, hundreds of MB that
the backward only needs to multiply dy by. Here the cast is made in the forward and again in the
backward, and only W itself (already resident) is saved: one more cast per backward for no copy
held. Without autocast, or when W is already in the compute dtype, it is plain F.linear.

On the CPU each cast is written into a buffer kept per weight shape and thread, not a fresh tensor:
a fresh multi-MB tensor is fresh pages, and in a VM that hands freed pages back to its host every
one of them is a page fault. A cast of a 1536 x 576 weight took 1.0 ms inside a SmolLM2 round
against 0.08 ms alone (torch.profiler); a round casts about 2,000 of them. The buffer is only ever
read by the GEMM that follows the cast, before the next cast of that shape.

Inside `kept_casts()` (the engine opens it around a round) each weight is cast once and the cast
is kept until the block ends: a SmolLM2 recite round otherwise casts each of its 210 weights 19
times (every student forward and backward, every teacher pass), 0.5 s of an 8.6 s round, for a
cast that is the same every time (7% of the round, alternating processes). What it costs is the
casts held for the round's length, half the frozen weights' fp32 size (213 MB on SmolLM2), so at
most KEPT_CAST_BYTES are kept: a larger model's other weights are cast at every pass as before.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from . import packed_linear

_cast_buffers = threading.local()
_kept = threading.local()
KEPT_CAST_BYTES = 1 << 30


@contextlib.contextmanager
def kept_casts():
    """Within the block, `cast_weight` casts each weight once and returns that cast again after (a
    weight written to in between is cast anew, unless written through `.data`, which keeps its
    version counter). Nested blocks share the outer one's casts. Each kept cast holds its weight,
    so no other tensor can take that weight's address (its key) while the block lasts."""
    if getattr(_kept, "casts", None) is not None:
        yield
        return
    _kept.casts, _kept.room = {}, KEPT_CAST_BYTES
    try:
        yield
    finally:
        _kept.casts = None


def cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`. On the CPU, outside autograd, the result is a per-thread buffer that the
    next cast of the same shape and dtype overwrites: use it at once, never keep it. Not in a
    compiled graph, which may keep the cast for its backward (and fuses the cast itself). Inside
    `kept_casts()` the cast is kept, never overwritten, until the block ends."""
    if weight.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return weight.to(dtype)
    kept = getattr(_kept, "casts", None)
    if kept is not None:
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride(), dtype)
        held = kept.get(key)
        if held is not None:
            return held[0]
        size = weight.numel() * dtype.itemsize
        if size <= _kept.room:
            _kept.room -= size
            with torch.inference_mode(False):
                cast = weight.detach().to(dtype)
            kept[key] = (cast, weight)      # the weight held: its address is not handed to another tensor
            return cast
    buffers = getattr(_cast_buffers, "by_shape", None)
    if buffers is None:
        buffers = _cast_buffers.by_shape = {}
    key = (tuple(weight.shape), dtype)
    buf = buffers.get(key)
    if buf is None:
        with torch.inference_mode(False):      # a normal tensor: writable in and out of inference mode
            buf = buffers[key] = torch.empty(weight.shape, dtype=dtype)
    return buf.copy_(weight)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv1d: bool, dtype: torch.dtype):
        ctx.save_for_backward(weight)
        ctx.conv1d, ctx.dtype, ctx.x_dtype = conv1d, dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            w = cast_weight(weight, dtype)
            return F.linear(x.to(dtype), w.t() if conv1d else w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        w = cast_weight(weight, ctx.dtype)           # grad mode is off here unless create_graph
        dx = torch.matmul(dy.to(ctx.dtype), w.t() if ctx.conv1d else w)
        return dx.to(ctx.x_dtype), None, None, None, None


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_layout: str) -> torch.Tensor:
    """x·W (+ bias) for either weight layout ("linear": [out, in]; "conv1d": [in, out]), W frozen."""
    if weight_layout not in ("linear", "conv1d"):
        raise ValueError(f"weight_layout must be 'linear' or 'conv1d', got {weight_layout!r}")
    packed = packed_linear.lookup(weight) if weight_layout == "linear" else None
    if packed is not None:                       # a decode step inside packed_linear.packed()
        return packed(x, bias)
    dtype = compute_dtype(x)
    if dtype != weight.dtype and not weight.requires_grad and (bias is None or not bias.requires_grad):
        return FrozenLinear.apply(x, weight, bias, weight_layout == "conv1d", dtype)
    if weight_layout == "linear":
        return F.linear(x, weight, bias)
    y = torch.matmul(x, weight)
    return y + bias if bias is not None else y
