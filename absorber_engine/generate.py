"""Generation with a memory: each row reads its session's delta, its raw window and its prompt.

    GenerationMixin  the engine's logits(), generate() and generate_batch()
    _routed(...)     which delta and window a prompt reads (routing.route)
    WindowCache      each window's KV under its readers (newest delta, base model), built once
    prefill(...)     all rows' windows and prompts in one forward, left-padded to one width
    decode(...)      one token per row per step until max_new_tokens or a stop token

Rows of different lengths are padded on the left, with positions counted from each row's own first
token, so every row reads exactly what it would read alone; on a sliding-window model, whose window
counts the padding's slots, such rows run one at a time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cached_property

import torch

from . import inputs, recital, static_decode, stops as stopping
from .errors import InputError
from .hf_cache import cache_tensors
from .lora import LowRankDelta
from .model import ModelRunner
from .probes import question_frame
from .routing import WINDOW, asked_alone, route, scorable, zero_delta
from .sampling import sample_next
from .session import DEFAULT_SESSION, Session


@dataclass
class WindowKV:
    tokens: list[int]                  # the prefix and the window, as the KV was built over them
    kv: list                           # per layer (keys, values), each (1, H, len, Dh); [] when empty
    last: torch.Tensor | None          # (D,) final state of the last token; None when empty
    delta: object = None               # the delta it was read under


@dataclass
class Rows:
    """A batch of generation rows after the prefill."""

    cache: object                      # DynamicCache over windows and prompts
    last: torch.Tensor                 # (S, D) final state of each row's last real token
    mask: torch.Tensor | None          # (S, cached) 1 on real tokens; None when no row is padded
    next_pos: torch.Tensor             # (S,) position of each row's next token


class WindowCache:
    """Each session's window KV, built once per window and reader and reused by every query. Two
    readers: the newest delta (a prompt continuing the stream) and the base model (a prompt that
    route() sends to the window). The engine drops a session's entries whenever its deltas change; a
    round keeps the recitals of the bank's other deltas (a committed delta never changes: it recites
    once while kept), not of one the bank let go or a Δ = 0 the round trained in place."""

    READERS = ("newest", "base")

    def __init__(self):
        self._kv: dict = {}              # (session key, reader) -> WindowKV
        self._zero: dict = {}            # session key -> its Δ = 0 (the base reader)
        self.recitals: dict = {}         # session key -> {bank delta: its recital (recital.py)}

    def get(self, runner: ModelRunner, key, delta, tokens: list[int], reader: str = "newest") -> WindowKV:
        win = self._kv.get((key, reader))
        if win is None or win.tokens != tokens or win.delta is not delta:
            win = self._kv[(key, reader)] = _window_kv(runner, delta, tokens)
        return win

    def zero(self, key, like) -> LowRankDelta:
        """A Δ = 0 shaped as `like`, kept per session so its window KV is built once."""
        if key not in self._zero:
            self._zero[key] = zero_delta(like)
        return self._zero[key]

    def drop(self, key, slots=(), trained=None) -> None:
        """Forgets the session's window KV, and its recitals but those of `slots` other than `trained`."""
        for reader in self.READERS:
            self._kv.pop((key, reader), None)
        self._zero.pop(key, None)
        kept = {d: r for d, r in self.recitals.pop(key, {}).items() if d is not trained and any(d is s for s in slots)}
        if kept:
            self.recitals[key] = kept

    def nbytes(self, key) -> int:
        return 8 * sum(map(len, self.recitals.get(key, {}).values())) + getattr(self._zero.get(key), "nbytes", 0) + sum(
            k.numel() * k.element_size() + v.numel() * v.element_size()
            for reader in self.READERS for k, v in getattr(self._kv.get((key, reader)), "kv", []))


