"""Hidden-state synchronization loss: the paper's L1 between student and teacher residual states.

    L = w / (N·L·D) · Σ_layers Σ_positions Σ_dims |s − t|

with N the number of synchronized positions of the whole round (`denom`; several groups of
sequences may share one round), L the number of layers compared (h^0..h^L) and D the hidden size.
dL/ds = w·sign(s − t) / (N·L·D). The reference lets autograd derive that; it is the CPU path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._common import HAS_TRITON, check_tensors, grad_dtype


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
    if any(s.dim() != 3 for s in student):     # (T, D) counted T·D positions in the mean
        raise ValueError(f"student states must be (B, T, D), got {[tuple(s.shape) for s in student][:3]}")
    first = student[0]
    n_pos = denom if denom is not None else first.shape[0] * first.shape[1]
    norm = weight / (n_pos * len(student) * first.shape[-1])
    acc = torch.promote_types(first.dtype, torch.float32)     # fp32 for 16-bit states, float64 stays float64
    total = first.new_zeros((), dtype=acc)
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"student states {tuple(s.shape)} and teacher states {tuple(t.shape)} differ")
        total = total + (s.to(acc) - t.to(acc)).abs().sum()
    return total * norm


# ---------------------------------------------------------------------------------------------
# Triton: the loss and its gradient in one pass over the states, all layers in one launch.
#
# dL/ds = w·sign(s − t)/(N·L·D) depends only on the sign of the difference at the same element, so
# the forward pass that reads s and t for the loss writes the gradient too; backward only scales it
# by grad_output. The student states come as L separate (B, T, D) tensors (stacking them would copy
# L·B·T·D elements), so the kernel takes a table of their addresses (int64, as vLLM's LoRA kernels
# do) and casts each to a typed pointer; one launch, grid (row blocks, layers). The teacher is a table
# too (a list) or one (L, B, T, D) tensor. Per-program partial sums (no atomics) are added in
# PyTorch, so the loss is deterministic. The gradient is written to one (L, B, T, D) buffer whose
# layer slices are handed to autograd.
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _hidden_l1_kernel(s_tab, t_tab, s_strides, t_strides, s0_ptr, t0_ptr, g_ptr, partial_ptr,
                          R, T, D, norm, n_row_blocks,
                          WRITE_GRAD: tl.constexpr, ALIGNED: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_r = tl.program_id(0)
        layer = tl.program_id(1)
        s_base = tl.load(s_tab + layer).to(tl.pointer_type(s0_ptr.dtype.element_ty))
        t_base = tl.load(t_tab + layer).to(tl.pointer_type(t0_ptr.dtype.element_ty))
        sb = tl.load(s_strides + 2 * layer)          # batch and time strides of this layer's tensors
        st = tl.load(s_strides + 2 * layer + 1)
        tb = tl.load(t_strides + 2 * layer)
        tt = tl.load(t_strides + 2 * layer + 1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)           # flattened (b, t)
        row_ok = rows < R
        bi = rows // T
        ti = rows % T
        s_off = bi.to(tl.int64) * sb + ti * st
        t_off = bi.to(tl.int64) * tb + ti * tt
        g_off = (layer.to(tl.int64) * R + rows) * D
        if ALIGNED:   # every row starts on a 16-byte boundary: lets the compiler use 16-byte loads
            s_base = tl.multiple_of(s_base, 16)
            t_base = tl.multiple_of(t_base, 16)
            s_off = tl.multiple_of(s_off, 8)
            t_off = tl.multiple_of(t_off, 8)
            g_off = tl.multiple_of(g_off, 8)
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m = row_ok[:, None] & (dd < D)[None, :]
            s = tl.load(s_base + s_off[:, None] + dd[None, :], mask=m, other=0.0).to(tl.float32)
            t = tl.load(t_base + t_off[:, None] + dd[None, :], mask=m, other=0.0).to(tl.float32)
            diff = s - t
            acc += tl.abs(diff)
            if WRITE_GRAD:
                g = tl.where(diff > 0, norm, tl.where(diff < 0, -norm, 0.0))
                tl.store(g_ptr + g_off[:, None] + dd[None, :], g.to(g_ptr.dtype.element_ty), mask=m)
        tl.store(partial_ptr + layer * n_row_blocks + pid_r, tl.sum(tl.sum(acc, axis=1), axis=0))


# 32 rows × 256 columns per step, 8 warps: a memory-bound stream, 8 elements per thread and tensor.
HIDDEN_CONFIG_GPU = dict(BLOCK_R=32, BLOCK_D=256, num_warps=8, num_stages=2)
HIDDEN_CONFIG_INTERPRET = dict(BLOCK_R=16, BLOCK_D=32, num_warps=4, num_stages=1)


def _table(tensors, stacked=None):
    """(addresses, (batch, time) strides) of L tensors (B, T, D) with unit last stride."""
    if stacked is not None:
        step = stacked.stride(0) * stacked.element_size()
        ptrs = [stacked.data_ptr() + i * step for i in range(stacked.shape[0])]
        strides = [(stacked.stride(1), stacked.stride(2))] * stacked.shape[0]
    else:
        ptrs = [x.data_ptr() for x in tensors]
        strides = [(x.stride(0), x.stride(1)) for x in tensors]
    dev = tensors[0].device if stacked is None else stacked.device
    return (torch.tensor(ptrs, dtype=torch.int64, device=dev),
            torch.tensor(strides, dtype=torch.int64, device=dev).reshape(-1), ptrs, strides)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class HiddenL1Triton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, denom, teacher_stacked, n_layers, *tensors):
        student = [_unit_last(s) for s in tensors[:n_layers]]
        teacher_list = [_unit_last(t) for t in tensors[n_layers:]]
        first = student[0]
        b, t, d = first.shape
        n_pos = denom if denom is not None else b * t
        norm = weight / (n_pos * n_layers * d)
        write_grad = any(ctx.needs_input_grad[4:4 + n_layers])
        cfg = HIDDEN_CONFIG_GPU if first.is_cuda else HIDDEN_CONFIG_INTERPRET
        s_tab, s_str, s_ptrs, s_strides = _table(student)
        if teacher_stacked is not None:
            teacher0 = _unit_last(teacher_stacked)
            t_tab, t_str, t_ptrs, t_strides = _table(None, teacher0)
            t_dtype_src = teacher0
        else:
            t_tab, t_str, t_ptrs, t_strides = _table(teacher_list)
            t_dtype_src = teacher_list[0]
        grad = torch.empty((n_layers, b, t, d), dtype=grad_dtype(first), device=first.device) if write_grad else first
        r = b * t
        n_rb = triton.cdiv(r, cfg["BLOCK_R"])
        partial = torch.empty(n_layers, n_rb, dtype=torch.float32, device=first.device)
        esz = first.element_size()
        aligned = (d % 8 == 0 and all(p % 16 == 0 for p in s_ptrs + t_ptrs)
                   and all(x % 8 == 0 for st in s_strides + t_strides for x in st)
                   and esz == 2 and t_dtype_src.element_size() == 2)
        _hidden_l1_kernel[(n_rb, n_layers)](
            s_tab, t_tab, s_str, t_str, first, t_dtype_src, grad, partial, r, t, d, float(norm), n_rb,
            WRITE_GRAD=write_grad, ALIGNED=aligned, BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        ctx.n_layers = n_layers
        ctx.n_teacher = len(tensors) - n_layers
        ctx.save_for_backward(grad if write_grad else first.new_empty(0))
        ctx.write_grad = write_grad
        ctx.dtype = first.dtype
        return partial.sum() * norm

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        grads = [None] * ctx.n_layers
        if ctx.write_grad:
            scaled = (grad * grad_out).to(ctx.dtype)
            grads = [scaled[i] if ctx.needs_input_grad[4 + i] else None for i in range(ctx.n_layers)]
        return (None, None, None, None, *grads, *([None] * ctx.n_teacher))


def hidden_l1_triton(
    student: Sequence[torch.Tensor],   # L tensors (B, T, D), with grad
    teacher: Sequence[torch.Tensor] | torch.Tensor,   # L tensors (B, T, D), or one (L, B, T, D), no grad
    weight: float = 1.0,
    denom: int | None = None,          # positions the mean is over; default: B·T of this call
) -> torch.Tensor:                     # scalar, fp32
    """Same function as hidden_l1_ref: loss and gradient in one pass (see the comment above)."""
    student = list(student)
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} layers of states, teacher {len(teacher)}")
    if len(student) == 0:
        raise ValueError("no hidden states to compare")
    shape = student[0].shape
    if len(shape) != 3:
        raise ValueError(f"hidden states must be (B, T, D), got {tuple(shape)}")
    stacked = teacher if isinstance(teacher, torch.Tensor) else None
    t_list = [] if stacked is not None else list(teacher)
    for i, s in enumerate(student):
        ti = stacked[i] if stacked is not None else t_list[i]
        if s.shape != ti.shape:
            raise ValueError(f"student states {tuple(s.shape)} and teacher states {tuple(ti.shape)} differ")
        if s.dtype != student[0].dtype:
            raise ValueError("all student layers must share one dtype")
    if stacked is None and any(t.dtype != t_list[0].dtype for t in t_list):
        raise ValueError("all teacher layers must share one dtype")
    check_tensors("hidden_l1", *student, *(t_list if stacked is None else [stacked]))
    detached = [t.detach() for t in t_list]
    return HiddenL1Triton.apply(float(weight), denom, None if stacked is None else stacked.detach(),
                                len(student), *student, *detached)
