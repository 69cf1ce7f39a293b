"""What ends a generated answer: stop token ids, and stop texts found in the answer's text.

A stop text is a sequence, wherever its characters fall among tokens: "Question:" is two tokens in
SmolLM2's vocabulary, and stopping at either one alone (as generate() did until 2026-12-06) ended
every answer at its first colon. A text that is one added token of the tokenizer ("<|im_end|>") is
that token's id too (and still a text, should the model write it in pieces). The model's own end
tokens stop every answer (the tokenizer's EOS and each id of the model's
generation_config.eos_token_id, which transformers' generate() stops at: Gemma's chat models end a
turn with <end_of_turn>, which their tokenizer's EOS is not; Llama 3.1 lists three) unless `stop`
names token ids, which then replace them, or is [] (no stop at all): stop texts add to them, as
transformers' stop_strings do.

An answer's text is decoded as it reads after the prompt (answer_text): alone, a SentencePiece-style
decoder drops its first piece's space, so " The" as a stop text never matched an answer's first
token, and prompt + answer read "...isThe".
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

from .errors import InputError
from .inputs import to_ids


@dataclass(frozen=True)
class Stops:
    ids: frozenset           # a sampled id among them ends the row, and is left out of the answer
    texts: tuple = ()        # the answer ends before the first of them its text holds


def model_end_ids(model, tokenizer, vocab_size: int) -> list[int]:
    """The model's generation_config (else config) eos_token_id, one id or a list, in its order, then
    the tokenizer's EOS if it is not among them."""
    found = []
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            found += eos if isinstance(eos, (list, tuple)) else [eos]
            break
    found.append(getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None)
    unk = getattr(tokenizer, "unk_token_id", None)      # an EOS text outside the vocabulary resolves to <unk>
    return list(dict.fromkeys(t for t in found if isinstance(t, int) and not isinstance(t, bool)
                              and 0 <= t < vocab_size and t != unk))


# Tokens that end a turn in the chat templates of common model families (ChatML, Llama 3, Phi-3,
# Gemma, and GPT-2-style text ends), in the order a template's own end of turn is looked for first.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def turn_end_ids(tokenizer, vocab_size: int | None = None) -> list[int]:
    """The ids of the TURN_END_TOKENS that the tokenizer's chat template writes, in that order:
    what ends a chat turn, which a model's EOS need not be (Gemma's EOS is <eos>, its turns end
    with <end_of_turn>)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return []
    out = []
    for name in TURN_END_TOKENS:
        if name in template:
            tid = tokenizer.convert_tokens_to_ids(name)
            if (isinstance(tid, int) and tid >= 0 and tid != getattr(tokenizer, "unk_token_id", None)
                    and (vocab_size is None or tid < vocab_size)):
                out.append(tid)
    return list(dict.fromkeys(out))


def parse(stop, tokenizer, vocab_size: int, model=None) -> Stops:
    """`stop` as generate() takes it: None (the model's end tokens), a token id, a text, or a list of
    them (texts and no id: the model's end tokens too)."""
    ends = frozenset(model_end_ids(model, tokenizer, vocab_size))
    if stop is None:
        return Stops(ends)
    if isinstance(stop, (int, str)) and not isinstance(stop, bool):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise InputError(f"stop must be a token id, a text, or a list of them, got {type(stop).__name__}")
    ids, texts, text_ids = set(), [], set()
    for s in stop:
        if isinstance(s, str):
            if tokenizer is None:
                raise InputError("stop texts need a tokenizer: pass stop token ids instead")
            if not s:
                raise InputError("a stop text must not be empty")
            one = to_ids(s, tokenizer, vocab_size)
            if len(one) == 1 and one[0] in _added_ids(tokenizer):
                text_ids.add(one[0])
            texts.append(s)
        elif isinstance(s, int) and not isinstance(s, bool) and 0 <= s < vocab_size:
            ids.add(s)
        else:
            raise InputError(f"stop items must be token ids in [0, {vocab_size}) or texts, got {s!r}")
    if texts and not ids:           # texts alone: the model's end tokens still stop
        ids = set(ends)
    return Stops(frozenset(ids | text_ids), tuple(dict.fromkeys(texts)))


def _added_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(getattr(tokenizer, "all_special_ids", []) or [])


class TextWatch:
    """An on_token for generate_rows that ends a row once its new text holds a stop text; `then`
    (the caller's on_token) sees every kept token first, a stop text's own included."""

    def __init__(self, texts: tuple, tokenizer, rows: int, then=None):
        self.texts, self.tokenizer, self.then = texts, tokenizer, then
        self.new: list[list[int]] = [[] for _ in range(rows)]
        self.tail = tail_tokens(texts)

    def __call__(self, row: int, tok: int):
        self.new[row].append(tok)
        if self.then is not None and self.then(row, tok) is False:
            return False
        tail = answer_text(self.tokenizer, self.new[row][-self.tail:])
        return False if any(t in tail for t in self.texts) else None

    def cut(self, ids: list[int]) -> tuple[str, list[int]]:
        """A row's answer before its first stop text: as text, and as the ids wholly before it."""
        text = answer_text(self.tokenizer, ids)
        at = min((i for i in (text.find(t) for t in self.texts) if i >= 0), default=-1)
        if at < 0:
            return text, ids
        keep = len(ids)             # a few steps back: the watch ended the row at the text's last token
        while keep and len(answer_text(self.tokenizer, ids[:keep])) > at:
            keep -= 1
        return text[:at], ids[:keep]


def answer_text(tokenizer, ids: list[int], **decode_options) -> str:
    """`ids` decoded as they read after other text: after a plain token, whose own text is then cut
    off. The same as tokenizer.decode(ids) for byte-level BPE (GPT-2, Llama 3, SmolLM2); with a
    SentencePiece-style decoder the first piece keeps its space ("▁The" reads " The")."""
    head = _sentinel(tokenizer)
    if head is None:
        return tokenizer.decode(ids, **decode_options)
    sentinel, text = head
    both = tokenizer.decode([sentinel] + list(ids), **decode_options)
    return both[len(text):] if both.startswith(text) else tokenizer.decode(ids, **decode_options)


_sentinels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sentinel(tokenizer) -> tuple[int, str] | None:
    """(id, text) of the plain token "a" answer_text() decodes in front, found once per tokenizer."""
    with contextlib.suppress(KeyError, TypeError):     # TypeError: no weak reference can hold it (not cached)
        return _sentinels[tokenizer]
    try:
        ids = tokenizer.encode("a", add_special_tokens=False)
        found = (ids[-1], tokenizer.decode(ids[-1:])) if ids else None
    except Exception:            # a tokenizer that cannot encode plain text: decode alone
        found = None
    with contextlib.suppress(TypeError):
        _sentinels[tokenizer] = found
    return found


def tail_tokens(texts) -> int:
    """How many of an answer's last tokens can hold a stop text: a text of L characters spans at
    most 4L byte-level tokens (one byte each), and one more may open before it."""
    return 4 * max((len(t) for t in texts), default=0) + 4
