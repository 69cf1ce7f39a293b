"""The CPU references of every kernel (the sync losses, the low-rank linears, attention) against the
plain torch composition they replace (F.kl_div, F.cross_entropy, F.l1_loss, a dense linear, SDPA), forward and backward, with odd shapes and a non-unit upstream gradient (so a reference cannot drift from the
function it claims to compute while its kernel keeps agreeing with it)."""

import pytest
import torch
import torch.nn.functional as F

from absorber_kernels.attention import attention_ref
from absorber_kernels.hidden_sync import hidden_l1_ref
from absorber_kernels.linear_ce import linear_ce_ref
from absorber_kernels.linear_kl import linear_kl_ref, teacher_side
from absorber_kernels.lowrank_batched import lowrank_linear_batched_ref
from absorber_kernels.lowrank_linear import lowrank_linear_ref


@pytest.mark.parametrize("temperature, chunk, kept", [(1.0, 64, False), (2.0, 7, False), (0.7, 1000, False),
                                                      (2.0, 7, True), (0.7, 1000, True)])
def test_linear_kl_equals_f_kl_div(temperature, chunk, kept):
    """`kept`: the teacher's distribution computed once (teacher_side, in chunks of another size)
    and read instead of recomputed."""
    g = torch.Generator().manual_seed(0)
    N, D, V = 41, 37, 401
    hs = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    denom = 53                      # the mean may be over more rows than this call holds
    teacher_p = teacher_side(ht, w, b, temperature, dtype=torch.float64, chunk=10) if kept else None
    got = linear_kl_ref(hs, ht, w, b, temperature=temperature, denom=denom, chunk=chunk, teacher_p=teacher_p)
    (got * 2.5).backward()
    grad_ref, hs.grad = hs.grad.clone(), None
    zs, zt = F.linear(hs, w, b) / temperature, F.linear(ht, w, b) / temperature
    want = F.kl_div(zs.log_softmax(-1), zt.log_softmax(-1), log_target=True, reduction="sum") / denom
    want = want * temperature ** 2
    (want * 2.5).backward()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_ref, hs.grad, rtol=1e-9, atol=1e-12)


