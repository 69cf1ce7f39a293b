"""evals.compare: the paired test behind the recall p-values (docs/recall.md)."""

import json

import pytest

from evals.compare import compare, exact_mcnemar, main, verdicts


def test_exact_mcnemar_is_the_two_sided_binomial_on_discordant_pairs():
    assert exact_mcnemar(9, 0) == pytest.approx(2 / 2**9)           # docs/recall.md: seed 9, replay vs none
    assert exact_mcnemar(8, 3) == pytest.approx(2 * (1 + 11 + 55 + 165) / 2**11)
    assert exact_mcnemar(3, 8) == exact_mcnemar(8, 3)
    assert exact_mcnemar(0, 0) == 1.0 and exact_mcnemar(2, 2) == 1.0


def _run(tmp_path, name, correct, method="absorber", in_window=(), answers=None, stored=None):
    answers = answers or [f"Kal{i}" for i in range(len(correct))]
    rows = [dict(method=method, doc=i // 2, question=f"q{i}", in_window=i in in_window, answer=answers[i],
                 reply=f"It is {answers[i]}." if c else "I do not know.", correct=c if stored is None else stored[i])
            for i, c in enumerate(correct)]
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(dict(rows=rows)))
    return d


def test_runs_are_compared_question_by_question(tmp_path, capsys):
    a = _run(tmp_path, "a", [True, True, False, True, False, False])
    b = _run(tmp_path, "b", [True, False, False, False, True, False], method="ttt")
    r = compare(verdicts(a, "absorber"), verdicts(b, "ttt"))
    assert (r["asked"], r["correct_a"], r["correct_b"], r["only_a"], r["only_b"]) == (6, 3, 2, 2, 1)
    assert main([str(a), str(b), "--method-b", "ttt"]) == 0
    assert "3/6 against 2/6: 2 only in A, 1 only in B" in capsys.readouterr().out


def test_unpaired_runs_and_missing_methods_are_refused(tmp_path):
    a = _run(tmp_path, "a", [True, False])
    b = _run(tmp_path, "b", [True, False, True])
    with pytest.raises(SystemExit, match="not paired"):
        compare(verdicts(a, "absorber"), verdicts(b, "absorber"))
    with pytest.raises(SystemExit, match="no rows of method 'ttt'"):
        verdicts(a, "ttt")


def test_questions_still_in_the_window_are_left_out_as_the_tables_leave_them_out(tmp_path, capsys):
    a = _run(tmp_path, "a", [True, True, True, False], in_window={2, 3})
    b = _run(tmp_path, "b", [True, False, False, True], method="ttt", in_window={2, 3})
    r = compare(verdicts(a, "absorber"), verdicts(b, "ttt"))
    assert (r["asked"], r["only_a"], r["only_b"]) == (2, 1, 0)
    assert main([str(a), str(b), "--method-b", "ttt", "--in-window"]) == 0
    assert "3/4 against 2/4: 2 only in A, 1 only in B" in capsys.readouterr().out


def test_runs_that_expect_other_answers_are_not_paired(tmp_path):
    a = _run(tmp_path, "a", [True, False], answers=["Kalo", "4821"])
    b = _run(tmp_path, "b", [True, False], answers=["Kalo", "9007"])        # another seed's document
    with pytest.raises(SystemExit, match="different answers to 1 of their questions: not paired"):
        compare(verdicts(a, "absorber"), verdicts(b, "absorber"))


def test_replies_are_scored_again_under_the_current_rule(tmp_path):
    # A verdict stored under an earlier, looser rule counted as right (docs/recall.md's seed-1 row
    # read 34 in the table and 35 here)
    a = _run(tmp_path, "a", [True, False], stored=[True, True])
    assert [v[1] for v in verdicts(a, "absorber").values()] == [True, False]
