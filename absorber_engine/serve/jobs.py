"""What the routes hand the engine's worker: a job (generate, absorb, info, delete) with its future,
and the share of one worker turn a job gets (its plan)."""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from .errors import APIError
from .prompts import Prompt
from .sessions import Conversation


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    recite: bool = False


@dataclass
class Job:
    kind: str                          # "generate", "absorb", "info", "delete"
    session_id: str | None = None
    prompt: Prompt | None = None       # generate
    sampling: Sampling | None = None   # generate
    sink: object | None = None         # generate with stream: a StreamSink
    document: list[int] | None = None  # absorb
    flush: bool = False                # absorb
    timeout: float = 600.0
    future: Future = field(default_factory=Future)
    deadline: float = 0.0

    # The route cancels the future from the event loop's thread (a timeout, a client gone): between
    # a check and a set it may have, so the set itself is what is guarded.
    def fail(self, err: APIError) -> None:
        try:
            self.future.set_exception(err)
        except InvalidStateError:
            if self.sink is not None:
                self.sink.put("error", err)

    def done(self, value) -> None:
        with contextlib.suppress(InvalidStateError):
            self.future.set_result(value)


@dataclass
class Plan:
    """A job's share of one turn: what its session takes in, and what it generates from."""

    job: Job
    conv: Conversation | None          # None: a stateless request, on a blank session
    key: str                           # the engine session it reads
    feed: list[int]
    prompt: list[int]                  # the generation prompt
    hasher: object | None = None       # running digest of the conversation taken in (None: a document)
    pos: int = 0
    reset: bool = False
    error: APIError | None = None
