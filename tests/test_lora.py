"""The low-rank delta on every supported architecture: identity at zero, the right function
otherwise, merged equal to unmerged, base weights untouched, and detach restores the model."""

import pytest
import torch

from absorber_engine import AbsorberConfig, AbsorberEngine
from tiny_models import ARCHS, base_logits as _base_logits, make_model, random_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_delta_is_the_base_model(arch):
    model = make_model(arch)
    ids = random_ids(23)
    before = _base_logits(model, ids)
    eng = AbsorberEngine(model, config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=4))
    assert len(eng.runner.wrappers) > 0
    # B = 0 adds exactly zero; the engine reads BOS from its cache, so float tolerance, not bits.
    torch.testing.assert_close(eng.logits(ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_delta_adds_scaled_low_rank_product_and_leaves_weights(arch):
    model = make_model(arch)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    eng = AbsorberEngine(model, config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=3, alpha=6.0))
    name, wrapper = next(iter(eng.runner.wrappers.items()))
    with torch.no_grad():
        for t in eng.delta.parameters():
            t.normal_(0, 0.2)
    x = torch.randn(2, 5, wrapper.in_features)
    w = wrapper.base.weight
    dense = w.t() if wrapper.layout == "linear" else w                     # (in, out)
    bias = wrapper.base.bias if wrapper.base.bias is not None else 0.0
    expected = x @ dense + bias + 2.0 * (x @ eng.delta.A[name]) @ eng.delta.B[name]
    torch.testing.assert_close(wrapper(x), expected, rtol=1e-5, atol=1e-5)
    # Merged into a standalone copy and unmerged agree; the engine's model is left as it was.
    ids = random_ids(19, seed=1)
    unmerged = eng.logits(ids)
    merged_model = eng.default.merged_model()
    assert not any(isinstance(m, type(wrapper)) for m in merged_model.modules())
    torch.testing.assert_close(_base_logits(merged_model, ids), unmerged, rtol=1e-4, atol=1e-4)
    assert eng.runner.wrappers[name] is wrapper and eng.runner.model.get_submodule(name) is wrapper
    # The base weights were never written; detaching gives the original model back.
    eng.close()
    after = model.state_dict()
    assert set(after) == set(weights)
    for k, v in weights.items():
        assert torch.equal(after[k], v), k


def test_targets_choose_modules():
    model = make_model("gpt2")
    eng = AbsorberEngine(model, config=AbsorberConfig(chunk_tokens=8, sync_tokens=8, rank=2, targets=("mlp.c_proj",)))
    assert sorted(eng.runner.wrappers) == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    eng.close()
    eng = AbsorberEngine(model, config=AbsorberConfig(chunk_tokens=8, sync_tokens=8, rank=2, targets=("c_proj",)))
    assert len(eng.runner.wrappers) == 4    # attention and MLP c_proj of both layers


def test_second_engine_on_same_model_is_refused_until_close():
    from absorber_engine import ConfigError

    model = make_model("llama")
    eng = AbsorberEngine(model, config=AbsorberConfig(chunk_tokens=8, sync_tokens=8, rank=2))
    with pytest.raises(ConfigError, match="already carries"):
        AbsorberEngine(model, config=AbsorberConfig(chunk_tokens=8, sync_tokens=8, rank=2))
    eng.close()
    AbsorberEngine(model, config=AbsorberConfig(chunk_tokens=8, sync_tokens=8, rank=2))
