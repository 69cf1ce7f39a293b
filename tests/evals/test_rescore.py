"""evals.rescore: stored fact replies scored again under the current rule, without a model."""

import json

from evals.rescore import main, rescore


def _rows(method, replies, **extra):
    answers = ["Nekvy Tassel", "Neklo Rulno"]
    return [dict(method=method, doc=0, question=f"q{i}", answer=a, reply=r, **extra)
            for i, (a, r) in enumerate(zip(answers, replies))]


def test_a_reply_that_names_another_answer_loses_its_hit_in_every_stored_shape():
    hedged = ["Neklo Rulno or Nekvy Tassel.", "Neklo Rulno."]
    assert rescore({"rows": _rows("absorber", hedged)}) == {"absorber": (2, 1, 2)}
    stream = _rows("ttt", hedged) + [dict(r, doc=1, in_window=True) for r in _rows("ttt", hedged)]
    assert rescore({"stream": True, "rows": stream}) == {"ttt": (2, 1, 2)}           # the window's left out
    matrix = {"method": "absorber", "matrix": [[1]],
              "rows": [dict(after=0, doc=0, answer=r["answer"], reply=r["reply"]) for r in _rows("x", hedged)]}
    assert rescore(matrix) == {"absorber (every round)": (2, 1, 2)}
    ways = [dict(doc=0, answer=r["answer"], in_window=False, replies={"delta_alone": r["reply"]})
            for r in _rows("x", hedged)]
    assert rescore(ways) == {"delta_alone": (2, 1, 2)}
    one_off = [dict(doc=0, a=r["answer"], direct=r["reply"], direct_ok=True, alone={"reply": r["reply"]})
               for r in _rows("x", hedged)]
    assert rescore(one_off) == {"direct": (2, 1, 2), "alone": (2, 1, 2)}
    assert rescore({"rows": [{"doc": 0, "tokens": 3}]}) == {}


def test_the_cli_prints_each_file_and_method_and_leaves_the_files_as_they_are(tmp_path, capsys):
    run = tmp_path / "run" / "results.json"
    run.parent.mkdir()
    run.write_text(json.dumps({"rows": _rows("absorber", ["Neklo Rulno or Nekvy Tassel.", "Neklo Rulno."])}))
    (tmp_path / "timing.json").write_text(json.dumps({"rows": [{"doc": 0, "seconds": 1.0}]}))
    before = run.read_text()
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{run}:\n  absorber: 2/2 -> 1/2  (changed)\n" in out
    assert f"{tmp_path / 'timing.json'}: skipped" in out and run.read_text() == before
