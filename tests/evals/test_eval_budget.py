"""`absorber eval --steps`: one steps-a-round for every engine method, the gated one included,
and the run's record says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from evals.evaluate import build_methods, main, render

MODEL = Path(__file__).resolve().parents[2] / "model" / "absorber-tiny"
pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="model/absorber-tiny not built")
NAMES = ["truncate", "ttt", "absorber", "absorber+recite+gate"]


def _steps(steps):
    _, methods = build_methods(NAMES, str(MODEL), 512, steps=steps)
    return {m.name: m.engine.config.max_steps for m in methods if hasattr(m, "engine")}


def test_each_method_keeps_its_own_steps_unless_told():
    assert _steps(None) == {"ttt": 80, "absorber": 80, "absorber+recite+gate": 160}
    assert _steps(7) == {"ttt": 7, "absorber": 7, "absorber+recite+gate": 7}


def test_the_override_is_rendered_and_checked(capsys):
    row = dict(chunk_tokens=256, sync_tokens=128, rank=16, max_steps=80, lr=5e-3)
    result = dict(model="m", trained_context=512, tasks=["passkey"], multiples=[4], examples_per_cell=1, seed=3,
                  methods=["truncate"], engine_config=row, steps=480, rows=[],
                  machine=dict(cpu="x", threads=1, torch="t"))
    assert "every engine method at 480 steps a round" in render(result)
    assert "steps a round" not in render(dict(result, steps=None))
    with pytest.raises(SystemExit):
        main(["--model", str(MODEL), "--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err
