"""KL(teacher || student) on next-token distributions, straight from final hidden states.

Both distributions come from the same frozen LM head W (V × D), so the loss is a function of the
two hidden states only:

    z_s = h_s·Wᵀ/T,  z_t = h_t·Wᵀ/T,  p_t = softmax(z_t) (optionally kept to its top k and renormalised)
    KL  = Σ_v p_t (log p_t − log_softmax(z_s)),    loss = T² / N · Σ_rows KL

    dloss/dh_s = T² / N · (softmax(z_s) − p_t)·W / T      (Σ_v p_t = 1)

The reference walks the rows in chunks and computes that gradient in the forward pass, so at most
chunk × V logits exist at once and backward is one multiply. It is the CPU path.
"""

from __future__ import annotations

import torch
from ._common import (HAS_TRITON, LN2, LOG2E, check_tensors, cuda_arch, dot_precision, grad_dtype, next_pow2,
                      num_sms)
from .frozen_linear import cast_weight
from .head_chunks import (ROWS, HeadChunks, check_head_inputs, exp_rows_, gemm_dtype, row_dot, sub_,
                          teacher_distribution, teacher_side)


class LinearKLRef(torch.autograd.Function):
    """Per chunk of rows, p_t and Σ p_t·log p_t (given, or recomputed), KL_row = Σ p_t·log p_t −
    Σ p_t·z_s + lse(z_s) and dz = softmax(z_s) − p_t in place over z_s: a step is one logit GEMM,
    one log-sum-exp, one row dot and the gradient GEMM (+ the teacher's GEMM and softmax)."""

    @staticmethod
    def forward(ctx, hs, ht, weight, bias, temperature, top_k, denom, chunk, teacher_p):
        # The logits' matmuls in the autocast dtype (bf16 halves their time on a CPU that has it); the
        # softmaxes over the vocabulary, the sums and the gradient of z in fp32 at least.
        gemm = gemm_dtype(hs)
        with torch.autocast(hs.device.type, enabled=False):
            head = HeadChunks(weight, bias, gemm, min(chunk, hs.shape[0]))
            if teacher_p is None:                     # the teacher's logits get their own buffer
                teacher = head.twin()
            coef = temperature * temperature / denom
            total = torch.zeros((), dtype=head.acc, device=hs.device)
            grad = torch.empty_like(hs, dtype=grad_dtype(hs)) if hs.requires_grad else None
            for i in range(0, hs.shape[0], chunk):
                if teacher_p is None:
                    pt = teacher.logits(ht[i:i + chunk])
                    neg_entropy = teacher_distribution(pt, temperature, top_k)
                else:
                    pt, neg_entropy = teacher_p[0][i:i + chunk], teacher_p[1][i:i + chunk].to(head.acc)
                zs = head.logits(hs[i:i + chunk])
                if temperature != 1.0:
                    zs /= temperature
                dot = row_dot(pt, zs)
                lse, sums = exp_rows_(zs)
                total += (neg_entropy - dot + lse).sum()
                if grad is not None:
                    dz = sub_(zs.mul_((coef / temperature / sums)[:, None]), pt, coef / temperature)
                    grad[i:i + chunk] = head.back(dz)
            ctx.save_for_backward(grad if grad is not None else hs.new_empty(0))
            ctx.hs_dtype = hs.dtype                     # grad may be fp32 (grad_dtype)
            return total * coef

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.hs_dtype), None, None, None, None, None, None, None, None


