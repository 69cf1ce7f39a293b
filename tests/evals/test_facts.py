"""The recall evaluation's documents and scorer (evals/facts.py, evals/recall_eval.py)."""

import hashlib
import re

from evals.facts import GENRES, make_document, score
import pytest

from evals.recall_eval import flushed_contexts, render, summarize, wilson

# sha256 of seeds 0, 1, 5, 17, 41 and 53's first 24 documents, with and without their place, as
# drawn before colliding draws were redrawn (none of them collided): stored results stay reproducible.
DOCUMENTS_DIGEST = "7710c2c9f3e25128"


def test_documents_are_seeded_state_their_facts_and_ask_them_in_other_words():
    a, b = make_document(1, 5), make_document(1, 5)
    assert a == b and make_document(2, 5) != a
    assert {make_document(0, i).genre for i in range(len(GENRES))} == set(GENRES)
    for i in range(12):
        d = make_document(0, i)
        assert len(d.questions) == len(d.answers) == 4 and len(set(d.answers)) == 4
        for q, ans in zip(d.questions, d.answers):
            assert ans in d.text and ans not in q
        placed = make_document(0, i, place=True)
        assert placed.answers == d.answers                       # the same facts, now about a place
        where = placed.text.split("(", 1)[1].split(")", 1)[0]
        assert all(q.startswith(f"At {where}, ") for q in placed.questions)
        assert sum(line.startswith(f"At {where}, ") for line in placed.text.splitlines()) == 4


def test_joined_contexts_hold_whole_placed_documents_and_no_blank_line():
    assert flushed_contexts(3, 4) == [make_document(3, i) for i in range(4)]
    joined = flushed_contexts(3, 6, join=3)
    assert len(joined) == 2
    for k, ctx in enumerate(joined):
        parts = [make_document(3, i, place=True) for i in range(3 * k, 3 * k + 3)]
        assert ctx.text == "".join(d.text for d in parts) and "\n\n" not in ctx.text
        assert ctx.questions == [q for d in parts for q in d.questions]
        assert ctx.answers == [a for d in parts for a in d.answers]
    with pytest.raises(ValueError, match="divide"):
        flushed_contexts(3, 5, join=2)


def test_score_reads_the_first_sentence_only():
    assert score("The code is 9007.", "9007") and score("the boat is the MARNEKKA", "Marnekka")
    assert not score("The code is 90071.", "9007")                   # whole words only
    assert not score("I do not know. The code is 9007.", "9007")    # a recited document earns nothing
    assert score("Kept by Orlena Vask\nmore text", "Orlena Vask")


def test_summary_intervals_and_rounds_ago():
    rows = [{"method": "m", "reply": r, "answer": "42", "rounds_ago": ago}
            for r, ago in [("It is 42.", 0), ("No.", 0), ("42", 3), ("x", 3)]]
    s = summarize(rows, ["m"], docs=1)["m"]
    assert (s["hits"], s["n"]) == (2, 4) and s["by_rounds_ago"] == {"0": [1, 2], "3": [1, 2]}
    lo, hi = wilson(2, 4)
    assert 0 < lo < 0.5 < hi < 1 and s["ci95"] == [lo, hi]
    assert wilson(0, 48)[0] == 0.0 and round(wilson(0, 48)[1], 3) == 0.074


def test_questions_still_in_the_window_are_counted_apart():
    rows = [{"method": "m", "reply": r, "answer": "42", "rounds_ago": 1, "in_window": raw}
            for r, raw in [("42", False), ("No.", False), ("42", True), ("42", True), ("x", True)]]
    s = summarize(rows, ["m"], docs=1)["m"]
    assert (s["hits"], s["n"], s["in_window"]) == (1, 2, [2, 3]) and s["by_rounds_ago"] == {"1": [1, 2]}


def test_a_label_asked_of_the_same_memory_shows_its_absorption_and_the_time_of_a_question():
    rows = [{"method": "absorber", "reply": "42", "answer": "42", "absorb_seconds": 40.0, "seconds": 3.0},
            {"method": "absorber", "reply": "no", "answer": "42", "seconds": 5.0},
            {"method": "absorber-recite", "reply": "42", "answer": "42", "seconds": 13.0},
            {"method": "window", "reply": "no", "answer": "42"}]
    s = summarize(rows, ["absorber", "absorber-recite", "window"], docs=2)
    assert s["absorber"]["absorb_seconds_per_doc"] == s["absorber-recite"]["absorb_seconds_per_doc"] == 20.0
    assert s["absorber"]["seconds_per_question"] == 4.0 and s["absorber-recite"]["seconds_per_question"] == 13.0
    assert "seconds_per_question" not in s["window"] and s["window"]["absorb_seconds_per_doc"] == 0.0