def test_hidden_l1_equals_f_l1_loss():
    g = torch.Generator().manual_seed(1)
    L, B, T, D = 3, 2, 13, 29
    s = [torch.randn(B, T, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(L)]
    t = [torch.randn(B, T, D, generator=g, dtype=torch.float64) for _ in range(L)]
    got = hidden_l1_ref(s, t, weight=0.7, denom=31)
    (got * -1.5).backward()
    grads = [x.grad.clone() for x in s]
    for x in s:
        x.grad = None
    want = sum(F.l1_loss(a, b, reduction="sum") for a, b in zip(s, t)) * 0.7 / (31 * L * D)
    (want * -1.5).backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, x in zip(grads, s):
        torch.testing.assert_close(a, x.grad, rtol=1e-12, atol=1e-12)


def _dense_grads(fn, inputs, upstream):
    out = fn(*inputs)
    out.backward(upstream)
    grads = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    return out.detach(), grads


def test_lowrank_linear_equals_a_dense_linear_with_the_merged_weight():
    g = torch.Generator().manual_seed(2)
    N, I, O, R, scale = 7, 13, 11, 3, 0.6
    x = torch.randn(2, N, I, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(O, I, generator=g, dtype=torch.float64)
    bias = torch.randn(O, generator=g, dtype=torch.float64)
    A = torch.randn(I, R, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(R, O, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, N, O, generator=g, dtype=torch.float64) * 1.7
    got, got_g = _dense_grads(lambda x, A, B: lowrank_linear_ref(x, w, bias, A, B, scale), [x, A, B], up)
    want, want_g = _dense_grads(lambda x, A, B: F.linear(x, w + scale * (A @ B).t(), bias), [x, A, B], up)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_lowrank_batched_equals_each_rows_dense_linear():
    g = torch.Generator().manual_seed(3)
    rows, T, I, O, R, S, scale = 5, 6, 9, 7, 2, 3, 1.3
    x = torch.randn(rows, T, I, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(O, I, generator=g, dtype=torch.float64)
    A = torch.randn(S, I, R, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(S, R, O, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([2, 0, 2, 1, 0])
    up = torch.randn(rows, T, O, generator=g, dtype=torch.float64) * -0.8

    def dense(x, A, B):
        return torch.stack([F.linear(x[i], w + scale * (A[s] @ B[s]).t()) for i, s in enumerate(index.tolist())])

    got, got_g = _dense_grads(lambda x, A, B: lowrank_linear_batched_ref(x, w, None, A, B, index, scale), [x, A, B], up)
    want, want_g = _dense_grads(dense, [x, A, B], up)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T, S", [(5, 5), (3, 11)])
def test_attention_equals_sdpa_over_a_cached_prefix(T, S):
    # Grouped-query heads: each key/value head serves Hq / Hkv query heads; the T queries are the
    # last T of the S positions, so query i sees keys 0 .. S - T + i.
    g = torch.Generator().manual_seed(4)
    B, Hq, Hkv, D = 2, 6, 2, 5
    q = torch.randn(B, Hq, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(B, Hq, T, D, generator=g, dtype=torch.float64) * 2.2
    mask = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)

    def plain(q, k, v):
        rep = Hq // Hkv
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                              attn_mask=mask)

    got, got_g = _dense_grads(lambda q, k, v: attention_ref(q, k, v), [q, k, v], up)
    want, want_g = _dense_grads(plain, [q, k, v], up)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [5, 128])
def test_linear_ce_equals_f_cross_entropy(chunk):
    g = torch.Generator().manual_seed(5)
    N, D, V = 23, 19, 301
    h = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.4
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    t = torch.randint(0, V, (N,), generator=g)
    got = linear_ce_ref(h, t, w, b, denom=29, chunk=chunk)
    (got * -0.6).backward()
    grad, h.grad = h.grad.clone(), None
    want = F.cross_entropy(F.linear(h, w, b), t, reduction="sum") / 29
    (want * -0.6).backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, h.grad, rtol=1e-12, atol=1e-12)


def test_linear_ce_leaves_out_rows_with_a_negative_target():
    g = torch.Generator().manual_seed(7)
    N, D, V = 23, 19, 301
    h = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.4
    t = torch.randint(0, V, (N,), generator=g)
    t[::3] = -1
    got = linear_ce_ref(h, t, w, chunk=5)
    (got * 1.7).backward()
    grad, h.grad = h.grad.clone(), None
    want = F.cross_entropy(F.linear(h, w), t, ignore_index=-1)      # the mean over rows with a target
    (want * 1.7).backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, h.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("top_k, chunk", [(0, 6), (0, 128), (17, 6)])
def test_linear_ce_with_the_kept_teacher_adds_the_kl_of_the_same_logits(top_k, chunk):
    """The recite probe's fused loss: cross-entropy on the rows with a target plus kl_weight × the
    summed KL to the teacher's (top-k) distribution on every row, against F.cross_entropy + F.kl_div."""
    g = torch.Generator().manual_seed(8)
    N, D, V = 29, 21, 307
    h = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.4
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    t = torch.randint(0, V, (N,), generator=g)
    t[:4] = -1                                   # the seed's positions: KL only
    kept = teacher_side(ht, w, b, top_k=top_k, dtype=torch.float64, chunk=10)
    got = linear_ce_ref(h, t, w, b, denom=31, chunk=chunk, teacher_p=kept, kl_weight=0.3)
    (got * -0.8).backward()
    grad, h.grad = h.grad.clone(), None
    zt = F.linear(ht, w, b)
    if top_k:
        zt = torch.full_like(zt, float("-inf")).scatter(-1, zt.topk(top_k).indices, zt.topk(top_k).values)
    logp = F.log_softmax(F.linear(h, w, b), dim=-1)
    want = (F.nll_loss(logp, t, ignore_index=-1, reduction="sum") / 31
            + 0.3 * F.kl_div(logp, F.softmax(zt, dim=-1), reduction="sum"))
    (want * -0.8).backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, h.grad, rtol=1e-10, atol=1e-12)


def test_linear_ce_refuses_a_kl_weight_without_the_teacher_or_of_other_rows():
    h, w, t = torch.randn(6, 8), torch.randn(11, 8), torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="teacher_p"):
        linear_ce_ref(h, t, w, kl_weight=1.0)
    with pytest.raises(ValueError, match="not \\(rows, vocabulary\\)"):
        linear_ce_ref(h, t, w, teacher_p=teacher_side(torch.randn(5, 8), w), kl_weight=1.0)


def test_linear_ce_under_autocast_matches_the_autocast_composition():
    g = torch.Generator().manual_seed(6)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    w, t = torch.randn(500, 32, generator=g) * 0.2, torch.randint(0, 500, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_ce_ref(h, t, w, chunk=16)
        want = F.cross_entropy(F.linear(h, w).float(), t)
    got.backward()
    grad, h.grad = h.grad.clone(), None
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad, h.grad, rtol=2e-2, atol=1e-4)


def test_linear_ce_of_no_rows_is_zero_with_a_zero_gradient():
    h = torch.zeros(0, 8, requires_grad=True)
    loss = linear_ce_ref(h, torch.zeros(0, dtype=torch.long), torch.randn(11, 8))
    loss.backward()
    assert float(loss) == 0.0 and h.grad.shape == (0, 8)