def linear_kl_ref(
    student_h: torch.Tensor,            # (N, D), with grad
    teacher_h: torch.Tensor,            # (N, D)
    head_weight: torch.Tensor,          # (V, D), frozen
    head_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    denom: int | None = None,           # rows the mean is over; default N
    chunk: int = ROWS,
    teacher_p: tuple[torch.Tensor, torch.Tensor] | None = None,   # teacher_side(teacher_h, ...), kept
) -> torch.Tensor:                      # scalar
    """With `teacher_p` the teacher's distribution is read, not recomputed: a third fewer matmuls."""
    if student_h.shape != teacher_h.shape or student_h.dim() != 2:
        raise ValueError(f"hidden states must both be (N, D), got {tuple(student_h.shape)} and {tuple(teacher_h.shape)}")
    if head_weight.shape[1] != student_h.shape[1]:
        raise ValueError(f"head weight {tuple(head_weight.shape)} does not match hidden size {student_h.shape[1]}")
    check_head_inputs("linear_kl", head_weight, head_bias, temperature, student_h, teacher_h)
    if teacher_p is not None and (teacher_p[0].shape != (student_h.shape[0], head_weight.shape[0])
                                  or teacher_p[1].shape != (student_h.shape[0],)):
        raise ValueError(f"teacher_p is {tuple(teacher_p[0].shape)} and {tuple(teacher_p[1].shape)}, not (rows, "
                         "vocabulary) and (rows,) of this call")
    if student_h.shape[0] == 0:
        return student_h.float().sum() * 0.0                  # no rows: no loss, and a zero gradient
    denom = denom if denom is not None else student_h.shape[0]
    return LinearKLRef.apply(student_h, teacher_h.detach(), head_weight.detach(),
                             None if head_bias is None else head_bias.detach(),
                             float(temperature), int(top_k), int(denom), int(chunk), teacher_p)


