"""Session: one stream of an engine, and the report of an absorption.

A session holds its memory: its own delta, the probes its later rounds replay and the first
losses its surprise gate reads. Its raw window is held by the engine's C++ scheduler, the base
model and the config are the engine's, and every method is the engine's own, applied to this
session (`engine.absorb(x, session=key)`).
"""

from __future__ import annotations

import copy
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .errors import InputError
from .lora import LowRankDelta
from .recital import marks

DEFAULT_SESSION = "default"


def check_key(name):
    """A session's name: an int (not a bool) or a str, as the scheduler takes them; InputError
    otherwise (a list is no key at all, and True or 1.0 would be session 1 by hash)."""
    if isinstance(name, bool) or not isinstance(name, (int, str)):
        raise InputError(f"a session is named by an int or a str, got {type(name).__name__} {name!r}")
    return name
SURPRISE_ROUNDS = 16        # first losses a stream keeps for its surprise gate (config.surprise_gate)
# A bank's committed deltas train no more, so it holds them in bf16: half the bytes. Stream of 24
# documents on SmolLM2-135M (seed 53, rounds of 256): see docs/recall.md, "A bank held in bf16".
BANK_DTYPE = torch.bfloat16


@dataclass
class AbsorbReport:
    tokens: int = 0             # tokens taken from this call's input
    absorbed: int = 0           # tokens this call absorbed into the memory (earlier held ones included)
    rounds: int = 0             # rounds absorbed by this call
    steps: int = 0              # optimizer steps taken by this call
    final_loss: float = float("nan")   # last loss of the last round (nan when no round ran)
    seconds: float = 0.0
    held_tokens: int = 0        # raw tokens in the window afterwards
    absorbed_tokens: int = 0    # tokens absorbed into the memory since the last reset, in total
    round_losses: list[float] = field(default_factory=list)   # final loss of each round
    gated: int = 0              # rounds the surprise gate skipped (no step taken)
    unrecited: int = 0          # recite_exact: rounds kept whose delta missed a token of X at its last check
    errors: list[str] = field(default_factory=list)            # rounds rolled back (engine.run() only)

    def add_round(self, x_len: int, result) -> None:
        self.rounds += 1
        self.absorbed += x_len
        self.steps += result.steps
        self.gated += result.gated
        self.unrecited += bool(result.misses and result.misses[-1])
        self.round_losses.append(result.final_loss)
        self.final_loss = result.final_loss


