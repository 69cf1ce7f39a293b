"""Low-rank delta linear for a batch of streams, each row with its own delta (Punica's BGMV/SGMV idea):

    y[b] = x[b]·W (+ bias) + s·(x[b]·A[index[b]])·B[index[b]]

A (S, in, r) and B (S, r, out) stack the deltas of S streams; index (rows,) names each row's
stream. The reference gathers each row's A and B and runs two batched matmuls: the gather copies
rows·r·(in + out) numbers, small next to the activations, and autograd scatters dA and dB back to
each stream. It is the CPU path. The Triton kernel below computes the same function without the
gather, and reduces dA and dB per stream without atomics.
"""

from __future__ import annotations

import torch

from ._common import HAS_TRITON, check_tensors, dot_precision, next_pow2
from .frozen_linear import base_linear
from .lowrank_linear import LORA_CONFIG_GPU, LORA_CONFIG_INTERPRET


def _check_shapes(x, weight, bias, A, B, index, weight_layout) -> tuple[int, int, int, int]:
    """(S, in, r, out), or a ValueError/TypeError naming what does not fit."""
    if weight_layout not in ("linear", "conv1d"):
        raise ValueError(f"weight_layout must be 'linear' or 'conv1d', got {weight_layout!r}")
    if x.dim() != 3 or index.dim() != 1 or index.shape[0] != x.shape[0]:
        raise ValueError(f"x must be (rows, T, in) with one index per row, got x {tuple(x.shape)}, "
                         f"index {tuple(index.shape)}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"index must be an integer tensor (torch.long), got {index.dtype}")
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[2] != B.shape[1]:
        raise ValueError(f"A must be (S, in, r) and B (S, r, out), got A {tuple(A.shape)}, B {tuple(B.shape)}")
    S, n_in, r = A.shape
    n_out = B.shape[2]
    want = (n_out, n_in) if weight_layout == "linear" else (n_in, n_out)
    if x.shape[2] != n_in or tuple(weight.shape) != want or (bias is not None and tuple(bias.shape) != (n_out,)):
        raise ValueError(f"lowrank_linear_batched shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)} "
                         f"({weight_layout}, want {want}), bias {None if bias is None else tuple(bias.shape)}, "
                         f"A {tuple(A.shape)}, B {tuple(B.shape)}")
    return S, n_in, r, n_out


class RowLayout:
    """Which stream each row of a batch belongs to, and what the kernels derive from it with one
    device → host copy of `index` (rows numbers): that it is in range, whether it is sorted, each
    stream's rows. The engine builds one per forward and every layer's op reads it (as vLLM's LoRA
    ops take one metadata object per forward); an op given a bare index tensor builds its own."""

    def __init__(self, index: torch.Tensor, S: int):
        if not isinstance(index, torch.Tensor) or index.dim() != 1:
            raise ValueError(f"index must be a 1-D tensor (one index per row), got {type(index).__name__} "
                             f"{tuple(index.shape) if isinstance(index, torch.Tensor) else ''}")
        if index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"index must be an integer tensor (torch.long), got {index.dtype}")
        self.index = index
        ih = index.detach().to("cpu", torch.int64)
        if ih.numel() and (int(ih.min()) < 0 or int(ih.max()) >= S):
            bad = ih[(ih < 0) | (ih >= S)]
            raise ValueError(f"index values must lie in [0, {S}) (one per stacked delta), got {bad[:8].tolist()}")
        self.S, self.device = S, index.device
        self.sorted = bool((ih[1:] >= ih[:-1]).all())
        counts = torch.bincount(ih, minlength=S)                             # rows of each stream
        self.seg_rows = torch.cat([counts.new_zeros(1), counts.cumsum(0)])   # (S + 1,) first row of each stream
        self.max_rows = int(counts.max()) if S else 0
        # rows in stream order: the kernels see x permuted by `perm` (identity when index is sorted)
        self.perm = self.inv = None
        if not self.sorted:
            perm = torch.argsort(ih, stable=True)
            self.perm, self.inv = perm.to(self.device), torch.argsort(perm).to(self.device)
        self.row_stream = torch.repeat_interleave(torch.arange(S), counts).to(self.device, torch.int32)
        self._seg: dict = {}
        self._tiles: dict = {}

    def seg(self, T: int) -> torch.Tensor:
        """(S + 1,) int32: the first token of each stream's segment, then M (rows of T tokens)."""
        if T not in self._seg:
            self._seg[T] = (self.seg_rows * T).to(self.device, torch.int32)
        return self._seg[T]

    def tiles(self, T: int, block_m: int) -> torch.Tensor:
        """(n, 3) int32, one row per segment tile: (stream, first token, end of the stream's tokens);
        a tile is at most block_m tokens of one stream, and a stream without rows has none."""
        key = (T, block_m)
        if key not in self._tiles:
            seg = self.seg_rows * T
            ntile = (seg[1:] - seg[:-1] + block_m - 1) // block_m
            stream = torch.repeat_interleave(torch.arange(self.S), ntile)
            j = torch.arange(stream.numel()) - (torch.cumsum(ntile, 0) - ntile)[stream]
            tiles = torch.stack([stream, seg[stream] + j * block_m, seg[stream + 1]], 1)
            self._tiles[key] = tiles.to(self.device, torch.int32).contiguous()
        return self._tiles[key]


