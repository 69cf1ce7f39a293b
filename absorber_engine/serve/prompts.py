"""What a request asks the model to read, as token ids, and where its generation prompt starts.

Sessions recognize the part of a resent history they already hold by token ids, so the ids of
earlier turns must not change when later turns are added. Tokenizing a whole rendered chat does
not guarantee that (BPE merges across the boundary of the next turn), so a chat is tokenized per
message: each message's rendered text on its own, and an assistant message split after the header
the generation prompt wrote, which is exactly where the model's reply began. The trailing ids a
session does not take in (`hold`) are read as the generation prompt instead: the chat's
assistant header, or for plain completions a few tokens, which the next request may retokenize
together with the completion that followed them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..stops import answer_text, model_end_ids, turn_end_ids
from .errors import bad_request

# Trailing tokens of a completion prompt read as the generation prompt, not taken into the session:
# enough for the merges a completion appended after them can cause when the history is resent.
COMPLETION_HOLD = 4


@dataclass
class Prompt:
    ids: list[int]
    hold: int            # the last `hold` ids are the generation prompt
    stop_ids: set[int]   # tokens that end the answer


class PromptBuilder:
    def __init__(self, tokenizer, vocab_size: int, model=None, prefix: list[int] = ()):
        if tokenizer is None:
            raise ValueError("serving needs a model with a tokenizer")
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.prefix = list(prefix)       # what the engine reads before every sequence (its BOS)
        self.template = getattr(tokenizer, "chat_template", None) or None
        self.eos_ids = set(model_end_ids(model, tokenizer, vocab_size))
        self.chat_stop_ids = self.eos_ids | set(turn_end_ids(tokenizer, vocab_size))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def decode(self, ids: list[int]) -> str:
        # No clean-up of spaces: it rewrote text already streamed ("don '" sent, then "don't").
        return answer_text(self.tokenizer, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def completion(self, prompt, param: str = "prompt") -> Prompt:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_ids(ids, param)
        return Prompt(ids, min(COMPLETION_HOLD, len(ids)), set(self.eos_ids))

    def chat(self, messages: list[dict]) -> Prompt:
        segments, hold = self._segments(messages)
        ids, lens = [], []
        for seg in segments:
            piece = self.encode(seg)
            if not ids and self.prefix and piece[:len(self.prefix)] == self.prefix:
                piece = piece[len(self.prefix):]   # a template that writes the BOS (Llama 2 and 3): read once
            ids += piece
            lens.append(len(piece))
        if not ids:
            raise bad_request("the rendered chat is empty", param="messages")
        self.check_ids(ids, "messages")
        return Prompt(ids, sum(lens[len(lens) - hold:]) if hold else min(COMPLETION_HOLD, len(ids)),
                      set(self.chat_stop_ids))

    def check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise bad_request("the prompt is empty", param=param)
        for i, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise bad_request(f"token id {t} at position {i} is outside the vocabulary [0, {self.vocab_size})",
                                  param=param, code="invalid_token")

    # ------------------------------------------------------------------ rendering

    def _segments(self, messages: list[dict]) -> tuple[list[str], int]:
        """The chat as text segments, each tokenized on its own, and how many trailing segments form
        the generation prompt (0: the chat could not be split; hold a few tokens instead)."""
        if self.template is None:
            return _plain_segments(messages)
        try:
            prefixes = [self._render(messages[:i], False) for i in range(len(messages) + 1)]
            full = self._render(messages, True)
        except Exception:       # templates that refuse partial chats (e.g. strict role alternation)
            return [self._render_or_refuse(messages)], 0
        if not all(b.startswith(a) for a, b in zip(prefixes, prefixes[1:] + [full])):
            return [full], 0
        segments = []
        for i, msg in enumerate(messages):
            seg = prefixes[i + 1][len(prefixes[i]):]
            if msg["role"] == "assistant":
                try:
                    header = self._render(messages[:i], True)[len(prefixes[i]):]
                except Exception:
                    header = ""
                if header and seg.startswith(header):
                    segments += [header, seg[len(header):]]
                    continue
            segments.append(seg)
        segments.append(full[len(prefixes[-1]):])
        return segments, 1

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _render_or_refuse(self, messages: list[dict]) -> str:
        try:
            return self._render(messages, True)
        except Exception as exc:
            raise bad_request(f"the model's chat template refused these messages: {exc}", param="messages") from None


def _plain_segments(messages: list[dict]) -> tuple[list[str], int]:
    """A model without a chat template reads the chat as plain text, one "role: content" line per
    message, then "assistant:" for the answer."""
    segments = []
    for msg in messages:
        segments += [f"{msg['role']}:", f" {msg['content']}\n"]
    segments.append("assistant:")
    return segments, 1


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """text up to the first stop sequence, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def safe_length(text: str, stops: list[str]) -> int:
    """How much of a growing text can be sent: everything but a tail that could still become the
    start of a stop sequence, or an unfinished multi-byte character."""
    keep = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = min(keep, len(text) - k)
                break
    while keep > 0 and text[keep - 1] == "\ufffd":
        keep -= 1
    return keep
