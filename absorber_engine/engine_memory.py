"""The engine's calls on a session's memory: forget it, drop its raw window, save it to a memory
file and load it back, export it as a PEFT adapter, and what it holds. Each takes the engine's lock:
a save or an export made while another thread's round trains would write a half-trained delta
beside the window of before that round."""

from __future__ import annotations

from contextlib import contextmanager

from .memory_file import load_memory, save_memory
from .peft_export import export_peft
from .session import DEFAULT_SESSION


class MemoryMixin:
    """Mixed into AbsorberEngine: uses its runner, default, _get, _lock, scheduler, _windows and _rest."""

    @property
    def delta(self):
        return self.default.delta

    @property
    def held_tokens(self) -> int:
        return self.default.held_tokens

    @property
    def absorbed_tokens(self) -> int:
        return self.default.absorbed_tokens

    @contextmanager
    def detached(self):
        """The model exactly as it was given (no deltas) for the duration of the block."""
        with self._lock:
            self.runner.detach()
            try:
                yield self.runner.model
            finally:
                self.runner.reattach()

    @contextmanager
    def _holding(self, session):
        """The session under the engine's lock, looked up again once the lock is held: one closed (or
        closed and opened anew) while the call waited was a KeyError, or a reset of the new one."""
        sess = self._get(session)
        with self._lock:
            yield self._get(sess)

    def reset(self, session=DEFAULT_SESSION) -> None:
        """Forgets everything: one delta, Δ = 0, and an empty window."""
        with self._holding(session) as sess:
            self.scheduler.clear(sess.key)
            sess.clear_slots()
            sess.replay.clear()
            sess.surprise.clear()
            self._windows.drop(sess.key)
            self._rest()

    def discard_window(self, session=DEFAULT_SESSION) -> int:
        """Drops the raw tokens the window holds (and any queued), keeping the absorbed memory and its
        counters: the way past a round that keeps failing on the same tokens. Returns how many."""
        with self._holding(session) as sess:
            st = sess.stats()
            self.scheduler.restore(sess.key, [], st["absorbed"], st["rounds"])
            self._windows.drop(sess.key, sess.slots)     # a recital reads no window: the bank's stay
            return st["held"]

    def save_memory(self, path, session=DEFAULT_SESSION) -> None:
        with self._holding(session) as sess:
            save_memory(sess, path)

    def load_memory(self, path, session=DEFAULT_SESSION) -> None:
        with self._holding(session) as sess:
            try:
                load_memory(sess, path)
            finally:                # a Ctrl-C held through the swap is raised as it ends: the model still
                self._windows.drop(sess.key)        # reads the memory the session holds
                self._rest()

    def export_peft(self, directory, session=DEFAULT_SESSION) -> None:
        with self._holding(session) as sess:
            export_peft(sess, directory)

    def window_tokens(self, session=DEFAULT_SESSION) -> list[int]:
        """The raw tokens generate() and logits() read after the memory (at most n + m)."""
        return list(self.scheduler.window(self._get(session).key))

    def held_bytes(self, session=DEFAULT_SESSION) -> dict[str, int]:
        """Bytes a stream holds: its deltas, what its queries keep (the window's KV, recitals, the Δ = 0 the base
        model is read through: "kv"), its raw tokens, its replay."""
        sess = self._get(session)
        return {"delta": sum(d.nbytes for d in sess.slots), "kv": self._windows.nbytes(sess.key), "tokens": 8 * sess.held_tokens,
                "replay": sum(8 * q.numel() for q in sess.replay)}
