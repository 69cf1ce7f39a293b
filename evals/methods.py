"""The methods the evaluation compares, all on the same model: what each keeps of a long context
and how it answers the query that follows.

- none: the query alone, no context at all (what the model knows without it).
- full: the whole context in the KV cache (grows with the context).
- truncate: only the last `window` tokens of context + query.
- sinks: StreamingLLM's window, the first `sinks` tokens plus the last `window - sinks` ones.
- engine methods (TTT and the Absorber variants): the context streamed through absorb(), so
  everything but the last raw window is in the delta; the query is asked after the window. With
  flush, all of the context goes into the delta and no raw token is kept.

Every method sees the same token ids: the context and the query are tokenized separately and
concatenated, so no method gets a different tokenization of the boundary; every sequence starts with
the model's BOS token, as the engine's do (AbsorberConfig.prefix_bos).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from absorber_engine import AbsorberConfig, AbsorberEngine
from absorber_engine.round_cuts import kv_bytes


@dataclass
class Outcome:
    generated: str = ""               # greedy continuation of the query (retrieval tasks)
    target_loss: float = math.nan     # doc_lm: mean next-token CE over the target
    held_bytes: int = 0               # what the method holds when it answers: KV (+ delta)
    absorb_seconds: float = 0.0       # time spent absorbing the context (engine methods)
    token_seconds: float = math.nan   # generation latency per new token


class WindowMethod:
    """full / truncate / sinks: a plain model reading (part of) the context in its KV cache."""

    def __init__(self, name: str, model, tokenizer, window: int | None = None, sinks: int = 0,
                 max_positions: int | None = None):
        self.name, self.model, self.tok = name, model, tokenizer
        self.window, self.sinks, self.max_positions = window, sinks, max_positions
        bos = model.config.bos_token_id
        self.prefix = [bos] if isinstance(bos, int) else []

    def fits(self, n_tokens: int, new_tokens: int) -> bool:
        """Whether the BOS, `n_tokens` read and `new_tokens` generated all have positions."""
        held = len(self.prefix) + n_tokens + new_tokens
        return self.window is not None or self.max_positions is None or held <= self.max_positions

    def _keep(self, ids: list[int]) -> list[int]:
        """BOS, then what the method keeps of `ids` (the BOS counts as one of the sinks)."""
        if self.window == 0:
            return list(self.prefix)
        if self.window is None or len(ids) <= self.window:
            return self.prefix + ids
        sinks = max(self.sinks - len(self.prefix), 0)
        return self.prefix + ids[:sinks] + ids[len(ids) - (self.window - sinks):]

    @torch.no_grad()
    def run(self, context: list[int], query: list[int], target: list[int], max_new_tokens: int) -> Outcome:
        # The window bounds what is kept of the context; the query or target is always read whole
        # (as the engine reads it after its window).
        if target:
            ids = self._keep(context) + target
            logits = self.model(torch.tensor([ids])).logits[0, -len(target):-1]
            loss = F.cross_entropy(logits.float(), torch.tensor(target[1:])).item()
            return Outcome(target_loss=loss, held_bytes=kv_bytes(self.model.config, len(ids), self.model.dtype))
        ids = self._keep(context) + query
        start = time.perf_counter()
        out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.tok.pad_token_id or 0)
        new = out[0, len(ids):].tolist()
        seconds = time.perf_counter() - start
        return Outcome(generated=self.tok.decode(new), token_seconds=seconds / max(len(new), 1),
                       held_bytes=kv_bytes(self.model.config, len(ids) + len(new), self.model.dtype))


class EngineMethod:
    """TTT or an Absorber variant: the context absorbed as a stream, the query asked after it."""

    def __init__(self, name: str, model_dir: str, config: AbsorberConfig, flush: bool = False, recite: bool = False):
        self.name, self.flush, self.recite = name, flush, recite
        self.engine = AbsorberEngine.from_pretrained(model_dir, config=config)
        self.tok = self.engine.tokenizer

    def fits(self, n_tokens: int, new_tokens: int) -> bool:
        return True

    def run(self, context: list[int], query: list[int], target: list[int], max_new_tokens: int) -> Outcome:
        eng = self.engine
        eng.reset()
        report = eng.absorb(context, flush=self.flush)
        out = Outcome(absorb_seconds=report.seconds)
        model_cfg, dtype = eng.runner.model.config, eng.runner.dtype
        if target:
            logits = eng.logits(target)[:-1]
            out.target_loss = F.cross_entropy(logits, torch.tensor(target[1:])).item()
            out.held_bytes = eng.held_bytes()["delta"] + kv_bytes(model_cfg, eng.held_tokens + len(target), dtype)
            return out
        start = time.perf_counter()
        new = eng.generate(query, max_new_tokens=max_new_tokens, recite=self.recite)
        out.token_seconds = (time.perf_counter() - start) / max(len(new), 1)
        out.generated = self.tok.decode(new)
        out.held_bytes = eng.held_bytes()["delta"] + kv_bytes(model_cfg, eng.held_tokens + len(query) + len(new), dtype)
        return out