# ---------------------------------------------------------------------------------------------
# Triton: fused linear KL.
#
# Work per call (N rows, V vocabulary, D hidden, W the (V, D) head):
#   pass 1  _kl_fwd_kernel   grid (row blocks, vocabulary splits). Each program walks its share of
#           the vocabulary one (BLOCK_V, BLOCK_D) tile of W at a time; every tile of W is loaded once
#           and feeds both dots (z_s = h_s·Wᵀ and z_t = h_t·Wᵀ), so the head is read once for both
#           models. An online softmax (base 2, 1/T and log2 e folded into one multiplier) keeps, per
#           row: the student max and sum, the teacher max and sum, and a_t = Σ 2^(z_t − m_t)(z_t − z_s).
#           Then KL = ln 2 · (a_t / l_t − lse_t + lse_s) in base-2 logits, no logit ever stored.
#           Splitting the vocabulary across programs (flash-decoding style) fills the GPU when N is small
#           (2048 rows are 32 row blocks for 132 SMs); the partial statistics are merged in PyTorch.
#   pass 2  _kl_grad_kernel  grid (row blocks of a chunk, vocabulary tiles): recomputes both logit
#           tiles (one read of W again), forms dz = softmax(z_s) − p_t with the final log-sum-exps of
#           pass 1, and writes dz for `chunk` rows; then grad_chunk = dz·W is one GEMM (cuBLAS).
#
# Why a second pass over W: the gradient needs softmax(z_s) − p_t, known only once the whole
# vocabulary is seen. Carrying it along the online softmax (as flash attention carries its output)
# needs a D-wide fp32 accumulator per row that round-trips global memory on every vocabulary tile
# (8 MB a row at Llama-7B sizes); writing dz once and reading it back costs 2·V·2 bytes (128 KB) a
# row. Recomputing the two logit tiles costs two GEMM-equivalents (ROOFLINE.md); dz is `chunk` × V.
#
# Top-k teacher (the reference keeps the teacher's k largest logits and renormalises over them):
#   k + 1 ≤ BLOCK_V (and k ≤ 127): in pass 1. Each row keeps a running top-K_PAD buffer (K_PAD =
#     next_pow2(k + 1)) of 64-bit keys: the teacher logit made order-preserving in the high 32 bits,
#     the student logit of the same entry in the low 32; per tile topk(cat(buffer, topk(tile))). The
#     merged top k are all the teacher's side of KL needs; their k-th is the threshold τ of pass 2.
#   larger k (threshold fallback): τ per row from teacher logits written 256 rows at a time by the
#     pass-2 kernel and torch.topk; pass 1 then keeps z_t ≥ τ (a 256 × V buffer).
#   Ties: pass 2 (and the fallback's pass 1) keep z_t ≥ τ − 2⁻²⁰·max(1, |τ|), so a last-bit difference
#     between two kernels' logits cannot drop the k-th entry. Where the (k+1)-th is that close, the
#     fused loss would read k entries and pass 2 more: such a call takes the fallback, whose loss and
#     gradient keep every tied entry (the reference keeps exactly k).
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _logit_tiles(hs_ptr, ht_ptr, w_ptr, b_ptr, rows, cols, N, V, D,
                     stride_hs_n, stride_hs_d, stride_ht_n, stride_ht_d, stride_wv, stride_wd, c2,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_D: tl.constexpr, PREC: tl.constexpr):
        """Both logit tiles (BLOCK_N, BLOCK_V), in base-2 units ((h·Wᵀ + b)·log2e/T); entries past V are −1e30."""
        row_ok = rows < N
        col_ok = cols < V
        zs = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        zt = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            w = tl.load(w_ptr + cols[:, None] * stride_wv + dd[None, :] * stride_wd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)          # (BLOCK_V, BLOCK_D): one read, two dots
            a = tl.load(hs_ptr + rows[:, None] * stride_hs_n + dd[None, :] * stride_hs_d,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(ht_ptr + rows[:, None] * stride_ht_n + dd[None, :] * stride_ht_d,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            wt = tl.trans(w)
            zs = tl.dot(a, wt.to(a.dtype), zs, input_precision=PREC)
            zt = tl.dot(b, wt.to(b.dtype), zt, input_precision=PREC)
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            zs += bias[None, :]
            zt += bias[None, :]
        # columns past V get a finite −1e30, not −inf: 2^(−1e30 − m) is 0 all the same, and z_t − z_s
        # stays finite (0) there, so no −inf − −inf = NaN needs masking later
        zs = tl.where(col_ok[None, :], zs * c2, -1.0e30)
        zt = tl.where(col_ok[None, :], zt * c2, -1.0e30)
        return zs, zt

    @triton.jit
    def _order_key(x):
        """fp32 bits → int32 whose signed order is the float order (and back: it is an involution)."""
        return tl.where(x >= 0, x, x ^ 0x7FFFFFFF)

    @triton.jit
    def _kl_fwd_kernel(hs_ptr, ht_ptr, w_ptr, b_ptr, tau_ptr, stats_ptr, topk_ptr,
                       N, V, D, stride_hs_n, stride_hs_d, stride_ht_n, stride_ht_d, stride_wv, stride_wd,
                       tiles_per_split, n_splits, c2,
                       HAS_BIAS: tl.constexpr, USE_TAU: tl.constexpr, TOPK: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        v_begin = split * tiles_per_split * BLOCK_V
        v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)

        m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)    # student running max (base 2)
        l_s = tl.zeros((BLOCK_N,), tl.float32)                   # Σ 2^(z_s − m_s)
        m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)    # teacher, over the kept entries
        l_t = tl.zeros((BLOCK_N,), tl.float32)
        a_t = tl.zeros((BLOCK_N,), tl.float32)                   # Σ 2^(z_t − m_t)·(z_t − z_s)
        if USE_TAU:
            tau = tl.load(tau_ptr + rows, mask=row_ok, other=float("-inf"))
        if TOPK > 0:
            best = tl.full((BLOCK_N, TOPK), -9223372036854775807 - 1, tl.int64)

        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            zs, zt = _logit_tiles(hs_ptr, ht_ptr, w_ptr, b_ptr, rows, cols, N, V, D,
                                  stride_hs_n, stride_hs_d, stride_ht_n, stride_ht_d, stride_wv, stride_wd, c2,
                                  HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, PREC)
            # Student: plain online log-sum-exp. Every tile has a valid column, so m_new is finite.
            m_new = tl.maximum(m_s, tl.max(zs, axis=1))
            l_s = l_s * tl.exp2(m_s - m_new) + tl.sum(tl.exp2(zs - m_new[:, None]), axis=1)
            m_s = m_new
            if TOPK == 0:
                keep = col_ok[None, :]
                if USE_TAU:
                    keep = keep & (zt >= tau[:, None])
                # the kept set may be empty in a tile (τ), so the teacher side does use −inf
                ztk = tl.where(keep, zt, float("-inf"))
                mt_new = tl.maximum(m_t, tl.max(ztk, axis=1))
                mt_ref = tl.where(mt_new == float("-inf"), 0.0, mt_new)   # no kept entry yet: avoid −inf − −inf
                alpha = tl.exp2(m_t - mt_ref)
                e = tl.exp2(ztk - mt_ref[:, None])
                l_t = l_t * alpha + tl.sum(e, axis=1)
                a_t = a_t * alpha + tl.sum(e * (zt - zs), axis=1)             # e = 0 off the kept set
                m_t = mt_new
            else:
                key = _order_key(zt.to(tl.int32, bitcast=True)).to(tl.int64)
                payload = zs.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
                packed = (key << 32) | payload                                   # (BLOCK_N, BLOCK_V)
                best = tl.topk(tl.cat(best, tl.topk(packed, TOPK), dim=1), TOPK)

        base = (rows * n_splits + split) * 5
        tl.store(stats_ptr + base + 0, m_s, mask=row_ok)
        tl.store(stats_ptr + base + 1, l_s, mask=row_ok)
        tl.store(stats_ptr + base + 2, m_t, mask=row_ok)
        tl.store(stats_ptr + base + 3, l_t, mask=row_ok)
        tl.store(stats_ptr + base + 4, a_t, mask=row_ok)
        if TOPK > 0:
            kk = tl.arange(0, TOPK)
            tl.store(topk_ptr + (rows[:, None] * n_splits + split) * TOPK + kk[None, :], best,
                     mask=row_ok[:, None])

    @triton.jit
    def _kl_grad_kernel(hs_ptr, ht_ptr, w_ptr, b_ptr, lse_s_ptr, lse_t_ptr, tau_ptr, out_ptr,
                        row0, N, V, D, stride_hs_n, stride_hs_d, stride_ht_n, stride_ht_d, stride_wv, stride_wd,
                        stride_out, c2,
                        HAS_BIAS: tl.constexpr, WRITE_TEACHER: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
        """out[r − row0, v] = softmax(z_s)[r, v] − p_t[r, v] for rows row0 ≤ r < N, or, with
        WRITE_TEACHER, the teacher's base-2 logits (for the top-k threshold fallback)."""
        rows = row0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok = rows < N
        col_ok = cols < V
        zs, zt = _logit_tiles(hs_ptr, ht_ptr, w_ptr, b_ptr, rows, cols, N, V, D,
                              stride_hs_n, stride_hs_d, stride_ht_n, stride_ht_d, stride_wv, stride_wd, c2,
                              HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, PREC)
        if WRITE_TEACHER:
            out = zt
        else:
            lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
            lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0)
            tau = tl.load(tau_ptr + rows, mask=row_ok, other=float("-inf"))
            q = tl.exp2(zs - lse_s[:, None])
            p = tl.where(zt >= tau[:, None], tl.exp2(zt - lse_t[:, None]), 0.0)
            out = q - p
        tl.store(out_ptr + (rows - row0)[:, None] * stride_out + cols[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# Tile sizes. GPU: 64 rows × 128 vocabulary × 64 hidden per step, 8 warps: two fp32 (64, 128)
# accumulators are 64 registers a thread. The top-k variant also holds a (64, 128) int64 key tile
# and the sort network: on sm_90 it still compiles without spills at 64 rows (64-row tiles keep the
# dots on wgmma, which works on 64 rows per warp group); on sm_80 it spills at 64 rows and takes 32
# (absorber_kernels/aot.py checks both). The interpreter runs small tiles (its cost is per program and per
# op), which also makes the tests cross many tile edges.
KL_CONFIG_GPU = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3)
KL_CONFIG_GPU_TOPK_SM80 = dict(BLOCK_N=32, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3)
KL_CONFIG_INTERPRET = dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1)
MAX_FUSED_TOPK = 127      # k + 1 candidates a split within GPU tiles of BLOCK_V = 128


