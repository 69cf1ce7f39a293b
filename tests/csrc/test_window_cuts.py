"""Rounds cut at boundary tokens: the C++ Window and Scheduler against a plain Python model of the
rule (X ends after the first boundary token, or the second of a boundary pair inside X, that leaves
it >= min_cut tokens, else at n)."""

import random

import pytest

from absorber_engine._scheduler import Scheduler, Window


def ends(held: list[int], i: int, after: set[int], pairs: set) -> bool:
    """Whether X = held[:i] ends at a break: its last token one, or its last two a pair."""
    return held[i - 1] in after or (i >= 2 and (held[i - 2], held[i - 1]) in pairs)


def expected_x(held: list[int], n: int, after: set[int], min_cut: int, pairs: set = frozenset()) -> int:
    return next((i for i in range(min_cut, n) if ends(held, i, after, pairs)), n)


def test_cut_after_the_first_boundary_past_min_cut():
    w = Window(8, 2, 100, cut_after=[5, 7], min_cut=3)
    assert (w.cut_after, w.min_cut) == ([5, 7], 3)
    w.feed([1, 5, 2, 3, 7, 4, 5, 4, 4, 4, 4])   # a 5 at index 1 leaves X too short; the 7 at 4 cuts
    r = w.plan()
    assert (r.x, r.y) == ([1, 5, 2, 3, 7], [4, 5])
    w.commit(r.id)
    assert (w.absorbed, w.held, w.window()) == (5, 6, [4, 5, 4, 4, 4, 4])


def test_no_boundary_in_reach_cuts_at_n():
    w = Window(4, 1, 100, cut_after=[9], min_cut=1)
    w.feed([1, 2, 3, 4, 9, 9])     # the boundary sits at index 4, past X's n = 4
    assert w.plan().x == [1, 2, 3, 4]


def test_the_drain_cuts_too_but_leaves_no_short_tail():
    w = Window(8, 2, 100, cut_after=[0], min_cut=2)
    w.feed([1, 2, 0, 3, 4, 0, 5])    # held 7 <= n + m: a drain round
    r = w.plan(flush=True)
    assert (r.x, r.y) == ([1, 2, 0], [3, 4])
    w.commit(r.id)
    r = w.plan(flush=True)           # cutting after the second 0 would leave a tail of 1 < min_cut
    assert (r.x, r.y) == ([3, 4, 0, 5], [])
    w.commit(r.id)
    assert w.plan(flush=True) is None and w.absorbed == 7


def test_a_pair_cuts_after_its_second_token_and_only_inside_x():
    w = Window(8, 0, 100, cut_after=[], min_cut=2, cut_pairs=[(3, 3), (5, 6), (2, 6)])
    assert w.cut_pairs == [(2, 6), (3, 3), (5, 6)]
    w.feed([3, 3, 1, 6, 5, 6, 2, 2, 2, 2, 2, 2])   # the first pair ends X at 2 tokens; 6 alone is no break
    r = w.plan()
    assert r.x == [3, 3]
    w.commit(r.id)
    r = w.plan()                         # X starts at 1: (3, 1) is no pair; (5, 6) ends X at 4
    assert r.x == [1, 6, 5, 6]
    w.commit(r.id)
    w.feed([6, 9, 9, 9, 9, 9])           # (2, 6) only once its 2 is in X: here it is, at X's 6th token
    assert w.plan().x == [2, 2, 2, 2, 2, 2, 6]
    w2 = Window(2, 0, 100, cut_pairs=[(2, 6)])
    w2.feed([2, 2])
    w2.commit(w2.plan().id)
    w2.feed([6, 9])                      # the 2 before this X's first token is no part of it
    assert w2.plan().x == [6, 9]