def _window_kv(runner: ModelRunner, delta, tokens: list[int]) -> WindowKV:
    """The KV of `tokens` (prefix and window) read under `delta`, and the last final state."""
    if not tokens:
        return WindowKV(tokens, [], None, delta)
    runner.bind([delta])
    with runner.model_dtype():          # not an autocast the caller holds: later calls read this KV too
        final, cache = runner.forward(torch.tensor([tokens], dtype=torch.long, device=runner.device), use_cache=True)
    return WindowKV(tokens, cache_tensors(cache), final[0, -1], delta)


def logits_after(runner: ModelRunner, delta, window: WindowKV, ids: list[int]) -> torch.Tensor:
    """Next-token logits (len(ids), V) of `ids` read after the window, under `delta`."""
    runner.bind([delta])
    final, _ = runner.forward(torch.tensor([ids], device=runner.device), runner.make_cache(window.kv))
    return runner.logits(final[0])


def generate_rows(runner: ModelRunner, deltas: list, windows: list[WindowKV], prompts: list[list[int]],
                  max_new_tokens: int, temperature: float, top_p: float, stops: set[int],
                  generators: list[torch.Generator], on_token=None, stacked: bool = False) -> list[list[int]]:
    """New tokens of each row (stop tokens excluded), every row with its own delta and window; on_token(row,
    token) sees each token as it is chosen (False ends that row); `stacked`: one delta read as several are."""
    for row, (w, p) in enumerate(zip(windows, prompts)):
        if len(w.tokens) == len(runner.prefix) and not p:
            raise InputError(f"generate() needs a prompt when the window holds no tokens (row {row} of the batch)")
    padded = len({len(w.tokens) for w in windows}) > 1 or len({len(p) for p in prompts}) > 1
    if padded and runner.kept_kv_tokens is not None:     # a sliding window counts padded slots: rows apart
        return [generate_rows(runner, [d], [w], [p], max_new_tokens, temperature, top_p, stops, [g],
                              on_token and (lambda _, t, row=row: on_token(row, t)), stacked)[0]
                for row, (d, w, p, g) in enumerate(zip(deltas, windows, prompts, generators))]
    runner.bind(deltas, stacked=stacked)
    with runner.sdpa_attention(padded):
        rows = prefill(runner, windows, prompts, padded)
        return decode(runner, rows, max_new_tokens, temperature, top_p, stops, generators, on_token)


def prefill(runner: ModelRunner, windows: list[WindowKV], prompts: list[list[int]], padded: bool) -> Rows:
    """Each row's window KV left-padded to the longest window, then its prompt left-padded to the
    longest prompt, run in one forward."""
    S, device = len(windows), runner.device
    lens_w, lens_p = [len(w.tokens) for w in windows], [len(p) for p in prompts]
    W, P = max(lens_w), max(lens_p)
    mask = torch.zeros(S, W + P, dtype=torch.long, device=device)       # 1 where a row has a real token
    ids = torch.zeros(S, P, dtype=torch.long, device=device)
    pos = torch.zeros(S, P, dtype=torch.long, device=device)
    for s, (w, p) in enumerate(zip(lens_w, lens_p)):
        mask[s, W - w:W] = 1
        mask[s, W + P - p:] = 1
        if p:
            ids[s, P - p:] = torch.tensor(prompts[s], device=device)
            pos[s, P - p:] = torch.arange(w, w + p, device=device)
    cache = runner.make_cache(_left_padded_kv([w.kv for w in windows], lens_w, W))
    zero = torch.zeros(runner.hidden_size, device=device)
    last = torch.stack([w.last if w.tokens else zero for w in windows])              # (S, D)
    if P:
        final, cache = runner.forward(ids, cache, use_cache=True, attention_mask=mask if padded else None,
                                      position_ids=pos if padded else None)
        has_prompt = torch.tensor(lens_p, device=device)[:, None] > 0
        last = torch.where(has_prompt, final[:, -1], last)
    next_pos = torch.tensor([w + p for w, p in zip(lens_w, lens_p)], device=device)
    return Rows(cache, last, mask if padded else None, next_pos)


