"""The engine's one owner: a thread that takes jobs from a bounded queue and runs them on the model.

The engine is not thread-safe, so every engine call happens here. Each turn of the loop takes the
next job and, if it generates, the generation jobs queued behind it (one per session, up to
max_batch): their new tokens are fed together and every ready round of all of them is absorbed by
the engine's scheduler in shared batches, then those with the same temperature, top_p and stops
decode in one generate_batch. Every row samples with its own seed, so its tokens never depend on
what it was batched with.

A session takes in a history piece by piece, at most a window's worth at a time, so each round is
absorbed as soon as it is ready and the session is written to the state directory after it: a
killed server loses at most the round in flight (and raw tokens not yet saved, which the client's
next resent history feeds again).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from array import array
from concurrent.futures import Future

from ..errors import AbsorptionError, InputError
from .decoding import Decoder
from .errors import (
    APIError,
    absorption_failed,
    bad_request,
    not_found,
    overloaded,
    server_error,
    timed_out,
)
from .jobs import Job, Plan
from .prompts import Prompt, PromptBuilder
from .sessions import Conversation, SessionTable, hasher

log = logging.getLogger("absorber.serve")


class Worker:
    def __init__(self, engine, table: SessionTable, prompts: PromptBuilder, max_positions: int | None,
                 max_queue: int, max_batch: int):
        self.engine, self.table, self.prompts = engine, table, prompts
        cfg = engine.config
        # A batch's sessions (a request without one takes a blank session) must all be resident at
        # once: more than max_resident made generate_batch refuse valid requests, after feeding them.
        self.max_batch = max(1, min(max_batch, cfg.max_resident))
        self.window = cfg.chunk_tokens + cfg.sync_tokens
        self.limit = max(max_positions, cfg.window_tokens) if max_positions else None
        self.decoder = Decoder(engine, prompts, self.limit)
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._held: Job | None = None       # taken from the queue, did not fit the last batch
        self.largest_batch = 0              # most generation requests run together so far (health, tests)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="absorber-engine", daemon=True)

    # ------------------------------------------------------------------ the other threads' side

    def start(self) -> None:
        self._thread.start()

    def stopping(self) -> None:
        """From now on: no new job, and the one in flight ends after the round it is running."""
        self._stop.set()

    def stop(self) -> None:
        """Finishes the job in flight, refuses the queued ones, saves every session."""
        self._stop.set()
        self._thread.join()

    def submit(self, job: Job) -> Future:
        if self._stop.is_set():
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        job.deadline = time.monotonic() + job.timeout
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise overloaded(f"the server's queue is full ({self.queue.maxsize} requests waiting); retry later") from None
        return job.future

    def check_span(self, prompt: Prompt, max_tokens: int, stateless: bool) -> None:
        """Refuses, before any session is touched, a request whose answer cannot fit the model's
        positions: the BOS, the raw window (or a stateless prompt), the generation prompt, max_tokens."""
        if self.limit is None:
            return
        read = 1 + (min(len(prompt.ids), self.window) if stateless else self.window + prompt.hold)
        if read + max_tokens > self.limit:
            raise bad_request(f"max_tokens ({max_tokens}) + the {read} tokens the model reads exceed its "
                              f"{self.limit} positions", param="max_tokens", code="context_length_exceeded")

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self._take(timeout=0.2)
            if job is not None:
                jobs = [job]
                if job.kind == "generate":
                    seen = {job.session_id}
                    while len(jobs) < self.max_batch:
                        nxt = self._take(timeout=None)
                        if nxt is None:
                            break
                        if nxt.kind != "generate" or (nxt.session_id is not None and nxt.session_id in seen):
                            self._held = nxt
                            break
                        jobs.append(nxt)
                        seen.add(nxt.session_id)
                self._run(jobs)
            self.table.save_idle()
        for job in ([self._held] if self._held else []) + _drain(self.queue):
            job.fail(APIError(503, "the server is shutting down", type="server_error", code="shutting_down"))
        self.table.save_all()

    def _take(self, timeout: float | None) -> Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()
        except queue.Empty:
            return None

    def _run(self, jobs: list[Job]) -> None:
        live = []
        for job in jobs:
            if job.future.cancelled():
                continue                            # its route timed out and answered already
            if time.monotonic() > job.deadline or (job.sink is not None and job.sink.closed):
                job.fail(timed_out(job.timeout))     # answered already by its route; nothing was done
            else:
                live.append(job)
        if not live:
            return
        self.largest_batch = max(self.largest_batch, len(live))
        try:
            if live[0].kind == "generate":
                self._generate(live)
            elif live[0].kind == "absorb":
                self._absorb(live[0])
            elif live[0].kind == "info":
                live[0].done(self._info(live[0].session_id))
            elif live[0].kind == "delete":
                self._delete(live[0].session_id)
                live[0].done({"id": live[0].session_id, "object": "session", "deleted": True})
        except APIError as err:
            for job in live:
                job.fail(err)
        except Exception as exc:        # a bug: logged with its traceback, answered without one
            log.exception("engine worker: a job failed")
            for job in live:
                job.fail(server_error(f"internal error: {type(exc).__name__}"))

    # ------------------------------------------------------------------ jobs

    def _info(self, session_id: str) -> dict:
        conv = self._known(session_id)
        sess = self.table.session(conv)
        held = sess.held_bytes()
        return {"id": conv.id, "object": "session", "absorbed_tokens": sess.absorbed_tokens,
                "held_tokens": sess.held_tokens, "held_bytes": dict(held, total=sum(held.values())),
                "rounds": sess.rounds, "conversation_tokens": conv.consumed}

    def _delete(self, session_id: str) -> None:
        if not self.table.held(session_id):
            self._known(session_id)
        self.table.delete(session_id)

    def _known(self, session_id: str) -> Conversation:
        conv = self.table.get(session_id)
        if conv is None:
            self.table.refuse_held(session_id)
            raise not_found(f"no session {session_id!r}", param="session", code="session_not_found")
        return conv

    def _absorb(self, job: Job) -> None:
        conv = self.table.open(job.session_id)
        sess = self.table.session(conv)
        before = sess.rounds
        plan = Plan(job, conv, conv.key, job.document, [])
        self._take_in([plan])
        if plan.error is not None:
            raise plan.error
        report = None
        if job.flush and sess.held_tokens:
            try:
                report = sess.absorb([], flush=True)
            except AbsorptionError as exc:
                raise self._failed_round(conv, "flushing", exc) from exc
            conv.changed()
            self.table.save_logged(conv)
        job.done({"id": conv.id, "object": "session.absorb", "tokens": len(job.document),
                  "rounds": sess.rounds - before, "absorbed_tokens": sess.absorbed_tokens,
                  "held_tokens": sess.held_tokens,
                  "final_loss": None if report is None or report.rounds == 0 else report.final_loss})

    def _generate(self, jobs: list[Job]) -> None:
        plans, blanks = [], 0
        for job in jobs:
            try:
                if job.session_id is None:
                    plans.append(Plan(job, None, f"blank:{blanks}", [], job.prompt.ids[-self.window:]))
                    self.engine.session(f"blank:{blanks}")
                    blanks += 1
                else:
                    plans.append(self._plan(job))
            except APIError as err:
                job.fail(err)
            except InputError as err:                     # the engine refused the session: this job only
                job.fail(bad_request(str(err), code="invalid_session"))
        self._take_in([p for p in plans if p.feed])
        for p in plans:
            if p.error is not None:
                p.job.fail(p.error)
        plans = [p for p in plans if p.error is None]
        whole = [p for p in plans if p.job.sink is None]
        if whole:
            self.decoder.together(whole)
        for p in plans:
            if p not in whole:
                if time.monotonic() > p.job.deadline:
                    p.job.fail(timed_out(p.job.timeout))
                else:
                    self.decoder.stream(p)

    def _plan(self, job: Job) -> Plan:
        """Matches the request's history against its session: what is new is fed; a history that
        does not extend what the session holds starts it over."""
        conv = self.table.open(job.session_id)
        ids, target = job.prompt.ids, len(job.prompt.ids) - job.prompt.hold
        h = hasher(ids[:conv.consumed]) if conv.consumed <= target else None
        reset = h is None or h.hexdigest() != conv.digest
        if reset:
            self.table.reset(conv)
            h = hasher([])
        return Plan(job, conv, conv.key, ids[conv.consumed:target], ids[target:], h, reset=reset)

    def _take_in(self, plans: list[Plan]) -> None:
        """Feeds every plan's new tokens, a window's worth at a time, absorbing the rounds they make
        ready (all sessions' together) and saving each session after a round."""
        pending = list(plans)
        by_key = {p.key: p for p in plans}
        while pending:
            if self._stop.is_set():     # what was taken in so far is saved; a resent history feeds the rest
                for p in pending:
                    p.error = APIError(503, f"the server is shutting down: {p.pos} of the {len(p.feed)} new tokens "
                                            f"of this request were taken in and saved", type="server_error",
                                       code="shutting_down")
                break
            for p in [p for p in pending if p.job.future.done() or time.monotonic() > p.job.deadline
                      or (p.job.sink is not None and p.job.sink.closed)]:
                # answered already (504) or its client gone: a timed-out /absorb went on absorbing the
                # whole document, and a retry then took it in twice
                p.error = APIError(504, f"the request ran past its deadline: {p.pos} of the {len(p.feed)} new "
                                        "tokens of this request were taken in and saved", type="timeout_error",
                                   code="timeout")
            pending = [p for p in pending if p.error is None]
            progress = False
            for p in pending:
                sess = self.table.session(p.conv)
                take = min(len(p.feed) - p.pos, self.window - sess.held_tokens)
                if take <= 0:
                    continue
                piece = p.feed[p.pos:p.pos + take]
                sess.feed(piece)
                p.pos += take
                if p.hasher is not None:
                    p.hasher.update(array("q", piece).tobytes())
                    p.conv.consumed += take
                    p.conv.digest = p.hasher.hexdigest()
                p.conv.changed()
                progress = True
            reports = self.engine.run()
            for key, rep in reports.items():
                p = by_key.get(key)
                if p is None:
                    continue
                if rep.rounds:
                    progress = True
                    self.table.save_logged(p.conv)
                if rep.errors:
                    p.error = self._failed_round(p.conv, "absorbing", rep.errors[-1])
            pending = [p for p in pending if p.pos < len(p.feed) and p.error is None]
            if not progress:
                for p in pending:
                    p.error = server_error(f"session {p.conv.id!r} cannot take in more tokens")
                break


    def _failed_round(self, conv: Conversation, doing: str, why) -> APIError:
        """The answer to a round that was rolled back. It would fail the same way on every later
        request, so its raw tokens are dropped and the session goes on with the memory it had."""
        dropped = self.table.session(conv).discard_window()
        conv.changed()
        self.table.save_logged(conv)
        return absorption_failed(f"{doing} session {conv.id!r} failed: {why}; its memory is kept as before that "
                                 f"round, and the {dropped} raw tokens of that round were dropped, so the session goes on")


def _drain(q: queue.Queue) -> list[Job]:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out
