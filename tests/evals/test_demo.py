"""`absorber demo`, the README's main job, end to end on its default model (smollm2-135m, fetched
and converted once, as tests/test_real_model.py does): the shortest document it streams (--multiple
1: the facts section and one more), its held-memory table, and the opening's facts asked four ways.

Seed 1 answers 4/6 from memory and 5/6 from its recital at --multiple 1 and 2 alike (the opening is
one round, its delta the same either way); the floor, 2/6 each, fails when absorption, routing or
the recital stops carrying facts (a memory that holds nothing answers none of them: the base model
has never seen these invented names).
"""

from __future__ import annotations

import os
import re

import pytest

from evals import demo

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("ABSORBER_SKIP_REAL_MODEL") == "1", reason="skipped on request")]


def test_the_demo_streams_into_the_real_model_and_answers_from_memory(capsys, monkeypatch):
    monkeypatch.delenv("ABSORBER_MODEL", raising=False)
    assert demo.main(["--multiple", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "into smollm2-135m" in out
    # One table row per section, each round adding one delta of the bank to the held memory.
    rows = re.findall(r"^\s+([\d,]+) \|\s+([\d.]+) MiB \|\s+([\d.]+) MiB$", out, flags=re.M)
    assert len(rows) == 2
    per_delta = float(re.search(r"grows by one delta \(([\d.]+) MiB\)", out).group(1))
    assert [float(held) for _, held, _ in rows] == pytest.approx([per_delta, 2 * per_delta], abs=0.01)
    got = re.search(r"correct: memory (\d)/6, memory recited (\d)/6, window baseline (\d)/6, "
                    r"whole document in the prompt (\d)/6", out)
    assert got, out[-600:]
    assert int(got.group(1)) >= 2 and int(got.group(2)) >= 2, out
