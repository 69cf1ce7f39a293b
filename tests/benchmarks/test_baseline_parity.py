"""The benchmark's baseline (benchmarks/baseline.py: transformers + PEFT, teacher recomputed every step)
optimizes exactly the engine's objective: with only the real Y (futures = 0, deterministic) both
see the same loss at every step of every round and end with the same delta."""

import pytest
import torch

from benchmarks.baseline import PeftSyncBaseline
from benchmarks.engine_hooks import record_round_losses
from absorber_engine import AbsorberConfig, AbsorberEngine
from absorber_engine.config import PAPER_OBJECTIVE
from tiny_models import make_model, random_ids

N, M, ROUNDS, STEPS = 24, 16, 2, 6


def _run_both(**overrides):
    cfg = AbsorberConfig(chunk_tokens=N, sync_tokens=M, rank=4, futures=0, max_steps=STEPS, lr=1e-2, compute_dtype="float32", prefix_bos=False,
                         **{**PAPER_OBJECTIVE, **overrides})
    stream = random_ids(ROUNDS * N + M, seed=21)
    engine = AbsorberEngine(make_model("llama"), config=cfg)
    initial = engine.delta.state_dict()
    baseline = PeftSyncBaseline(make_model("llama"), cfg, init=initial)
    with record_round_losses() as engine_losses:
        report = engine.absorb(stream)
    base_report = baseline.absorb(stream)
    return engine, report, engine_losses, baseline, base_report


@pytest.mark.parametrize("objective", [dict(), dict(kl_weight=1.0)], ids=["hidden_l1", "hidden_l1+kl"])
def test_baseline_matches_engine_step_by_step(objective):
    engine, report, engine_losses, baseline, base_report = _run_both(**objective)
    assert report.rounds == base_report.rounds == ROUNDS
    assert report.steps == base_report.steps == ROUNDS * STEPS
    assert len(engine_losses) == len(base_report.step_losses) == ROUNDS
    for r, (e, b) in enumerate(zip(engine_losses, base_report.step_losses)):
        assert len(e) == len(b) == STEPS, f"round {r}: {len(e)} engine steps, {len(b)} baseline steps"
        for k, (le, lb) in enumerate(zip(e, b)):
            assert lb == pytest.approx(le, rel=2e-4, abs=1e-6), f"round {r} step {k}: engine {le}, baseline {lb}"
    # The losses moved (otherwise agreement would say little), and the trained deltas agree.
    assert engine_losses[0][-1] < engine_losses[0][0]
    trained = baseline.delta_state()
    for name, value in engine.delta.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=2e-3, atol=2e-5, msg=lambda m: f"{name}: {m}")


def test_baseline_early_stop_matches_engine():
    engine, report, engine_losses, _, base_report = _run_both(stop_loss=0.0)
    target = engine_losses[0][3]                    # a loss the first round reaches after three steps
    _, report, engine_losses, _, base_report = _run_both(stop_loss=target * (1 + 1e-6))
    assert len(engine_losses[0]) == len(base_report.step_losses[0]) <= 4
    assert report.steps == base_report.steps
    assert base_report.final_loss == pytest.approx(report.final_loss, rel=2e-4)


def test_baseline_samples_futures_once_per_round():
    cfg = AbsorberConfig(**PAPER_OBJECTIVE, chunk_tokens=N, sync_tokens=M, rank=4, futures=3, future_tokens=5, max_steps=2, lr=1e-2, compute_dtype="float32", prefix_bos=False)
    baseline = PeftSyncBaseline(make_model("llama"), cfg)
    calls = []
    real = baseline._sample_futures
    baseline._sample_futures = lambda x, r: calls.append(r) or real(x, r)
    rep = baseline.absorb(random_ids(ROUNDS * N + M, seed=22))
    assert calls == [0, 1] and rep.rounds == ROUNDS and rep.steps == ROUNDS * 2
    futures = real(torch.tensor(random_ids(N, seed=23)), 0)
    assert futures.shape == (3, 5)
