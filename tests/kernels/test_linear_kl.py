"""Fused linear KL under the Triton interpreter against the float64 reference, forward and backward."""

import pytest
import torch

from absorber_kernels import linear_kl as K
from absorber_kernels.linear_kl import linear_kl_ref, linear_kl_triton
from absorber_kernels.testing import assert_close


def _inputs(n, d, v, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, d, generator=g)
    ht = hs + 0.5 * torch.randn(n, d, generator=g)       # a teacher near the student: KL well away from 0 and ∞
    w = 0.3 * torch.randn(v, d, generator=g)
    b = torch.randn(v, generator=g) if bias else None
    return hs.to(dtype), ht.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def _check(name, dtype, hs, ht, w, b, grad_out=2.5, **kw):
    hs_k = hs.clone().requires_grad_()
    loss = linear_kl_triton(hs_k, ht, w, b, **kw)
    (loss * grad_out).backward()
    hs64 = hs.double().requires_grad_()
    ref = linear_kl_ref(hs64, ht.double(), w.double(), None if b is None else b.double(), **kw)
    (ref * grad_out).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(f"linear_kl {name} loss", loss, ref, dtype)
    assert_close(f"linear_kl {name} dh_s", hs_k.grad, hs64.grad, dtype)
    assert hs_k.grad.dtype == hs.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature,bias", [(1.0, True), (2.0, False)])
