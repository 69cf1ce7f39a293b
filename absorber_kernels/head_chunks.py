"""Rows of hidden states through a frozen LM head a chunk at a time, in buffers reused by every chunk.

linear_ce_ref, linear_kl_ref and teacher_side walk N rows through the (V, D) head `chunk` rows at a
time. A chunk's logits are chunk × V: 25 MB in fp32 for 128 rows of SmolLM2's 49,152 tokens. Made
afresh per chunk (what out-of-place ops do: the GEMM's output, its cast to fp32, logsumexp's shifted
copy, the row dot's product, the gradient's cast back) each of those is memory the allocator
takes from the OS and the kernel zeroes page by page. On this project's CPU machine those page
faults cost more than the arithmetic: one 535-row fused recite loss took 0.33 s, and 0.6-1.4 s
with the same inputs once the process held a model (1.1 s of it kernel time, 30-70 k faults a
call). Here a call holds one buffer in the GEMM dtype and one in the accumulation dtype, writes
every chunk's logits into them and takes the softmax in place.

The teacher's side of the KL (teacher_side, teacher_distribution) lives here too: p_t of every row,
computed once a round through the same chunks, which linear_kl_ref and linear_ce_ref then read.
"""

from __future__ import annotations

import copy
import math

import torch


# Rows a chunk: the head's bf16 GEMMs on this project's CPU (2 threads) run at 265-284 GFLOP/s
# with 64 rows, 327-335 with 128, 379-386 with 256 (32,000 x 512; SmolLM2's 49,152 x 576: 209-276,
# 283-332, 344-378), logits and gradient products alike. 256 rows cost a (256, V) buffer in each
# dtype (SmolLM2: 75 MB), up to 37 MB more at a round's peak than 128; rounds with probes took
# 4-7% less time (docs/performance.md, "Head chunks of 256 rows").
ROWS = 256


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on (as a plain head-then-loss would run), else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def check_head_inputs(op: str, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float,
                      *hidden: torch.Tensor) -> None:
    """Floating-point states and head, a bias of one entry a vocabulary row, a temperature > 0: an
    integer tensor set the GEMMs' dtype and truncated the head's weights, a (1,) bias broadcast
    (and the fused kernel read past it), T = 0 gave NaN."""
    for t in (weight, bias, *hidden):
        if t is not None and not t.dtype.is_floating_point:
            raise TypeError(f"{op}: hidden states, head weight and bias must be floating point, got {t.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: head bias {tuple(bias.shape)} must be ({weight.shape[0]},), an entry a vocabulary row")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")


