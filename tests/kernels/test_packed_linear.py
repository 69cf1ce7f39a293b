"""Products on weights reordered for oneDNN (absorber_kernels/packed_linear.py): the same values as
F.linear in float64, routed only inside the block and outside grad mode, nothing left behind after
it (a failure included), and the engine's decode steps (generate, the teacher's probes) reading them
to the same tokens as the plain path."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from absorber_engine import AbsorberConfig, AbsorberEngine
from absorber_engine import static_decode
from absorber_kernels import packed_linear
from absorber_kernels.frozen_linear import base_linear
from tests.tiny_models import make_model, random_ids

pytestmark = pytest.mark.skipif(not packed_linear.supported(torch.float32),
                                reason="this torch build has no oneDNN linear with prepacked weights")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 4, 7])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_products_equal_the_float64_product(dtype, tol, rows, bias):
    if not packed_linear.supported(dtype):
        pytest.skip(f"no oneDNN {dtype} here")
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 160, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(2, rows, 160, generator=g).to(dtype)           # leading dims are kept
    got = packed_linear.Packed(w, dtype, rows=4)(x, b)             # tuned for 4 rows, right for any
    want = F.linear(x.double(), w.to(dtype).double(), None if b is None else b.to(dtype).double())
    assert got.shape == (2, rows, 96) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_the_block_routes_frozen_linears_outside_grad_mode_and_leaves_nothing_behind(monkeypatch):
    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16, bias=False)).requires_grad_(False)
    x = torch.randn(3, 32)
    want = model(x)
    calls = []
    real = packed_linear.Packed.__call__
    monkeypatch.setattr(packed_linear.Packed, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    with torch.no_grad(), packed_linear.packed(list(model), torch.float32, rows=3):
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        assert len(calls) == 2
        assert packed_linear.lookup(model[0].weight) is not None
        torch.testing.assert_close(base_linear(x, model[0].weight, model[0].bias, "linear"), model[0](x))
        assert len(calls) == 4                                      # the engine's delta linears' path too
        with torch.enable_grad():                                   # autograd never sees an opaque weight
            assert packed_linear.lookup(model[0].weight) is None
            model(x)
        assert len(calls) == 4
    assert packed_linear.lookup(model[0].weight) is None
    assert all("forward" not in m.__dict__ for m in model)
    with pytest.raises(RuntimeError, match="inside"), torch.no_grad(), packed_linear.packed(list(model), torch.float32, 3):
        raise RuntimeError("a failure inside the block")
    assert packed_linear.lookup(model[0].weight) is None and all("forward" not in m.__dict__ for m in model)
    with packed_linear.packed(list(model), torch.float32, 3):       # under grad: nothing is packed
        assert packed_linear.lookup(model[0].weight) is None and all("forward" not in m.__dict__ for m in model)
    hooked = []
    model[1].forward = lambda x: hooked.append(1) or nn.Linear.forward(model[1], x)    # as accelerate wraps a module
    hook = model[1].forward
    with torch.no_grad(), packed_linear.packed(list(model), torch.float32, 3):
        assert packed_linear.lookup(model[1].weight) is None and model[1].forward is hook
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert model[1].forward is hook and hooked == [1]                  # the hook ran, and is still there


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_generate_and_the_teachers_probes_decode_on_packed_weights_to_the_same_tokens(compute_dtype, monkeypatch):
    if not packed_linear.supported(getattr(torch, compute_dtype)):
        pytest.skip(f"no oneDNN {compute_dtype} here")
    cfg = AbsorberConfig(chunk_tokens=16, sync_tokens=0, rank=4, futures=2, future_tokens=6, prefix_bos=False,
                         compute_dtype=compute_dtype, max_steps=2)
    calls = []
    real = packed_linear.Packed.__call__
    monkeypatch.setattr(packed_linear.Packed, "__call__", lambda self, *a: calls.append(1) or real(self, *a))

    def run():
        eng = AbsorberEngine(make_model("llama"), config=cfg)
        eng.absorb(random_ids(16, seed=2), flush=True)             # sampled futures: the teacher's decode
        return eng.generate(random_ids(5, seed=3), max_new_tokens=8), eng.delta.state_dict()

    packed_tokens, packed_delta = run()
    assert calls, "no decode step read a packed weight"
    monkeypatch.setattr(static_decode.packed_linear, "supported", lambda dtype: False)
    calls.clear()
    plain_tokens, plain_delta = run()
    assert not calls
    assert packed_tokens == plain_tokens
    tol = 1e-4 if compute_dtype == "float32" else 2e-2
    for name in plain_delta:
        torch.testing.assert_close(packed_delta[name], plain_delta[name], rtol=tol, atol=tol)
