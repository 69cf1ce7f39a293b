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
import random
import threading
import time
from array import array
from concurrent.futures import Future

from ..errors import AbsorberError, InputError
from .errors import (
    APIError,
    absorption_failed,
    bad_request,
    not_found,
    overloaded,
    server_error,
    timed_out,
)
from .jobs import Job, Plan, Sampling
from .prompts import Prompt, PromptBuilder, cut_at_stop, safe_length
from .sessions import Conversation, SessionTable, hasher

log = logging.getLogger("absorber.serve")


class Worker:
    def __init__(self, engine, table: SessionTable, prompts: PromptBuilder, max_positions: int | None,
                 max_queue: int, max_batch: int):
        self.engine, self.table, self.prompts = engine, table, prompts
        self.max_batch = max_batch
        cfg = engine.config
        self.window = cfg.chunk_tokens + cfg.sync_tokens
        self.limit = max(max_positions, cfg.window_tokens) if max_positions else None
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._held: Job | None = None       # taken from the queue, did not fit the last batch
        self.largest_batch = 0              # most generation requests run together so far (health, tests)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="absorber-engine", daemon=True)

    # ------------------------------------------------------------------ the other threads' side

    def start(self) -> None:
        self._thread.start()

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
        self._known(session_id)
        self.table.delete(session_id)

    def _known(self, session_id: str) -> Conversation:
        conv = self.table.get(session_id)
        if conv is None:
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
            report = sess.absorb([], flush=True)
            conv.changed()
            self.table.save(conv)
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
        self._take_in([p for p in plans if p.feed])
        for p in plans:
            if p.error is not None:
                p.job.fail(p.error)
        plans = [p for p in plans if p.error is None]
        whole = [p for p in plans if p.job.sink is None]
        if whole:
            self._decode_together(whole)
        for p in plans:
            if p not in whole:
                if time.monotonic() > p.job.deadline:
                    p.job.fail(timed_out(p.job.timeout))
                else:
                    self._stream(p)

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
                    self.table.save(p.conv)
                if rep.errors:
                    # The round would fail the same way on every later request: its raw tokens are
                    # dropped so the session goes on, with the memory it had before that round.
                    dropped = self.table.session(p.conv).discard_window()
                    p.conv.changed()
                    self.table.save(p.conv)
                    p.error = absorption_failed(f"absorbing session {p.conv.id!r} failed: {rep.errors[-1]}; its "
                                                f"memory is kept as before that round, and the {dropped} raw "
                                                "tokens of that round were dropped, so the session goes on")
            pending = [p for p in pending if p.pos < len(p.feed) and p.error is None]
            if not progress:
                for p in pending:
                    p.error = server_error(f"session {p.conv.id!r} cannot take in more tokens")
                break

    # ------------------------------------------------------------------ decoding

    def _decode_together(self, plans: list[Plan]) -> None:
        # Rows sample with their own seeds (what each would draw alone), so only the settings that
        # apply to the whole batch split it.
        groups: dict = {}
        for p in plans:
            s = p.job.sampling
            groups.setdefault((frozenset(p.job.prompt.stop_ids), s.temperature, s.top_p), []).append(p)
        for (stop_ids, temperature, top_p), group in groups.items():
            longest = max(p.job.sampling.max_tokens for p in group)
            rows = [p for p in group if self._fits(p, longest)]
            for p in group:
                if p not in rows:
                    self._decode_alone(p)
            if not rows:
                continue
            try:
                out = self.engine.generate_batch({p.key: p.prompt for p in rows}, max_new_tokens=longest,
                                                 temperature=temperature, top_p=top_p, stop=sorted(stop_ids),
                                                 seed={p.key: _seed(p.job.sampling) for p in rows})
            except InputError as exc:
                for p in rows:
                    p.job.fail(bad_request(str(exc)))
                continue
            for p in rows:
                self._finish(p, out[p.key])

    def _fits(self, p: Plan, max_tokens: int) -> bool:
        if self.limit is None:
            return True
        held = self.engine.session(p.key).held_tokens
        return 1 + held + len(p.prompt) + max_tokens <= self.limit

    def _decode_alone(self, p: Plan) -> None:
        s = p.job.sampling
        try:
            out = self.engine.generate_batch({p.key: p.prompt}, max_new_tokens=s.max_tokens, temperature=s.temperature,
                                             top_p=s.top_p, stop=sorted(p.job.prompt.stop_ids), seed=_seed(s))
        except InputError as exc:
            p.job.fail(bad_request(str(exc)))
            return
        self._finish(p, out[p.key])

    def _finish(self, p: Plan, ids: list[int]) -> None:
        s = p.job.sampling
        finish = "length" if len(ids) >= s.max_tokens else "stop"
        ids = ids[:s.max_tokens]
        text, hit = cut_at_stop(self.prompts.decode(ids), s.stops)
        p.job.done({"text": text, "finish_reason": "stop" if hit else finish, "prompt_tokens": len(p.job.prompt.ids),
                    "completion_tokens": len(ids), **self._meta(p)})

    def _meta(self, p: Plan) -> dict:
        return {"session": p.conv.id if p.conv else None, "reset": p.reset, "fed": len(p.feed)}

    def _stream(self, p: Plan) -> None:
        """Sends each token's text as soon as it is decoded (held back only while it may still
        become a stop sequence); the answer is the one the request gets without streaming."""
        s, sink = p.job.sampling, p.job.sink
        p.job.done(self._meta(p))
        out: list[int] = []
        sent, hit = 0, False

        def on_token(_key, token: int) -> bool:
            nonlocal sent, hit
            out.append(token)
            text = self.prompts.decode(out)
            cut, hit = cut_at_stop(text, s.stops)
            end = len(cut) if hit else safe_length(text, s.stops)
            if end > sent:
                sink.put("text", (cut if hit else text)[sent:end])
                sent = end
            # A stop sequence, a client gone or the deadline ends the row.
            return not (hit or sink.closed or time.monotonic() > p.job.deadline)

        try:
            self.engine.generate_batch({p.key: p.prompt}, max_new_tokens=s.max_tokens, temperature=s.temperature,
                                       top_p=s.top_p, stop=sorted(p.job.prompt.stop_ids), seed={p.key: _seed(s)},
                                       on_token=on_token)
        except (InputError, AbsorberError) as exc:
            sink.put("error", bad_request(str(exc)))
            return
        if not hit:
            text = self.prompts.decode(out)
            if len(text) > sent:
                sink.put("text", text[sent:])
        finish = "stop" if hit or len(out) < s.max_tokens else "length"
        sink.put("end", {"finish_reason": finish, "prompt_tokens": len(p.job.prompt.ids),
                         "completion_tokens": len(out)})


def _seed(s: Sampling) -> int | None:
    if s.temperature == 0:
        return None
    # Without a seed, sampling differs from request to request, as OpenAI's does.
    return s.seed if s.seed is not None else random.randrange(2**31)


def _drain(q: queue.Queue) -> list[Job]:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out
