"""The KV cache goes to the decoder under the keyword its forward names (hf_cache.py): a decode over
the engine's cache gives the logits of one pass over the whole sequence, and no call warns that the
keyword is deprecated (transformers 5.25 renamed past_key_values to cache)."""

import inspect
import warnings

import pytest
import torch

from absorber_engine import AbsorberConfig, AbsorberEngine
from absorber_engine.hf_cache import returned_cache
from tiny_models import make_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_runner_passes_and_reads_the_cache_under_the_models_own_keyword(arch):
    model = make_model(arch)
    eng = AbsorberEngine(model, config=AbsorberConfig(chunk_tokens=8, sync_tokens=8, backend="torch"))
    runner = eng.runner
    assert runner.cache_keyword in inspect.signature(runner.base.forward).parameters
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        whole, _ = runner.forward(ids)
        _, cache = runner.forward(ids[:, :9], use_cache=True)
        assert cache is not None and cache.get_seq_length() == 9
        tail, cache = runner.forward(ids[:, 9:], cache=cache, use_cache=True)
    assert cache.get_seq_length() == 12
    torch.testing.assert_close(tail, whole[:, 9:], rtol=1e-4, atol=1e-4)
    eng.close()


def test_returned_cache_reads_either_name():
    class Out(dict):
        pass
    assert returned_cache(Out(cache="new")) == "new"
    assert returned_cache(Out(past_key_values="old")) == "old"
    assert returned_cache(Out(last_hidden_state=1)) is None
