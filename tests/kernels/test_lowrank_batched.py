"""Batched (per-stream) low-rank delta under the Triton interpreter against the float64 reference:
forward and backward (dx, dA, dB), both layouts, fp32 and fp16, ragged shapes, streams of unequal and
zero row counts, an unsorted index, one-token rows (decode), the GPU tile configuration, bad inputs."""

import inspect

import pytest
import torch

from absorber_kernels import get_ops
from absorber_kernels import lowrank_batched as LB
from absorber_kernels.lowrank_batched import lowrank_linear_batched_ref, lowrank_linear_batched_triton
from absorber_kernels.testing import assert_close


def _inputs(rows, T, n_in, n_out, r, S, dtype, layout, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, T, n_in, generator=g).to(dtype)
    w = 0.2 * (torch.randn(n_out, n_in, generator=g) if layout == "linear" else torch.randn(n_in, n_out, generator=g))
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    a = 0.2 * torch.randn(S, n_in, r, generator=g)          # the deltas stay fp32, as the engine keeps them
    bb = 0.2 * torch.randn(S, r, n_out, generator=g)
    return x, w.to(dtype), b, a, bb


def _check(name, dtype, x, w, b, a, bb, index, scale, layout, x_grad=True, delta_grad=True):
    xk = x.clone().requires_grad_(x_grad)
    ak, bk = a.clone().requires_grad_(delta_grad), bb.clone().requires_grad_(delta_grad)
    y = lowrank_linear_batched_triton(xk, w, b, ak, bk, index, scale, layout)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(dtype)   # grad_output ≠ 1
    y.backward(dy)
    x64 = x.double().requires_grad_(x_grad)
    a64, b64 = a.double().requires_grad_(delta_grad), bb.double().requires_grad_(delta_grad)
    y64 = lowrank_linear_batched_ref(x64, w.double(), None if b is None else b.double(), a64, b64, index, scale,
                                     layout)
    y64.backward(dy.double())
    assert y.dtype == dtype and y.shape == y64.shape
    assert_close(f"lowrank_batched {name} y", y, y64, dtype)
    if x_grad:
        assert_close(f"lowrank_batched {name} dx", xk.grad, x64.grad, dtype)
    else:
        assert xk.grad is None
    if delta_grad:
        assert ak.grad.dtype == torch.float32 and bk.grad.dtype == torch.float32
        assert_close(f"lowrank_batched {name} dA", ak.grad, a64.grad, dtype)
        assert_close(f"lowrank_batched {name} dB", bk.grad, b64.grad, dtype)
        empty = [s for s in range(a.shape[0]) if not (index == s).any()]
        assert all(not ak.grad[s].any() and not bk.grad[s].any() for s in empty), "a stream without rows got a gradient"
    else:
        assert ak.grad is None and bk.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_batched_odd_shapes(dtype, layout):
    # 6 rows × 9 tokens, 45 → 71, rank 20, 5 streams holding 3, 0, 2, 0, 1 rows: ragged against every
    # tile, main tiles of 16 tokens that straddle rows and streams, streams 1 and 3 with no rows
    index = torch.tensor([0, 0, 0, 2, 2, 4])
    x, w, b, a, bb = _inputs(6, 9, 45, 71, 20, 5, dtype, layout, bias=True)
    _check(layout, dtype, x, w, b, a, bb, index, 0.5, layout)


def test_batched_unsorted_index_no_x_grad():
    # rows not grouped by stream: the wrapper permutes them into stream order and back; x needs no
    # gradient, so backward's second launch runs only dA's tiles
    index = torch.tensor([3, 0, 3, 1, 0])
    x, w, b, a, bb = _inputs(5, 6, 33, 50, 7, 4, torch.float32, "linear", bias=False, seed=1)
    _check("unsorted", torch.float32, x, w, b, a, bb, index, 2.0, "linear", x_grad=False)


def test_batched_decode_rows_only_dx():
    # decode: one token per row, 19 streams of one row each, so a main tile spans 16 streams; the
    # deltas need no gradient (backward is dx alone)
    index = torch.arange(19)
    x, w, b, a, bb = _inputs(19, 1, 40, 24, 5, 19, torch.float32, "conv1d", bias=True, seed=2)
    _check("decode", torch.float32, x, w, b, a, bb, index, 1.5, "conv1d", delta_grad=False)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_batched_gpu_tiles(monkeypatch, layout):
    monkeypatch.setattr(LB, "BLORA_CONFIG_INTERPRET", LB.BLORA_CONFIG_GPU)
    index = torch.tensor([0, 1, 1, 1])   # 50 and 150 tokens: one and three 64-token shrink tiles
    x, w, b, a, bb = _inputs(4, 50, 70, 130, 64, 3, torch.float32, layout, bias=True, seed=3)
    _check(f"gpu tiles {layout}", torch.float32, x, w, b, a, bb, index, 0.25, layout)