SEGMENT = 256     # decode() grows its static cache by this many tokens at a time (StaticDecoder.then)


def decode(runner: ModelRunner, rows: Rows, max_new_tokens: int, temperature: float, top_p: float,
           stops: set[int], generators: list[torch.Generator], on_token=None) -> list[list[int]]:
    """Each row samples with its own generator, so a row draws what it would draw alone."""
    S, device = rows.last.shape[0], runner.device
    cache, mask, next_pos = rows.cache, rows.mask, rows.next_pos
    out, done = [[] for _ in range(S)], [False] * S
    static = max_new_tokens > 1 and static_decode.supported(runner)
    weights = static_decode.decode_weights(runner, S) if static else contextlib.nullcontext()
    with weights, runner.sdpa_attention(static):
        decoder = static_decode.StaticDecoder(runner, cache_tensors(cache), min(max_new_tokens - 1, SEGMENT), mask,
                                              next_pos[:, None], graphs=runner.cuda_graphs, record=False) if static else None
        logits = runner.logits(rows.last)
        for step in range(max_new_tokens):
            tok = logits.argmax(dim=-1) if temperature <= 0 else torch.cat(                   # (S,)
                [sample_next(logits[s:s + 1], temperature, top_p, g) for s, g in enumerate(generators)])
            for s, t in enumerate(tok.tolist()):
                if done[s]:
                    continue
                if t in stops:
                    done[s] = True
                else:
                    out[s].append(t)
                    if on_token is not None and on_token(s, t) is False:
                        done[s] = True
            if all(done) or step + 1 == max_new_tokens:
                break
            if static:
                if decoder.taken == decoder.steps:
                    decoder = decoder.then(min(max_new_tokens - 1 - step, SEGMENT))
                logits = decoder.step(tok)
                continue
            # A sliding-window model: the cache grows by a token.
            if mask is not None:
                mask = torch.cat([mask, torch.ones(S, 1, dtype=torch.long, device=device)], dim=1)
            final, cache = runner.forward(tok[:, None], cache, use_cache=True, attention_mask=mask,
                                          position_ids=next_pos[:, None] if mask is not None else None)
            next_pos = next_pos + 1
            logits = runner.logits(final[:, -1])
    return out


def _left_padded_kv(per_row: list[list], lengths: list[int], width: int) -> list:
    """Per layer (keys, values) of all rows, each row's (1, H, len, Dh) left-padded with zeros to `width`."""
    ref = per_row[lengths.index(max(lengths))] if width else []
    out = []
    for layer, refs in enumerate(ref):
        pads = [tuple(r.new_zeros(1, r.shape[1], width - n, r.shape[3]) for r in refs) for n in lengths]
        out.append(tuple(torch.cat([torch.cat([pad[i], kv[layer][i]], dim=2) if n else pad[i]
                                    for kv, n, pad in zip(per_row, lengths, pads)]) for i in (0, 1)))
    return out


