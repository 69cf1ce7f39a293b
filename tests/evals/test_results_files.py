"""The evaluations' files: results.json is strict JSON (no bare NaN) written whole or not at all,
and the long-context tables compare methods on the same examples only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from evals import evaluate, recall_eval
from evals.jsonio import write_json
from evals.methods import WindowMethod

MODEL = Path(__file__).resolve().parents[2] / "model" / "absorber-tiny"


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_nan_is_written_as_null_and_the_old_file_is_replaced_whole(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    write_json(path, {"loss": math.nan, "rows": [{"s": math.inf, "n": 1.5}], "t": (1, 2)})
    assert _strict(path.read_text()) == {"loss": None, "rows": [{"s": None, "n": 1.5}], "t": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]          # no temporary file left


def test_a_rescored_recall_run_is_written_as_strict_json(tmp_path):
    saved = tmp_path / "saved.json"
    rows = [{"method": "absorber", "doc": 0, "question": "q", "answer": "Kalo", "reply": "Kalo.",
             "seconds": math.nan}]
    saved.write_text(json.dumps({"model": "m", "docs": 1, "seed": 0, "summary": {"absorber": {}}, "rows": rows}))
    assert recall_eval.main(["--rescore", str(saved), "--out", str(tmp_path / "out")]) == 0
    result = _strict((tmp_path / "out" / "results.json").read_text())
    assert result["rows"][0]["seconds"] is None and result["summary"]["absorber"]["hits"] == 1


def test_full_fits_only_with_its_bos_and_the_tokens_it_generates():
    model = SimpleNamespace(config=SimpleNamespace(bos_token_id=1))
    full = WindowMethod("full", model, None, max_positions=100)
    assert full.fits(95, 4) and not full.fits(96, 4) and full.fits(99, 0) and not full.fits(100, 0)
    assert WindowMethod("truncate", model, None, window=10, max_positions=100).fits(1000, 4)


def _result(rows):
    return dict(model="m", trained_context=512, tasks=["passkey"], multiples=[1, 4], examples_per_cell=2, seed=0,
                methods=["full", "truncate"], engine_config=dict(chunk_tokens=256, sync_tokens=128, rank=16,
                                                                 max_steps=80, lr=5e-3),
                steps=None, rows=rows, machine=dict(cpu="x", threads=1, torch="t"))


def test_a_method_that_skipped_an_example_of_a_cell_shows_no_mean_for_it():
    rows = [dict(task="passkey", multiple=m, example=i, method=meth, score=1.0, held_bytes=2**20)
            for m in (1, 4) for i in range(2) for meth in ("full", "truncate")]
    rows[-2] = dict(task="passkey", multiple=4, example=1, method="full", skipped="does not fit")
    table = evaluate.render(_result(rows)).split("### Accuracy: passkey")[1]
    assert "| full | 100% | n/a |" in table and "| truncate | 100% | 100% |" in table


@pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="model/absorber-tiny not built")
def test_the_cli_warns_that_runs_of_near_seeds_share_examples(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: _result([]))
    assert evaluate.main(["--model", str(MODEL), "--seed", "3", "--examples", "3", "--tasks", "passkey",
                          "--lengths", "1", "--methods", "truncate", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: example i uses seed + i (seeds 3-5 here): runs whose seed ranges overlap share examples"]
    assert "runs whose seed ranges overlap share examples" in evaluate.__doc__