def test_batched_in_the_triton_op_table():
    op = get_ops("triton").lowrank_linear_batched
    assert op is lowrank_linear_batched_triton
    assert list(inspect.signature(op).parameters) == list(inspect.signature(lowrank_linear_batched_ref).parameters)


def test_batched_index_change_in_place_is_seen():
    # the per-index bookkeeping is cached for the forward's layers: an in-place change invalidates it
    x, w, b, a, bb = _inputs(3, 2, 8, 8, 2, 2, torch.float32, "linear", bias=False)
    index = torch.tensor([0, 1, 1])
    y0 = lowrank_linear_batched_triton(x, w, None, a, bb, index, 1.0)
    index[1] = 0
    y1 = lowrank_linear_batched_triton(x, w, None, a, bb, index, 1.0)
    torch.testing.assert_close(y1, lowrank_linear_batched_ref(x, w, None, a, bb, index, 1.0))
    assert not torch.allclose(y0, y1)
    index[2] = 2
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        lowrank_linear_batched_triton(x, w, None, a, bb, index, 1.0)


def _bad_cases():
    x, w, b, a, bb = _inputs(3, 2, 8, 6, 2, 2, torch.float32, "linear", bias=True)
    i = torch.tensor([0, 1, 1])
    return [
        # (case, args, error, message)
        ("index too large", (x, w, b, a, bb, torch.tensor([0, 2, 1])), ValueError, r"\[0, 2\)"),
        ("negative index", (x, w, b, a, bb, torch.tensor([-1, 0, 1])), ValueError, r"\[0, 2\)"),
        ("float index", (x, w, b, a, bb, i.float()), TypeError, "integer"),
        ("index per token", (x, w, b, a, bb, torch.zeros(3, 2, dtype=torch.long)), ValueError, "one index per row"),
        ("2-D x", (x[0], w, b, a, bb, i), ValueError, "one index per row"),
        ("A and B stream counts", (x, w, b, a, bb[:1], i), ValueError, r"\(S, in, r\)"),
        ("rank mismatch", (x, w, b, a, bb[:, :1], i), ValueError, r"\(S, in, r\)"),
        ("weight in the other layout", (x, w.t(), b, a, bb, i), ValueError, "shapes"),
        ("x's features", (x[..., :5], w, b, a, bb, i), ValueError, "shapes"),
        ("bias length", (x, w, b[:3], a, bb, i), ValueError, "shapes"),
    ]


@pytest.mark.parametrize("fn", [lowrank_linear_batched_triton, lowrank_linear_batched_ref], ids=["triton", "ref"])
@pytest.mark.parametrize("case", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_batched_bad_inputs(fn, case):
    _, args, err, msg = _bad_cases()[case]
    with pytest.raises(err, match=msg):
        fn(*args, 1.0)


def test_batched_triton_refusals():
    x, w, b, a, bb = _inputs(3, 2, 8, 6, 2, 2, torch.float32, "linear", bias=True)
    i = torch.tensor([0, 1, 1])
    with pytest.raises(TypeError, match="share one of"):
        lowrank_linear_batched_triton(x, w.half(), b, a, bb, i, 1.0)
    with pytest.raises(TypeError, match="A and B"):
        lowrank_linear_batched_triton(x, w, b, a.double(), bb, i, 1.0)
    with pytest.raises(ValueError, match="frozen"):
        lowrank_linear_batched_triton(x, w.clone().requires_grad_(), b, a, bb, i, 1.0)
    with pytest.raises(ValueError, match="weight_layout"):
        lowrank_linear_batched_triton(x, w, b, a, bb, i, 1.0, "transposed")
    # nothing to compute: empty batches and rank 0 return the reference's (empty or delta-free) result
    y = lowrank_linear_batched_triton(x[:0], w, b, a, bb, i[:0], 1.0)
    assert y.shape == (0, 2, 6)
    torch.testing.assert_close(lowrank_linear_batched_triton(x, w, b, a[..., :0], bb[:, :0], i, 1.0),
                               torch.nn.functional.linear(x, w, b))