def row_layout(index, S: int) -> RowLayout:
    """`index` as a RowLayout over S stacked deltas (a RowLayout passes through, checked)."""
    if isinstance(index, RowLayout):
        if index.S != S:
            raise ValueError(f"the row layout is for {index.S} streams, but {S} deltas are stacked")
        return index
    return RowLayout(index, S)


def lowrank_linear_batched_ref(
    x: torch.Tensor,              # (rows, T, in)
    weight: torch.Tensor,         # (out, in) or (in, out), see weight_layout
    bias: torch.Tensor | None,    # (out,)
    A: torch.Tensor,              # (S, in, r)
    B: torch.Tensor,              # (S, r, out)
    index,                        # (rows,) long tensor in [0, S), or a RowLayout of one
    scale: float,
    weight_layout: str = "linear",
) -> torch.Tensor:                # (rows, T, out)
    index = row_layout(index, A.shape[0]).index                # range-checked once per layout
    _check_shapes(x, weight, bias, A, B, index, weight_layout)
    y = base_linear(x, weight, bias, weight_layout)
    a = A.index_select(0, index).to(x.dtype)                   # (rows, in, r)
    b = B.index_select(0, index).to(x.dtype)                   # (rows, r, out)
    return torch.baddbmm(y, torch.bmm(x, a).mul_(scale), b)     # as lowrank_linear_ref: s on x·a, the sum in the GEMM


