"""Causal attention with grouped-query heads and an optional prefix of cached keys/values.

The T queries are the last T of the S key positions (S − T cached ones come first), so query i
sees keys 0 .. S − T + i. That one shape serves the teacher (X's cache, then Y), the student
(no prefix, S = T) and generate() (the window's cache, then the new tokens).
"""

from __future__ import annotations

import math

import torch

from ._common import HAS_TRITON, LOG2E, check_tensors, dot_precision, next_pow2


def attention_ref(
    q: torch.Tensor,   # (B, Hq, T, D)
    k: torch.Tensor,   # (B, Hkv, S, D), S >= T, Hq % Hkv == 0
    v: torch.Tensor,   # (B, Hkv, S, D)
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:     # (B, Hq, T, D)
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if hq % hkv or s < t or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"bad attention shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if not all(x.dtype.is_floating_point for x in (q, k, v)):      # int probabilities were all zeros
        raise TypeError(f"attention needs floating-point q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}")
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale            # (B, Hq, T, S)
    if causal:
        rows = torch.arange(t, device=q.device)[:, None] + (s - t)
        cols = torch.arange(s, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows, float("-inf"))
    acc = torch.promote_types(scores.dtype, torch.float32)            # fp32 softmax; float64 stays float64
    return torch.matmul(torch.softmax(scores.to(acc), dim=-1).to(v.dtype), v)


# ---------------------------------------------------------------------------------------------
# Triton: flash attention, forward and backward (after Triton's fused-attention tutorial).
#
# Positions: query i (0 ≤ i < T) sits at key position P + i, P = S − T (the cached prefix), and sees
# keys j ≤ P + i. Softmax in base 2: scores are multiplied once by scale·log2 e and exp2 is used
# throughout; m, l and the accumulator are fp32; the saved LSE is m + log2 l (base 2).
#
# forward   _attn_fwd_kernel, grid (query blocks, B·Hq). For a query block starting at m0 every key
#           j < P + m0 is visible to all its rows: those key blocks run without a mask; the blocks up
#           to P + m0 + BLOCK_M get the causal mask; later blocks are skipped. Grouped-query heads:
#           query head h reads key/value head h // (Hq/Hkv); K and V are never repeated in memory.
# backward  δ_i = Σ_d O_id·dO_id (_attn_bwd_pre_kernel), then one launch (_attn_bwd_kernel) with
#           two kinds of programs, no atomics:
#             dK, dV: one program per (key block, batch, KV head). It loops over the Hq/Hkv query heads
#               of its group and their query blocks, so the group's sum lands in registers, not in
#               memory: P_ji = 2^(s·log2e·q_i·k_j − LSE_i), dV_j += Σ_i P_ji dO_i,
#               dS_ji = P_ji (dO_i·v_j − δ_i), dK_j += scale · Σ_i dS_ji q_i.
#             dQ: one program per (query block, batch, query head): dQ_i = scale · Σ_j dS_ij k_j.
#           (dS = P∘(dP − δ) is the softmax Jacobian: δ_i = Σ_j P_ij dP_ij = Σ_d dO_id O_id.)
#           The two kinds share one launch so the dQ programs fill the GPU beside the dK/dV ones;
#           δ needs all of O·dO before any of them starts, hence its own (tiny) launch.
# Decoding (T = 1) runs the same forward: correct, but one program per (batch, head) streams the
# whole cache, with 1 of its BLOCK_M query rows used; a split-S (flash-decoding) variant would fill
# the GPU better for generate(). Not done: absorption, the hot path, runs T = m queries.
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_ks, s_kd, s_vs, s_vd, qpos, lo, hi, S, qk_scale,
                        MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        rd = tl.arange(0, BLOCK_D)
        d_ok = rd < HEAD_DIM
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            kv_ok = cols < S
            k = tl.load(k_base + cols[:, None] * s_ks + rd[None, :] * s_kd, mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC)                     # (BLOCK_M, BLOCK_N)
            if MASK:
                ok = kv_ok[None, :]
                if CAUSAL:
                    ok = ok & (cols[None, :] <= qpos[:, None])
                qk = tl.where(ok, qk * qk_scale, float("-inf"))
                m_ij = tl.maximum(m_i, tl.max(qk, axis=1))
                qk = qk - m_ij[:, None]
            else:
                m_ij = tl.maximum(m_i, tl.max(qk, axis=1) * qk_scale)
                qk = qk * qk_scale - m_ij[:, None]
            p = tl.exp2(qk)
            alpha = tl.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            v = tl.load(v_base + cols[:, None] * s_vs + rd[None, :] * s_vd, mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
            m_i = m_ij
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, LSE, qk_scale,
                         s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd,
                         s_ob, s_oh, s_ot, s_od, H, G, T, S,
                         CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        hk = h // G
        prefix = S - T
        m0 = pid_m * BLOCK_M
        rm = m0 + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        row_ok = rm < T
        d_ok = rd < HEAD_DIM
        q = tl.load(Q + b * s_qb + h * s_qh + rm[:, None] * s_qt + rd[None, :] * s_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b * s_kb + hk * s_kh
        v_base = V + b * s_vb + hk * s_vh
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        if CAUSAL:
            full_hi = ((prefix + m0) // BLOCK_N) * BLOCK_N     # keys below: visible to every row of the block
            hi = tl.minimum(S, prefix + m0 + BLOCK_M)          # keys from here on: visible to none (skipped)
        else:
            full_hi = (S // BLOCK_N) * BLOCK_N
            hi = S
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_ks, s_kd, s_vs, s_vd, prefix + rm,
                                        0, full_hi, S, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, PREC)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_ks, s_kd, s_vs, s_vd, prefix + rm,
                                        full_hi, hi, S, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, PREC)
        acc = acc / l_i[:, None]
        tl.store(LSE + bh.to(tl.int64) * T + rm, m_i + tl.log2(l_i), mask=row_ok)
        tl.store(O + b * s_ob + h * s_oh + rm[:, None] * s_ot + rd[None, :] * s_od, acc.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _attn_bwd_pre_kernel(O, DO, Delta, s_ob, s_oh, s_ot, s_od, s_db, s_dh, s_dt, s_dd, H, T,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = bh % H
        rd = tl.arange(0, BLOCK_D)
        m = (rm < T)[:, None] & (rd < HEAD_DIM)[None, :]
        o = tl.load(O + b * s_ob + h * s_oh + rm[:, None] * s_ot + rd[None, :] * s_od, mask=m, other=0.0)
        do = tl.load(DO + b * s_db + h * s_dh + rm[:, None] * s_dt + rd[None, :] * s_dd, mask=m, other=0.0)
        tl.store(Delta + bh.to(tl.int64) * T + rm, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=rm < T)

    @triton.jit
    def _attn_bwd_dkdv(dk, dv, k, v, q_base, do_base, lse_base, delta_base, s_qt, s_qd, s_dt, s_dd,
                       cols, prefix, lo, hi, T, qk_scale,
                       MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, PREC: tl.constexpr):
        rd = tl.arange(0, BLOCK_D)
        d_ok = rd < HEAD_DIM
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < T
            qT = tl.load(q_base + rows[None, :] * s_qt + rd[:, None] * s_qd, mask=row_ok[None, :] & d_ok[:, None], other=0.0)
            lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
            pT = tl.exp2(tl.dot(k, qT, input_precision=PREC) * qk_scale - lse[None, :])     # (BLOCK_N, BLOCK_M)
            if MASK:   # causal: key j is seen by row i iff j ≤ prefix + i
                pT = tl.where(cols[:, None] <= (prefix + rows)[None, :], pT, 0.0)
            do = tl.load(do_base + rows[:, None] * s_dt + rd[None, :] * s_dd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
            dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PREC)
        return dk, dv

    @triton.jit
    def _attn_bwd_dq(dq, q, do, lse, delta, k_base, v_base, s_ks, s_kd, s_vs, s_vd, qpos, lo, hi, S, qk_scale,
                     MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        rd = tl.arange(0, BLOCK_D)
        d_ok = rd < HEAD_DIM
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            kv_ok = cols < S
            kT = tl.load(k_base + cols[None, :] * s_ks + rd[:, None] * s_kd, mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
            vT = tl.load(v_base + cols[None, :] * s_vs + rd[:, None] * s_vd, mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
            p = tl.exp2(tl.dot(q, kT, input_precision=PREC) * qk_scale - lse[:, None])       # (BLOCK_M, BLOCK_N)
            if MASK:
                ok = kv_ok[None, :]
                if CAUSAL:
                    ok = ok & (cols[None, :] <= qpos[:, None])
                p = tl.where(ok, p, 0.0)
            dp = tl.dot(do, vT, input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC)
        return dq

    @triton.jit
    def _attn_bwd_kernel(Q, K, V, DO, DQ, DK, DV, LSE, Delta, sm_scale, qk_scale,
                         s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd,
                         s_db, s_dh, s_dt, s_dd,
                         s_dqb, s_dqh, s_dqt, s_dqd, s_dkb, s_dkh, s_dks, s_dkd, s_dvb, s_dvh, s_dvs, s_dvd,
                         H, HKV, G, T, S, n_kv_programs,
                         CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
                         PREC: tl.constexpr):
        pid = tl.program_id(0)
        prefix = S - T
        rd = tl.arange(0, BLOCK_D)
        d_ok = rd < HEAD_DIM
        if pid < n_kv_programs:
            # ---- dK, dV for one key block of one KV head, summed over its query-head group ----
            n_kb = tl.cdiv(S, BLOCK_N1)
            bhk = pid // n_kb
            n0 = (pid % n_kb) * BLOCK_N1
            b = (bhk // HKV).to(tl.int64)
            hk = bhk % HKV
            cols = n0 + tl.arange(0, BLOCK_N1)
            kv_ok = cols < S
            k = tl.load(K + b * s_kb + hk * s_kh + cols[:, None] * s_ks + rd[None, :] * s_kd,
                        mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(V + b * s_vb + hk * s_vh + cols[:, None] * s_vs + rd[None, :] * s_vd,
                        mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
            dk = tl.zeros((BLOCK_N1, BLOCK_D), tl.float32)
            dv = tl.zeros((BLOCK_N1, BLOCK_D), tl.float32)
            if CAUSAL:
                # rows i with prefix + i ≥ n0 see some of these keys; from the first block whose rows
                # all satisfy prefix + i ≥ n0 + BLOCK_N1 − 1 on, every row sees every key
                start = (tl.maximum(n0 - prefix, 0) // BLOCK_M1) * BLOCK_M1
                mask_end = tl.maximum(tl.cdiv(tl.maximum(n0 + BLOCK_N1 - 1 - prefix, 0), BLOCK_M1) * BLOCK_M1, start)
            else:
                start = 0
                mask_end = 0
            for g in range(0, G):
                h = hk * G + g
                bh = b * H + h
                q_base = Q + b * s_qb + h * s_qh
                do_base = DO + b * s_db + h * s_dh
                dk, dv = _attn_bwd_dkdv(dk, dv, k, v, q_base, do_base, LSE + bh * T, Delta + bh * T,
                                        s_qt, s_qd, s_dt, s_dd, cols, prefix, start, tl.minimum(mask_end, T), T,
                                        qk_scale, True, HEAD_DIM, BLOCK_D, BLOCK_M1, PREC)
                dk, dv = _attn_bwd_dkdv(dk, dv, k, v, q_base, do_base, LSE + bh * T, Delta + bh * T,
                                        s_qt, s_qd, s_dt, s_dd, cols, prefix, mask_end, T, T,
                                        qk_scale, False, HEAD_DIM, BLOCK_D, BLOCK_M1, PREC)
            dk = dk * sm_scale
            m = kv_ok[:, None] & d_ok[None, :]
            tl.store(DK + b * s_dkb + hk * s_dkh + cols[:, None] * s_dks + rd[None, :] * s_dkd,
                     dk.to(DK.dtype.element_ty), mask=m)
            tl.store(DV + b * s_dvb + hk * s_dvh + cols[:, None] * s_dvs + rd[None, :] * s_dvd,
                     dv.to(DV.dtype.element_ty), mask=m)
        else:
            # ---- dQ for one query block of one query head ----
            pid = pid - n_kv_programs
            n_qb = tl.cdiv(T, BLOCK_M2)
            bh = pid // n_qb
            m0 = (pid % n_qb) * BLOCK_M2
            b = (bh // H).to(tl.int64)
            h = bh % H
            hk = h // G
            rows = m0 + tl.arange(0, BLOCK_M2)
            row_ok = rows < T
            m = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qt + rd[None, :] * s_qd, mask=m, other=0.0)
            do = tl.load(DO + b * s_db + h * s_dh + rows[:, None] * s_dt + rd[None, :] * s_dd, mask=m, other=0.0)
            lse = tl.load(LSE + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
            delta = tl.load(Delta + bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
            dq = tl.zeros((BLOCK_M2, BLOCK_D), tl.float32)
            k_base = K + b * s_kb + hk * s_kh
            v_base = V + b * s_vb + hk * s_vh
            if CAUSAL:
                full_hi = ((prefix + m0) // BLOCK_N2) * BLOCK_N2
                hi = tl.minimum(S, prefix + m0 + BLOCK_M2)
            else:
                full_hi = (S // BLOCK_N2) * BLOCK_N2
                hi = S
            dq = _attn_bwd_dq(dq, q, do, lse, delta, k_base, v_base, s_ks, s_kd, s_vs, s_vd, prefix + rows,
                              0, full_hi, S, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N2, PREC)
            dq = _attn_bwd_dq(dq, q, do, lse, delta, k_base, v_base, s_ks, s_kd, s_vs, s_vd, prefix + rows,
                              full_hi, hi, S, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N2, PREC)
            dq = dq * sm_scale
            tl.store(DQ + b * s_dqb + h * s_dqh + rows[:, None] * s_dqt + rd[None, :] * s_dqd,
                     dq.to(DQ.dtype.element_ty), mask=m)


# GPU tiles (head dim ≤ 128): forward 128 queries × 64 keys, 8 warps; backward dK/dV 64 keys ×
# 32 queries and dQ 64 queries × 32 keys, 8 warps (dK and dV are two fp32 (64, 128) accumulators:
# 64 registers a thread). The interpreter runs 16 × 16 tiles so the tests cross many block edges.
ATTN_CONFIG_GPU = dict(fwd=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                       bwd=dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, num_warps=8, num_stages=2),
                       pre=dict(BLOCK_M=64, num_warps=4))
# fp32 operands (compute_dtype "float32" on a GPU) take twice the shared memory and registers per
# tile: the tiles above need 320 KB of shared memory at head dim 128 in fp32 (an H200 has 227 KB; seen
# failing there), and 64-query tiles spill registers under 3xTF32. These compile for sm_80 and sm_90
# with neither (absorber_kernels.aot, fp32).
ATTN_CONFIG_GPU_FP32 = dict(fwd=dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
                            bwd=dict(BLOCK_M1=16, BLOCK_N1=16, BLOCK_M2=16, BLOCK_N2=16, num_warps=8, num_stages=2),
                            pre=dict(BLOCK_M=64, num_warps=4))
ATTN_CONFIG_INTERPRET = dict(fwd=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
                             bwd=dict(BLOCK_M1=16, BLOCK_N1=16, BLOCK_M2=16, BLOCK_N2=16, num_warps=4, num_stages=1),
                             pre=dict(BLOCK_M=16, num_warps=4))


def gpu_config(dtype: torch.dtype) -> dict:
    """The tiles a GPU launch uses for operands of `dtype`."""
    return ATTN_CONFIG_GPU_FP32 if dtype == torch.float32 else ATTN_CONFIG_GPU


def _s4(x):
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


class AttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, config):
        b, hq, t, d = q.shape
        hkv, s = k.shape[1], k.shape[2]
        cfg = config or (gpu_config(q.dtype) if q.is_cuda else ATTN_CONFIG_INTERPRET)
        f = cfg["fwd"]
        bd = max(16, next_pow2(d))
        out = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)   # (B, Hq, T, D) view
        lse = torch.empty(b, hq, t, dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(t, f["BLOCK_M"]), b * hq)
        _attn_fwd_kernel[grid](
            q, k, v, out, lse, scale * LOG2E, *_s4(q), *_s4(k), *_s4(v), *_s4(out), hq, hq // hkv, t, s,
            CAUSAL=causal, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=f["BLOCK_M"], BLOCK_N=f["BLOCK_N"],
            PREC=dot_precision(q.dtype), num_warps=f["num_warps"], num_stages=f["num_stages"])
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal, ctx.cfg = scale, causal, cfg
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        cfg = ctx.cfg
        b, hq, t, d = q.shape
        hkv, s = k.shape[1], k.shape[2]
        bd = max(16, next_pow2(d))
        delta = torch.empty_like(lse)
        pre = cfg["pre"]
        _attn_bwd_pre_kernel[(triton.cdiv(t, pre["BLOCK_M"]), b * hq)](
            out, do, delta, *_s4(out), *_s4(do), hq, t, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=pre["BLOCK_M"],
            num_warps=pre["num_warps"])
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        c = cfg["bwd"]
        n_kv = triton.cdiv(s, c["BLOCK_N1"]) * b * hkv
        n_q = triton.cdiv(t, c["BLOCK_M2"]) * b * hq
        _attn_bwd_kernel[(n_kv + n_q,)](
            q, k, v, do, dq, dk, dv, lse, delta, ctx.scale, ctx.scale * LOG2E,
            *_s4(q), *_s4(k), *_s4(v), *_s4(do), *_s4(dq), *_s4(dk), *_s4(dv),
            hq, hkv, hq // hkv, t, s, n_kv,
            CAUSAL=ctx.causal, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M1=c["BLOCK_M1"], BLOCK_N1=c["BLOCK_N1"],
            BLOCK_M2=c["BLOCK_M2"], BLOCK_N2=c["BLOCK_N2"], PREC=dot_precision(q.dtype),
            num_warps=c["num_warps"], num_stages=c["num_stages"])
        return dq, dk, dv, None, None, None


def attention_triton(
    q: torch.Tensor,   # (B, Hq, T, D)
    k: torch.Tensor,   # (B, Hkv, S, D), S >= T, Hq % Hkv == 0
    v: torch.Tensor,   # (B, Hkv, S, D)
    scale: float | None = None,
    causal: bool = True,
    config: dict | None = None,   # tile sizes (tests); default by device
) -> torch.Tensor:     # (B, Hq, T, D): a transposed view of a contiguous (B, T, Hq, D) buffer
    """Same function as attention_ref, flash-style (see the comment above the kernels). Any strides."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"bad attention shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if hq % hkv or s < t or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"bad attention shapes q {tuple(q.shape)} k {tuple(k.shape)}")
    if d > 256:
        raise ValueError(f"head dim {d} > 256 is not supported by the triton attention")
    check_tensors("attention", q, k, v)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    return AttentionTriton.apply(q, k, v, float(scale), bool(causal), config)
