"""Unit tests of the C++ chunk scheduler: Window (one stream) and Scheduler (many streams)."""

import os
import random
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from absorber_engine._scheduler import Batch, Scheduler, Window

# ----------------------------------------------------------------------------------------------
# Window
# ----------------------------------------------------------------------------------------------


def test_window_rejects_bad_sizes():
    with pytest.raises(ValueError, match="chunk_tokens"):
        Window(0, 2, 10)
    with pytest.raises(ValueError, match="chunk_tokens"):
        Window(-1, 2, 10)
    with pytest.raises(ValueError, match="sync_tokens"):
        Window(4, -1, 10)
    with pytest.raises(ValueError, match="vocab_size"):
        Window(4, 2, 0)
    with pytest.raises(ValueError, match="vocab_size"):
        Window(4, 2, 2**31)
    with pytest.raises(ValueError, match="too large"):
        Window(2**41, 2, 10)
    w = Window(4, 0, 10)  # m = 0 is allowed: absorb without a real continuation
    assert (w.chunk_tokens, w.sync_tokens, w.vocab_size) == (4, 0, 10)


def test_window_plans_only_when_full_and_slides_by_n():
    n, m = 4, 3
    w = Window(n, m, 100)
    w.feed(list(range(n + m - 1)))
    assert w.plan() is None
    assert w.window() == list(range(n + m - 1))
    w.feed([n + m - 1, 50, 51])
    r = w.plan()
    assert r.x == [0, 1, 2, 3] and r.y == [4, 5, 6]
    assert w.held == n + m + 2 and w.absorbed == 0 and w.rounds == 0  # planning changes nothing
    assert w.window() == list(range(n + m))  # at most n + m tokens
    w.commit(r.id)
    assert (w.held, w.absorbed, w.rounds) == (5, n, 1)
    assert w.window() == [4, 5, 6, 50, 51]
    assert w.plan() is None  # 5 < n + m


def test_window_flush_drains_the_last_window_in_one_round():
    w = Window(4, 3, 100)
    w.feed(list(range(10)))
    r = w.plan(flush=True)  # 10 > 7: a full round even on flush
    assert (r.x, r.y) == ([0, 1, 2, 3], [4, 5, 6])
    w.commit(r.id)
    r = w.plan(flush=True)  # 6 held <= n + m: all of it is X, no Y (nothing stays raw)
    assert (r.x, r.y) == ([4, 5, 6, 7, 8, 9], [])
    w.commit(r.id)
    assert w.plan(flush=True) is None
    assert (w.held, w.absorbed, w.rounds) == (0, 10, 2)
    w.feed(list(range(8)))  # n + m + 1: one full round, then a round of 1
    assert w.plan(flush=True).x == [0, 1, 2, 3]


def test_window_commit_rules():
    w = Window(2, 1, 10)
    with pytest.raises(ValueError, match="not the planned round"):
        w.commit(1)  # nothing planned
    w.feed([1, 2, 3, 4, 5, 6])
    r1 = w.plan()
    r2 = w.plan()  # planning again re-plans the same tokens under a new id; r1 is stale
    assert r2.id != r1.id and (r2.x, r2.y) == (r1.x, r1.y)
    with pytest.raises(ValueError):
        w.commit(r1.id)
    with pytest.raises(ValueError):
        w.commit(r2.id + 100)
    assert (w.held, w.absorbed) == (6, 0)  # refused commits changed nothing
    w.commit(r2.id)
    with pytest.raises(ValueError):
        w.commit(r2.id)  # twice
    assert (w.held, w.absorbed, w.rounds) == (4, 2, 1)
    with pytest.raises(TypeError):
        w.commit(-1)
    with pytest.raises(TypeError):
        w.commit("1")