# ---------------------------------------------------------------------------------------------
# Triton: four launches in all, two forward and two backward, as for the single delta
# (lowrank_linear.py, whose _mm_acc and _wgrad_tile are reused). s is the scale, k a stream. x is
# flattened to M = rows·T token rows in stream order (index sorted; otherwise the wrapper permutes the
# rows first), so each stream k owns one contiguous segment of tokens [seg[k], seg[k+1]), maybe empty.
#
# forward   1. shrink   u = s·(x·A[k])                   (M, r)    grid: segment tiles × r blocks
#                       (SGMV: a tile is ≤ BLOCK_M tokens of one stream k, so it reads one A[k])
#           2. main     y = x·W + u·B[k] (+ b)           (M, out)  grid: M/BLOCK_M × out/BLOCK_N tiles
#                       in grouped order; the tiles ignore segments so the frozen GEMM, the bulk of
#                       the work, runs at full tile efficiency, and the expand loops over the streams
#                       a tile spans (a contiguous range, index being sorted): one u·B[k] each, with u's
#                       rows of other streams masked to zero. Usually 1 or 2 streams per tile.
# backward  1. shrink   v = s·(dy·B[k]ᵀ)                 (M, r)    segment tiles, as forward
#              + dB[k] = u_kᵀ·dy_k                       (S, r, out)  one program per (stream, tile of
#                       dB[k]), reducing over that stream's segment: no atomics, and a stream with
#                       no rows gets zeros.
#           2. main     dx = dy·Wᵀ + v·A[k]ᵀ             (M, in)   the forward's main kernel, W and A
#                                                                   read through transposed strides
#              + dA[k] = x_kᵀ·v_k                        (S, in, r)   per (stream, tile), as dB.
# Gradient math (token m of stream k, upstream dy): y_m = x_m·W + s·x_m·A_k·B_k, so
#   dx_m = dy_m·Wᵀ + s·dy_m·B_kᵀ·A_kᵀ = dy_m·Wᵀ + v_m·A_kᵀ,
#   dA_k = Σ_{m∈k} s·x_mᵀ·(dy_m·B_kᵀ) = x_kᵀ·v_k,   dB_k = Σ_{m∈k} (s·x_m·A_k)ᵀ·dy_m = u_kᵀ·dy_k,
# and no dW (W frozen). Where the launches split, and why the weight-gradient tiles ride along with
# the shrink and main programs: see lowrank_linear.py. dB needs u and dy, so it joins launch 1;
# dA needs v, so it joins launch 2. u is saved for backward, in the activations' dtype.
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .lowrank_linear import _block_r, _grouped_tile, _mm_acc, _w_as_in_out, _wgrad_tile

    @triton.jit
    def _seg_wgrad(pid, tiles_per_stream, seg_ptr, x_ptr, y_ptr, c_ptr, P, Q, s_xm, s_xp, s_ym, s_yq,
                   s_cs, s_cp, s_cq, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                   PREC: tl.constexpr):
        """Tile pid % tiles_per_stream of C[s] = X_sᵀ·Y_s, s = pid // tiles_per_stream: the reduction
        runs over stream s's own segment of rows, so no other program writes C[s]."""
        s = pid // tiles_per_stream
        m0 = tl.load(seg_ptr + s).to(tl.int64)
        m1 = tl.load(seg_ptr + s + 1).to(tl.int64)
        _wgrad_tile(pid % tiles_per_stream, x_ptr + m0 * s_xm, y_ptr + m0 * s_ym, c_ptr + s.to(tl.int64) * s_cs,
                    P, Q, (m1 - m0).to(tl.int32), s_xm, s_xp, s_ym, s_yq, s_cp, s_cq, BLOCK_P, BLOCK_Q, BLOCK_M, PREC)

    @triton.jit
    def _blora_shrink_kernel(
            x_ptr, a_ptr, u_ptr, tiles_ptr, seg_ptr, K, R, s_xm, s_xk, s_as, s_ak, s_ar, s_um, s_ur, scale,
            # the fused weight gradient (backward only): C[s] = X_sᵀ·Y_s, n_aux programs first in the grid
            n_aux, aux_per_stream, ax_ptr, ay_ptr, ac_ptr, AP, AQ, s_axm, s_axp, s_aym, s_ayq, s_acs, s_acp, s_acq,
            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
            AUX_P: tl.constexpr, AUX_Q: tl.constexpr, AUX_M: tl.constexpr, PREC: tl.constexpr):
        """u[tile rows, r-block] = scale · x[tile rows, :] · A[s][:, r-block] for one segment tile of
        stream s (forward: A; backward: B[s]ᵀ)."""
        pid = tl.program_id(0)
        if pid < n_aux:
            _seg_wgrad(pid, aux_per_stream, seg_ptr, ax_ptr, ay_ptr, ac_ptr, AP, AQ, s_axm, s_axp, s_aym, s_ayq,
                       s_acs, s_acp, s_acq, AUX_P, AUX_Q, AUX_M, PREC)
        else:
            pid = pid - n_aux
            n_r = tl.cdiv(R, BLOCK_R)
            tile = pid // n_r
            s = tl.load(tiles_ptr + 3 * tile)          # (stream, first token, end of the stream's tokens)
            m0 = tl.load(tiles_ptr + 3 * tile + 1)
            m1 = tl.load(tiles_ptr + 3 * tile + 2)
            rm = m0 + tl.arange(0, BLOCK_M)
            rr = (pid % n_r) * BLOCK_R + tl.arange(0, BLOCK_R)
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            acc = _mm_acc(acc, x_ptr, a_ptr + s.to(tl.int64) * s_as, tl.minimum(rm, m1 - 1), rr % R, K,
                          s_xm, s_xk, s_ak, s_ar, BLOCK_K, PREC)
            tl.store(u_ptr + rm[:, None] * s_um + rr[None, :] * s_ur, (acc * scale).to(u_ptr.dtype.element_ty),
                     mask=(rm < m1)[:, None] & (rr < R)[None, :])

    @triton.jit
    def _mm_acc_rows(acc, a_ptr, b_ptr, ra, rb, row_ok, K, s_a0, s_ak, s_bk, s_b1,
                     BLOCK_K: tl.constexpr, PREC: tl.constexpr):
        """_mm_acc with a's rows outside `row_ok` read as zero."""
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            a = tl.load(a_ptr + ra[:, None] * s_a0 + rk[None, :] * s_ak, mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            b = tl.load(b_ptr + rk[:, None] * s_bk + rb[None, :] * s_b1, mask=k_ok[:, None], other=0.0)
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PREC)
        return acc

    @triton.jit
    def _blora_main_kernel(
            x_ptr, w_ptr, u_ptr, b_ptr, bias_ptr, y_ptr, stream_ptr, T, M, N, K, R,
            s_xm, s_xk, s_wk, s_wn, s_um, s_ur, s_bs, s_br, s_bn, s_ym, s_yn,
            n_aux, aux_per_stream, seg_ptr, ax_ptr, ay_ptr, ac_ptr, AP, AQ, s_axm, s_axp, s_aym, s_ayq,
            s_acs, s_acp, s_acq,
            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
            AUX_P: tl.constexpr, AUX_Q: tl.constexpr, AUX_M: tl.constexpr, PREC: tl.constexpr):
        """y = x·W + u·B[stream of the row] (+ bias), tile by tile (forward: W as (in, out), B[s];
        backward: Wᵀ and A[s]ᵀ). stream_ptr holds each row's stream (sorted), a row being T tokens."""
        pid = tl.program_id(0)
        if pid < n_aux:
            _seg_wgrad(pid, aux_per_stream, seg_ptr, ax_ptr, ay_ptr, ac_ptr, AP, AQ, s_axm, s_axp, s_aym, s_ayq,
                       s_acs, s_acp, s_acq, AUX_P, AUX_Q, AUX_M, PREC)
        else:
            pid = pid - n_aux
            pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc = _mm_acc(acc, x_ptr, w_ptr, rm % M, rn % N, K, s_xm, s_xk, s_wk, s_wn, BLOCK_K, PREC)
            # the expand, one stream at a time over the streams [s_lo, s_hi] of this tile's rows
            row_s = tl.load(stream_ptr + (rm % M) // T)
            s_lo = tl.load(stream_ptr + (pid_m * BLOCK_M) // T)
            s_hi = tl.load(stream_ptr + (tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // T)
            for s in range(s_lo, s_hi + 1):
                acc = _mm_acc_rows(acc, u_ptr, b_ptr + s * s_bs, rm % M, rn % N, row_s == s, R,
                                   s_um, s_ur, s_br, s_bn, BLOCK_R, PREC)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn % N).to(tl.float32)[None, :]
            tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty),
                     mask=(rm < M)[:, None] & (rn < N)[None, :])


# GPU tiles: the single delta's (lowrank_linear.py); the shrink's segment tile is at most 64 tokens
# of one stream, fewer (down to 16) when no stream has that many (decode: one token per row).
BLORA_CONFIG_GPU, BLORA_CONFIG_INTERPRET = LORA_CONFIG_GPU, LORA_CONFIG_INTERPRET


def _shrink_block_m(info: RowLayout, T: int, cfg) -> int:
    return min(cfg["shrink"]["BLOCK_M"], max(16, next_pow2(info.max_rows * T)))


def _aux_args(aux, S, bp, bq, dummy):
    """(n_aux, aux_per_stream, *pointer/size/stride args) for the per-stream weight-gradient tiles
    C[s] = X_sᵀ·Y_s, aux = (X (M, P), Y (M, Q), C (S, P, Q)); none when aux is None."""
    if aux is None:
        return 0, 1, (dummy, dummy, dummy, 1, 1, 0, 0, 0, 0, 0, 0, 0)
    x, y, c = aux
    per = triton.cdiv(c.shape[1], bp) * triton.cdiv(c.shape[2], bq)
    return S * per, per, (x, y, c, c.shape[1], c.shape[2], x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                          c.stride(0), c.stride(1), c.stride(2))


def _shrink(x, mat, s_s, s_k, s_r, r, scale, info, T, cfg, aux=None):
    """u = scale·x·mat[s] (M, r) in x's dtype, each row with its stream's mat[s] read as (K, r) through
    strides (s_s, s_k, s_r); `aux` (X, Y, C) adds the per-stream tiles C[s] = X_sᵀ·Y_s to the launch."""
    m, k = x.shape
    c = cfg["shrink"]
    bm = _shrink_block_m(info, T, cfg)
    br = _block_r(r)
    seg, tiles = info.seg(T), info.tiles(T, bm)
    u = torch.empty(m, r, dtype=x.dtype, device=x.device)
    n_aux, per, aux_args = _aux_args(aux, info.S, c["AUX_P"], c["AUX_Q"], u)
    grid = (n_aux + tiles.shape[0] * triton.cdiv(r, br),)
    _blora_shrink_kernel[grid](
        x, mat, u, tiles, seg, k, r, x.stride(0), x.stride(1), s_s, s_k, s_r, u.stride(0), u.stride(1),
        float(scale), n_aux, per, *aux_args,
        BLOCK_M=bm, BLOCK_K=c["BLOCK_K"], BLOCK_R=br, AUX_P=c["AUX_P"], AUX_Q=c["AUX_Q"], AUX_M=c["AUX_M"],
        PREC=dot_precision(x.dtype), num_warps=c["num_warps"], num_stages=c["num_stages"])
    return u


def _main(x, w, s_wk, s_wn, n_out, u, bmat, s_bs, s_br, s_bn, bias, info, T, cfg, aux=None, main=True):
    """y = x·W + u·bmat[s] (+ bias), W read as (K, n_out) through (s_wk, s_wn), bmat[s] as (r, n_out)
    through (s_bs, s_br, s_bn); main=False runs only the `aux` weight-gradient tiles."""
    m, k = x.shape
    r = u.shape[1]
    c = cfg["main"]
    seg = info.seg(T)
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    n_aux, per, aux_args = _aux_args(aux, info.S, c["AUX_P"], c["AUX_Q"], y)
    n_main = triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n_out, c["BLOCK_N"]) if main else 0
    _blora_main_kernel[(n_aux + n_main,)](
        x, w, u, bmat, bias if bias is not None else y, y, info.row_stream, T, m, n_out, k, r,
        x.stride(0), x.stride(1), s_wk, s_wn, u.stride(0), u.stride(1), s_bs, s_br, s_bn, y.stride(0), y.stride(1),
        n_aux, per, seg, *aux_args,
        HAS_BIAS=bias is not None, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
        BLOCK_R=_block_r(r, 32), GROUP_M=c["GROUP_M"], AUX_P=c["AUX_P"], AUX_Q=c["AUX_Q"], AUX_M=c["AUX_M"],
        PREC=dot_precision(x.dtype), num_warps=c["num_warps"], num_stages=c["num_stages"])
    return y


