"""compile_layers: the student's passes through torch.compile'd decoder layers give the round the
eager layers give, the model is handed back as it came, and a compiler that fails says so and
keeps the memory."""

import pytest
import torch

from absorber_engine import AbsorberConfig, AbsorberEngine
from absorber_engine import layer_forward
from absorber_engine.errors import ConfigError
from tiny_models import make_model, random_ids

CFG = AbsorberConfig(chunk_tokens=24, sync_tokens=16, rank=4, futures=1, future_tokens=8, max_steps=4, lr=1e-2,
                     kl_weight=0.5, compute_dtype="float32")


def _run_two_streams(cfg):
    """Two sessions absorbed in one batched round (stacked deltas), then one of them alone."""
    eng = AbsorberEngine(make_model("llama"), config=cfg)
    for i, name in enumerate(("a", "b")):
        eng.session(name)
        eng.feed(random_ids(40, seed=20 + i), session=name)
    eng.run(flush=True)
    eng.absorb(random_ids(40, seed=30), session="a", flush=True)
    return eng


@pytest.mark.parametrize("checkpoint", [False, True])
def test_compiled_layers_give_the_eager_round(checkpoint, monkeypatch):
    cfg = CFG.replace(checkpoint_layers=checkpoint)
    checkpointed = []               # each checkpointed layer call: both runs compared are checkpointed
    own = layer_forward.checkpoint
    monkeypatch.setattr(layer_forward, "checkpoint", lambda *a, **k: checkpointed.append(1) or own(*a, **k))
    eager = _run_two_streams(cfg)
    assert bool(checkpointed) == checkpoint
    checkpointed.clear()
    compiled = _run_two_streams(cfg.replace(compile_layers=True))
    assert bool(checkpointed) == checkpoint
    layers = compiled.runner.layers
    assert all(isinstance(layer.__dict__.get("forward"), layer_forward._Compiled) for layer in layers)
    for name in ("a", "b"):
        ref, got = eager.sessions[name].delta.state_dict(), compiled.sessions[name].delta.state_dict()
        assert any(v.abs().sum() > 0 for k, v in got.items() if k.endswith(".B"))       # it trained
        for k, v in ref.items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)
    compiled.close()
    assert not any("forward" in layer.__dict__ for layer in layers)     # handed back as it came


def test_only_passes_with_gradient_are_compiled(monkeypatch):
    calls = {"compiled": 0, "eager": 0}

    class Counting(layer_forward._Compiled):
        def __init__(self, eager, own):
            super().__init__(eager, own)
            compiled = self.compiled

            def count_compiled(*a, **k):
                calls["compiled"] += 1
                return compiled(*a, **k)

            def count_eager(*a, **k):
                calls["eager"] += 1
                return eager(*a, **k)

            self.compiled, self.eager = count_compiled, count_eager

    monkeypatch.setattr(layer_forward, "_Compiled", Counting)
    eng = AbsorberEngine(make_model("llama"), config=CFG.replace(compile_layers=True))
    eng.absorb(random_ids(40, seed=3), flush=True)
    assert calls["compiled"] > 0 and calls["eager"] > 0     # student under gradient; teacher and sampling not
    with torch.no_grad():
        before = dict(calls)
        eng.generate(random_ids(5, seed=4), max_new_tokens=3)
    assert calls["compiled"] == before["compiled"] and calls["eager"] > before["eager"]


def test_a_compiler_that_fails_is_named_and_the_memory_is_kept(monkeypatch):
    eng = AbsorberEngine(make_model("llama"), config=CFG.replace(compile_layers=True, compute_dtype="auto"))
    eng.absorb(random_ids(40, seed=5), flush=True)
    held = eng.delta.state_dict()

    def broken(*a, **k):
        raise torch._dynamo.exc.BackendCompilerFailed(lambda *_: None, RuntimeError("no C++ compiler found"), None)

    for layer in eng.runner.layers:
        monkeypatch.setattr(layer.__dict__["forward"], "compiled", broken)
    with pytest.raises(ConfigError, match="compile_layers.*RuntimeError: no C.. compiler found.*set compile_layers to false"):
        eng.absorb(random_ids(40, seed=6), flush=True)
    for k, v in eng.delta.state_dict().items():
        assert torch.equal(v, held[k]), k


def test_compile_layers_is_for_the_torch_backend(monkeypatch):
    from absorber_engine import model as model_mod

    monkeypatch.setattr(model_mod, "resolve_backend", lambda requested, device: "triton")
    model = make_model("llama")
    with pytest.raises(ConfigError, match="compile_layers is for backend 'torch'"):
        AbsorberEngine(model, config=CFG.replace(compile_layers=True))
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)