class GenerationMixin:
    """The engine's inference calls. Nothing here absorbs: each call reads the session's memory
    and raw window, holding the engine's lock and its sessions' deltas on the device. The host
    (AbsorberEngine) provides runner, tokenizer, config, scheduler, _lock, _windows, _get, to_ids,
    _move, _rest, _check_span, _call_back and window_tokens."""

    @torch.no_grad()
    def logits(self, ids, session=DEFAULT_SESSION) -> torch.Tensor:
        """Next-token logits (len(ids), V) of `ids` read after the memory and the raw window; nothing is absorbed."""
        sess = self._get(session)
        ids = self.to_ids(ids)
        self._check_span(sess, len(ids), f"{len(ids)} query tokens")
        with self._resident([sess]):
            delta, window, _ = self._routed(sess, ids)
            return logits_after(self.runner, delta, window, ids)

    def generate(self, prompt=None, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop=None, seed: int | None = None, session=DEFAULT_SESSION, recite: bool = False):
        """Continues the window (and `prompt`, if any) with the memory; nothing is absorbed.
        Returns text when the prompt is text, else a list of token ids. recite: generate_batch's."""
        key = self._get(session).key
        return self.generate_batch({key: prompt}, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, stop=stop, seed=seed, recite=recite)[key]

    @torch.no_grad()
    def generate_batch(self, prompts: dict, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                       stop=None, seed: int | dict | None = None, on_token=None, recite: bool = False) -> dict:
        """Generates for several sessions in one batch, each row with its own delta and window.

        prompts maps a session name to its prompt (text, token ids, or None to continue the window
        alone). Returns, per session, text when its prompt was text, else a list of token ids.
        seed: one for every row, or {session: seed}; each row samples with its own generator, so its
        tokens are those it would get alone with the same seed. stop: token ids (they replace the
        model's end tokens, which stop by default) and texts, matched in the answer's text wherever
        they fall among tokens (stops.py). on_token(session, token), when given, sees each kept token
        as it is chosen (streaming; a stop text's own too, which the answer leaves out); returning
        False ends that row there.
        recite: a row whose session holds a bank reads the recital of its bank's deltas that shares
        the most with its question, the base model answering after it (recital.py; slower, and
        recalls more).
        """
        inputs.check_sampling(max_new_tokens, temperature, top_p)
        inputs.check_callback("on_token", on_token)
        if not isinstance(recite, bool):
            raise InputError(f"recite must be true or false, got {recite!r}")
        if not isinstance(prompts, dict):
            raise InputError(f"generate_batch takes a dict of session name -> prompt, got {type(prompts).__name__}")
        if not prompts:
            raise InputError("generate_batch() needs at least one session")
        sessions = [self._get(name) for name in prompts]
        ids = [self.to_ids(p if p is not None else [], allow_empty=True) for p in prompts.values()]
        if recite:        # every prompt, banked or not: what is refused does not hang on the memory held
            recital.check_prompts(self.frame, self._question_frame, ids)
        for sess, p in zip(sessions, ids):
            self._check_span(sess, len(p) + max_new_tokens, f"prompt ({len(p)}) + max_new_tokens ({max_new_tokens})")
        stops = stopping.parse(stop, self.tokenizer, self.runner.vocab_size, self.runner.model)
        names = list(prompts)
        streamed = None if on_token is None else lambda row, tok: self._call_back(on_token, names[row], tok)
        watch = stopping.TextWatch(stops.texts, self.tokenizer, len(names), streamed) if stops.texts else None
        seeds = [inputs.seed_of(seed, name, self.config.seed) for name in names]
        gens = [torch.Generator(device=self.runner.device).manual_seed(s) for s in seeds]
        with self._resident(sessions):
            deltas, windows, banked = map(list, zip(*[self._routed(s, p, recite) for s, p in zip(sessions, ids)]))
            if recite:
                self._read_recitals(sessions, [i for i, b in enumerate(banked) if b], deltas, windows, ids, max_new_tokens)
            new = generate_rows(self.runner, deltas, windows, ids, max_new_tokens, temperature, top_p,
                                set(stops.ids), gens, watch or streamed)
        if watch is not None:
            return {name: watch.cut(out)[0 if isinstance(p, str) else 1] for (name, p), out in zip(prompts.items(), new)}
        return {name: (stopping.answer_text(self.tokenizer, out) if isinstance(p, str) else out)
                for (name, p), out in zip(prompts.items(), new)}

    @contextlib.contextmanager
    def _resident(self, sessions: list[Session]):
        """The sessions' deltas on the device for the block (the scheduler decides whose leave)."""
        if len(sessions) > self.config.max_resident:
            raise InputError(f"a batch of {len(sessions)} sessions needs all their deltas resident at once, and "
                             f"max_resident is {self.config.max_resident}: generate in batches of at most that many")
        with self._lock:
            for sess in sessions:
                self._get(sess)                    # still open: close() or close_session() may have run first
            acquired = []
            try:                                   # a failed acquire or move releases what was taken
                for sess in sessions:
                    moves = self.scheduler.acquire(sess.key)
                    acquired.append(sess)
                    self._move(moves)
                yield
            finally:
                for sess in acquired:
                    self.scheduler.release(sess.key)
                self._rest()

    def _read_recitals(self, sessions: list[Session], rows: list[int], deltas, windows, ids, max_new_tokens: int):
        """recite: each of `rows` (a session with a bank) reads, in place, the bank's recital or the raw
        window that shares the longest run of tokens with its question, with the base model (recital.py)."""
        banks = {sessions[i].key: sessions[i] for i in rows}
        kept = {key: self._windows.recitals.get(key, {}) for key in banks}
        slots = [(key, d, sess.stats()) for key, sess in banks.items() for d in sess.slots if d not in kept[key]]
        recited = recital.recite_rows(self.runner, self.frame, [d for _, d, _ in slots],
                                      [_window_kv(self.runner, d, self.runner.prefix) for _, d, _ in slots],
                                      [recital.room(d, st) for _, d, st in slots],
                                      self.config.round_cut, self.cut_min, self.tokenizer, generate_rows) if slots else []
        new = {(key, d): r for (key, d, _), r in zip(slots, recited)}
        for key, sess in banks.items():           # a delta the full bank let go takes its recital with it
            self._windows.recitals[key] = {d: kept[key][d] if d in kept[key] else new[key, d] for d in sess.slots}
        for i in rows:
            texts, frame = list(self._windows.recitals[sessions[i].key].values()), self._question_frame
            k = recital.pick(recital.asked(ids[i], frame), texts + [self.window_tokens(sessions[i])])
            if k == len(texts) or not texts[k]:
                continue                           # the raw window, as _routed left it
            prompt = recital.answer_prompt(self.frame, frame, texts[k], ids[i])
            inputs.check_span(len(self.runner.prefix), len(prompt) + max_new_tokens, f"recital and prompt ({len(prompt)}) + "
                              f"max_new_tokens ({max_new_tokens})", self.runner.max_positions)
            zero = self._windows.zero(sessions[i].key, sessions[i].slots[-1])
            deltas[i], windows[i], ids[i] = zero, _window_kv(self.runner, zero, self.runner.prefix), prompt

    @cached_property
    def _question_frame(self) -> tuple | None:          # probes.question_frame() of the tokenizer, found once
        return question_frame(self.tokenizer)

    def _routed(self, sess: Session, ids: list[int], recite: bool = False) -> tuple:
        """The delta and window KV that read the prompt `ids`, and whether it reads from the bank: with one
        delta (but a bank's first round to recite), or no prompt to score, the newest delta and the raw
        window; else the delta route() picks, or the base model and the raw window (with `recite`: until
        _read_recitals picks a recital)."""
        newest, tokens = sess.slots[-1], self.runner.prefix + self.window_tokens(sess)
        if (len(sess.slots) == 1 and not (recite and self.config.memory_slots > 1 and sess.rounds)
                or not scorable(self.runner, ids)):
            return newest, self._windows.get(self.runner, sess.key, newest, tokens), False
        zero = self._windows.zero(sess.key, newest)
        window = self._windows.get(self.runner, sess.key, zero, tokens, reader="base")
        if recite:
            return zero, window, True
        frame = self._question_frame
        asked = asked_alone(ids, frame)
        opening = len(frame[0]) if frame and asked[:len(frame[0])] == frame[0] else 0
        k = route(self.runner, list(sess.slots), asked, window, opening)
        if k == WINDOW:
            return zero, window, False
        return sess.slots[k], _window_kv(self.runner, sess.slots[k], self.runner.prefix), True
