"""What callers pass in, checked and turned into token ids, or refused with an InputError that
says what was wrong and where."""

from __future__ import annotations

import torch

from .errors import ConfigError, InputError, UnsupportedModelError


def to_ids(value, tokenizer, vocab_size: int, allow_empty: bool = False, follows: bool = False) -> list[int]:
    """Text (with a tokenizer) or token ids (list, tuple, 1-D tensor or array) -> checked ids. With
    `follows`, text is read as it follows other text (encoders())."""
    if isinstance(value, str):
        if tokenizer is None:
            raise InputError("this engine has no tokenizer: pass token ids instead of text")
        try:
            ids = encoders(tokenizer)[1 if follows else 0](value)
        except (TypeError, ValueError, UnicodeError) as exc:     # e.g. lone surrogates, which no tokenizer takes
            raise InputError(f"the text cannot be tokenized ({type(exc).__name__}: {exc})") from exc
    else:
        ids = as_id_list(value)
    if not ids and not allow_empty:
        raise InputError("the input is empty")
    for i, t in enumerate(ids):
        if t < 0 or t >= vocab_size:
            raise InputError(f"token id {t} at position {i} is outside the vocabulary [0, {vocab_size})")
    return ids


def encoders(tokenizer):
    """(alone, after): ids of a text that opens a sequence, and of a text that follows other text.
    Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) encodes both alike. SentencePiece-style
    tokenizers (Llama 2, Mistral) put "▁" before a text's first word when it is encoded alone: a
    stream's second piece, or a chat template's piece after X, would read a space no text has.
    There a text that follows is encoded after a newline, whose byte token never joins what comes
    next, and the newline's ids are dropped."""
    enc = lambda text: list(tokenizer.encode(text, add_special_tokens=False)) if text else []   # noqa: E731
    anchor = enc("\n")

    def after(text):
        ids = enc("\n" + text)
        return ids[len(anchor):] if text and ids[:len(anchor)] == anchor else enc(text)

    return enc, (after if after("a") != enc("a") else enc)


def as_id_list(value) -> list[int]:
    if value is None:
        raise InputError("expected text or token ids, got None")
    if isinstance(value, torch.Tensor):
        # meta, sparse, nested and quantized tensors failed on .tolist() with a traceback
        if value.is_meta or value.is_nested or value.is_quantized or value.layout != torch.strided:
            raise InputError(f"token ids must be a plain tensor of integers, got a {value.layout} {value.dtype} "
                             f"tensor on {value.device}{' (nested)' if value.is_nested else ''}")
        if value.dim() == 2 and value.shape[0] == 1:
            value = value[0]
        if value.dim() != 1:
            raise InputError(f"token ids must be 1-D (or (1, T)), got a tensor of shape {tuple(value.shape)}")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise InputError(f"token ids must be integers, got a {value.dtype} tensor")
        return [int(t) for t in value.tolist()]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):       # numpy arrays, any byte order
        if hasattr(value, "mask") and hasattr(value, "filled"):   # a masked entry read as None: a TypeError
            raise InputError("token ids must not be a masked array: pass value.filled(...) or the ids kept")
        kind = getattr(value.dtype, "kind", None)
        if kind not in ("i", "u"):
            raise InputError(f"token ids must be integers, got an array of dtype {value.dtype}")
        if getattr(value, "ndim", 1) == 2 and value.shape[0] == 1:
            value = value[0]
        if getattr(value, "ndim", 1) != 1:
            raise InputError(f"token ids must be 1-D (or (1, T)), got an array of shape {tuple(value.shape)}")
        return [int(t) for t in value.tolist()]
    if isinstance(value, (bytes, bytearray, dict, set)) or not hasattr(value, "__iter__"):
        raise InputError(f"expected text or a sequence of token ids, got {type(value).__name__}")
    out = []
    for i, t in enumerate(value):
        try:                # a 0-d integer tensor or numpy scalar is an id; a float one or a row is not
            if isinstance(t, bool) or not hasattr(t, "__index__") or (torch.is_tensor(t) and t.dtype == torch.bool):
                raise TypeError
            out.append(int(t.__index__()))
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"token ids must be integers; item {i} is {type(t).__name__} {t!r}") from None
    return out


def check_sampling(max_new_tokens, temperature, top_p) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < 1e30:
        raise InputError(f"temperature must be a number in [0, 1e30), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")


def check_span(held: int, extra: int, what: str, limit: int) -> None:
    """Queries read the window plus what they add, in full attention. Past the model's positions
    (or the window, if larger) that is no longer bounded memory: absorb long inputs instead."""
    if held + extra > limit:
        raise InputError(f"window ({held}) + {what} = {held + extra} tokens exceeds the model's {limit} "
                         "positions; absorb() long inputs first")


def future_prompt(value, tokenizer, vocab_size: int, future_length: int, device) -> torch.Tensor:
    """The config's future_prompt as token ids; ConfigError naming it (text with no tokenizer, an id
    past the vocabulary: their InputErrors named neither the field nor ids the caller never passed)."""
    try:
        ids = to_ids(value if isinstance(value, str) else list(value), tokenizer, vocab_size)
    except InputError as exc:
        raise ConfigError(f"future_prompt: {exc}") from None
    if len(ids) >= future_length:
        raise ConfigError(f"future_prompt is {len(ids)} tokens; futures are {future_length}")
    return torch.tensor(ids, dtype=torch.long, device=device)


def seed_of(seed, name, default: int) -> int:
    """A row's sampling seed from generate_batch's `seed`: None, one int, or {session: int}."""
    if isinstance(seed, dict):
        seed = seed.get(name)
    if seed is None:
        return default
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise InputError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return seed


def check_finite_weights(model) -> None:
    """UnsupportedModelError for NaN or inf in any weight, checked a million values at a time:
    isfinite's temporaries of a whole embedding were 40 MB more at an engine's start (13M parameters)."""
    for name, p in model.named_parameters():
        # a meta or float8 weight crashed the checks below with a traceback
        if p.is_meta or p.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise UnsupportedModelError(f"the model's weight {name.replace('.base.', '.')} is "
                                        f"{'on the meta device (no values)' if p.is_meta else p.dtype}: the engine "
                                        "runs weights held in memory in float16/32/64 or bfloat16")
        if not all(bool(torch.isfinite(part).all()) for part in p.detach().reshape(-1).split(1 << 20)):
            raise UnsupportedModelError(f"the model's weights hold NaN or inf ({name.replace('.base.', '.')}): "
                                        "nothing it computes can be trusted")


def check_flag(name: str, value) -> None:
    """True or False only: a string "no" is truthy, and flush="no" absorbed the whole window."""
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false, got {value!r}")


def check_sizes(**sizes) -> None:
    for name, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InputError(f"{name} must be an int, got {type(value).__name__}")


def check_callback(name: str, fn) -> None:
    if fn is not None and not callable(fn):
        raise InputError(f"{name} must be a function or None, got {type(fn).__name__}")