def kl_configs(top_k: int, arch: int | None) -> tuple[dict, dict]:
    """(pass-1 config, pass-2 config) for this top_k on compute capability `arch` (None: the
    interpreter). Both passes must use the same BLOCK_V and BLOCK_D so that they compute bitwise the
    same logits (the threshold fallback relies on it)."""
    if arch is None:
        return KL_CONFIG_INTERPRET, KL_CONFIG_INTERPRET
    fused_topk = 0 < top_k <= MAX_FUSED_TOPK
    return (KL_CONFIG_GPU_TOPK_SM80 if fused_topk and arch < 90 else KL_CONFIG_GPU), KL_CONFIG_GPU


def _decode_keys(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of the kernel's packing: (teacher logit, student logit), both fp32 base-2."""
    hi = (packed >> 32).to(torch.int32)
    hi = torch.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
    return hi.view(torch.float32), packed.to(torch.int32).view(torch.float32)


def _relax(tau: torch.Tensor) -> torch.Tensor:
    """τ lowered by 2⁻²⁰·max(1, |τ|): rounding-level differences between kernels count as ties."""
    return tau - torch.ldexp(tau.abs().clamp(min=1.0), torch.tensor(-20, device=tau.device))


def _merge_lse(m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """log2 Σ_splits l·2^m over the last axis; splits with nothing kept (m = −inf) weigh 0."""
    mx = m.max(dim=-1).values
    mx_ref = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    return mx_ref + torch.log2((l * torch.exp2(m - mx_ref[:, None])).sum(-1))


def linear_kl_stats(hs, ht, weight, bias=None, temperature=1.0, top_k=0, config=None, splits=None,
                    fused_topk=None):
    """Pass 1 and the merge: per-row KL (nats, logits divided by T), and the base-2 log-sum-exps and
    threshold pass 2 needs. `config`, `splits` and `fused_topk` are for tests."""
    n, d = hs.shape
    v = weight.shape[0]
    interp = hs.device.type != "cuda"
    cfg, grad_cfg = kl_configs(top_k, cuda_arch(hs.device))
    cfg = config or cfg
    grad_cfg = config or grad_cfg
    bn, bv, bd = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_D"]
    c2 = LOG2E / temperature
    use_topk = 0 < top_k < v
    if fused_topk is None:
        fused_topk = top_k <= MAX_FUSED_TOPK and next_pow2(top_k + 1) <= bv
    # k + 1 kept a split: the (k+1)-th largest overall shows whether the k-th has a tie (below)
    k_pad = next_pow2(top_k + 1) if (use_topk and fused_topk) else 0
    if k_pad > bv:
        raise ValueError(f"fused top-k needs top_k ≤ BLOCK_V={bv}, got {top_k}")
    prec = dot_precision(hs.dtype)

    tau = None
    if use_topk and not fused_topk:   # threshold fallback: τ from chunks of teacher logits
        tau = torch.empty(n, dtype=torch.float32, device=hs.device)
        rows = max(grad_cfg["BLOCK_N"], 256)
        buf = torch.empty(min(rows, n), v, dtype=torch.float32, device=hs.device)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            grid = (triton.cdiv(r1 - r0, grad_cfg["BLOCK_N"]), triton.cdiv(v, bv))
            _kl_grad_kernel[grid](
                hs, ht, weight, bias if bias is not None else weight, buf, buf, buf, buf,
                r0, r1, v, d, hs.stride(0), hs.stride(1), ht.stride(0), ht.stride(1),
                weight.stride(0), weight.stride(1), buf.stride(0), c2,
                HAS_BIAS=bias is not None, WRITE_TEACHER=True, BLOCK_N=grad_cfg["BLOCK_N"], BLOCK_V=bv,
                BLOCK_D=bd, PREC=prec, num_warps=grad_cfg["num_warps"], num_stages=grad_cfg["num_stages"])
            tau[r0:r1] = torch.topk(buf[:r1 - r0], top_k, dim=-1).values[:, -1]
        tau = _relax(tau)

    n_tiles = triton.cdiv(v, bv)
    row_blocks = triton.cdiv(n, bn)
    if splits is None:   # enough programs for ~2 waves of the GPU, each split at least 8 tiles
        splits = max(1, min(triton.cdiv(2 * num_sms(hs.device), row_blocks), n_tiles // 8 if not interp else 4))
    splits = max(1, min(splits, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)          # no empty split
    stats = torch.empty(n, splits, 5, dtype=torch.float32, device=hs.device)
    best = torch.empty(n, splits, max(k_pad, 1), dtype=torch.int64, device=hs.device)
    _kl_fwd_kernel[(row_blocks, splits)](
        hs, ht, weight, bias if bias is not None else weight, tau if tau is not None else stats, stats, best,
        n, v, d, hs.stride(0), hs.stride(1), ht.stride(0), ht.stride(1), weight.stride(0), weight.stride(1),
        tiles_per_split, splits, c2,
        HAS_BIAS=bias is not None, USE_TAU=tau is not None, TOPK=k_pad,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, PREC=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    lse_s = _merge_lse(stats[..., 0], stats[..., 1])
    if k_pad:
        zt_sel, zs_sel = _decode_keys(torch.topk(best.reshape(n, -1), top_k + 1, dim=-1).values)   # (N, k+1), sorted
        tau = _relax(zt_sel[:, top_k - 1]).contiguous()
        if bool((zt_sel[:, top_k] >= tau).any()):
            # A (near-)tie at the k-th place: pass 2 keeps every entry >= tau, more than the k this
            # loss reads (its gradient was 0.42 off). The threshold path's loss reads that same set.
            return linear_kl_stats(hs, ht, weight, bias, temperature, top_k, config, splits, fused_topk=False)
        zt_sel, zs_sel = zt_sel[:, :top_k], zs_sel[:, :top_k]
        lse_t = torch.logsumexp(zt_sel * LN2, dim=-1) / LN2
        p = torch.exp2(zt_sel - lse_t[:, None])
        kl2 = (p * (zt_sel - zs_sel)).sum(-1) - lse_t + lse_s
    else:
        m_t, l_t, a_t = stats[..., 2], stats[..., 3], stats[..., 4]
        mx = m_t.max(dim=-1).values
        w = torch.exp2(m_t - mx[:, None])                  # every row keeps ≥ 1 entry, so mx is finite
        l_sum = (l_t * w).sum(-1)
        lse_t = mx + torch.log2(l_sum)
        kl2 = (a_t * w).sum(-1) / l_sum - lse_t + lse_s
        if tau is None:
            tau = torch.full((n,), float("-inf"), dtype=torch.float32, device=hs.device)
    return kl2 * LN2, lse_s.contiguous(), lse_t.contiguous(), tau


def linear_kl_grad(hs, ht, weight, bias, temperature, lse_s, lse_t, tau, coef, chunk, config=None):
    """dloss/dh_s = coef/T · (softmax(z_s) − p_t)·W, `chunk` rows at a time."""
    n, d = hs.shape
    v = weight.shape[0]
    cfg = config or kl_configs(0, cuda_arch(hs.device))[1]
    bn = cfg["BLOCK_N"]
    chunk = max(bn, triton.cdiv(min(chunk, n), bn) * bn)
    grad = torch.empty_like(hs, dtype=grad_dtype(hs))
    dz = torch.empty(min(chunk, n), v, dtype=weight.dtype, device=hs.device)   # the only vocabulary-wide buffer
    c2 = LOG2E / temperature
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        grid = (triton.cdiv(r1 - r0, bn), triton.cdiv(v, cfg["BLOCK_V"]))
        _kl_grad_kernel[grid](
            hs, ht, weight, bias if bias is not None else weight, lse_s, lse_t, tau, dz,
            r0, r1, v, d, hs.stride(0), hs.stride(1), ht.stride(0), ht.stride(1),
            weight.stride(0), weight.stride(1), dz.stride(0), c2,
            HAS_BIAS=bias is not None, WRITE_TEACHER=False, BLOCK_N=bn, BLOCK_V=cfg["BLOCK_V"],
            BLOCK_D=cfg["BLOCK_D"], PREC=dot_precision(hs.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        g = torch.matmul(dz[:r1 - r0], weight)                 # (rows, D), a plain GEMM: cuBLAS
        grad[r0:r1] = g.float() * (coef / temperature)
    return grad


class LinearKLTriton(torch.autograd.Function):
    """loss = T²/denom · Σ_rows KL(p_t ‖ softmax(z_s)); the gradient wrt h_s is formed in forward
    (pass 2) and backward only scales it by grad_output (W, h_t and the bias get none: frozen/detached)."""

    @staticmethod
    def forward(ctx, hs, ht, weight, bias, temperature, top_k, denom, chunk):
        kl, lse_s, lse_t, tau = linear_kl_stats(hs, ht, weight, bias, temperature, top_k)
        coef = temperature * temperature / denom
        grad = None
        if ctx.needs_input_grad[0]:
            grad = linear_kl_grad(hs, ht, weight, bias, temperature, lse_s, lse_t, tau, coef, chunk)
        ctx.save_for_backward(grad if grad is not None else hs.new_empty(0))
        ctx.hs_dtype = hs.dtype
        return kl.sum() * coef

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.hs_dtype), None, None, None, None, None, None, None


def linear_kl_triton(
    student_h: torch.Tensor,            # (N, D), with grad
    teacher_h: torch.Tensor,            # (N, D)
    head_weight: torch.Tensor,          # (V, D), frozen
    head_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    denom: int | None = None,           # rows the mean is over; default N
    chunk: int = 256,                   # rows of the dz buffer (chunk × V) in the gradient pass
    teacher_p: tuple[torch.Tensor, torch.Tensor] | None = None,   # ignored: see below
) -> torch.Tensor:                      # scalar, fp32
    """Same function as linear_kl_ref, fused (see the comment above the kernels). teacher_p is not
    read: each tile of W feeds both sides' logits, so the teacher's are free and p_t N × V reads."""
    if student_h.shape != teacher_h.shape or student_h.dim() != 2:
        raise ValueError(f"hidden states must both be (N, D), got {tuple(student_h.shape)} and {tuple(teacher_h.shape)}")
    if head_weight.shape[1] != student_h.shape[1]:
        raise ValueError(f"head weight {tuple(head_weight.shape)} does not match hidden size {student_h.shape[1]}")
    check_head_inputs("linear_kl", head_weight, head_bias, temperature, student_h, teacher_h)
    check_tensors("linear_kl", student_h, teacher_h, head_weight, head_bias)
    denom = denom if denom is not None else student_h.shape[0]
    if student_h.shape[0] == 0:
        return student_h.float().sum() * 0.0
    if (dtype := gemm_dtype(student_h)) != student_h.dtype:      # under autocast, as the torch op computes
        student_h, teacher_h = student_h.to(dtype), teacher_h.to(dtype)
        head_weight, head_bias = cast_weight(head_weight, dtype), None if head_bias is None else head_bias.to(dtype)
    return LinearKLTriton.apply(student_h, teacher_h.detach(), head_weight.detach(),
                                None if head_bias is None else head_bias.detach(),
                                float(temperature), int(top_k), int(denom), int(chunk))
