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

from ._common import HAS_TRITON, check_tensors, dot_precision, next_pow2
from . import packed_linear
from .frozen_linear import base_linear, cast_weight, compute_dtype


def lowrank_linear_ref(
    x: torch.Tensor,              # (..., in)
    weight: torch.Tensor,         # (out, in) or (in, out), see weight_layout
    bias: torch.Tensor | None,    # (out,)
    A: torch.Tensor,              # (in, r)
    B: torch.Tensor,              # (r, out)
    scale: float,
    weight_layout: str = "linear",
) -> torch.Tensor:                # (..., out)
    y = base_linear(x, weight, bias, weight_layout)
    # The delta is kept in fp32 for the optimizer; compute it in the activations' dtype. The scale goes
    # on the r-wide x·A and the expand's sum into y happens inside its GEMM (as the kernels do): no
    # pass over the (..., out) output beyond the GEMMs'.
    xa = torch.matmul(x, A.to(x.dtype)).mul_(scale)            # (..., r)
    out = torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]), B.to(x.dtype))
    return out.view(y.shape)                                    # (..., out)


class LowRankLinearTorch(torch.autograd.Function):
    """The reference's arithmetic, op for op and so to the bit, as one autograd node: x cast to the
    compute dtype once (the reference casts it for W and again for A), and one node of the graph
    where the reference makes six (the frozen GEMM, the casts of A and B, x·A, the scale, the
    expand), each a Python-side step of the backward. The sum of dx's two branches stays a separate
    add in x's dtype, as autograd makes it: folded into a GEMM it would round otherwise, and a
    stream's rounds alone would then differ from the same rounds batched with other streams
    (lowrank_batched). Saves x in the compute dtype, u = s·x·A and the delta's casts; W is cast
    again in the backward (frozen_linear says why)."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, conv1d, dtype):
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            w = weight if weight.dtype == dtype else cast_weight(weight, dtype)
            a, b = A.to(dtype), B.to(dtype)
            if conv1d and weight.dtype == dtype:         # base_linear's own order: GEMM, then the bias
                y = torch.matmul(xc, w) if bias is None else torch.matmul(xc, w) + bias
            else:
                y = F.linear(xc, w.t() if conv1d else w, None if bias is None else bias.to(dtype))
            x2 = xc.reshape(-1, xc.shape[-1])
            u = torch.mm(x2, a).mul_(scale)
            y.view(-1, y.shape[-1]).addmm_(u, b)        # y is ours: no copy of it for an out-of-place sum
        ctx.save_for_backward(x2, weight, a, b, u)
        ctx.meta = (scale, conv1d, dtype, x.dtype, x.shape, A.dtype, B.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, a, b, u = ctx.saved_tensors
        scale, conv1d, dtype, x_dtype, x_shape, a_dtype, b_dtype = ctx.meta
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
        dx = dA = dB = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            v = torch.mm(dy2, b.t()).mul_(scale)                       # (M, r)
            if ctx.needs_input_grad[0]:
                w = weight if weight.dtype == dtype else cast_weight(weight, dtype)
                dx = torch.mm(dy2, w.t() if conv1d else w).to(x_dtype)
                dx.add_(torch.mm(v, a.t()))           # in x's dtype, as the sum of two casts would round
                dx = dx.view(x_shape)
            if ctx.needs_input_grad[3]:
                dA = torch.mm(x2.t(), v).to(a_dtype)
        if ctx.needs_input_grad[4]:
            dB = torch.mm(u.t(), dy2).to(b_dtype)
        return dx, None, None, dA, dB, None, None, None


def lowrank_linear_torch(x, weight, bias, A, B, scale, weight_layout="linear"):
    """The torch backend's op: lowrank_linear_ref's result (to rounding) in one autograd node. A
    trainable W or bias, and a decode step on packed weights, take the reference."""
    if weight_layout not in ("linear", "conv1d"):
        raise ValueError(f"weight_layout must be 'linear' or 'conv1d', got {weight_layout!r}")
    if (weight.requires_grad or (bias is not None and bias.requires_grad)
            or (weight_layout == "linear" and packed_linear.lookup(weight) is not None)):
        return lowrank_linear_ref(x, weight, bias, A, B, scale, weight_layout)
    return LowRankLinearTorch.apply(x, weight, bias, A, B, scale, weight_layout == "conv1d", compute_dtype(x))


# ---------------------------------------------------------------------------------------------
# Triton: four launches in all, two forward and two backward.
#
# forward   1. shrink   u = s·(x·A)                      (M, r)    grid: row blocks × r blocks
#           2. main     y = x·W + u·B (+ b)              (M, out)  one accumulator: the expand is
#                       a short extra reduction (length r) after the K loop of the frozen GEMM,
#                       so y is written once and no (M, out) delta is ever stored.
# backward  1. shrink   v = s·(dy·Bᵀ)                    (M, r)
#              + dB   = uᵀ·dy                            (r, out)  (= s·(x·A)ᵀ·dy)
#           2. main     dx = dy·Wᵀ + v·Aᵀ                (M, in)   the forward's main kernel, W read
#                                                                   through transposed strides
#              + dA   = xᵀ·v                             (in, r)   (= s·xᵀ·(dy·Bᵀ))
# Gradient math (y = x·W + s·x·A·B, upstream dy): dx = dy·Wᵀ + s·dy·Bᵀ·Aᵀ, dA = s·xᵀ·dy·Bᵀ,
# dB = s·(x·A)ᵀ·dy, no dW (W frozen). Bracketed as above nothing in × out is formed, and the
# scale s is folded into u and v once, in the shrink epilogue.
#
# Why the launches split there: the expand needs the whole r-vector of a row, which is a reduction
# over all of `in` (resp. `out`), so it cannot start in the program that computes it without every
# output-column program redoing x·A (r/BLOCK_N more work: +50% at r = 64, BLOCK_N = 128); a
# grid-wide dependency is a launch boundary. Within each launch the independent work is fused: dB
# needs only dy and u, so it rides with the backward shrink; dA needs v, so it rides with dx. The
# weight-gradient GEMMs (dA, dB: a reduction over all M rows into a small r-wide output) are too
# small to fill a GPU alone; as extra programs of a launch they run beside the big GEMM tiles.
# They come first in the grid (they are the long, few programs). u and v are kept in the
# activations' dtype (as the reference does), u is saved for backward, x is saved, W is not copied.
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _mm_acc(acc, a_ptr, b_ptr, ra, rb, K, s_a0, s_ak, s_bk, s_b1,
                BLOCK_K: tl.constexpr, PREC: tl.constexpr):
        """acc += a[ra, :K] · b[:K, rb]; ra, rb are already wrapped into bounds (only K is masked).
        b is cast to a's dtype (the fp32 delta meets 16-bit activations, as in the reference)."""
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            a = tl.load(a_ptr + ra[:, None] * s_a0 + rk[None, :] * s_ak, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptr + rk[:, None] * s_bk + rb[None, :] * s_b1, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PREC)
        return acc

    @triton.jit
    def _wgrad_tile(tile, x_ptr, y_ptr, c_ptr, P, Q, M, s_xm, s_xp, s_ym, s_yq, s_cp, s_cq,
                    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr):
        """One (BLOCK_P, BLOCK_Q) tile of C = Xᵀ·Y, X (M, P), Y (M, Q): a reduction over all M rows."""
        n_q = tl.cdiv(Q, BLOCK_Q)
        rp = (tile // n_q) * BLOCK_P + tl.arange(0, BLOCK_P)
        rq = (tile % n_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        acc = _mm_acc(acc, x_ptr, y_ptr, rp % P, rq % Q, M, s_xp, s_xm, s_ym, s_yq, BLOCK_M, PREC)
        tl.store(c_ptr + rp[:, None] * s_cp + rq[None, :] * s_cq, acc.to(c_ptr.dtype.element_ty),
                 mask=(rp < P)[:, None] & (rq < Q)[None, :])

    @triton.jit
    def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row block, column block) of output tile `pid` in grouped order (Triton's matmul tutorial):
        GROUP_M row blocks in turn share each W column block while it is in L2."""
        n_m = tl.cdiv(M, BLOCK_M)
        n_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * n_n
        first_m = (pid // in_group) * GROUP_M
        group_m = tl.minimum(n_m - first_m, GROUP_M)
        return first_m + (pid % in_group) % group_m, (pid % in_group) // group_m

    @triton.jit
    def _lora_shrink_kernel(
            x_ptr, a_ptr, u_ptr, M, K, R, s_xm, s_xk, s_ak, s_ar, s_um, s_ur, scale,
            # the fused weight gradient (backward only): C = Xᵀ·Y in n_aux tiles, first in the grid
            n_aux, ax_ptr, ay_ptr, ac_ptr, AP, AQ, s_axm, s_axp, s_aym, s_ayq, s_acp, s_acq,
            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
            AUX_P: tl.constexpr, AUX_Q: tl.constexpr, AUX_M: tl.constexpr, PREC: tl.constexpr):
        """u[rows, r-block] = scale · x[rows, :] · A[:, r-block]   (forward: A; backward: Bᵀ)."""
        pid = tl.program_id(0)
        if pid < n_aux:
            _wgrad_tile(pid, ax_ptr, ay_ptr, ac_ptr, AP, AQ, M, s_axm, s_axp, s_aym, s_ayq, s_acp, s_acq,
                        AUX_P, AUX_Q, AUX_M, PREC)
        else:
            pid = pid - n_aux
            n_r = tl.cdiv(R, BLOCK_R)
            rm = (pid // n_r) * BLOCK_M + tl.arange(0, BLOCK_M)
            rr = (pid % n_r) * BLOCK_R + tl.arange(0, BLOCK_R)
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            acc = _mm_acc(acc, x_ptr, a_ptr, rm % M, rr % R, K, s_xm, s_xk, s_ak, s_ar, BLOCK_K, PREC)
            tl.store(u_ptr + rm[:, None] * s_um + rr[None, :] * s_ur, (acc * scale).to(u_ptr.dtype.element_ty),
                     mask=(rm < M)[:, None] & (rr < R)[None, :])

    @triton.jit
    def _lora_main_kernel(
            x_ptr, w_ptr, u_ptr, b_ptr, bias_ptr, y_ptr, M, N, K, R,
            s_xm, s_xk, s_wk, s_wn, s_um, s_ur, s_br, s_bn, s_ym, s_yn,
            n_aux, ax_ptr, ay_ptr, ac_ptr, AP, AQ, s_axm, s_axp, s_aym, s_ayq, s_acp, s_acq,
            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
            AUX_P: tl.constexpr, AUX_Q: tl.constexpr, AUX_M: tl.constexpr, PREC: tl.constexpr):
        """y = x·W + u·B (+ bias), tile by tile (forward: W as (in, out); backward: Wᵀ and Aᵀ)."""
        pid = tl.program_id(0)
        if pid < n_aux:
            _wgrad_tile(pid, ax_ptr, ay_ptr, ac_ptr, AP, AQ, M, s_axm, s_axp, s_aym, s_ayq, s_acp, s_acq,
                        AUX_P, AUX_Q, AUX_M, PREC)
        else:
            pid = pid - n_aux
            pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc = _mm_acc(acc, x_ptr, w_ptr, rm % M, rn % N, K, s_xm, s_xk, s_wk, s_wn, BLOCK_K, PREC)
            acc = _mm_acc(acc, u_ptr, b_ptr, rm % M, rn % N, R, s_um, s_ur, s_br, s_bn, BLOCK_R, PREC)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn % N).to(tl.float32)[None, :]
            tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty),
                     mask=(rm < M)[:, None] & (rn < N)[None, :])


# GPU tiles: the main GEMM 128 × 128 × 64, 8 warps, 3 stages (96 KB of shared memory for the
# pipelined operands, within sm_80's 163 KB); the shrink 64 rows × r ≤ 64 per program; the
# weight-gradient tiles 128 × 64 reduced 64 rows at a time.
LORA_CONFIG_GPU = dict(
    main=dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, AUX_P=128, AUX_Q=64, AUX_M=64, num_warps=8, num_stages=3),
    shrink=dict(BLOCK_M=64, BLOCK_K=64, AUX_P=64, AUX_Q=128, AUX_M=64, num_warps=4, num_stages=3),
)
LORA_CONFIG_INTERPRET = dict(
    main=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, AUX_P=32, AUX_Q=16, AUX_M=16, num_warps=4, num_stages=1),
    shrink=dict(BLOCK_M=16, BLOCK_K=32, AUX_P=16, AUX_Q=32, AUX_M=16, num_warps=4, num_stages=1),
)


def _block_r(r: int, cap: int = 64) -> int:
    return min(cap, next_pow2(max(r, 16)))


def _w_as_in_out(weight: torch.Tensor, layout: str) -> tuple[int, int]:
    """Strides (along in, along out) of W read as an (in, out) matrix."""
    if layout == "linear":      # [out, in]
        return weight.stride(1), weight.stride(0)
    if layout == "conv1d":      # [in, out]
        return weight.stride(0), weight.stride(1)
    raise ValueError(f"weight_layout must be 'linear' or 'conv1d', got {layout!r}")


def _shrink(x, mat, s_k, s_r, r, scale, cfg, aux=None):
    """u = scale·x·mat (M, r) in x's dtype, mat read as (K, r) through strides (s_k, s_r); `aux`
    (X, Y, C) adds the weight-gradient tiles C = Xᵀ·Y to the same launch."""
    m, k = x.shape
    c = cfg["shrink"]
    br = _block_r(r)
    u = torch.empty(m, r, dtype=x.dtype, device=x.device)
    n_aux, aux_args = _aux_args(aux, c["AUX_P"], c["AUX_Q"], u)
    grid = (n_aux + triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(r, br),)
    _lora_shrink_kernel[grid](
        x, mat, u, m, k, r, x.stride(0), x.stride(1), s_k, s_r, u.stride(0), u.stride(1), float(scale),
        n_aux, *aux_args,
        BLOCK_M=c["BLOCK_M"], BLOCK_K=c["BLOCK_K"], BLOCK_R=br, AUX_P=c["AUX_P"], AUX_Q=c["AUX_Q"],
        AUX_M=c["AUX_M"], PREC=dot_precision(x.dtype), num_warps=c["num_warps"], num_stages=c["num_stages"])
    return u


def _aux_args(aux, bp, bq, dummy):
    if aux is None:
        return 0, (dummy, dummy, dummy, 1, 1, 0, 0, 0, 0, 0, 0)
    x, y, c = aux
    n = triton.cdiv(c.shape[0], bp) * triton.cdiv(c.shape[1], bq)
    return n, (x, y, c, c.shape[0], c.shape[1], x.stride(0), x.stride(1), y.stride(0), y.stride(1),
               c.stride(0), c.stride(1))


def _main(x, w, s_wk, s_wn, n_out, u, bmat, s_br, s_bn, bias, cfg, aux=None, main=True):
    """y = x·W + u·bmat (+ bias), W read as (K, n_out) through (s_wk, s_wn); main=False runs only
    the `aux` weight-gradient tiles."""
    m, k = x.shape
    r = u.shape[1]
    c = cfg["main"]
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    n_aux, aux_args = _aux_args(aux, c["AUX_P"], c["AUX_Q"], y)
    n_main = triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n_out, c["BLOCK_N"]) if main else 0
    _lora_main_kernel[(n_aux + n_main,)](
        x, w, u, bmat, bias if bias is not None else y, y, m, n_out, k, r,
        x.stride(0), x.stride(1), s_wk, s_wn, u.stride(0), u.stride(1), s_br, s_bn, y.stride(0), y.stride(1),
        n_aux, *aux_args,
        HAS_BIAS=bias is not None, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
        BLOCK_R=_block_r(r, 32), GROUP_M=c["GROUP_M"], AUX_P=c["AUX_P"], AUX_Q=c["AUX_Q"], AUX_M=c["AUX_M"],
        PREC=dot_precision(x.dtype), num_warps=c["num_warps"], num_stages=c["num_stages"])
    return y


class LowRankLinearTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, A, B, scale, layout):
        cfg = LORA_CONFIG_GPU if x2.is_cuda else LORA_CONFIG_INTERPRET
        s_win, s_wout = _w_as_in_out(weight, layout)
        n_out = B.shape[1]
        u = _shrink(x2, A, A.stride(0), A.stride(1), A.shape[1], scale, cfg)                 # s·x·A  (M, r)
        y = _main(x2, weight, s_win, s_wout, n_out, u, B, B.stride(0), B.stride(1), bias, cfg)   # x·W + u·B
        ctx.save_for_backward(x2, weight, A, B, u)
        ctx.scale, ctx.layout, ctx.cfg = scale, layout, cfg
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, A, B, u = ctx.saved_tensors
        need_dx, need_da, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        cfg, r = ctx.cfg, A.shape[1]
        dA = torch.empty_like(A) if need_da else None
        dB = torch.empty_like(B) if need_db else None
        dx = None
        # launch 1: v = s·dy·Bᵀ (Bᵀ read as (out, r)) and dB = uᵀ·dy
        v = _shrink(dy, B, B.stride(1), B.stride(0), r, ctx.scale, cfg, aux=(u, dy, dB) if need_db else None)
        # launch 2: dx = dy·Wᵀ + v·Aᵀ and dA = xᵀ·v
        if need_dx:
            s_win, s_wout = _w_as_in_out(weight, ctx.layout)
            dx = _main(dy, weight, s_wout, s_win, x2.shape[1], v, A, A.stride(1), A.stride(0), None, cfg,
                       aux=(x2, v, dA) if need_da else None)
        elif need_da:
            _main(dy, weight, 0, 0, 1, v, A, 0, 0, None, cfg, aux=(x2, v, dA), main=False)
        return dx, None, None, dA, dB, None, None


def lowrank_linear_triton(
    x: torch.Tensor,              # (..., in)
    weight: torch.Tensor,         # (out, in) or (in, out), see weight_layout; frozen
    bias: torch.Tensor | None,    # (out,), frozen
    A: torch.Tensor,              # (in, r)
    B: torch.Tensor,              # (r, out)
    scale: float,
    weight_layout: str = "linear",
) -> torch.Tensor:                # (..., out)
    """Same function as lowrank_linear_ref (see the comment above the kernels for the launches)."""
    if weight_layout not in ("linear", "conv1d"):
        raise ValueError(f"weight_layout must be 'linear' or 'conv1d', got {weight_layout!r}")
    n_in, r = A.shape
    n_out = B.shape[1]
    want = (n_out, n_in) if weight_layout == "linear" else (n_in, n_out)
    if (tuple(weight.shape) != want or B.shape[0] != r or x.shape[-1] != n_in
            or (bias is not None and tuple(bias.shape) != (n_out,))):      # the kernel reads n_out entries of it
        raise ValueError(f"lowrank_linear shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)} ({weight_layout}), "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)}, bias {None if bias is None else tuple(bias.shape)}")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("lowrank_linear (triton) treats W and its bias as frozen and computes no gradient for "
                         "them: call weight.requires_grad_(False) (and the bias), or use backend='torch'")
    check_tensors("lowrank_linear", x, weight, bias, A, B)
    lead = x.shape[:-1]
    if x.numel() == 0:
        return lowrank_linear_ref(x, weight, bias, A, B, scale, weight_layout)
    if (dtype := compute_dtype(x)) != x.dtype:       # under autocast, as the torch op computes
        x, weight, A, B = x.to(dtype), cast_weight(weight, dtype), A.to(dtype), B.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    y = LowRankLinearTriton.apply(x.reshape(-1, n_in), weight, bias, A, B, float(scale), weight_layout)
    return y.reshape(*lead, n_out)