class Session:
    def __init__(self, engine, key, seed: int):
        self.engine, self.key, self.seed = engine, key, seed
        cfg = engine.config
        # The memory's deltas, oldest first; the last is the newest (the one delta when memory_slots = 1).
        self.slots: deque[LowRankDelta] = deque([self.new_delta()], maxlen=cfg.memory_slots)
        # Earlier rounds' probes that each round replays (replay_rounds): bounded, so held memory stays flat.
        self.replay: deque[torch.Tensor] = deque(maxlen=max(cfg.replay_rounds, 1))
        # Its recent rounds' first losses: what the surprise gate compares a round's first loss with.
        self.surprise: deque[float] = deque(maxlen=SURPRISE_ROUNDS)
        self.closed = False

    # ------------------------------------------------------------------ the memory's deltas

    @property
    def delta(self) -> LowRankDelta:
        """The newest delta: the whole memory when memory_slots = 1."""
        return self.slots[-1]

    def new_delta(self) -> LowRankDelta:
        cfg, runner = self.engine.config, self.engine.runner
        return LowRankDelta(runner.shapes, cfg.rank, cfg.scale, runner.device, seed=self.seed)

    @property
    def delta_bytes(self) -> int:
        """Bytes one round's delta takes once this memory holds it."""
        dtype = BANK_DTYPE if self.slots.maxlen > 1 else torch.float32
        return self.delta.num_parameters * dtype.itemsize

    def round_delta(self) -> LowRankDelta:
        """The delta a round trains: the memory's one delta, or with memory_slots > 1 a fresh one
        (its teacher is then the base model, and no earlier round's delta is touched)."""
        if self.slots.maxlen == 1 or self.delta.is_zero():
            return self.delta
        return self.new_delta()

    def keep(self, delta: LowRankDelta, x: list[int]) -> None:
        """A committed round's delta joins the memory (a full bank drops its oldest); a fresh delta
        that took no step (the surprise gate) holds nothing and is not kept. A bank holds its deltas
        compact (BANK_DTYPE), each with the length and marks of its round's X `x`: what its recital
        can be and what it must match."""
        if delta.is_zero():
            return
        if self.slots.maxlen > 1:          # before it joins: a failed cast leaves the bank as it was
            delta.compact(BANK_DTYPE)
            if delta.is_zero():            # below BANK_DTYPE's range: it holds nothing, and a Δ = 0 trains on
                delta.reset()
                return
            delta.round_tokens, delta.marks = len(x), marks(list(x))
        if delta is not self.delta:
            self.slots.append(delta)

    @contextmanager
    def keeping(self, delta: LowRankDelta, x: list[int]):
        """keep(delta, x) for a commit inside the block: a block that raises (an allocation in the
        scheduler's commit) puts the bank back as it was, its oldest delta too if a full bank dropped it."""
        before = list(self.slots)
        self.keep(delta, x)
        try:
            yield
        except BaseException:
            self.slots.clear()
            self.slots.extend(before)
            raise

    def clear_slots(self) -> None:
        """Back to one delta, Δ = 0."""
        newest = self.slots[-1]
        newest.reset()
        self.slots.clear()
        self.slots.append(newest)

    # ------------------------------------------------------------------ the engine's API, on this stream

    def feed(self, text_or_ids) -> int:
        """Queues tokens without absorbing them (thread-safe); engine.run() absorbs what is ready."""
        return self.engine.feed(text_or_ids, session=self)

    def absorb(self, text_or_ids, flush: bool = False, progress=None) -> AbsorbReport:
        """Feeds the stream and absorbs every round its window allows (all of it with flush); see
        AbsorberEngine.absorb."""
        return self.engine.absorb(text_or_ids, flush=flush, progress=progress, session=self)

    def logits(self, ids) -> torch.Tensor:
        """Next-token logits (len(ids), V) at each position of `ids`, after the memory and the window."""
        return self.engine.logits(ids, session=self)

    def generate(self, prompt=None, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop=None, seed: int | None = None):
        """Continues the window (and `prompt`, if any) with the memory; nothing is absorbed."""
        return self.engine.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    stop=stop, seed=seed, session=self)

    def reset(self) -> None:
        """Forgets everything: Δ = 0 and an empty window."""
        self.engine.reset(session=self)

    def discard_window(self) -> int:
        """Drops the raw window, keeping the absorbed memory (see AbsorberEngine.discard_window)."""
        return self.engine.discard_window(session=self)

    def save_memory(self, path) -> None:
        self.engine.save_memory(path, session=self)

    def load_memory(self, path) -> None:
        self.engine.load_memory(path, session=self)

    def export_peft(self, directory) -> None:
        self.engine.export_peft(directory, session=self)

    def window_tokens(self) -> list[int]:
        """The raw tokens generate() and logits() read after the memory (at most n + m)."""
        return self.engine.window_tokens(session=self)

    def held_bytes(self) -> dict[str, int]:
        return self.engine.held_bytes(session=self)

    def close(self) -> None:
        """Ends the stream: its window and delta are dropped."""
        if not self.closed:
            self.engine.close_session(self)

    # ------------------------------------------------------------------ state

    def stats(self) -> dict:
        """The scheduler's view: held, absorbed, rounds, chunk_tokens, sync_tokens, ..."""
        self.check_open()
        return self.engine.scheduler.session_stats(self.key)

    @property
    def held_tokens(self) -> int:
        return self.stats()["held"]

    @property
    def absorbed_tokens(self) -> int:
        return self.stats()["absorbed"]

    @property
    def rounds(self) -> int:
        return self.stats()["rounds"]

    @property
    def runner(self):
        return self.engine.runner

    @property
    def config(self):
        return self.engine.config

    def end_drain(self) -> None:
        """A flush whose round failed stops draining (the scheduler's flag outlived it, and the next
        plain absorb() flushed unasked): what it held stays raw, counters as they are."""
        self.engine.scheduler.end_drain(self.key)

    def restore_window(self, tokens: list[int], absorbed: int, rounds: int) -> None:
        """Puts a saved window back (memory files)."""
        self.engine.scheduler.restore(self.key, tokens, absorbed, rounds)

    def merged_model(self):
        """A standalone copy of the base model with this session's delta merged into its weights
        (W + scale·A·B): plain weights for stacks that take no adapters. The raw window is not
        part of it."""
        self.engine._get(self)                      # refused once the session or the engine is closed
        with self.engine._lock:                     # not a delta half-way through another thread's round
            d = self.single_delta("a merged model")
            merged = {name: w.merged_weight(*d.factors(name), d.scale) for name, w in self.runner.wrappers.items()}
            with self.engine.detached() as model:
                out = copy.deepcopy(model)
            self.runner.as_given(out)               # trainable, in its mode and attention, as the model was given
        with torch.no_grad():
            for name, weight in merged.items():
                out.get_submodule(name).weight.copy_(weight)
        return out

    def single_delta(self, what: str) -> LowRankDelta:
        """The memory's one delta; InputError when it holds several (memory_slots), which no single
        set of weights can stand for."""
        if len(self.slots) > 1:
            raise InputError(f"{what} holds one delta; session {self.key!r} holds {len(self.slots)} "
                             "(memory_slots > 1), each answering its own queries")
        return self.delta

    def check_open(self) -> None:
        if self.closed:
            raise InputError(f"session {self.key!r} is closed")

    def reopened(self, chunk_tokens, sync_tokens) -> "Session":
        """This session, asked for again by name: sizes given must be its own (they were ignored, and
        the stream absorbed in rounds its caller had not asked for)."""
        if chunk_tokens is None and sync_tokens is None:
            return self
        st = self.stats()
        for field, asked in (("chunk_tokens", chunk_tokens), ("sync_tokens", sync_tokens)):
            if asked is not None and asked != st[field]:
                raise InputError(f"session {self.key!r} is open with {field}={st[field]}, not {asked!r}: close it "
                                 f"first to open it with other sizes")
        return self

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"held={self.held_tokens}, absorbed={self.absorbed_tokens}"
        return f"Session({self.key!r}, {state})"
