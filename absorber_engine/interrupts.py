"""Ctrl-C held back while a round is committed.

Committing a round is several steps: the delta joins the memory (a full bank drops its oldest),
the scheduler lets go of the round's tokens, the gate's level and the replay buffer move. A
KeyboardInterrupt between two of them would leave a bank holding a delta whose tokens the
scheduler still holds (absorbed again by the next run, the oldest delta already dropped), or
abort a round the scheduler has committed. Within `deferred()` SIGINT is only recorded; once the
block is left, the handler it found is put back and the signal raised again, for that handler to
act on as it would have (Python's default raises KeyboardInterrupt).

Python runs signal handlers in the main thread only, and only there can they be replaced: in any
other thread (a server's worker) this changes nothing, and a Ctrl-C reaches the main thread.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def deferred():
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield                                  # None: a handler set outside Python, not ours to swap
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)
