"""One engine from several threads, as a stack embedding it uses it: a session opened by two threads
at once is one session, what a call reports is read before another thread can close its session,
a call that waited for the lock finds a closed engine or session refused cleanly, and tokens fed
while a failed flush ends are kept."""

import threading
import time

import pytest

from absorber_engine import AbsorberConfig, AbsorberEngine, InputError
from absorber_engine import engine as engine_module
from absorber_engine import round as rounds
from absorber_engine.session import Session
from tiny_models import make_model, random_ids

CFG = AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=4, max_steps=1, futures=0, future_tokens=4, lr=1e-2,
                     compute_dtype="float32")


def _outcome(fn):
    try:
        return fn()
    except Exception as exc:              # noqa: BLE001  (what a thread raised is the result checked)
        return exc


def _in_threads(*fns):
    out = [None] * len(fns)
    threads = [threading.Thread(target=lambda i=i, fn=fn: out.__setitem__(i, _outcome(fn))) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_two_threads_opening_one_session_get_the_same_one(monkeypatch):
    eng = AbsorberEngine(make_model("llama"), config=CFG)

    class Slow(Session):                  # the gap between the name check and the session's place in the dict
        def __init__(self, *a, **k):
            time.sleep(0.2)
            super().__init__(*a, **k)
    monkeypatch.setattr(engine_module, "Session", Slow)
    a, b = _in_threads(lambda: eng.session("s"), lambda: eng.session("s"))
    assert a is b and isinstance(a, Session)


def test_a_session_closed_while_another_thread_asks_for_it():
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    eng.session("x")

    class Slow(dict):                     # the gap between a membership test and a lookup
        def __contains__(self, key):
            found = dict.__contains__(self, key)
            time.sleep(0.2)
            return found
    eng.sessions = Slow(eng.sessions)
    got, _ = _in_threads(lambda: eng.session("x"), lambda: (time.sleep(0.05), eng.close_session("x")))
    assert isinstance(got, (Session, InputError)), got


def test_a_flushing_run_while_another_thread_opens_sessions(monkeypatch):
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    for i in range(3):
        eng.session(f"s{i}").feed(random_ids(5, seed=i))
    held = Session.held_tokens

    def slow_held(self):                  # run() looks at every session while another thread opens one
        time.sleep(0.1)
        return held.fget(self)
    monkeypatch.setattr(Session, "held_tokens", property(slow_held))
    ran, opened = _in_threads(lambda: eng.run(flush=True), lambda: (time.sleep(0.05), eng.session("new"))[1])
    assert not isinstance(ran, Exception), ran
    assert sorted(ran) == ["s0", "s1", "s2"] and isinstance(opened, Session)


def test_what_absorb_and_run_report_is_read_under_the_lock(monkeypatch):
    """close_session() from another thread waits for the lock: a report read after it is released
    raised KeyError for work that was done."""
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    owned = []
    absorbed = Session.absorbed_tokens
    monkeypatch.setattr(Session, "absorbed_tokens", property(lambda s: owned.append(eng._lock._is_owned())
                                                             or absorbed.fget(s)))
    eng.session("a").absorb(random_ids(40, seed=1))
    eng.session("b").feed(random_ids(40, seed=2))
    assert eng.run()["b"].rounds > 0
    assert owned and all(owned)


def test_a_call_that_waited_for_the_lock_finds_its_engine_or_session_closed():
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    eng.session("x").absorb(random_ids(30, seed=1))
    eng.session("y")
    for close, call in [(lambda: eng.close_session("x"), lambda: eng.generate([3, 4], max_new_tokens=2, session="x")),
                        (lambda: eng.close_session("y"), lambda: eng.logits([3, 4], session="y")),
                        (eng.close, lambda: eng.absorb(random_ids(30, seed=2)))]:
        got = []
        with eng._lock:                   # the call passes its first checks, then waits here
            t = threading.Thread(target=lambda: got.append(_outcome(call)))
            t.start()
            time.sleep(0.3)
            close()
        t.join()
        assert isinstance(got[0], InputError) and "closed" in str(got[0]), got[0]


def test_a_memory_call_that_waited_for_the_lock_touches_no_session_opened_meanwhile(tmp_path):
    # reset() and save_memory() looked their session up only before the lock: a KeyError when it was
    # closed meanwhile, and a reset that wiped the window and counters of a new session of the same name
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    eng.session("x").absorb(random_ids(30, seed=1))
    eng.save_memory(tmp_path / "m", session="x")
    calls = [lambda: eng.reset("x"), lambda: eng.discard_window("x"), lambda: eng.save_memory(tmp_path / "o", "x"),
             lambda: eng.load_memory(tmp_path / "m", "x"), lambda: eng.export_peft(tmp_path / "peft", "x")]
    for call in calls:
        got = []
        with eng._lock:                   # the call passes its first checks, then waits here
            t = threading.Thread(target=lambda: got.append(_outcome(call)))
            t.start()
            time.sleep(0.3)
            eng.close_session("x")
            eng.session("x").absorb(random_ids(40, seed=2))     # a new session of the same name
            before = eng.session("x").stats()
        t.join()
        assert isinstance(got[0], InputError) and "closed" in str(got[0]), got[0]
        assert eng.session("x").stats() == before and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_tokens_fed_while_failed_flushes_end_are_kept(monkeypatch):
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    x = eng.session("x")
    real = rounds.student_losses
    monkeypatch.setattr(rounds, "student_losses", lambda *a, **k: [float("nan") for _ in real(*a, **k)])
    stop, fed = threading.Event(), [0]

    def feeder():
        while not stop.is_set():
            x.feed([7])
            fed[0] += 1
    t = threading.Thread(target=feeder)
    t.start()
    end, failed = time.monotonic() + 2.0, 0
    while time.monotonic() < end:
        failed += len(eng.run(flush=True).get("x", type("R", (), {"errors": []})).errors)
    stop.set()
    t.join()
    assert failed > 0 and x.absorbed_tokens == 0
    assert x.held_tokens == fed[0]        # a failed flush ends without losing what was fed meanwhile
