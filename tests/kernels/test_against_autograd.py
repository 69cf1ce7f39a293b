"""The CPU references of the sync losses against the plain torch composition they replace, forward
and backward, with odd shapes and a non-unit upstream gradient (so a reference cannot drift from the
function it claims to compute while its kernel keeps agreeing with it)."""

import pytest
import torch
import torch.nn.functional as F

from absorber_kernels.hidden_sync import hidden_l1_ref
from absorber_kernels.linear_kl import linear_kl_ref


@pytest.mark.parametrize("temperature, chunk", [(1.0, 64), (2.0, 7), (0.7, 1000)])
def test_linear_kl_equals_f_kl_div(temperature, chunk):
    g = torch.Generator().manual_seed(0)
    N, D, V = 41, 37, 401
    hs = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    denom = 53                      # the mean may be over more rows than this call holds
    got = linear_kl_ref(hs, ht, w, b, temperature=temperature, denom=denom, chunk=chunk)
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
