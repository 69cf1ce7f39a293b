"""Fused hidden-state L1 under the Triton interpreter against the float64 reference."""

import pytest
import torch

from absorber_kernels import hidden_sync as H
from absorber_kernels.hidden_sync import hidden_l1_ref, hidden_l1_triton
from absorber_kernels.testing import assert_close


def _check(name, dtype, student, teacher, grad_out=3.0, **kw):
    s_k = [s.clone().requires_grad_() for s in student]
    loss = hidden_l1_triton(s_k, teacher, **kw)
    (loss * grad_out).backward()
    s64 = [s.double().requires_grad_() for s in student]
    t64 = [t.double() for t in teacher]
    ref = hidden_l1_ref(s64, t64, **kw)
    (ref * grad_out).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(f"hidden_l1 {name} loss", loss, ref, dtype)
    for i, (a, c) in enumerate(zip(s_k, s64)):
        assert a.grad.dtype == dtype and a.grad.shape == a.shape
        assert_close(f"hidden_l1 {name} grad[{i}]", a.grad, c.grad, dtype)


def _states(layers, b, t, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(b, t, d, generator=g).to(dtype) for _ in range(layers)],
            torch.randn(layers, b, t, d, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("stacked", [False, True])
def test_hidden_l1_odd_shapes(dtype, stacked):
    student, teacher = _states(3, 2, 13, 70, dtype)       # 26 rows, 70 dims: ragged for 16 × 32 tiles
    _check(f"stacked={stacked}", dtype, student, teacher if stacked else list(teacher.unbind(0)),
           weight=0.7, denom=40)


def test_hidden_l1_aligned_fp16():
    # D a multiple of 8 and 16-byte aligned rows: the ALIGNED (vector-load) variant
    student, teacher = _states(2, 1, 9, 64, torch.float16, seed=1)
    _check("aligned", torch.float16, student, teacher)


def test_hidden_l1_strided_states():
    # states that are slices of larger buffers (batch/time strides differ per layer) and one whose
    # last dim is not contiguous: the address/stride tables must follow each tensor
    g = torch.Generator().manual_seed(2)
    big = torch.randn(2, 20, 48, generator=g)
    student = [big[:, 3:14, :], torch.randn(2, 11, 48, generator=g),
               torch.randn(2, 48, 11, generator=g).transpose(1, 2)]
    teacher = [torch.randn(2, 11, 48, generator=g) for _ in range(3)]
    _check("strided", torch.float32, student, teacher)


def test_hidden_l1_equal_states_have_zero_grad():
    student, _ = _states(2, 1, 5, 24, torch.float32, seed=3)
    s_k = [s.clone().requires_grad_() for s in student]
    loss = hidden_l1_triton(s_k, [s.clone() for s in student])
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(float(s.grad.abs().max()) == 0.0 for s in s_k)   # sign(0) = 0, as torch's |x|'


def test_hidden_l1_gpu_tiles(monkeypatch):
    monkeypatch.setattr(H, "HIDDEN_CONFIG_INTERPRET", H.HIDDEN_CONFIG_GPU)
    student, teacher = _states(2, 3, 17, 300, torch.float32, seed=4)
    _check("gpu tiles", torch.float32, student, teacher)


def test_hidden_l1_errors():
    student, teacher = _states(2, 1, 5, 8, torch.float32)
    with pytest.raises(ValueError):
        hidden_l1_triton(student, teacher[:1])
    with pytest.raises(ValueError):
        hidden_l1_triton(student, [t[:, :4] for t in teacher])
    with pytest.raises(ValueError):
        hidden_l1_triton([], [])


def test_hidden_l1_fp16_gradient_below_fp16s_range_survives_the_loss_scale():
    # weight/(N·L·D) = 2.7e-8 for a SmolLM2 round of 2,048 positions: kept in fp32 until grad_output
    # (which carries an fp16 round's loss scale of 2^16) multiplies it; it was stored as fp16 zeros.
    student, teacher = _states(2, 1, 9, 64, torch.float16, seed=2)
    _check("2.7e-8 an element", torch.float16, student, teacher, grad_out=2.0 ** 16, denom=2 ** 21)
