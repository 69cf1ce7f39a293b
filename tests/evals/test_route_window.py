"""route_window's --memory: written with the record of its stream beside it, and refused (exit 2)
when that record is missing or names another stream (seed, documents or tokens)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from evals import route_window


class FakeEngine:
    """What stream_engine uses of an engine, with a word tokenizer: no model is loaded."""

    def __init__(self):
        self.tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens: [len(w) for w in text.split()])
        self.calls = []

    def absorb(self, ids):
        self.calls.append("absorb")

    def save_memory(self, path):
        self.calls.append("save")
        open(path, "w").close()

    def load_memory(self, path):
        self.calls.append("load")


@pytest.fixture
def engines(monkeypatch):
    made = []

    def from_pretrained(path, config=None):
        made.append(FakeEngine())
        return made[-1]

    monkeypatch.setattr(route_window, "resolve", lambda model: model)
    monkeypatch.setattr(route_window, "recommended_config", lambda path: None)
    monkeypatch.setattr(route_window.AbsorberEngine, "from_pretrained", staticmethod(from_pretrained))
    return made


def test_a_memory_is_written_with_its_stream_and_loaded_for_that_stream_only(tmp_path, engines):
    memory = str(tmp_path / "mem.safetensors")
    route_window.stream_engine("m", 2, 17, memory)
    assert engines[0].calls == ["absorb", "absorb", "save"]
    record = json.loads(open(memory + ".stream.json").read())
    assert record["seed"] == 17 and record["docs"] == 2 and len(record["tokens_sha256"]) == 64
    route_window.stream_engine("m", 2, 17, memory)
    assert engines[1].calls == ["load"]


@pytest.mark.parametrize("written, asked, message", [
    (None, (2, 17), "no readable record of its stream"),
    ((2, 17), (2, 29), "not the one asked for"),
    ((2, 17), (3, 17), "not the one asked for")])
def test_a_memory_of_another_or_an_unknown_stream_is_refused(tmp_path, engines, capsys, written, asked, message):
    memory = str(tmp_path / "mem.safetensors")
    if written:
        route_window.stream_engine("m", *written, memory)
    else:
        open(memory, "w").close()
    docs, seed = asked
    with pytest.raises(SystemExit) as exc:
        route_window.main(["--docs", str(docs), "--seed", str(seed), "--memory", memory, "--out", str(tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert "load" not in engines[-1].calls


def test_every_question_is_answered_four_ways_by_a_bank(monkeypatch):
    """The answering half on a real (tiny) bank: it ran only after a whole SmolLM2 stream, and a
    renamed stop helper made it fail there, after the absorption."""
    from tests.test_probes import CHATML, _tokenizer
    from tests.test_recital import TINY, _bank

    if not (TINY / "model.safetensors").exists():
        pytest.skip("model/absorber-tiny not built")
    tok = _tokenizer(CHATML)
    eng = _bank(tok)
    seen = []
    real = route_window.generate_rows

    def generate_rows(runner, deltas, windows, prompts, max_new, temperature, top_p, stops, gens):
        seen.append(stops)
        return real(runner, deltas, windows, prompts, max_new, temperature, top_p, stops, gens)

    monkeypatch.setattr(route_window, "generate_rows", generate_rows)
    rows = route_window.answer_four_ways(eng, 1, 17, [eng.absorbed_tokens + 1])
    asked = route_window.make_document(17, 0, place=True).questions
    assert [r["question"] for r in rows] == asked and all(r["in_window"] for r in rows)
    assert all(set(r["replies"]) == {"delta_and_window", "delta_alone", "newest_and_window", "base_and_window"}
               and set(r["correct"]) == set(r["replies"]) and 0 <= r["routed"] < 3 for r in rows)
    assert len(seen) == 4 * len(rows) and all(tok.convert_tokens_to_ids("<|im_end|>") in s for s in seen)
    # A flushed bank holds no raw window: its gain is None, and the table counts no question for it.
    assert all(g is None for r in rows for g in r["gain_window"].values())
    table = route_window.render(rows, 17)
    assert "| base | 1.0 | 0 | 0 |" in table and f"| delta_alone | 0 | {sum(r['correct']['delta_alone'] for r in rows)} |" in table