class LowRankLinearBatchedTriton(torch.autograd.Function):
    """x2 (M, in) in stream order, M = rows·T; `info` says which rows belong to which stream."""

    @staticmethod
    def forward(ctx, x2, weight, bias, A, B, scale, layout, info, T):
        cfg = BLORA_CONFIG_GPU if x2.is_cuda else BLORA_CONFIG_INTERPRET
        s_win, s_wout = _w_as_in_out(weight, layout)
        u = _shrink(x2, A, A.stride(0), A.stride(1), A.stride(2), A.shape[2], scale, info, T, cfg)   # s·x·A[s]
        y = _main(x2, weight, s_win, s_wout, B.shape[2], u, B, B.stride(0), B.stride(1), B.stride(2), bias,
                  info, T, cfg)                                                                    # x·W + u·B[s]
        ctx.save_for_backward(x2, weight, A, B, u)
        ctx.scale, ctx.layout, ctx.cfg, ctx.info, ctx.T = scale, layout, cfg, info, T
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, A, B, u = ctx.saved_tensors
        need_dx, need_da, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        cfg, info, T, r = ctx.cfg, ctx.info, ctx.T, A.shape[2]
        dA = torch.empty_like(A) if need_da else None
        dB = torch.empty_like(B) if need_db else None
        dx = None
        # launch 1: v = s·dy·B[s]ᵀ (B[s]ᵀ read as (out, r)) and dB[s] = u_sᵀ·dy_s
        v = _shrink(dy, B, B.stride(0), B.stride(2), B.stride(1), r, ctx.scale, info, T, cfg,
                    aux=(u, dy, dB) if need_db else None)
        # launch 2: dx = dy·Wᵀ + v·A[s]ᵀ and dA[s] = x_sᵀ·v_s
        if need_dx:
            s_win, s_wout = _w_as_in_out(weight, ctx.layout)
            dx = _main(dy, weight, s_wout, s_win, x2.shape[1], v, A, A.stride(0), A.stride(2), A.stride(1), None,
                       info, T, cfg, aux=(x2, v, dA) if need_da else None)
        elif need_da:
            _main(dy, weight, 0, 0, 1, v, A, 0, 0, 0, None, info, T, cfg, aux=(x2, v, dA), main=False)
        return dx, None, None, dA, dB, None, None, None, None