def test_a_streamed_run_is_plotted_by_age_and_held_memory(tmp_path):
    from evals.recall_plots import plot_stream

    rows = [{"method": "absorber", "rounds_ago": age, "correct": age % 3 != 0, "in_window": False}
            for age in range(10) for _ in range(4)]
    rows += [{"method": "window", "rounds_ago": None, "correct": False, "in_window": False}] * 40
    rows += [{"method": "absorber", "rounds_ago": None, "correct": True, "in_window": True}] * 4
    result = {"model": "m", "docs": 12, "seed": 0, "summary": {"window": {}, "absorber": {}}, "rows": rows,
              "held_curve": {"window": [2**20] * 12, "absorber": [2**20 * (1 + i) for i in range(12)]}}
    assert plot_stream(result, tmp_path) == ["recall_by_age.png", "memory.png"]
    assert all((tmp_path / name).stat().st_size > 10_000 for name in ("recall_by_age.png", "memory.png"))
    del result["held_curve"]                   # a run saved before held memory was recorded
    assert plot_stream(result, tmp_path / ".") == ["recall_by_age.png"]


def test_a_reply_that_names_another_person_or_number_first_or_as_a_choice_is_wrong():
    answers = ["Nekvy Tassel", "Neklo Rulno", "4821", "Quamir", "Kaquamar", "Zetloqua", "Griilocus"]
    hedged = "The spare key is held by the Neklo Rulno, the head of the Nekvy Tassel"
    assert score(hedged, "Nekvy Tassel") and not score(hedged, "Nekvy Tassel", answers)
    assert score("The spare key is held by nekvy tassel.", "Nekvy Tassel", answers)
    assert score("It is 4821. Neklo Rulno keeps it.", "4821", answers)        # the first sentence only
    # Context of another kind, or of its kind but named after it, takes nothing away.
    assert score("The delivery is signed for by the owner of the Kaquamar, Nekvy Tassel.", "Nekvy Tassel", answers)
    assert score("The lighthouse is in Zetloqua, near the village of Griilocus.", "Zetloqua", answers)
    assert score("The Zetloqua is a small boat called the Griilocus.", "Griilocus", answers)   # one-word kinds
    assert not score("Neklo Rulno or Nekvy Tassel keeps it.", "Nekvy Tassel", answers)
    assert not score("It is 4821 or 4822.", "4821", answers + ["4822"])
    # An answer that is part of the asked one is named with it; the longer one names the shorter.
    assert score("The cat is Quamir Ilomir.", "Quamir Ilomir", ["Quamir Ilomir", "Quamir"])
    assert not score("It is Quamir Ilomir.", "Quamir", ["Quamir Ilomir", "Quamir"])


def test_the_summary_scores_each_reply_against_the_other_answers_of_its_document():
    rows = [{"method": "m", "doc": 0, "answer": "Nekvy Tassel", "reply": "Neklo Rulno or Nekvy Tassel."},
            {"method": "m", "doc": 0, "answer": "Neklo Rulno", "reply": "Neklo Rulno."},
            {"method": "m", "doc": 1, "answer": "Kalo", "reply": "Kalo, not Nekvy Tassel."}]   # another document's
    assert summarize(rows, ["m"], docs=2)["m"]["hits"] == 2


def test_a_method_with_nothing_counted_has_no_accuracy():
    rows = [{"method": "absorber", "doc": 0, "answer": "Kalo", "reply": "Kalo.", "in_window": True}]
    s = summarize(rows, ["absorber"], docs=1)
    assert s["absorber"]["accuracy"] is None and s["absorber"]["ci95"] is None
    table = render({"model": "m", "docs": 1, "seed": 0, "summary": s, "rows": rows})
    assert "| absorber | n/a | n/a | 0 / 0 |" in table and "nan" not in table


def _whole(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def _collide(a: str, b: str) -> bool:
    return _whole(a, b) or _whole(b, a)


# Found by the reviewer's scan (seeds 0-1999, 32 placed documents each): the cat "Quamir" beside the
# person "Quamir Ilomir"; a town answer that is the document's place; two documents at one place.
def test_no_answer_shares_a_word_with_another_answer_or_its_place():
    for seed, index in ((86, 23), (168, 0)):
        d = make_document(seed, index, place=True)
        where = d.text.split("(", 1)[1].split(")", 1)[0]
        assert not any(_collide(a, b) for i, a in enumerate(d.answers) for b in d.answers[i + 1:]), d.answers
        assert not any(_whole(q, a) or _collide(a, where) for q, a in zip(d.questions, d.answers)), d.questions


def test_the_documents_of_a_stream_have_different_places():
    places = [make_document(33, i, place=True).text.split("(", 1)[1].split(")", 1)[0].lower() for i in range(32)]
    assert len(set(places)) == 32


def test_documents_without_a_collision_are_as_they_always_were():
    h = hashlib.sha256()
    for seed in (0, 1, 5, 17, 41, 53):
        for i in range(24):
            for placed in (False, True):
                d = make_document(seed, i, place=placed)
                h.update(repr((d.text, d.questions, d.answers)).encode())
    assert h.hexdigest()[:16] == DOCUMENTS_DIGEST       # measured before collisions were redrawn
