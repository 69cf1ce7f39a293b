"""Decoding for the server's worker: requests whose sampling settings match run as one
generate_batch, each row with its own seed; streamed requests run alone, sending text as it comes."""

from __future__ import annotations

import random
import time

from ..errors import AbsorberError, InputError
from ..stops import tail_tokens
from .errors import bad_request
from .jobs import Plan, Sampling
from .prompts import PromptBuilder, cut_at_stop, safe_length


class Decoder:
    def __init__(self, engine, prompts: PromptBuilder, limit: int | None):
        self.engine, self.prompts, self.limit = engine, prompts, limit

    def together(self, plans: list[Plan]) -> None:
        # Rows sample with their own seeds (what each would draw alone), so only the settings that
        # apply to the whole batch split it.
        groups: dict = {}
        for p in plans:
            s = p.job.sampling
            groups.setdefault((frozenset(p.job.prompt.stop_ids), s.temperature, s.top_p, s.recite), []).append(p)
        for (stop_ids, temperature, top_p, recite), group in groups.items():
            longest = max(p.job.sampling.max_tokens for p in group)
            rows = [p for p in group if self._fits(p, longest)]
            for p in group:
                if p not in rows:
                    self.alone(p)
            if not rows:
                continue
            try:
                out = self.engine.generate_batch({p.key: p.prompt for p in rows}, max_new_tokens=longest,
                                                 temperature=temperature, top_p=top_p, stop=sorted(stop_ids),
                                                 seed={p.key: _seed(p.job.sampling) for p in rows}, recite=recite,
                                                 on_token=self._watch(rows))
            except InputError as exc:
                if len(rows) == 1:
                    rows[0].job.fail(bad_request(str(exc)))
                else:       # one row's error (its recital past the positions) is its own: each answers
                    for p in rows:      # alone, a call a row, on this rare path only
                        self.alone(p)
                continue
            for p in rows:
                self._finish(p, out[p.key])

    def _fits(self, p: Plan, max_tokens: int) -> bool:
        if self.limit is None:
            return True
        held = self.engine.session(p.key).held_tokens
        return 1 + held + len(p.prompt) + max_tokens <= self.limit

    def alone(self, p: Plan) -> None:
        s = p.job.sampling
        try:
            out = self.engine.generate_batch({p.key: p.prompt}, max_new_tokens=s.max_tokens, temperature=s.temperature,
                                             top_p=s.top_p, stop=sorted(p.job.prompt.stop_ids), seed=_seed(s),
                                             recite=s.recite, on_token=self._watch([p]))
        except InputError as exc:
            p.job.fail(bad_request(str(exc)))
            return
        self._finish(p, out[p.key])

    def _watch(self, plans: list[Plan]):
        """generate_batch's on_token for answers sent whole: a row ends at its own max_tokens, at a
        stop sequence, or once nobody waits for it (its request timed out or went away): a
        timed-out answer decoded to the end held the worker, and the requests queued behind it
        timed out in turn."""
        rows = {p.key: (p, []) for p in plans}

        def on_token(key, token: int) -> bool:
            p, out = rows[key]
            out.append(token)
            s = p.job.sampling
            if len(out) >= s.max_tokens or p.job.future.done() or time.monotonic() > p.job.deadline:
                return False
            return not (s.stops and cut_at_stop(self.prompts.decode(out[-tail_tokens(s.stops):]), s.stops)[1])
        return on_token

    def _finish(self, p: Plan, ids: list[int]) -> None:
        s = p.job.sampling
        finish = "length" if len(ids) >= s.max_tokens else "stop"
        ids = ids[:s.max_tokens]
        text, hit = cut_at_stop(self.prompts.decode(ids), s.stops)
        used = self._tokens_to_stop(ids, s.stops) if hit else len(ids)
        p.job.done({"text": text, "finish_reason": "stop" if hit else finish, "prompt_tokens": len(p.job.prompt.ids),
                    "completion_tokens": used, **self._meta(p)})

    def _tokens_to_stop(self, ids: list[int], stops: list[str]) -> int:
        """The fewest of `ids` whose text holds a stop sequence: where a streamed answer stops, and
        so what usage counts (a stop sequence, once in a prefix's text, stays in longer ones')."""
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if cut_at_stop(self.prompts.decode(ids[:mid]), stops)[1]:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _meta(self, p: Plan) -> dict:
        return {"session": p.conv.id if p.conv else None, "reset": p.reset, "fed": len(p.feed)}

    def stream(self, p: Plan) -> None:
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
                                       on_token=on_token, recite=s.recite)
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
