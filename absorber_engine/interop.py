"""A drop-in for code that already calls a transformers model's generate().

    model = absorber_engine.wrap(model, tokenizer=tok, config=cfg)
    out = model.generate(input_ids, max_new_tokens=32)      # input_ids may be far past the window

Each generate() call starts from an empty memory, absorbs all of the input but its last tokens
(streaming, so the memory and KV stay bounded however long the input), and generates after the
tokens left raw in the window plus the tail. The result has the shape transformers gives:
(batch, input length + new tokens), padded with pad_token_id where rows stop early.
"""

from __future__ import annotations

import torch

from . import inputs, stops as stopping
from .config import AbsorberConfig
from .engine import AbsorberEngine
from .errors import InputError
from .session import DEFAULT_SESSION

_SUPPORTED_KWARGS = {"max_new_tokens", "do_sample", "temperature", "top_p", "eos_token_id", "pad_token_id",
                     "attention_mask"}


class AbsorbingModel:
    """The wrapped model: generate() absorbs; everything else is the model's own (with the memory of
    the last generate() call attached)."""

    def __init__(self, model, tokenizer=None, config: AbsorberConfig | None = None, tail_tokens: int | None = None):
        if tail_tokens is not None and (isinstance(tail_tokens, bool) or not isinstance(tail_tokens, int)
                                        or tail_tokens < 0):
            raise InputError(f"tail_tokens must be an integer >= 0, got {tail_tokens!r}")
        if tokenizer is None:
            # Without a tokenizer nothing says whether input_ids start with BOS: read them as given,
            # as transformers does (a config's BOS put in front of every row changed the answers of
            # GPT-2 and Qwen2, whose tokenizers never add theirs).
            config = (config or AbsorberConfig()).replace(prefix_bos=False)
        self.engine = AbsorberEngine(model, tokenizer=tokenizer, config=config)
        self.model = model
        # The last tokens stay raw (the question usually sits at the end of a long input).
        self.tail_tokens = tail_tokens if tail_tokens is not None else self.engine.config.sync_tokens

    def __getattr__(self, name):
        # Only reached for names the wrapper lacks; copy and pickle ask before __init__ has run.
        if "model" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["model"], name)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        unknown = set(kwargs) - _SUPPORTED_KWARGS
        if unknown:
            raise InputError(f"generate() of an absorbing model does not take {sorted(unknown)}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise InputError("input_ids must be a (batch, length) tensor of at least one row")
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape):
            raise InputError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}")
        if mask is not None and not bool(mask.bool().all()):
            raise InputError("padded batches are not supported: pass rows without padding")
        sample = kwargs.get("do_sample", False)
        inputs.check_flag("do_sample", sample)
        # None, as transformers callers often pass, is the default there too
        temperature = _number(kwargs.get("temperature"), 1.0, "temperature") if sample else 0.0
        if sample and not temperature > 0:       # 0 decoded greedily; transformers refuses it too
            raise InputError(f"do_sample needs a temperature > 0, got {temperature!r}")
        top_p = _number(kwargs.get("top_p"), 1.0, "top_p") if sample else 1.0
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, torch.Tensor):        # as transformers takes it too
            eos = eos.tolist()
        if eos is None:                        # transformers stops at generation_config's, one id or several
            eos = stopping.model_end_ids(self.model, None, self.engine.runner.vocab_size) or None
        pad = kwargs.get("pad_token_id", getattr(self.model.config, "pad_token_id", None))
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)
                                or not 0 <= pad < self.engine.runner.vocab_size):
            raise InputError(f"pad_token_id must be a token id of the vocabulary, got {pad!r}")
        # Sampled rows draw their seeds from torch's global generator, as transformers' sampling draws
        # from it: torch.manual_seed reproduces a call, and calls and rows differ (one config seed
        # for all gave every call and every row the same sample).
        seeds = [int(torch.randint(0, 2 ** 62, (1,))) if sample else None for _ in range(len(input_ids))]
        rows = [self._generate_row(row.tolist(), max_new_tokens, temperature, top_p, eos, seed)
                for row, seed in zip(input_ids, seeds)]
        width = max(len(r) for r in rows)
        if any(len(r) < width for r in rows) and pad is None:
            pad = eos[0] if isinstance(eos, list) else eos
        # long, as transformers returns: new ids past a narrow input dtype (uint8) failed to fit
        out = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(input_ids.device)

    def _generate_row(self, ids: list[int], max_new_tokens, temperature, top_p, eos, seed) -> list[int]:
        eng = self.engine
        stops = stopping.parse([] if eos is None else eos, None, eng.runner.vocab_size).ids
        eng.reset()
        # A tokenizer that adds BOS put it in input_ids; the engine starts every sequence with its own
        # (prefix_bos): read as given, the model saw BOS twice and answered otherwise than generate().
        prefix = eng.runner.prefix
        start = len(prefix) if prefix and ids[:len(prefix)] == prefix else 0
        # at least one token left to read after the memory (tail 0, as sync_tokens = 0 gives, absorbed
        # every token of an input a multiple of the round long: generate() then had nothing to read)
        split = start + max(len(ids) - start - max(self.tail_tokens, 1), 0)
        if split > start:
            eng.absorb(ids[start:split])
        # transformers keeps the eos a row stopped on, whichever of several: stop through on_token,
        # which sees each token after it is kept.
        new = eng.generate_batch({DEFAULT_SESSION: ids[split:]}, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, stop=[], seed=seed, on_token=lambda row, tok: tok not in stops
                                 )[DEFAULT_SESSION]
        return ids + new


def _number(value, default: float, name: str) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number, got {value!r}")
    return float(value)


def wrap(model, tokenizer=None, config: AbsorberConfig | None = None, tail_tokens: int | None = None) -> AbsorbingModel:
    """`model` with a generate() that absorbs inputs longer than the engine's window as it reads them."""
    return AbsorbingModel(model, tokenizer=tokenizer, config=config, tail_tokens=tail_tokens)
