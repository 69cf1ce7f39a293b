"""AbsorberEngine: streaming absorption (Algorithm 2 of Absorber LLM) over a Hugging Face causal LM.

State of one stream: the delta (the absorbed memory) and a raw window of at most n + m tokens,
owned by the C++ scheduler, which also decides where each round cuts X and Y. Every round's
teacher is the model as it is at the start of that round (W plus everything absorbed before), so
each round adds to the memory instead of replacing it. The window's KV is rebuilt lazily, and only
after the delta or the window changed, so generation after absorption pays one prefill.

A round either completes or leaves the memory exactly as it was before it: the delta is restored
from a snapshot on any failure, NaN losses and KeyboardInterrupt included.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from absorber_kernels import get_ops

from . import _scheduler
from .config import AbsorberConfig
from .delta import LowRankDelta, attach, bind, detach
from .errors import AbsorptionError, ConfigError, InputError
from .model_support import DEFAULT_TARGETS, ModelParts, cache_tensors, inspect_model
from .sampling import sample_next
from .sync import ROUNDS, StreamRound


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


class AbsorberEngine:
    def __init__(self, model, tokenizer=None, config: AbsorberConfig | None = None):
        cfg = config if config is not None else AbsorberConfig()
        if not isinstance(cfg, AbsorberConfig):
            raise ConfigError(f"config must be an AbsorberConfig, got {type(cfg).__name__}")
        cfg.validate()
        self.config, self.tokenizer = cfg, tokenizer
        self.parts: ModelParts = inspect_model(model)
        if self.parts.absolute_positions and cfg.window_tokens > self.parts.max_positions:
            raise ConfigError(
                f"chunk_tokens + sync_tokens = {cfg.window_tokens} exceeds the {self.parts.max_positions} "
                f"positions {self.parts.model_type} has")
        model.requires_grad_(False)
        model.eval()
        self.backend = resolve_backend(cfg.backend, self.parts.device)
        self.ops = get_ops(self.backend)
        targets = cfg.targets if cfg.targets is not None else DEFAULT_TARGETS[self.parts.model_type]
        self.wrappers = attach(model, targets, self.ops)
        shapes = {name: (w.in_features, w.out_features) for name, w in self.wrappers.items()}
        self.delta = LowRankDelta(shapes, cfg.rank, cfg.scale, self.parts.device, seed=cfg.seed)
        bind(self.wrappers, [self.delta])
        self.window = _scheduler.Window(cfg.chunk_tokens, cfg.sync_tokens, self.parts.vocab_size)
        self._window_kv = None          # (tokens, kv per layer, last final state) for the current delta

    @classmethod
    def from_pretrained(cls, path, config: AbsorberConfig | None = None, dtype=None, device=None,
                        tokenizer: bool = True) -> "AbsorberEngine":
        """Loads a local Hugging Face causal LM directory (never a hub download)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from .model_support import DEFAULT_TARGETS as supported

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise InputError(f"model directory {path!r} does not exist")
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
        if hf_config.model_type not in supported:
            from .errors import UnsupportedModelError

            raise UnsupportedModelError(f"model type {hf_config.model_type!r} in {path} is not supported; "
                                        f"supported: {sorted(supported)}")
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
        return cls(model, tokenizer=tok, config=config)

    # ------------------------------------------------------------------ absorption

    def absorb(self, text_or_ids, flush: bool = False, progress=None) -> AbsorbReport:
        """Feeds the stream and absorbs every round the window allows (all of it with flush).

        If a round fails, the memory stays as it was before that round, the window keeps the
        tokens not absorbed yet, and AbsorptionError says how many of this call's tokens were taken
        (`err.tokens_taken`), so the caller can resume from there.
        """
        ids = self._to_ids(text_or_ids, allow_empty=flush)
        if not ids and self.window.held == 0:
            raise InputError("nothing to absorb: the input is empty and the window holds no tokens")
        start = time.perf_counter()
        report = AbsorbReport()
        capacity = self.config.window_tokens
        pos = 0
        while True:
            take = min(len(ids) - pos, max(capacity - self.window.held, 0))
            if take:
                self.window.feed(ids[pos:pos + take])
                pos += take
                self._window_kv = None
            rnd = self.window.plan(flush and pos == len(ids))
            if rnd is None:
                break
            try:
                result = self._run_round(rnd)
            except AbsorptionError as err:
                err.tokens_taken = pos
                raise
            self.window.commit(rnd.id)
            self._window_kv = None
            report.rounds += 1
            report.absorbed += len(rnd.x)
            report.steps += result.steps
            report.round_losses.append(result.final_loss)
            if progress is not None:
                progress(len(rnd.x))
        report.tokens = pos
        report.final_loss = report.round_losses[-1] if report.round_losses else float("nan")
        report.seconds = time.perf_counter() - start
        report.held_tokens = self.window.held
        report.absorbed_tokens = self.window.absorbed
        if self.config.merge_for_inference:
            self._merge()
        return report

    def _run_round(self, rnd):
        device = self.parts.device
        # Seeded by the round's index in the stream: the same stream absorbs to the same memory.
        gen = torch.Generator(device=device).manual_seed(self.config.seed * 1_000_003 + self.window.rounds)
        stream = StreamRound(self.delta, torch.tensor(rnd.x, dtype=torch.long, device=device),
                             torch.tensor(rnd.y, dtype=torch.long, device=device), gen)
        snapshot = self.delta.snapshot()
        try:
            # Callers often sit inside no_grad or inference_mode (serving code); a round trains.
            with torch.inference_mode(False), torch.enable_grad():
                (result,) = ROUNDS[self.config.objective](self.parts, self.wrappers, [stream], self.config, self.ops)
        except BaseException:
            self.delta.restore(snapshot)
            raise
        finally:
            bind(self.wrappers, [self.delta])
        if result.error is not None:
            self.delta.restore(snapshot)
            raise AbsorptionError(f"round {self.window.rounds + 1} rolled back, memory unchanged: {result.error}")
        return result

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def logits(self, ids) -> torch.Tensor:
        """Next-token logits (len(ids), V) at each position of `ids`, read after the memory and
        the raw window. Nothing is absorbed."""
        ids = self._to_ids(ids)
        self._check_span(len(ids), f"{len(ids)} query tokens")
        cache, _ = self._window_cache()
        final, _ = self.parts.forward(self._tensor(ids), cache)
        return self.parts.logits(final[0])

    @torch.no_grad()
    def generate(self, prompt=None, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop=None, seed: int | None = None):
        """Continues the window (and `prompt`, if any) with the memory; nothing is absorbed.

        Returns text when the prompt is text, else a list of token ids. Stops at max_new_tokens or
        at a stop token (default: the tokenizer's eos).
        """
        as_text = isinstance(prompt, str)
        ids = self._to_ids(prompt if prompt is not None else [], allow_empty=True)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise InputError(f"temperature must be >= 0, got {temperature!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
        self._check_span(len(ids) + max_new_tokens, f"prompt ({len(ids)}) + max_new_tokens ({max_new_tokens})")
        stops = self._stop_ids(stop)
        cache, last = self._window_cache()
        if ids:
            final, cache = self.parts.forward(self._tensor(ids), cache, use_cache=True)
            last = final[:, -1]
        if last is None:
            raise InputError("generate() needs a prompt when the window holds no tokens")
        gen = torch.Generator(device=self.parts.device).manual_seed(self.config.seed if seed is None else seed)
        out: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(sample_next(self.parts.logits(last), temperature, top_p, gen)[0])
            if tok in stops:
                break
            out.append(tok)
            if len(out) == max_new_tokens:
                break
            final, cache = self.parts.forward(self._tensor([tok]), cache, use_cache=True)
            last = final[:, -1]
        if as_text:
            return self.tokenizer.decode(out)
        return out

    def _check_span(self, extra: int, what: str) -> None:
        """Queries read the window plus what they add, in full attention. Past the model's positions
        (or the window, if larger) that is no longer bounded memory: absorb long inputs instead."""
        limit = max(self.parts.max_positions, self.config.window_tokens)
        if self.window.held + extra > limit:
            raise InputError(f"window ({self.window.held}) + {what} = {self.window.held + extra} tokens "
                             f"exceeds the model's {limit} positions; absorb() long inputs first")

    def _window_cache(self):
        """A fresh cache over the raw window (built once per window and delta) and its last state."""
        tokens = self.window.window()
        if not tokens:
            return None, None
        if self._window_kv is None or self._window_kv[0] != tokens:
            final, cache = self.parts.forward(self._tensor(tokens), use_cache=True)
            self._window_kv = (tokens, cache_tensors(cache), final[:, -1])
        _, kv, last = self._window_kv
        return self.parts.make_cache(kv), last

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

    # ------------------------------------------------------------------ memory

    def reset(self) -> None:
        """Forgets everything: Δ = 0 and an empty window."""
        self.delta.reset()
        bind(self.wrappers, [self.delta])
        self.window.clear()
        self._window_kv = None
        self._unmerge()

    def save_memory(self, path) -> None:
        from .memory_file import save_memory

        save_memory(self, path)

    def load_memory(self, path) -> None:
        from .memory_file import load_memory

        load_memory(self, path)
        self._window_kv = None
        self._unmerge()
        if self.config.merge_for_inference:
            self._merge()

    def export_peft(self, directory) -> None:
        from .peft_export import export_peft

        export_peft(self, directory)

    def close(self) -> None:
        """Detaches the deltas: the model is left exactly as it was given."""
        detach(self.parts.model, self.wrappers)
        self.wrappers = {}

    @property
    def held_tokens(self) -> int:
        return self.window.held

    @property
    def absorbed_tokens(self) -> int:
        return self.window.absorbed

    def held_bytes(self) -> dict[str, int]:
        """Bytes of what the engine holds for this stream: the delta and the window's KV."""
        kv = 0
        if self._window_kv is not None:
            kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._window_kv[1])
        return {"delta": self.delta.nbytes, "kv": kv, "tokens": 8 * self.window.held}

    # ------------------------------------------------------------------ helpers

    def _merge(self) -> None:
        for w in self.wrappers.values():
            w.merge()

    def _unmerge(self) -> None:
        for w in self.wrappers.values():
            w.unmerge()

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
        if isinstance(t, bool) or not isinstance(t, int):
            if hasattr(t, "__index__") and not isinstance(t, bool):
                t = t.__index__()
            else:
                raise InputError(f"token ids must be integers; item {i} is {type(t).__name__} {t!r}")
        out.append(int(t))
    return out


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