_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def lowrank_linear_batched_triton(
    x: torch.Tensor,              # (rows, T, in)
    weight: torch.Tensor,         # (out, in) or (in, out), see weight_layout; frozen
    bias: torch.Tensor | None,    # (out,), frozen
    A: torch.Tensor,              # (S, in, r)
    B: torch.Tensor,              # (S, r, out)
    index,                        # (rows,) long in [0, S), or a RowLayout; sorted (stream-major) is the fast case
    scale: float,
    weight_layout: str = "linear",
) -> torch.Tensor:                # (rows, T, out)
    """Same function as lowrank_linear_batched_ref (see the comment above the kernels for the launches)."""
    info = row_layout(index, A.shape[0])
    index = info.index
    S, n_in, r, n_out = _check_shapes(x, weight, bias, A, B, index, weight_layout)
    if x.dtype not in _FLOAT or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"lowrank_linear_batched (triton): x, weight and bias must share one of fp32/fp16/bf16, got "
                        f"x {x.dtype}, weight {weight.dtype}, bias {None if bias is None else bias.dtype}")
    if A.dtype not in _FLOAT or B.dtype not in _FLOAT:
        raise TypeError(f"lowrank_linear_batched (triton): A and B must be fp32/fp16/bf16, got {A.dtype}, {B.dtype}")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("lowrank_linear_batched (triton) treats W and its bias as frozen and computes no gradient "
                         "for them: call weight.requires_grad_(False) (and the bias), or use backend='torch'")
    check_tensors("lowrank_linear_batched", x, weight, bias, A, B, index)
    rows, T = x.shape[:2]
    if x.numel() == 0 or r == 0 or n_out == 0:
        return lowrank_linear_batched_ref(x, weight, bias, A, B, info, scale, weight_layout)
    xs = x if info.sorted else x.index_select(0, info.perm)      # rows in stream order
    y = LowRankLinearBatchedTriton.apply(xs.reshape(rows * T, n_in), weight, bias, A, B, float(scale),
                                         weight_layout, info, T)
    y = y.reshape(rows, T, n_out)
    return y if info.sorted else y.index_select(0, info.inv)
