"""The frozen base linear under autocast: what autocast's F.linear computes, without a cast copy of
the weight held from the forward to the backward."""

import pytest
import torch
import torch.nn.functional as F

from absorber_kernels import frozen_linear
from absorber_kernels.frozen_linear import base_linear


def _saved_bytes(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_equals_autocast_linear_and_saves_no_cast_weight(layout):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 23, generator=g) if layout == "linear" else torch.randn(23, 37, generator=g)
    b = torch.randn(37, generator=g)
    x = torch.randn(3, 5, 23, generator=g, requires_grad=True)
    up = torch.randn(3, 5, 37, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, saved = _saved_bytes(lambda: base_linear(x, w, b, layout))
        want = F.linear(x, w if layout == "linear" else w.t(), b)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    # Only the stored fp32 weight is kept for the backward, no bf16 copy of it.
    assert [t.dtype for t in saved] == [torch.float32] and saved[0].data_ptr() == w.data_ptr()
    got.backward(up)
    dx, x.grad = x.grad.clone(), None
    want.backward(up)
    assert dx.dtype == torch.float32
    torch.testing.assert_close(dx, x.grad)


def test_without_autocast_it_is_plain_linear():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(base_linear(x, w, b, "linear"), F.linear(x, w, b), rtol=0, atol=0)
    with pytest.raises(ValueError, match="weight_layout"):
        base_linear(x, w, b, "dense")


def test_layers_of_one_shape_share_the_cast_buffer_and_keep_their_own_gradients():
    # Three frozen weights of one shape: every forward and backward cast writes the same CPU buffer,
    # so a cast read after the next one overwrote it would show here as a wrong output or gradient.
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(16, 16, generator=g) / 4 for _ in range(3)]
    x = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    grads = []
    for chain in (lambda h, w: base_linear(h, w, None, "linear"), lambda h, w: F.linear(h, w)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = x
            for w in ws:
                h = torch.tanh(chain(h, w))
        h.float().square().sum().backward()
        grads.append((h.detach(), x.grad))
        x.grad = None
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)


def test_a_cast_first_made_in_inference_mode_serves_training_after():
    # A serving stack's forward under inference_mode makes the buffer first; a round after it writes
    # the same buffer outside inference mode (an inference tensor would refuse that).
    frozen_linear._cast_buffers.by_shape = {}   # so this test's inference-mode call makes the buffer
    w = torch.randn(8, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = base_linear(torch.randn(2, 8), w, None, "linear")
    x = torch.randn(2, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = base_linear(x, w, None, "linear")
        want = F.linear(x, w)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    y.float().sum().backward()
    assert x.grad.shape == (2, 8) and first.shape == (2, 8)


def test_threads_casting_weights_of_one_shape_each_read_their_own_cast():
    """The cast buffers are per thread: two threads casting different weights of one shape at once
    each multiply by their own weight."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(64, 64, generator=g) for _ in range(2)]
    x = torch.randn(8, 64, generator=g)

    def run(w):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return [base_linear(x, w, None, "linear") for _ in range(200)]

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(run, ws))
    for w, got in zip(ws, outs):
        want = F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16))
        assert all(torch.equal(y, want) for y in got)


def _chain_grads(ws, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = x
        for w in ws:
            h = torch.tanh(base_linear(h, w, None, "linear"))
    h.float().square().sum().backward()
    out, grad = h.detach(), x.grad
    x.grad = None
    return out, grad


def test_kept_casts_cast_each_weight_once_and_change_no_bit(monkeypatch):
    # Three passes forward and backward over three weights of one shape: 18 casts per pass otherwise,
    # 3 inside the block, and the same outputs and gradients to the bit.
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(16, 16, generator=g) / 4 for _ in range(3)]
    x = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    want = _chain_grads(ws, x)
    made = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: made.append(t.data_ptr()) or real_to(t, *a, **k))
    with frozen_linear.kept_casts():
        with frozen_linear.kept_casts():             # nested: the outer block's casts
            got = [_chain_grads(ws, x) for _ in range(3)]
        made_weights = [p for p in made if p in {w.data_ptr() for w in ws}]
        assert sorted(made_weights) == sorted(w.data_ptr() for w in ws)
        with torch.no_grad():
            ws[1].mul_(2.0)                          # a weight written to is cast anew
        changed = _chain_grads(ws, x)
    monkeypatch.undo()
    for out, grad in got:
        torch.testing.assert_close(out, want[0], rtol=0, atol=0)
        torch.testing.assert_close(grad, want[1], rtol=0, atol=0)
    torch.testing.assert_close(changed[0], _chain_grads(ws, x)[0], rtol=0, atol=0)
    assert frozen_linear._kept.casts is None         # nothing held once the block ends


def test_kept_casts_hold_at_most_their_budget(monkeypatch):
    # A budget of two 16 x 16 bf16 casts: the third weight is cast per pass into the shared buffer,
    # which must still give its own product.
    monkeypatch.setattr(frozen_linear, "KEPT_CAST_BYTES", 2 * 16 * 16 * 2)
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(16, 16, generator=g) / 4 for _ in range(3)]
    x = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    want = _chain_grads(ws, x)
    with frozen_linear.kept_casts():
        got = _chain_grads(ws, x)
        assert len(frozen_linear._kept.casts) == 2 and frozen_linear._kept.room == 0
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_a_kept_cast_holds_its_weight_so_no_other_tensor_takes_its_address():
    # A weight freed inside the block would hand its address to the next tensor of its shape, whose
    # key (address, version 0, shape) would find the first weight's cast: each kept cast holds its
    # weight until the block ends, and every product is the weight's own.
    import gc
    import weakref

    x = torch.randn(3, 64)

    def product(w):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return base_linear(x, w, None, "linear").float()

    held = []
    with frozen_linear.kept_casts():
        for seed in range(4):
            w = torch.randn(256, 64, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(product(w), F.linear(x.bfloat16(), w.bfloat16()).float(), rtol=0, atol=0)
            held.append(weakref.ref(w))
            del w
        gc.collect()
        assert all(ref() is not None for ref in held)
    gc.collect()
    assert all(ref() is None for ref in held)