class HeadChunks:
    """Logits z = h·Wᵀ (+ b) of up to `rows` rows at a time, and dz·W back. Build and use it with
    autocast off: it casts to `gemm` itself. A view it returns is overwritten by the next call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gemm: torch.dtype, rows: int):
        self.acc = torch.promote_types(gemm, torch.float32)       # fp32 for 16-bit, float64 stays float64
        self.gemm = gemm
        self.w = weight.to(gemm)
        self.b = bias.to(gemm) if bias is not None else None
        self.low = weight.new_empty(rows, weight.shape[0], dtype=gemm)
        self.z = self.low if self.acc == gemm else weight.new_empty(rows, weight.shape[0], dtype=self.acc)

    def twin(self) -> HeadChunks:
        """Buffers of their own over the same cast head (a second model's logits beside these)."""
        other = copy.copy(self)
        other.low = torch.empty_like(self.low)
        other.z = other.low if self.z is self.low else torch.empty_like(self.z)
        return other

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(n, D) -> (n, V) logits in the accumulation dtype."""
        n = h.shape[0]
        low, z = self.low[:n], self.z[:n]
        if self.b is None:
            torch.mm(h.to(self.gemm), self.w.t(), out=low)
        else:                                        # the bias inside the GEMM: one rounding, as F.linear
            torch.addmm(self.b, h.to(self.gemm), self.w.t(), out=low)
        if z.data_ptr() != low.data_ptr():
            z.copy_(low)
        return z

    def back(self, dz: torch.Tensor) -> torch.Tensor:
        """(n, V) -> dz·W, (n, D): in the GEMM dtype, in fp32 for an fp16 GEMM. dz may be the view
        logits() returned, and is overwritten.

        In fp16 dz is scaled by a power of two first: its entries are about softmax/rows, 1e-8 and
        below for a real vocabulary and a round's rows, under fp16's smallest subnormal (6e-8), and
        cast as they are 40% of a KL's gradient was lost. Scaled so the largest is 2^10, and the
        product scaled back in fp32, they keep fp16's 11 bits (headroom left for the sum over V)."""
        low = self.low[:dz.shape[0]]
        if self.gemm != torch.float16:
            if low.data_ptr() != dz.data_ptr():
                low.copy_(dz)
            return torch.mm(low, self.w)
        top = float(dz.abs().amax()) if dz.numel() else 0.0
        if top == 0.0 or not math.isfinite(top):
            low.copy_(dz)
            return torch.mm(low, self.w).to(self.acc)
        scale = 2.0 ** (10 - math.ceil(math.log2(top)))
        low.copy_(dz.mul_(scale))
        return torch.mm(low, self.w).to(self.acc).div_(scale)


def exp_rows_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z ← exp(z − max z) per row, in place; returns (log Σ exp z, Σ exp(z − max z)), both (n,):
    softmax(z) is then z / the second, which callers fold into their own scaling of z."""
    top = z.amax(dim=-1, keepdim=True)
    total = z.sub_(top).exp_().sum(dim=-1)
    return top.squeeze(-1) + total.log(), total


def sub_(z: torch.Tensor, p: torch.Tensor, alpha: float) -> torch.Tensor:
    """z -= alpha·p in place. A p in another dtype (a kept bf16 distribution) goes 16 rows at a time:
    the CPU casts a mixed-dtype operand to a whole temporary first (31 MiB for 256 x 32,000)."""
    if p.dtype == z.dtype:
        return z.sub_(p, alpha=alpha)
    for i in range(0, z.shape[0], 16):
        z[i:i + 16].sub_(p[i:i + 16], alpha=alpha)
    return z


def row_dot(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Σ_v p[n, v]·z[n, v] per row, (n,): one BLAS dot a row, no (n, V) product. Batched GEMMs of
    1 x V by V x 1 (`bmm`, `einsum`) run at 1 GFLOP/s on a CPU (256 x 49,152 in fp32: 18 ms against
    3 ms here; the product torch.linalg.vecdot makes is fresh pages: 15 ms). A p in another dtype
    (a kept bf16 distribution) is cast a row at a time: no (n, V) copy."""
    out = z.new_empty(z.shape[0])
    with torch.no_grad():                   # callers write their gradients themselves
        for i in range(z.shape[0]):
            torch.dot(p[i].to(z.dtype), z[i], out=out[i])
    return out


def teacher_distribution(zt: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """Teacher logits (rows, V) in the accumulation dtype -> p_t, in place, and returns Σ_v p_t·log p_t
    (rows,): constant within a round."""
    if temperature != 1.0:
        zt /= temperature
    if top_k and top_k < zt.shape[-1]:
        kept, where = torch.topk(zt, top_k, dim=-1)          # exactly k, ties chosen by topk
        zt.fill_(float("-inf")).scatter_(-1, where, kept)
    _, sums = exp_rows_(zt)
    zt.div_(sums[:, None])
    # p·log p with p = 0 outside the top k read as p·log(tiny) = 0: xlogy's sum, 3.8 ms not 12.6 (64 x 49,152).
    return row_dot(zt, zt.clamp_min(torch.finfo(zt.dtype).tiny).log_())


def teacher_side(ht, weight, bias=None, temperature=1.0, top_k=0, dtype=torch.float32, chunk=ROWS):
    """p_t of all N rows in `dtype` and Σ p_t·log p_t (fp32 at least), with linear_kl_ref's matmul
    dtype: what it takes as `teacher_p`, to skip the teacher's half of every call."""
    check_head_inputs("teacher_side", weight, bias, temperature, ht)
    gemm = gemm_dtype(ht)
    with torch.autocast(ht.device.type, enabled=False):
        head = HeadChunks(weight.detach(), None if bias is None else bias.detach(), gemm, min(chunk, ht.shape[0]))
        pt = ht.new_empty(ht.shape[0], weight.shape[0], dtype=dtype)
        neg_entropy = ht.new_empty(ht.shape[0], dtype=torch.promote_types(dtype, torch.float32))
        for i in range(0, ht.shape[0], chunk):
            zt = head.logits(ht[i:i + chunk])
            neg_entropy[i:i + chunk] = teacher_distribution(zt, temperature, top_k)
            pt[i:i + chunk] = zt
    return pt, neg_entropy
