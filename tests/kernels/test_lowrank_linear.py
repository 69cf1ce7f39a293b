"""Low-rank delta linear under the Triton interpreter against the float64 reference, both layouts."""

import pytest
import torch

from absorber_kernels import lowrank_linear as LR
from absorber_kernels.lowrank_linear import lowrank_linear_ref, lowrank_linear_triton
from absorber_kernels.testing import assert_close


def _inputs(lead, n_in, n_out, r, dtype, layout, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n_in, generator=g).to(dtype)
    w = 0.2 * (torch.randn(n_out, n_in, generator=g) if layout == "linear" else torch.randn(n_in, n_out, generator=g))
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    a = 0.2 * torch.randn(n_in, r, generator=g)            # the delta stays fp32, as the engine keeps it
    bb = 0.2 * torch.randn(r, n_out, generator=g)
    return x, w.to(dtype), b, a, bb


def _check(name, dtype, x, w, b, a, bb, scale, layout, x_grad=True):
    xk = x.clone().requires_grad_(x_grad)
    ak, bk = a.clone().requires_grad_(), bb.clone().requires_grad_()
    y = lowrank_linear_triton(xk, w, b, ak, bk, scale, layout)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(dtype)   # grad_output ≠ 1
    y.backward(dy)
    x64 = x.double().requires_grad_(x_grad)
    a64, b64 = a.double().requires_grad_(), bb.double().requires_grad_()
    y64 = lowrank_linear_ref(x64, w.double(), None if b is None else b.double(), a64, b64, scale, layout)
    y64.backward(dy.double())
    assert y.dtype == dtype and y.shape == y64.shape
    assert_close(f"lowrank {name} y", y, y64, dtype)
    if x_grad:
        assert_close(f"lowrank {name} dx", xk.grad, x64.grad, dtype)
    else:
        assert xk.grad is None
    assert ak.grad.dtype == torch.float32 and bk.grad.dtype == torch.float32
    assert_close(f"lowrank {name} dA", ak.grad, a64.grad, dtype)
    assert_close(f"lowrank {name} dB", bk.grad, b64.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_lowrank_odd_shapes(dtype, layout):
    # 2 × 21 tokens, 45 → 71, rank 20: ragged against 16 × 32 × 32 tiles and 16-wide rank blocks
    x, w, b, a, bb = _inputs((2, 21), 45, 71, 20, dtype, layout, bias=True)
    _check(layout, dtype, x, w, b, a, bb, 0.5, layout)


def test_lowrank_no_bias_no_x_grad():
    # first layer: x needs no gradient, so backward runs only dA's tiles in its second launch
    x, w, b, a, bb = _inputs((1, 37), 33, 50, 8, torch.float32, "linear", bias=False, seed=1)
    _check("x without grad", torch.float32, x, w, b, a, bb, 2.0, "linear", x_grad=False)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_lowrank_gpu_tiles(monkeypatch, layout):
    monkeypatch.setattr(LR, "LORA_CONFIG_INTERPRET", LR.LORA_CONFIG_GPU)
    x, w, b, a, bb = _inputs((3, 50), 70, 130, 64, torch.float32, layout, bias=True, seed=2)
    _check(f"gpu tiles {layout}", torch.float32, x, w, b, a, bb, 0.25, layout)


def test_lowrank_refuses_trainable_weight():
    x, w, b, a, bb = _inputs((4,), 8, 8, 2, torch.float32, "linear", bias=False)
    with pytest.raises(ValueError, match="frozen"):
        lowrank_linear_triton(x, w.requires_grad_(), None, a, bb, 1.0)
    with pytest.raises(ValueError):
        lowrank_linear_triton(x, w.detach(), None, a, bb, 1.0, "transposed")


@pytest.mark.parametrize("layout,bias", [("linear", False), ("conv1d", True)])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("x_grad", [True, False])
def test_torch_op_is_the_reference_in_one_node(layout, bias, autocast, x_grad):
    """The torch backend's op against the float64 reference and to the bit against the reference
    at its own precision: y, dx, dA and dB, fp32 and under bf16 autocast (the engine's CPU rounds),
    a bias, a 3-d input, an input without gradient."""
    x, w, b, a, bb = _inputs((3, 5), 24, 40, 4, torch.float32, layout, bias, seed=2)
    xk = x.clone().requires_grad_(x_grad)
    ak, bk = a.clone().requires_grad_(), bb.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = LR.lowrank_linear_torch(xk, w, b, ak, bk, 0.5, layout)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    y.backward(dy.to(y.dtype))
    x64 = x.double().requires_grad_(x_grad)
    a64, b64 = a.double().requires_grad_(), bb.double().requires_grad_()
    y64 = lowrank_linear_ref(x64, w.double(), None if b is None else b.double(), a64, b64, 0.5, layout)
    y64.backward(dy.double())
    dtype = torch.bfloat16 if autocast else torch.float32
    assert y.dtype == dtype and y.grad_fn.name() == "LowRankLinearTorchBackward"
    assert_close("torch op y", y, y64, dtype)
    assert (xk.grad is None) != x_grad and ak.grad.dtype == bk.grad.dtype == torch.float32
    if x_grad:
        assert xk.grad.dtype == torch.float32
        assert_close("torch op dx", xk.grad, x64.grad, dtype)
    assert_close("torch op dA", ak.grad, a64.grad, dtype)
    assert_close("torch op dB", bk.grad, b64.grad, dtype)
    # And the reference's own bits at the same precision: a stream absorbed alone must equal the
    # same stream batched with others (lowrank_batched rounds as the reference does).
    xr = x.clone().requires_grad_(x_grad)
    ar, br = a.clone().requires_grad_(), bb.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        yr = lowrank_linear_ref(xr, w, b, ar, br, 0.5, layout)
    yr.backward(dy.to(yr.dtype))
    assert torch.equal(y, yr) and torch.equal(ak.grad, ar.grad) and torch.equal(bk.grad, br.grad)
    assert not x_grad or torch.equal(xk.grad, xr.grad)


def test_torch_op_takes_the_reference_for_a_trainable_weight():
    x, w, b, a, bb = _inputs((4,), 8, 6, 2, torch.float32, "linear", bias=False)
    w.requires_grad_()
    y = LR.lowrank_linear_torch(x, w, None, a, bb, 1.0)
    y.sum().backward()
    assert w.grad is not None and torch.allclose(y, lowrank_linear_ref(x, w, None, a, bb, 1.0))
    with pytest.raises(ValueError, match="weight_layout"):
        LR.lowrank_linear_torch(x, w.detach(), None, a, bb, 1.0, "transposed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_torch_op_equals_the_reference_at_gpt2_sizes_in_the_weights_own_dtype(dtype):
    """Where the compute dtype is W's own (no autocast: an fp32 run, a bf16 or float64 model), the
    reference adds GPT-2's bias after its GEMM; inside it, the sum rounds otherwise at these sizes."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 37, 576, generator=g).to(dtype)
    w, b = (0.05 * torch.randn(576, 1536, generator=g)).to(dtype), torch.randn(1536, generator=g).to(dtype)
    a, bb = 0.1 * torch.randn(576, 8, generator=g), 0.1 * torch.randn(8, 1536, generator=g)
    for layout, weight in (("conv1d", w), ("linear", w.t().contiguous())):
        assert torch.equal(LR.lowrank_linear_torch(x, weight, b, a, bb, 0.5, layout),
                           lowrank_linear_ref(x, weight, b, a, bb, 0.5, layout)), layout
