"""Ctrl-C (and SIGTERM) held back while a round is committed; SIGTERM read as Ctrl-C by the CLI.

Committing a round is several steps: the delta joins the memory (a full bank drops its oldest),
the scheduler lets go of the round's tokens, the gate's level and the replay buffer move. A
KeyboardInterrupt between two of them would leave a bank holding a delta whose tokens the
scheduler still holds (absorbed again by the next run, the oldest delta already dropped), or
abort a round the scheduler has committed. Within `deferred()` SIGINT and SIGTERM are only
recorded; once the block is left, the handlers it found are put back and the signals raised again,
for those handlers to act on as they would have (Python's default raises KeyboardInterrupt).

`terminate_as_interrupt()` makes SIGTERM (a `kill`, a service manager's stop, a batch scheduler's
preemption) do what Ctrl-C does, so a command saves the rounds it completed: SIGTERM's default
ended the process at once, every completed round of an `absorber absorb` lost.

Python runs signal handlers in the main thread only, and only there can they be replaced: in any
other thread (a server's worker) this changes nothing, and a Ctrl-C reaches the main thread.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_HELD = (signal.SIGINT, signal.SIGTERM)


def _ours(sig) -> bool:
    # None: a handler set outside Python, not ours to swap
    return threading.current_thread() is threading.main_thread() and signal.getsignal(sig) is not None


@contextmanager
def deferred():
    caught, previous = [], {}
    for sig in _HELD:
        if _ours(sig):
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def terminate_as_interrupt():
    if not _ours(signal.SIGTERM):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
