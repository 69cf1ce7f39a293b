"""interrupts.deferred: SIGINT inside the block reaches the handler in place only after it."""

import os
import signal
import threading

import pytest

from absorber_engine import interrupts


def test_the_interrupt_comes_after_the_block_and_the_handler_is_put_back():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("rest of the block")
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_of_the_callers_gets_the_signal_once_and_an_ignored_one_stays_ignored():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            assert seen == []
        assert seen == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_off_the_main_thread_nothing_is_swapped():
    handlers = []

    def worker():
        with interrupts.deferred():
            handlers.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert handlers == [signal.default_int_handler]


def test_sigterm_is_held_back_too_and_read_as_ctrl_c_where_the_cli_asks():
    with pytest.raises(KeyboardInterrupt):
        with interrupts.terminate_as_interrupt():
            done = []
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("rest of the block")
            assert False, "the held SIGTERM is raised as the block ends"
    assert done == ["rest of the block"] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _sigint_at(engine_line: str, call, after: bool = False):
    """Runs call() with a real SIGINT raised when engine.py first reaches the line holding `engine_line`
    (with `after`, the next line below it that its frame runs once that one has run: a with block's exit
    reports its own first line again)."""
    import inspect
    import sys

    import absorber_engine.engine as E

    src, _ = inspect.getsourcelines(E)
    line = next(n for n, text in enumerate(src, start=1) if engine_line in text)
    fired, seen = [], []

    def tracer(frame, event, arg):
        if event == "call":
            return tracer if frame.f_code.co_filename == E.__file__ else None
        if event == "line" and not fired and seen and frame is seen[0] and frame.f_lineno > line:
            fired.append(1)
            signal.raise_signal(signal.SIGINT)
        elif event == "line" and not fired and frame.f_lineno == line:
            if not after:
                fired.append(1)
                signal.raise_signal(signal.SIGINT)
            else:
                seen.append(frame)
        return tracer
    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
    assert fired


@pytest.mark.parametrize("where, after", [("results = ROUNDS[self.config.objective]", True),
                                          ("report.tokens = pos = pos + take", False)],
                         ids=["right after the round", "between a feed and its count"])
def test_a_ctrl_c_where_a_round_ends_or_tokens_are_fed_leaves_the_memory_whole(where, after):
    # Right after the round, before its commit, the round stayed in flight (the delta trained, the
    # session stuck: a later absorb took nothing); right after a feed, tokens_taken said 0 of 24 held
    import torch

    from absorber_engine import AbsorberConfig, AbsorberEngine
    from tiny_models import make_model, random_ids

    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2,
                                                                    max_steps=2, compute_dtype="float32"))
    before = {k: v.clone() for k, v in eng.delta.state_dict().items()}
    with pytest.raises(KeyboardInterrupt) as stopped:
        _sigint_at(where, lambda: eng.absorb(random_ids(24, seed=1)), after)
    st = eng.default.stats()
    assert st["in_flight"] is None and stopped.value.tokens_taken == st["held"] + st["absorbed"]
    if st["rounds"] == 0:
        assert all(torch.equal(v, before[k]) for k, v in eng.delta.state_dict().items())
    assert eng.absorb(random_ids(24, seed=2)).rounds >= 1
