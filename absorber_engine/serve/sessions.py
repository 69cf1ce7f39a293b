"""Conversations: what each named session has taken in, how a resent history is matched against it,
and when its memory is written to the state directory.

A session holds a constant amount: the engine's delta and raw window, plus a token count and a
digest of the conversation ids it has taken in. It never keeps the history itself; a request's
history extends the session when the digest of its first `consumed` ids equals the session's.
"""

from __future__ import annotations

import hashlib
import logging
import time
from array import array
from dataclasses import dataclass

from ..errors import AbsorberError, MemoryFileError
from ..model_identity import weights_read_once
from .errors import APIError
from .state import StateDir

log = logging.getLogger("absorber.serve")

EMPTY_DIGEST = hashlib.sha256().hexdigest()


def hasher(ids: list[int]):
    h = hashlib.sha256()
    if ids:
        h.update(array("q", ids).tobytes())
    return h


@dataclass
class Conversation:
    id: str
    key: str                   # the engine's session name
    consumed: int = 0          # conversation tokens taken in (documents fed by /absorb not counted)
    digest: str = EMPTY_DIGEST
    generation: int = 0        # of its file in the state directory
    dirty: bool = False
    changed_at: float = 0.0

    def changed(self) -> None:
        self.dirty, self.changed_at = True, time.monotonic()


class SessionTable:
    """Owned by the engine worker: every call here runs on its thread."""

    def __init__(self, engine, state: StateDir | None, idle_save_s: float):
        self.engine, self.state, self.idle_save_s = engine, state, idle_save_s
        self.convs: dict[str, Conversation] = {}

    def load(self) -> int:
        """Opens every session saved in the state directory; returns how many."""
        if self.state is None:
            return 0
        # The worker owns the engine while it starts: the weights are read once for all the files.
        with weights_read_once(self.engine.runner):
            for saved in self.state.load_all():
                conv = Conversation(saved.session_id, _key(saved.session_id), saved.consumed, saved.digest,
                                    saved.generation)
                sess = self.engine.session(conv.key)
                try:
                    sess.load_memory(saved.memory)
                except MemoryFileError as exc:
                    # Made for another model or config: left on disk untouched, its id refused.
                    log.warning("state: not loading session %r (left on disk, its id refused): %s",
                                saved.session_id, exc)
                    self.state.hold(saved.session_id, f"its saved memory {saved.memory.name} does not load ({exc})")
                    sess.close()
                    continue
                self.convs[conv.id] = conv
        return len(self.convs)

    def get(self, session_id: str) -> Conversation | None:
        return self.convs.get(session_id)

    def open(self, session_id: str) -> Conversation:
        conv = self.convs.get(session_id)
        if conv is None:
            self.refuse_held(session_id)
            conv = Conversation(session_id, _key(session_id))
            self.engine.session(conv.key)            # may refuse: then no entry without a session
            conv.changed()                           # saved even if nothing is fed: it exists, and lists
            self.convs[session_id] = conv
        return conv

    def session(self, conv: Conversation):
        return self.engine.session(conv.key)

    def reset(self, conv: Conversation) -> None:
        self.session(conv).reset()
        conv.consumed, conv.digest = 0, EMPTY_DIGEST
        conv.changed()

    def delete(self, session_id: str) -> None:
        conv = self.convs.pop(session_id, None)
        if conv is not None:
            self.session(conv).close()
        if self.state is not None:
            self.state.delete(session_id)

    def held(self, session_id: str) -> bool:
        """A session whose saved files were not loaded (only a DELETE touches them)."""
        return self.state is not None and self.state.refusal(session_id) is not None

    def refuse_held(self, session_id: str) -> None:
        if self.held(session_id):
            raise APIError(409, f"session {session_id!r} is saved in the state directory but was not loaded: "
                                f"{self.state.refusal(session_id)}; its files are kept as they are: restart with "
                                f"the model and config it was made with, or DELETE the session to remove them",
                           code="session_not_loaded")

    # ------------------------------------------------------------------ saving

    def save(self, conv: Conversation) -> None:
        if self.state is None:
            conv.dirty = False
            return
        conv.generation += 1
        self.state.save(self.session(conv), conv.id, conv.consumed, conv.digest, conv.generation)
        conv.dirty = False

    def save_idle(self) -> None:
        now = time.monotonic()
        for conv in list(self.convs.values()):
            if conv.dirty and now - conv.changed_at >= self.idle_save_s:
                self.save_logged(conv)

    def save_all(self) -> None:
        for conv in list(self.convs.values()):
            if conv.dirty:
                self.save_logged(conv)

    def save_logged(self, conv: Conversation) -> None:
        """save(), a failure logged rather than raised: the session stays dirty, and the next save
        (idle, or the next round's) tries again. The memory itself is in the engine, not on disk."""
        try:
            self.save(conv)
        except (OSError, AbsorberError) as exc:   # a full disk, a quota: not the server's end; retried next time
            log.error("state: could not save session %r: %s", conv.id, exc)


def _key(session_id: str) -> str:
    # A prefix keeps client ids apart from the server's own sessions (the blank rows of stateless requests).
    return "u:" + session_id