def test_window_bad_ids_are_atomic():
    w = Window(2, 1, 10)
    w.feed([1, 2])
    with pytest.raises(IndexError, match="position 2"):
        w.feed([3, 4, 10, 5])
    with pytest.raises(IndexError):
        w.feed([-1])
    with pytest.raises(TypeError):
        w.feed([1, None])
    with pytest.raises(TypeError):
        w.feed([1, 2.5])
    with pytest.raises(TypeError):
        w.feed("12")
    assert w.held == 2 and w.window() == [1, 2]
    with pytest.raises(IndexError):
        w.restore([1, 99], 0, 0)
    with pytest.raises(ValueError):
        w.restore([1], -1, 0)
    for absorbed, rounds in ((2**53 + 1, 0), (0, 2**63 - 1)):      # a commit after them could overflow
        with pytest.raises(ValueError, match=r"\[0, 2\^53\]"):
            w.restore([1], absorbed, rounds)
    assert w.held == 2 and w.window() == [1, 2]


def test_window_restore_and_clear():
    w = Window(2, 1, 10)
    w.feed([1, 2, 3, 4])
    r = w.plan()
    w.restore([7, 8, 9], absorbed=40, rounds=20)
    assert (w.held, w.absorbed, w.rounds, w.window()) == (3, 40, 20, [7, 8, 9])
    with pytest.raises(ValueError):
        w.commit(r.id)  # restore drops the planned round
    r = w.plan()
    assert (r.x, r.y) == ([7, 8], [9])
    w.clear()
    assert (w.held, w.absorbed, w.rounds, w.window()) == (0, 0, 0, [])
    with pytest.raises(ValueError):
        w.commit(r.id)


def test_window_long_stream_absorbs_exactly_the_stream():
    rng = random.Random(0)
    stream = [rng.randrange(1000) for _ in range(30_000)]  # past the compaction threshold
    w = Window(300, 200, 1000)
    absorbed = []
    pos = 0
    while pos < len(stream):
        k = rng.randrange(1, 900)
        w.feed(stream[pos:pos + k])
        pos += k
        while (r := w.plan()) is not None:
            assert r.x == stream[len(absorbed):len(absorbed) + 300]
            assert r.y == stream[len(absorbed) + 300:len(absorbed) + 500]
            absorbed += r.x
            w.commit(r.id)
        assert w.window() == stream[len(absorbed):min(pos, len(absorbed) + 500)]
    while (r := w.plan(flush=True)) is not None:
        absorbed += r.x
        w.commit(r.id)
    assert absorbed == stream and w.held == 0 and w.absorbed == len(stream)


# ----------------------------------------------------------------------------------------------
# Scheduler: sessions
# ----------------------------------------------------------------------------------------------


def make(max_resident=8, n=4, m=2, vocab=100):
    return Scheduler(vocab_size=vocab, max_resident=max_resident, chunk_tokens=n, sync_tokens=m)


def run_batch(s, batch, commit=True):
    for r in batch.rounds:
        (s.commit if commit else s.abort)(r.session, r.id)


