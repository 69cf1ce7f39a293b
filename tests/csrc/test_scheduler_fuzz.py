"""Fuzz the scheduler's Python API with nonsense: every call must either work or raise a clean
Python exception of an expected type, never crash. The loop runs in a subprocess, so a segfault
or an abort fails the test instead of killing pytest."""

import subprocess
import sys
import textwrap

FUZZ = textwrap.dedent(r'''
    import random, sys, threading, traceback
    from absorber_engine._scheduler import Scheduler, Window

    CLEAN = (TypeError, ValueError, KeyError, IndexError, RuntimeError, OverflowError)
    seed, steps = int(sys.argv[1]), int(sys.argv[2])
    rng = random.Random(seed)

    class Weird:
        def __index__(self):
            raise ZeroDivisionError("index")  # a user-defined __index__ that raises
    WEIRD_ERRORS = (ZeroDivisionError,)

    INTS = [0, 1, 2, 3, -1, -2**31, 2**31, 2**31 - 1, 2**32, 2**40, 2**41, 2**62, 2**63 - 1, 2**63,
            -2**63, -2**63 - 1, 2**64, 2**64 + 1, 2**200, -2**200]
    JUNK = [None, 1.5, float("nan"), float("inf"), -0.0, "x", "", "\udcff", b"ab", bytearray(b"a"),
            True, False, [], (), {}, set(), object(), [None], ["1"], [1.0], [2**70], [-1], [[1]],
            (1, 2), range(3), iter([1, 2]), "0123", Weird(), [Weird()], {1: 2}, complex(1, 1)]

    def anything():
        r = rng.random()
        if r < 0.35:
            return rng.choice(INTS)
        if r < 0.55:
            return rng.choice(JUNK)
        if r < 0.7:
            return rng.choice(KEYS)
        if r < 0.85:
            return [rng.randrange(-3, 70) for _ in range(rng.randrange(0, 30))]
        return [rng.choice(INTS + [rng.randrange(64)] * 10) for _ in range(rng.randrange(0, 5))]

    KEYS = [0, 1, "1", "a", "b", "", "\u00e9", -5, 2**63 - 1, -2**63]

    def tokens():
        if rng.random() < 0.8:
            return [rng.randrange(64) for _ in range(rng.randrange(0, 40))]
        return anything()

    def key():
        return rng.choice(KEYS) if rng.random() < 0.85 else anything()

    def make_scheduler():
        while True:
            try:
                if rng.random() < 0.7:
                    return Scheduler(64, rng.randrange(1, 4), rng.randrange(1, 5), rng.randrange(0, 4))
                return Scheduler(*[anything() for _ in range(rng.randrange(0, 5))])
            except CLEAN:
                pass

    def scheduler_op(s, in_flight):
        op = rng.randrange(19)
        if op == 0:
            args = [key()] + [anything() for _ in range(rng.randrange(0, 4))]
            if rng.random() < 0.6:
                args = [key(), rng.randrange(0, 5)] + ([rng.randrange(1, 4), rng.randrange(0, 3)] if rng.random() < 0.5 else [])
            s.open(*args)
        elif op == 1:
            s.close(key())
        elif op in (2, 3, 4):
            s.feed(key(), tokens())
        elif op == 5:
            s.flush(key()) if rng.random() < 0.7 else s.end_drain(key())
        elif op == 6:
            s.set_priority(key(), rng.choice([0, 1, 5, 1000, 1001, -1]) if rng.random() < 0.7 else anything())
        elif op in (7, 8):
            args = [rng.randrange(0, 4), rng.random() < 0.3] if rng.random() < 0.8 else [anything(), anything()]
            b = s.next_batch(*args)
            if b is not None:
                assert len(set(map(repr, b.sessions))) == len(b), "a session twice in a batch"
                assert all(len(r.x) == b.x_len and len(r.y) == b.y_len for r in b.rounds), "mixed shapes"
                repr(b), b.moves, [repr(r) for r in b.rounds]
                in_flight.extend((r.session, r.id) for r in b.rounds)
        elif op in (9, 10):
            if in_flight and rng.random() < 0.8:
                k, rid = in_flight.pop(rng.randrange(len(in_flight)))
                if rng.random() < 0.2:
                    rid = anything()
                (s.commit if rng.random() < 0.7 else s.abort)(k, rid)
            else:
                (s.commit if rng.random() < 0.5 else s.abort)(key(), anything())
        elif op == 11:
            s.touch(key())
        elif op == 12:
            s.acquire(key())
        elif op == 13:
            s.release(key())
        elif op == 14:
            s.window(key())
        elif op == 15:
            s.restore(key(), tokens(), anything() if rng.random() < 0.3 else rng.randrange(3),
                      anything() if rng.random() < 0.3 else 0)
        elif op == 16:
            s.clear(key())
        elif op == 17:
            s.session_stats(key()), s.stats(), s.sessions(), len(s), key() in s
        else:
            getattr(s, rng.choice(["open", "feed", "next_batch", "commit", "restore", "stats"]))(
                *[anything() for _ in range(rng.randrange(0, 6))])
        st = s.stats()
        assert 0 <= st["resident"] <= st["max_resident"], st
        assert st["rounds_planned"] == st["rounds_committed"] + st["rounds_aborted"] + st["in_flight"], st

    def window_op(w):
        op = rng.randrange(6)
        if op == 0:
            w.feed(tokens())
        elif op == 1:
            r = w.plan(*([rng.random() < 0.5] if rng.random() < 0.8 else [anything()]))
            if r is not None:
                repr(r)
                if rng.random() < 0.7:
                    w.commit(r.id)
        elif op == 2:
            w.commit(anything())
        elif op == 3:
            w.restore(tokens(), anything() if rng.random() < 0.3 else 1, anything() if rng.random() < 0.3 else 0)
        elif op == 4:
            w.window(), w.held, w.absorbed, w.rounds
        else:
            w.clear()

    def guarded(fn, *args):
        try:
            fn(*args)
            return 0
        except CLEAN:
            return 1
        except WEIRD_ERRORS:  # raised by the Weird object itself, passed through cleanly
            return 1

    raised = 0
    s, w, in_flight = make_scheduler(), Window(3, 2, 64), []
    for i in range(steps):
        if i % 2000 == 0:
            s, in_flight = make_scheduler(), []
            while True:
                try:
                    w = Window(*([rng.randrange(-1, 5), rng.randrange(-1, 4), rng.choice([64, 0, 2**31])]
                                 if rng.random() < 0.5 else [anything() for _ in range(3)]))
                    break
                except CLEAN:
                    pass
        raised += guarded(scheduler_op, s, in_flight) if rng.random() < 0.8 else guarded(window_op, w)

    # Phase 2: the same nonsense from several threads at once on one scheduler.
    shared = Scheduler(64, 2, 2, 1)
    failures = []
    def worker(seed):
        global rng
        local = random.Random(seed)
        for _ in range(steps // 8):
            try:
                op = local.randrange(6)
                k = local.choice(KEYS)
                if op == 0:
                    shared.open(k, local.randrange(3))
                elif op == 1:
                    shared.feed(k, [local.randrange(70) for _ in range(local.randrange(8))])
                elif op == 2:
                    b = shared.next_batch(local.randrange(0, 3), local.random() < 0.2)
                    for r in (b.rounds if b is not None else []):
                        # Each round settled on its own: another thread's random commit may have
                        # taken one (its id is a guess away), and the rest must not stay in flight.
                        try:
                            (shared.commit if local.random() < 0.8 else shared.abort)(r.session, r.id)
                        except CLEAN:
                            pass
                elif op == 3:
                    shared.close(k)
                elif op == 4:
                    shared.acquire(k)
                    shared.release(k)
                else:
                    shared.commit(k, local.randrange(1, 50))
            except CLEAN:
                pass
            except BaseException as e:
                failures.append(repr(e))
                return
    threads = [threading.Thread(target=worker, args=(seed * 100 + t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        print("unexpected exception in a thread:", failures[:3])
        sys.exit(2)
    st = shared.stats()
    assert st["in_flight"] == 0 and st["resident"] <= 2, st
    assert st["rounds_planned"] == st["rounds_committed"] + st["rounds_aborted"], st
    print(f"OK {steps} raised={raised}")
''')


def run_fuzz(seed, steps):
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", FUZZ, str(seed), str(steps)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_fuzz_only_clean_exceptions():
    for seed in (1, 2):
        out = run_fuzz(seed, 12_000)
        assert out.startswith("OK 12000")
        raised = int(out.split("raised=")[1])
        assert 1000 < raised < 12_000  # both refusals and successes happened


def test_fuzz_harness_detects_a_crash():
    """The subprocess really reports a crash: a hard abort must fail run_fuzz."""
    proc = subprocess.run([sys.executable, "-c", "import os; os.abort()"], capture_output=True, timeout=60)
    assert proc.returncode != 0