def test_linear_kl_odd_shapes(dtype, temperature, bias):
    # 41 rows, 67 hidden, 401 vocabulary: no size a multiple of the 16 × 64 × 32 interpreter tiles;
    # chunk=16 runs the gradient pass in three chunks, the vocabulary is split over programs
    hs, ht, w, b = _inputs(41, 67, 401, dtype, bias)
    _check(f"T={temperature} bias={bias}", dtype, hs, ht, w, b, temperature=temperature, chunk=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_kl_fused_topk(dtype):
    # top_k ≤ 128: the teacher's top k found inside pass 1 (packed 64-bit keys), across vocabulary splits
    hs, ht, w, b = _inputs(19, 40, 203, dtype, bias=True, seed=1)
    _check("top-5 T=1.5", dtype, hs, ht, w, b, temperature=1.5, top_k=5, denom=50)


def test_linear_kl_threshold_topk():
    # top_k > 128: the threshold fallback (τ from chunks of teacher logits, then a masked pass 1)
    hs, ht, w, b = _inputs(19, 40, 401, torch.float32, bias=False, seed=2)
    _check("top-150 (threshold)", torch.float32, hs, ht, w, b, temperature=1.0, top_k=150)


def test_linear_kl_topk_paths_agree():
    hs, ht, w, b = _inputs(19, 40, 203, torch.float32, bias=True, seed=3)
    fused = K.linear_kl_stats(hs, ht, w, b, 1.0, 7, fused_topk=True)
    thresh = K.linear_kl_stats(hs, ht, w, b, 1.0, 7, fused_topk=False)
    for name, a, c in zip(("kl", "lse_s", "lse_t", "tau"), fused, thresh):
        assert_close(f"linear_kl top-7 fused vs threshold {name}", a, c, torch.float32)


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_linear_kl_split_merge(splits):
    # the per-split statistics merged in PyTorch must not depend on how the vocabulary was split
    hs, ht, w, b = _inputs(23, 33, 401, torch.float32, bias=True, seed=4)
    kl, *_ = K.linear_kl_stats(hs, ht, w, b, 1.3, 0, splits=splits)
    ref = [linear_kl_ref(hs[i:i + 1].double(), ht[i:i + 1].double(), w.double(), b.double(), 1.3) / 1.3 ** 2
           for i in range(23)]
    assert_close(f"linear_kl per-row kl splits={splits}", kl, torch.stack(ref), torch.float32)


def test_linear_kl_gpu_tiles(monkeypatch):
    # the tile sizes the GPU compiles (64 × 128 × 64), run by the interpreter
    monkeypatch.setattr(K, "KL_CONFIG_INTERPRET", K.KL_CONFIG_GPU)
    hs, ht, w, b = _inputs(41, 67, 401, torch.float32, bias=True, seed=5)
    _check("gpu tiles", torch.float32, hs, ht, w, b, temperature=1.0, chunk=32)


def test_linear_kl_no_grad_and_errors():
    hs, ht, w, b = _inputs(9, 16, 70, torch.float32, bias=False, seed=6)
    loss = linear_kl_triton(hs, ht, w)                     # student without grad: pass 1 only
    assert_close("linear_kl no-grad loss", loss, linear_kl_ref(hs.double(), ht.double(), w.double()), torch.float32)
    with pytest.raises(ValueError):
        linear_kl_triton(hs, ht[:, :8], w)
    with pytest.raises(ValueError):
        linear_kl_triton(hs, ht, w[:, :8])
    with pytest.raises(ValueError, match="teacher_p"):                # a kept distribution of other rows
        linear_kl_ref(hs, ht, w, teacher_p=K.teacher_side(ht[:5], w))
    # Top-k: the kept distribution is the one the reference recomputes.
    want = linear_kl_ref(hs.double(), ht.double(), w.double(), top_k=7)
    got = linear_kl_ref(hs.double(), ht.double(), w.double(), top_k=7,
                        teacher_p=K.teacher_side(ht.double(), w.double(), top_k=7, dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_reference_under_bf16_autocast_is_the_plain_composition_with_bf16_logits():
    # Under autocast the reference's logit and gradient matmuls run in bf16, as head-then-kl_div
    # would; the softmaxes stay fp32. fp32 matmuls would miss the plain composition's loss by 1.6e-3.
    hs, ht, w, b = _inputs(24, 32, 300, torch.float32, bias=True, seed=6)
    hs_r, hs_p = hs.clone().requires_grad_(), hs.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_kl_ref(hs_r, ht, w, b, temperature=2.0, chunk=10)
        kept = linear_kl_ref(hs, ht, w, b, temperature=2.0, chunk=7, teacher_p=K.teacher_side(ht, w, b, 2.0))
        zs, zt = torch.nn.functional.linear(hs_p, w, b), torch.nn.functional.linear(ht, w, b)
    assert zs.dtype == torch.bfloat16
    log_s, log_t = (torch.log_softmax(z.float() / 2.0, -1) for z in (zs, zt))
    plain = 4.0 * torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="sum") / 24
    loss.backward()
    plain.backward()
    torch.testing.assert_close(loss, plain, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(hs_r.grad, hs_p.grad, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(kept, loss.detach(), rtol=1e-6, atol=1e-7)     # kept == recomputed
    fp32 = float(linear_kl_ref(hs, ht, w, b, temperature=2.0))
    assert abs(fp32 - float(plain.detach())) > 20 * 2e-5 * abs(float(plain.detach()))


def test_no_rows_is_a_zero_loss_with_a_zero_gradient():
    hs = torch.zeros(0, 8, requires_grad=True)
    loss = linear_kl_ref(hs, torch.zeros(0, 8), torch.randn(30, 8))
    loss.backward()
    assert float(loss) == 0.0 and hs.grad.shape == (0, 8)


@pytest.mark.parametrize("which", ["kl", "ce"])
def test_a_loss_weight_scales_bf16_gradients_with_one_rounding(which):
    """The upstream weight is applied in fp32 and the gradient rounded once, not the weight rounded
    to bf16 first (0.3 is 0.30078 in bf16: every gradient 0.26% too large)."""
    from absorber_kernels.linear_ce import linear_ce_ref

    hs, ht, w, b = _inputs(20, 16, 90, torch.bfloat16, bias=False, seed=7)
    targets = torch.randint(0, 90, (20,), generator=torch.Generator().manual_seed(8))
    grads = []
    for weight in (1.0, 0.3):
        h = hs.clone().requires_grad_()
        loss = linear_kl_ref(h, ht, w) if which == "kl" else linear_ce_ref(h, targets, w)
        (loss * weight).backward()
        grads.append(h.grad)
    assert torch.equal(grads[1], (grads[0].float() * 0.3).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_dot_is_each_rows_dot_product(dtype):
    """The per-row sum the KL and CE paths read; p may come in another dtype (a kept bf16 p_t)."""
    from absorber_kernels.head_chunks import row_dot

    g = torch.Generator().manual_seed(3)
    p, z = torch.rand(37, 1000, generator=g), torch.randn(37, 1000, generator=g, dtype=torch.float64)
    got = row_dot(p.to(torch.bfloat16), z.to(dtype))
    want = (p.to(torch.bfloat16).double() * z.to(dtype).double()).sum(-1)
    assert got.dtype == dtype and got.shape == (37,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
    assert row_dot(p[:0], z[:0].to(dtype)).shape == (0,)


@pytest.mark.parametrize("op", ["kl", "ce"])
@pytest.mark.parametrize("autocast", [False, True])
def test_head_losses_keep_fp16_gradients_of_a_real_vocabulary(op, autocast):
    # dz = softmax/positions: ~1e-8 an entry for 8k tokens and 1,024 positions, under fp16's
    # subnormals. Cast as it was, 40% of the KL's gradient was lost (fp16 model or fp16 autocast).
    from absorber_kernels.linear_ce import linear_ce_ref
    n, d, v, denom = 32, 32, 8192, 1024
    g = torch.Generator().manual_seed(5)
    w = torch.randn(v, d, generator=g) / d ** 0.5
    hs = torch.randn(n, d, generator=g)
    ht = hs + 0.3 * torch.randn(n, d, generator=g)
    tg = torch.randint(0, v, (n,), generator=g)
    dtype = torch.float32 if autocast else torch.float16

    def loss_of(h, ht, w):
        if op == "kl":
            return linear_kl_ref(h, ht, w, denom=denom)
        return linear_ce_ref(h, tg, w, denom=denom)

    h = hs.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        loss = loss_of(h, ht.to(dtype), w.to(dtype))
    (loss * 2.0 ** 16).backward()                      # the loss scale an fp16 round applies
    h64 = h.detach().double().requires_grad_()
    (loss_of(h64, ht.half().double(), w.half().double()) * 2.0 ** 16).backward()
    assert h.grad.dtype == dtype
    err = (h.grad.double() - h64.grad).norm() / h64.grad.norm()
    assert err < 5e-3, f"{op} fp16 gradient: relative error {float(err):.3g}"


def test_a_distribution_kept_in_bf16_gives_the_fp32_kept_loss_and_gradient():
    # Under bf16 autocast the engine keeps p_t in bf16 (teacher._kept_dtype): the logits' own bf16
    # rounding dominates both. Σ p·log p stays fp32 (in bf16 it moved the loss 1%), and p is
    # subtracted 16 rows at a time (a whole-chunk fp32 temporary was 31 MiB at a round's peak).
    from absorber_kernels.linear_ce import linear_ce_ref
    from absorber_kernels.head_chunks import sub_
    n, d, v = 40, 48, 3001
    g = torch.Generator().manual_seed(6)
    w = (0.05 * torch.randn(v, d, generator=g)).bfloat16()
    hs = 2 * torch.randn(n, d, generator=g)
    ht = hs + 0.5 * torch.randn(n, d, generator=g)
    tg = torch.randint(0, v, (n,), generator=g)
    got = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kept = K.teacher_side(ht, w, dtype=dtype, chunk=16)
            assert kept[0].dtype == dtype and kept[1].dtype == torch.float32
            for name, fn in (("kl", lambda h: linear_kl_ref(h, ht, w, teacher_p=kept, chunk=16)),
                             ("ce+kl", lambda h: linear_ce_ref(h, tg, w, teacher_p=kept, kl_weight=1.0, chunk=16))):
                h = hs.clone().requires_grad_()
                loss = fn(h)
                loss.backward()
                got[name, dtype] = (loss.detach(), h.grad)
    for name in ("kl", "ce+kl"):
        (l32, g32), (l16, g16) = got[name, torch.float32], got[name, torch.bfloat16]
        assert abs(float(l16 - l32)) <= 2e-3 * abs(float(l32)), name
        assert float((g16 - g32).norm() / g32.norm()) < 1e-2, name
    z, p = torch.randn(37, 11), torch.rand(37, 11).bfloat16()
    assert torch.equal(sub_(z.clone(), p, 0.3), z.sub(p.float(), alpha=0.3))
