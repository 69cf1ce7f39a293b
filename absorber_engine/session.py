"""Session: one stream of an engine. Its own delta (the absorbed memory) and its own raw window
(held by the engine's C++ scheduler); the base model, the targets and the config are the engine's.

Sessions of one engine absorb together: whenever rounds of several sessions are ready with the
same shape, one student pass takes them all, each row reading its own session's delta.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from .delta import LowRankDelta
from .errors import AbsorptionError, InputError


class Session:
    def __init__(self, engine, key, seed: int):
        self.engine, self.key, self.seed = engine, key, seed
        cfg = engine.config
        self.delta = LowRankDelta(engine.shapes, cfg.rank, cfg.scale, engine.parts.device, seed=seed)
        # Earlier rounds' probes that each round replays (replay_rounds): bounded, so held memory stays flat.
        self.replay: deque[torch.Tensor] = deque(maxlen=max(cfg.replay_rounds, 1))
        self._kv = None                          # (window tokens, kv per layer, last final state)
        self._closed = False

    # ------------------------------------------------------------------ stream state

    def _stats(self) -> dict:
        self._check_open()
        return self.engine.scheduler.session_stats(self.key)

    def window_tokens(self) -> list[int]:
        """The raw tokens generate() and logits() read after the memory (at most n + m)."""
        self._check_open()
        return list(self.engine.scheduler.window(self.key))

    @property
    def held_tokens(self) -> int:
        return self._stats()["held"]

    @property
    def absorbed_tokens(self) -> int:
        return self._stats()["absorbed"]

    @property
    def rounds(self) -> int:
        return self._stats()["rounds"]

    def held_bytes(self) -> dict[str, int]:
        """Bytes this stream holds: its delta, its window's KV (when built) and its raw tokens."""
        kv = 0
        if self._kv is not None:
            kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._kv[1])
        return {"delta": self.delta.nbytes, "kv": kv, "tokens": 8 * self.held_tokens,
                "replay": sum(8 * q.numel() for q in self.replay)}

    def _has_round(self) -> bool:
        st = self._stats()
        full = st["held"] >= st["chunk_tokens"] + st["sync_tokens"]
        return st["in_flight"] is None and (full or (st["draining"] and st["held"] > 0))

    # ------------------------------------------------------------------ absorption

    def feed(self, text_or_ids) -> int:
        """Queues tokens without absorbing them (thread-safe); engine.run() absorbs what is ready.
        Returns how many tokens were queued."""
        self._check_open()
        ids = self.engine._to_ids(text_or_ids)
        self.engine.scheduler.feed(self.key, ids)
        return len(ids)

    def absorb(self, text_or_ids, flush: bool = False, progress=None):
        """Feeds the stream and absorbs every round its window allows (all of it with flush).

        Ready rounds of other sessions with the same shape are absorbed in the same batches. If one
        of this session's rounds fails, its memory stays as it was before that round, the window
        keeps the tokens not absorbed yet, and AbsorptionError says how many of this call's tokens
        were taken (`err.tokens_taken`), so the caller can resume from there.
        """
        from .engine import AbsorbReport

        self._check_open()
        eng = self.engine
        ids = eng._to_ids(text_or_ids, allow_empty=flush)
        if not ids and self.held_tokens == 0:
            raise InputError("nothing to absorb: the input is empty and the window holds no tokens")
        start = time.perf_counter()
        report = AbsorbReport()
        capacity = self._capacity()
        pos, flushed = 0, False
        with eng._lock:
            while True:
                # Fed only as far as the window needs: a failed round never leaves more than
                # n + m tokens queued behind it.
                take = min(len(ids) - pos, max(capacity - self.held_tokens, 0))
                if take:
                    eng.scheduler.feed(self.key, ids[pos:pos + take])
                    pos += take
                if flush and pos == len(ids) and not flushed:
                    eng.scheduler.flush(self.key)
                    flushed = True
                if not self._has_round():
                    break
                results = eng._run_ready()
                if self.key not in results:
                    break
                rnd, res = results[self.key]
                if res.error is not None:
                    err = AbsorptionError(f"round {self.rounds + 1} rolled back, memory unchanged: {res.error}")
                    err.tokens_taken = pos
                    raise err
                report.add_round(len(rnd.x), res)
                if progress is not None:
                    progress(len(rnd.x))
            eng._rest()
        report.tokens = pos
        report.seconds = time.perf_counter() - start
        report.held_tokens = self.held_tokens
        report.absorbed_tokens = self.absorbed_tokens
        return report

    def _capacity(self) -> int:
        st = self._stats()
        return st["chunk_tokens"] + st["sync_tokens"]

    # ------------------------------------------------------------------ inference

    def logits(self, ids) -> torch.Tensor:
        """Next-token logits (len(ids), V) at each position of `ids`, read after the memory and
        the raw window. Nothing is absorbed."""
        self._check_open()
        return self.engine._logits(self, self.engine._to_ids(ids))

    def generate(self, prompt=None, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop=None, seed: int | None = None):
        """Continues the window (and `prompt`, if any) with the memory; nothing is absorbed.
        Returns text when the prompt is text, else a list of token ids."""
        self._check_open()
        return self.engine.generate_batch({self.key: prompt}, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_p=top_p, stop=stop, seed=seed)[self.key]

    # ------------------------------------------------------------------ memory

    def reset(self) -> None:
        """Forgets everything: Δ = 0 and an empty window."""
        self._check_open()
        with self.engine._lock:
            self.engine.scheduler.clear(self.key)
            self.delta.reset()
            self.replay.clear()
            self._kv = None

    def restore_window(self, tokens: list[int], absorbed: int, rounds: int) -> None:
        self.engine.scheduler.restore(self.key, tokens, absorbed, rounds)
        self._kv = None

    def save_memory(self, path) -> None:
        from .memory_file import save_memory

        self._check_open()
        save_memory(self, path)

    def load_memory(self, path) -> None:
        from .memory_file import load_memory

        self._check_open()
        with self.engine._lock:
            load_memory(self, path)
            self._kv = None

    def export_peft(self, directory) -> None:
        from .peft_export import export_peft

        self._check_open()
        export_peft(self, directory)

    def merged_model(self):
        """A standalone copy of the base model with this session's delta merged into its weights
        (W + scale·A·B): plain weights for stacks that take no adapters. The raw window is not
        part of it."""
        import copy

        self._check_open()
        eng = self.engine
        merged = {name: w.merged_weight(self.delta.A[name], self.delta.B[name]) for name, w in eng.wrappers.items()}
        with eng.detached() as model:
            out = copy.deepcopy(model)
        with torch.no_grad():
            for name, weight in merged.items():
                out.get_submodule(name).weight.copy_(weight)
        return out

    def close(self) -> None:
        """Ends the stream: its window and delta are dropped."""
        if not self._closed:
            self.engine._close_session(self)
            self._closed = True

    def _move(self, kind: str) -> None:
        """Carries out the scheduler's residency decision for this session's delta."""
        self.delta.to(self.engine.parts.device if kind == "to_device" else torch.device("cpu"))

    def _check_open(self) -> None:
        if self._closed:
            raise InputError(f"session {self.key!r} is closed")

    @property
    def parts(self):
        return self.engine.parts

    @property
    def config(self):
        return self.engine.config

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"held={self.held_tokens}, absorbed={self.absorbed_tokens}"
        return f"Session({self.key!r}, {state})"