def test_ids_are_sorted_deduplicated_and_checked():
    assert Window(4, 1, 100, cut_after=[7, 3, 7]).cut_after == [3, 7]
    with pytest.raises(IndexError, match="cut token id 100"):
        Window(4, 1, 100, cut_after=[100])
    with pytest.raises(IndexError, match="cut token id -1"):
        Scheduler(100, 2, 4, 1, cut_after=[-1])
    with pytest.raises(ValueError, match="min_cut"):
        Window(4, 1, 100, cut_after=[3], min_cut=0)
    with pytest.raises(ValueError, match="min_cut"):
        Scheduler(100, 2, 4, 1, cut_after=[3], min_cut=0)
    s = Scheduler(100, 2, 4, 1)
    assert (s.cut_after, s.min_cut, s.cut_pairs) == ([], 1, [])
    assert Scheduler(100, 2, 4, 1, cut_pairs=[(9, 1), (2, 3), (9, 1)]).cut_pairs == [(2, 3), (9, 1)]
    with pytest.raises(IndexError, match="cut token id 100"):
        Window(4, 1, 100, cut_pairs=[(1, 100)])
    with pytest.raises(IndexError, match="cut token id -2"):
        Scheduler(100, 2, 4, 1, cut_pairs=[(-2, 1)])


@pytest.mark.parametrize("seed", range(4))
def test_random_streams_match_the_model(seed):
    rng = random.Random(seed)
    n, m, vocab = rng.randrange(2, 40), rng.randrange(0, 20), 12
    after, min_cut = set(rng.sample(range(vocab), rng.randrange(0, 3))), rng.randrange(1, n + 2)
    pairs = {(rng.randrange(vocab), rng.randrange(vocab)) for _ in range(rng.randrange(1, 6))}
    stream = [rng.randrange(vocab) for _ in range(3000)]
    w = Window(n, m, vocab, cut_after=sorted(after), min_cut=min_cut, cut_pairs=sorted(pairs))
    done, pos, rounds = 0, 0, 0
    while pos < len(stream):
        k = rng.randrange(1, 3 * (n + m))
        w.feed(stream[pos:pos + k])
        pos += k
        while (r := w.plan()) is not None:
            held = stream[done:pos]
            assert len(held) >= n + m       # cuts never plan before the window is full
            x = expected_x(held, n, after, min_cut, pairs)
            assert (r.x, r.y) == (held[:x], held[x:x + m])
            w.commit(r.id)
            done, rounds = done + x, rounds + 1
        assert w.window() == stream[done:min(pos, done + n + m)]
    while (r := w.plan(flush=True)) is not None:
        held = stream[done:]
        if len(held) > n + m:
            x = expected_x(held, n, after, min_cut, pairs)
            assert (r.x, r.y) == (held[:x], held[x:x + m])
        else:       # the drain: cut where neither side is shorter than min_cut, else all of it
            x = next((i for i in range(min_cut, len(held) - min_cut + 1) if ends(held, i, after, pairs)), len(held))
            assert (r.x, r.y) == (held[:x], held[x:x + m])
        done += x
        w.commit(r.id)
    assert done == len(stream) == w.absorbed
    assert rounds > len(stream) // n // 2     # the stream did run through full rounds


def test_scheduler_sessions_share_the_cuts_and_batch_by_shape():
    s = Scheduler(100, 4, 6, 2, cut_after=[0], min_cut=2)
    s.open("a")
    s.open("b")
    s.open("c", chunk_tokens=3)                 # its own n: a cut past 3 tokens is out of reach
    s.feed("a", [1, 2, 0, 3, 4, 5, 6, 7])       # cut after the 0: X = 3 tokens
    s.feed("b", [1, 2, 3, 4, 5, 6, 7, 8])       # no boundary: X = n = 6
    s.feed("c", [1, 2, 3, 0, 5])
    shapes = {}
    while (batch := s.next_batch(4)) is not None:
        for r in batch.rounds:
            shapes[r.session] = (len(r.x), len(r.y))
            assert (batch.x_len, batch.y_len) == shapes[r.session]
            s.commit(r.session, r.id)
    assert shapes == {"a": (3, 2), "b": (6, 2), "c": (3, 2)}
    assert [s.window(k) for k in "abc"] == [[3, 4, 5, 6, 7], [7, 8], [0, 5]]