def test_scheduler_rejects_bad_construction():
    with pytest.raises(ValueError, match="max_resident"):
        Scheduler(100, 0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        Scheduler(100, 2, 0, 1)
    with pytest.raises(ValueError, match="sync_tokens"):
        Scheduler(100, 2, 4, -1)
    with pytest.raises(ValueError, match="vocab_size"):
        Scheduler(0, 2)
    with pytest.raises(TypeError):
        Scheduler(100.0, 2)
    s = Scheduler(100, 3)
    assert (s.vocab_size, s.max_resident, s.chunk_tokens, s.sync_tokens) == (100, 3, 1024, 2048)


def test_sessions_open_close_and_keys():
    s = make()
    s.open("alice")
    s.open(1, priority=5, chunk_tokens=3, sync_tokens=0)
    s.open("1")  # str "1" and int 1 are different sessions
    assert s.sessions() == ["alice", 1, "1"] and len(s) == 3
    assert "alice" in s and 1 in s and "1" in s and 2 not in s and 1.0 not in s and None not in s
    st = s.session_stats(1)
    assert (st["priority"], st["chunk_tokens"], st["sync_tokens"]) == (5, 3, 0)
    assert s.session_stats("alice")["chunk_tokens"] == 4  # the scheduler's default
    with pytest.raises(ValueError, match="already open"):
        s.open("alice")
    with pytest.raises(TypeError, match="bool"):
        s.open(True)
    with pytest.raises(TypeError, match="str or an int"):
        s.open(1.5)
    with pytest.raises(TypeError):
        s.open(None)
    with pytest.raises(ValueError, match="64 bits"):
        s.open(2**64)
    with pytest.raises(ValueError):  # UnicodeEncodeError: a lone surrogate is not UTF-8
        s.open("\udcff")
    assert 2**64 not in s and "\udcff" not in s
    with pytest.raises(ValueError, match="priority"):
        s.open("p", priority=-1)
    with pytest.raises(ValueError, match="priority"):
        s.open("p", priority=Scheduler.MAX_PRIORITY + 1)
    with pytest.raises(ValueError, match="chunk_tokens"):
        s.open("p", chunk_tokens=0)
    with pytest.raises(ValueError, match="sync_tokens"):
        s.open("p", sync_tokens=-3)
    assert "p" not in s  # failed opens leave nothing behind
    s.feed("alice", [1, 2, 3])
    s.close("alice")
    with pytest.raises(KeyError, match="not open"):
        s.feed("alice", [1])
    with pytest.raises(KeyError):
        s.close("alice")
    for call in (s.flush, s.touch, s.acquire, s.release, s.window, s.clear, s.session_stats):
        with pytest.raises(KeyError):
            call("nobody")
    with pytest.raises(KeyError):
        s.commit("nobody", 1)
    with pytest.raises(KeyError):
        s.set_priority("nobody", 1)
    s.open("alice")  # a closed name can be opened again, as a fresh stream
    assert s.session_stats("alice")["held"] == 0
    assert s.sessions() == [1, "1", "alice"]


def test_feed_checks_ids_all_or_nothing():
    s = make(vocab=10)
    s.open("a")
    s.feed("a", [1, 2, 3])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        s.feed("a", [4, 5, 10])
    with pytest.raises(IndexError):
        s.feed("a", [-1])
    with pytest.raises(TypeError):
        s.feed("a", [1, "2"])
    with pytest.raises(TypeError):
        s.feed("a", [2**64])
    assert s.window("a") == [1, 2, 3] and s.stats()["tokens_fed"] == 3


# ----------------------------------------------------------------------------------------------
# Scheduler: batching, priority, fairness
# ----------------------------------------------------------------------------------------------


def test_next_batch_groups_rounds_by_shape():
    s = make(n=4, m=2)
    s.open("a")
    s.open("b")
    s.open("c", chunk_tokens=3, sync_tokens=1)
    s.open("d")
    s.open("idle")
    for k, base in (("a", 0), ("b", 10), ("c", 20), ("d", 30)):
        s.feed(k, list(range(base, base + 6)))
    s.feed("idle", [1, 2, 3])  # not enough for a round
    with pytest.raises(ValueError, match="max_sessions"):
        s.next_batch(0)
    b = s.next_batch(8)
    assert isinstance(b, Batch)
    assert b.sessions == ["a", "b", "d"] and (b.x_len, b.y_len) == (4, 2) and len(b) == 3
    assert [r.x for r in b.rounds] == [[0, 1, 2, 3], [10, 11, 12, 13], [30, 31, 32, 33]]
    assert [r.y for r in b.rounds] == [[4, 5], [14, 15], [34, 35]]
    assert len({r.id for r in b.rounds}) == 3
    b2 = s.next_batch(8)  # a, b, d are in flight: only c is left, in its own shape
    assert b2.sessions == ["c"] and (b2.x_len, b2.y_len) == (3, 1)
    assert b2.rounds[0].x == [20, 21, 22] and b2.rounds[0].y == [23]
    assert s.next_batch(8) is None  # everything ready is in flight
    assert s.stats()["in_flight"] == 4
    run_batch(s, b)
    run_batch(s, b2)
    assert [s.session_stats(k)["absorbed"] for k in "abcd"] == [4, 4, 3, 4]
    assert s.next_batch(8) is None


def test_batch_size_is_capped_by_max_sessions_and_residency():
    s = make(max_resident=3)
    for k in range(6):
        s.open(k)
        s.feed(k, [k] * 6)
    b = s.next_batch(2)
    assert len(b) == 2 and b.sessions == [0, 1]
    b = s.next_batch(10)  # capped at max_resident = 3, but 2 slots are pinned by the first batch
    assert len(b) == 1 and b.sessions == [2]
    assert s.next_batch(10) is None  # all 3 slots pinned by in-flight rounds
    assert s.stats()["resident"] == 3


def test_priority_orders_and_can_change():
    s = make()
    for k, p in (("low", 0), ("mid", 5), ("high", 9)):
        s.open(k, priority=p)
        s.feed(k, [1] * 60)
    b = s.next_batch(1)
    assert b.sessions == ["high"]
    run_batch(s, b)
    s.set_priority("low", 100)
    b = s.next_batch(1)
    assert b.sessions == ["low"]
    run_batch(s, b)
    with pytest.raises(ValueError):
        s.set_priority("low", -1)
    with pytest.raises(TypeError):
        s.set_priority("low", 1.5)
    assert s.session_stats("low")["priority"] == 100


def test_waiting_raises_the_score_and_serving_resets_it():
    s = make()
    s.open("hi", priority=3)
    s.open("lo", priority=0)
    s.feed("hi", [1] * 600)
    s.feed("lo", [1] * 600)
    order = []
    for _ in range(12):
        b = s.next_batch(1)
        order += b.sessions
        run_batch(s, b)
    # hi 3 vs lo 0 + waited: lo is served once it has waited > 3 batches (ties go to the longer wait).
    assert order[:4] == ["hi"] * 3 + ["lo"]
    assert order == (["hi"] * 3 + ["lo"]) * 3
    assert s.session_stats("lo")["waited"] == 0 and s.session_stats("hi")["waited"] == 1


def test_fairness_bound_low_priority_session_is_served():
    """A session of priority p among N others (max priority P) that stays eligible is served
    within max(0, P - p) + N + 1 non-empty batches (SCHEDULER.md); under pure priority order
    it would starve here, since the high-priority streams always have a round ready."""
    P, N = 40, 4
    s = make(max_resident=2, n=4, m=2)
    for k in range(N):
        s.open(f"hot{k}", priority=P)
    s.open("cold", priority=0, chunk_tokens=3, sync_tokens=2)  # its own shape: never a fill-in
    s.feed("cold", list(range(50)) * 10)
    bound = P - 0 + N + 1
    served_at = []
    for i in range(1, 6 * bound):
        for k in range(N):  # the hot streams never run dry
            if s.session_stats(f"hot{k}")["held"] < 20:
                s.feed(f"hot{k}", [7] * 20)
        b = s.next_batch(2)
        assert b is not None and len(set(b.sessions)) == len(b)
        if "cold" in b.sessions:
            served_at.append(i)
        run_batch(s, b)
    gaps = [b - a for a, b in zip([0] + served_at, served_at)]
    assert served_at, "the low-priority session starved"
    assert max(gaps) <= bound, gaps
    assert len(served_at) >= 5


def test_fairness_bound_with_fill_ins_and_many_sessions():
    rng = random.Random(3)
    P, N = 10, 12
    s = make(max_resident=4, n=2, m=1)
    for k in range(N):
        s.open(k, priority=rng.randrange(P + 1))
        s.feed(k, [1] * 3000)
    s.open("x", priority=0)
    s.feed("x", [2] * 3000)
    last = 0
    for i in range(1, 400):
        b = s.next_batch(rng.randrange(1, 4))
        if "x" in b.sessions:
            assert i - last <= P + N + 1
            last = i
        run_batch(s, b)
        if rng.random() < 0.1:
            s.set_priority(rng.randrange(N), rng.randrange(P + 1))
    assert last > 0


def test_flush_one_session_and_flush_all():
    s = make(n=4, m=2)
    s.open("a")
    s.open("b")
    s.feed("a", list(range(9)))  # one full round, then 5 left
    s.feed("b", [1, 2, 3])
    s.flush("a")
    assert s.session_stats("a")["draining"] and not s.session_stats("b")["draining"]
    got = []
    while (b := s.next_batch(4)) is not None:
        assert b.sessions == ["a"]
        got.append((b.rounds[0].x, b.rounds[0].y))
        run_batch(s, b)
    assert got == [([0, 1, 2, 3], [4, 5]), ([4, 5, 6, 7, 8], [])]   # the last n + m or less: one round
    assert s.session_stats("a")["held"] == 0 and not s.session_stats("a")["draining"]
    s.feed("a", [1, 2])  # a new feed after the drain is held again, not flushed
    assert s.next_batch(4) is None
    b = s.next_batch(4, flush=True)  # flush everyone for this call
    assert b.sessions == ["a"] and (b.x_len, b.y_len) == (2, 0)
    b2 = s.next_batch(4, flush=True)
    assert b2.sessions == ["b"] and (b2.x_len, b2.y_len) == (3, 0)
    run_batch(s, b)
    run_batch(s, b2)
    s.flush("b")  # nothing held: no drain
    assert not s.session_stats("b")["draining"]


def test_end_drain_stops_draining_and_keeps_the_window():
    s = make(n=4, m=2)
    s.open("a")
    s.feed("a", list(range(9)))
    s.flush("a")
    b = s.next_batch(4)
    s.end_drain("a")                  # a round in flight: it still drains
    assert s.session_stats("a")["draining"]
    s.abort("a", b.rounds[0].id)      # the round failed
    s.end_drain("a")
    st = s.session_stats("a")
    assert not st["draining"] and st["held"] == 9 and s.window("a", all=True) == list(range(9))
    s.feed("a", [1])
    assert s.window("a", all=True) == list(range(9)) + [1]
    assert s.next_batch(4).rounds[0].x == [0, 1, 2, 3]   # full rounds only again, not the drain's
    with pytest.raises(KeyError):
        s.end_drain("nobody")


# ----------------------------------------------------------------------------------------------
# Scheduler: commit / abort
# ----------------------------------------------------------------------------------------------


def test_commit_and_abort_contract():
    s = make(n=2, m=1)
    s.open("a")
    s.open("b")
    s.feed("a", [1, 2, 3, 4, 5])
    s.feed("b", [6, 7, 8])
    b = s.next_batch(2)
    ra, rb = b.rounds
    assert s.session_stats("a")["in_flight"] == ra.id
    with pytest.raises(ValueError, match="not in flight"):
        s.commit("a", rb.id)  # another session's round
    with pytest.raises(ValueError):
        s.commit("a", ra.id + 1000)
    with pytest.raises(TypeError):
        s.commit("a", -1)
    with pytest.raises(RuntimeError, match="in flight"):
        s.close("a")
    with pytest.raises(RuntimeError, match="in flight"):
        s.restore("a", [], 0, 0)
    s.commit("a", ra.id)
    with pytest.raises(ValueError):
        s.commit("a", ra.id)  # twice
    with pytest.raises(ValueError):
        s.abort("a", ra.id)  # after commit
    assert s.session_stats("a")["absorbed"] == 2 and s.session_stats("a")["in_flight"] is None
    s.abort("b", rb.id)  # absorption failed: the tokens stay
    with pytest.raises(ValueError):
        s.commit("b", rb.id)  # an aborted round is stale
    assert s.session_stats("b")["held"] == 3 and s.session_stats("b")["absorbed"] == 0
    b2 = s.next_batch(2)
    by = {r.session: r for r in b2.rounds}
    assert by["b"].x == rb.x and by["b"].y == rb.y and by["b"].id not in (ra.id, rb.id)
    assert by["a"].x == [3, 4]
    run_batch(s, b2)
    st = s.stats()
    assert (st["rounds_planned"], st["rounds_committed"], st["rounds_aborted"]) == (4, 3, 1)
    assert st["tokens_absorbed"] == 6 and st["tokens_held"] == 2 and st["in_flight"] == 0
    s.close("a")


def test_feeding_while_in_flight_keeps_order():
    s = make(n=2, m=1)
    s.open("a")
    s.feed("a", [1, 2, 3])
    b = s.next_batch(1)
    s.feed("a", [4, 5, 6])
    s.commit("a", b.rounds[0].id)
    assert s.window("a") == [3, 4, 5]
    assert s.next_batch(1).rounds[0].x == [3, 4]


# ----------------------------------------------------------------------------------------------
# Scheduler: residency
# ----------------------------------------------------------------------------------------------


def test_residency_lru_moves():
    s = make(max_resident=2, n=2, m=0)
    for k in "abc":
        s.open(k)
    assert s.touch("a") == [("a", "to_device")]
    assert s.touch("b") == [("b", "to_device")]
    assert s.touch("a") == []  # already resident: a use, no move
    assert s.touch("c") == [("b", "to_host"), ("c", "to_device")]  # b is least recently used
    assert [s.session_stats(k)["resident"] for k in "abc"] == [True, False, True]
    s.feed("b", [1, 2])
    b = s.next_batch(4)
    assert b.sessions == ["b"] and b.moves == [("a", "to_host"), ("b", "to_device")]
    s.feed("a", [1, 2])
    b2 = s.next_batch(4)  # b is pinned by its in-flight round: c is the victim
    assert b2.sessions == ["a"] and b2.moves == [("c", "to_host"), ("a", "to_device")]
    with pytest.raises(RuntimeError, match="pinned"):
        s.touch("c")  # both slots pinned
    assert s.session_stats("c")["resident"] is False
    run_batch(s, b)
    run_batch(s, b2)
    assert s.touch("c") == [("b", "to_host"), ("c", "to_device")]
    st = s.stats()
    assert st["resident"] == 2 and st["moves_to_device"] == 6 and st["moves_to_host"] == 4


def test_batch_moves_keep_the_device_within_budget():
    s = make(max_resident=3, n=1, m=0)
    for k in range(7):
        s.open(k)
        s.feed(k, [1] * 50)
    resident = set()
    for _ in range(20):
        b = s.next_batch(3)
        for sess, kind in b.moves:  # Python applies them in order
            if kind == "to_host":
                resident.remove(sess)
            else:
                assert sess not in resident
                resident.add(sess)
            assert len(resident) <= 3
        assert set(b.sessions) <= resident
        assert resident == {k for k in range(7) if s.session_stats(k)["resident"]}
        run_batch(s, b)


def test_acquire_pins_until_release():
    s = make(max_resident=2, n=1, m=0)
    for k in "abc":
        s.open(k)
    assert s.acquire("a") == [("a", "to_device")]
    assert s.acquire("a") == []  # pins count
    s.touch("b")
    assert s.touch("c") == [("b", "to_host"), ("c", "to_device")]  # a is older but pinned
    s.acquire("c")
    with pytest.raises(RuntimeError, match="pinned"):
        s.acquire("b")
    s.feed("b", [1])
    assert s.next_batch(2) is None  # b has a round but no slot can be freed
    with pytest.raises(RuntimeError, match="acquired"):
        s.close("a")
    s.release("c")
    b = s.next_batch(2)
    assert b.sessions == ["b"] and b.moves == [("c", "to_host"), ("b", "to_device")]
    s.release("a")
    s.release("a")
    with pytest.raises(RuntimeError, match="not acquired"):
        s.release("a")
    assert s.session_stats("a")["acquired"] == 0
    run_batch(s, b)
    s.close("a")  # frees its slot
    assert s.stats()["resident"] == 1
    assert s.touch("c") == [("c", "to_device")]


# ----------------------------------------------------------------------------------------------
# Scheduler: restore, stats
# ----------------------------------------------------------------------------------------------


def test_restore_clear_and_stats():
    s = make(n=2, m=1, vocab=10)
    s.open("a", priority=3)
    s.feed("a", [1, 2, 3, 4])
    s.flush("a")
    s.restore("a", [5, 6, 7], absorbed=100, rounds=9)
    st = s.session_stats("a")
    assert (st["held"], st["absorbed"], st["rounds"], st["draining"]) == (3, 100, 9, False)
    with pytest.raises(IndexError):
        s.restore("a", [11], 0, 0)
    with pytest.raises(ValueError):
        s.restore("a", [1], -1, 0)
    with pytest.raises(ValueError, match=r"\[0, 2\^53\]"):
        s.restore("a", [1], 2**63 - 3, 2**63 - 1)
    assert s.window("a") == [5, 6, 7]
    s.restore("a", [5, 6, 7], absorbed=2**53, rounds=2**53)      # what a memory file may hold
    s.restore("a", [5, 6, 7], absorbed=100, rounds=9)
    s.clear("a")
    assert s.session_stats("a")["held"] == 0 and s.session_stats("a")["absorbed"] == 0
    g = s.stats()
    assert g["sessions"] == 1 and g["tokens_fed"] == 4 and g["tokens_held"] == 0 and g["max_resident"] == 8


# ----------------------------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------------------------


def test_threads_feeders_and_a_planner_account_for_every_token():
    vocab = 997
    s = Scheduler(vocab, max_resident=3, chunk_tokens=5, sync_tokens=3)
    feeders, per = 4, 3
    keys = [f"t{i}s{j}" for i in range(feeders) for j in range(per)]
    streams = {}
    rng = random.Random(11)
    for k in keys:
        s.open(k, priority=rng.randrange(4), chunk_tokens=rng.choice([5, 5, 7]))
        streams[k] = [rng.randrange(vocab) for _ in range(rng.randrange(2000, 4000))]
    absorbed = {k: [] for k in keys}
    errors = []
    done = threading.Event()

    def feeder(i):
        try:
            r = random.Random(i)
            pos = {k: 0 for k in keys[i * per:(i + 1) * per]}
            while pos:
                k = r.choice(list(pos))
                n = r.randrange(1, 12)
                s.feed(k, streams[k][pos[k]:pos[k] + n])
                pos[k] += n
                if pos[k] >= len(streams[k]):
                    del pos[k]
                if r.random() < 0.05:
                    s.session_stats(k)
                    try:
                        s.touch(k)  # races with the planner's moves
                    except RuntimeError as e:
                        assert "pinned" in str(e)  # every slot pinned by in-flight rounds
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def planner():
        try:
            r = random.Random(99)
            n_batch = 0
            while True:
                finishing = done.is_set()
                b = s.next_batch(r.randrange(1, 4), flush=finishing)
                if b is None:
                    if finishing:
                        return
                    continue
                n_batch += 1
                assert len(set(b.sessions)) == len(b)
                assert all(len(x.x) == b.x_len and len(x.y) == b.y_len for x in b.rounds)
                for rd in b.rounds:
                    if n_batch % 7 == 0:
                        s.abort(rd.session, rd.id)
                    else:
                        absorbed[rd.session].extend(rd.x)
                        s.commit(rd.session, rd.id)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def churn():  # the session table grows and shrinks under the feeders (no tokens: accounting unchanged)
        try:
            i = 0
            while not done.is_set():
                s.open(10_000 + i % 64)
                if i >= 32:
                    s.session_stats(10_000 + (i - 32) % 64)
                    s.close(10_000 + (i - 32) % 64)
                i += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=feeder, args=(i,)) for i in range(feeders)]
    plan_thread = threading.Thread(target=planner)
    churn_thread = threading.Thread(target=churn)
    plan_thread.start()
    churn_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    churn_thread.join()
    plan_thread.join()
    assert not errors, errors
    for k in s.sessions():
        if isinstance(k, int):
            s.close(k)
    for k in keys:
        assert absorbed[k] == streams[k], k  # every token absorbed once, in order
        st = s.session_stats(k)
        assert st["held"] == 0 and st["absorbed"] == len(streams[k]) and st["in_flight"] is None
    g = s.stats()
    total = sum(map(len, streams.values()))
    assert g["tokens_fed"] == total == g["tokens_absorbed"] and g["tokens_held"] == 0
    assert g["rounds_planned"] == g["rounds_committed"] + g["rounds_aborted"] and g["rounds_aborted"] > 0
    assert g["resident"] <= 3


def test_threads_feeding_one_session_lose_nothing():
    s = Scheduler(1000, max_resident=1, chunk_tokens=16, sync_tokens=4)
    s.open("shared")
    per_thread = 5000

    def feeder(i):
        for j in range(0, per_thread, 50):
            s.feed("shared", [i] * 50)

    got = []
    stop = threading.Event()

    def planner():
        while True:
            finishing = stop.is_set()
            b = s.next_batch(1, flush=finishing)
            if b is None:
                if finishing:
                    return
                continue
            got.extend(b.rounds[0].x)
            s.commit("shared", b.rounds[0].id)

    threads = [threading.Thread(target=feeder, args=(i,)) for i in range(6)]
    p = threading.Thread(target=planner)
    p.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    p.join()
    assert s.session_stats("shared")["held"] == 0
    assert sorted(got) == sorted(i for i in range(6) for _ in range(per_thread))
    # each feed() is atomic: runs of 50 from one thread are never interleaved
    assert all(len(set(got[j:j + 50])) == 1 for j in range(0, len(got), 50))


CSRC = Path(__file__).resolve().parents[2] / "csrc"


def test_cpp_stress_under_thread_sanitizer(tmp_path):
    """csrc/stress/scheduler_stress.cpp drives the Scheduler from feeder, planner, churn and
    observer threads with no GIL in the way; built with -fsanitize=thread, any data race fails it
    (TSan exits 66), and it checks every stream was absorbed exactly, in order."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "stress"
    sources = [CSRC / "stress" / "scheduler_stress.cpp"] + [CSRC / f for f in ("window.cpp", "residency.cpp", "scheduler.cpp")]
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-g", "-fsanitize=thread", "-pthread", f"-I{CSRC}",
                            *map(str, sources), "-o", str(exe)], capture_output=True, text=True, timeout=240)
    if build.returncode != 0:
        if "tsan" in build.stderr.lower() or "sanitize" in build.stderr.lower():
            pytest.skip("no ThreadSanitizer runtime: " + build.stderr[-200:])
        pytest.fail(build.stderr[-3000:])
    env = dict(os.environ, TSAN_OPTIONS="exitcode=66 halt_on_error=1")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=240, env=env)
    if run.returncode != 0 and "FATAL: ThreadSanitizer" in run.stderr:
        pytest.skip("ThreadSanitizer cannot run here: " + run.stderr[-200:])
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-6000:]
    assert run.stdout.startswith("OK")


def test_window_all_returns_every_held_token_and_the_default_at_most_n_plus_m():
    s = Scheduler(100, 4, 4, 2, [], 1)
    s.open("a", 1, None, None)
    s.feed("a", list(range(20)))
    assert s.window("a") == list(range(6))
    assert s.window("a", all=True) == list(range(20))
    s.restore("a", list(range(3)), 0, 0)
    assert s.window("a", all=True) == s.window("a") == [0, 1, 2]
