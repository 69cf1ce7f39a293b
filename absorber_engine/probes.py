"""Probes: what the student is synchronized on, written so that the teacher must use X.

Synchronizing on plain continuations of X transfers almost nothing on a real model: the teacher
rarely needs X to continue it (SmolLM2-135M, invented facts: 0/4 recalled). Self-study probes
(Cartridges) fix that: the teacher, reading X, is asked a seed instruction (a question about a
detail, a summary, a list of the facts, a use, a creative rewrite) and answers it; the student then
reads the same exchange without X and must produce the teacher's states on it.

`ProbeFrame` holds the token ids that wrap X and the probes, built once per engine from the
tokenizer's chat template when it has one (X as a system message, each probe a user turn with the
seed and an assistant turn with the teacher's answer; the student reads the template's own default
opening, what a plain chat with the model starts with), else plain text ("\n" between X and the
seed). The seed stays in the probe: a kind's rows then share one prompt, so they are sampled in
lockstep with no padding, and the student learns to produce X's content when asked about it.
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass, field

import torch

from .errors import ConfigError
from .inputs import encoders
from .stops import turn_end_ids

# One seed instruction per kind; a kind's probes differ by sampling (probe_temperature).
SEED_PROMPTS = {
    "question": "Ask a question about one specific detail of the text you were given, then answer it.",
    "facts": "List every name, place and number in the text you were given, each with what it refers to.",
    "summary": "Summarize the text you were given in a few sentences, keeping every name and number.",
    "use": "What should someone who read the text you were given remember? Give the details.",
    "creative": "Retell the text you were given as a short story, keeping its details exact.",
    "recite": "Repeat the text you were given, word for word.",
}
# Kinds whose answer is X itself, read by the teacher rather than sampled: the teacher copies X from
# its context, and the student must produce it from the delta alone (TTT's target, with the
# teacher's states on it, in the frame questions are asked in).
FORCED_KINDS = ("recite",)

_MARK = "\x00ABSORBER\x00"


@dataclass
class ProbeFrame:
    context_open: list[int]      # teacher: before X
    context_close: list[int]     # teacher: after X, before the probe
    student_open: list[int]      # student: before the probe
    seeds: dict[str, list[int]] = field(default_factory=dict)   # kind -> the probe's forced opening
    stop: list[int] = field(default_factory=list)               # tokens that end an answer
    chat: bool = False
    context_end: list[int] = field(default_factory=list)        # closes a system message (recital.py)


def build_frame(tokenizer, kinds, use_chat: bool = True, prefix: list[int] = ()) -> ProbeFrame:
    """The frame for `kinds` under `tokenizer` (None: a model without one gets plain-text seeds
    it cannot read, so probes need a tokenizer; callers check). `prefix`: what the model reads
    before every sequence (its BOS), which a template that writes it too must not add again."""
    enc, after = encoders(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if use_chat and template:
        def render(messages):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

        try:
            before_ctx, rest = render([{"role": "system", "content": _MARK},
                                       {"role": "user", "content": _MARK}]).split(_MARK, 1)
            between, after_user = rest.split(_MARK, 1)
        except Exception:     # a template that refuses (or drops) a system message before a user turn
            warnings.warn("the chat template takes no system message before a user turn, where the teacher "
                          "reads the context: probes use plain text (chat_probes=False)", stacklevel=3)
            return build_frame(tokenizer, kinds, use_chat=False)
        student_before = render([{"role": "user", "content": _MARK}]).split(_MARK, 1)[0]
        # The probe starts where both sequences agree: the opening of the user turn (and whatever
        # closes the message before it), so teacher and student read the probe token for token.
        turn = _common_tail(between, student_before, enc, after)
        teacher_close, student_open = between[:len(between) - len(turn)], student_before[:len(student_before) - len(turn)]
        if after is not enc:
            # "▁" tokenizers read a space as the start of the word after it ("[INST] Ask": "▁Ask"):
            # a space that ends the student's opening goes with the seed; X, encoded alone, starts
            # with one of its own.
            if student_open.endswith(" "):
                student_open, teacher_close, turn = student_open[:-1], teacher_close.removesuffix(" "), " " + turn
            before_ctx = before_ctx.removesuffix(" ")
        # A template that writes the BOS (Llama 3's, Mistral's) would have it read twice.
        strip = lambda ids: ids[len(prefix):] if prefix and ids[:len(prefix)] == list(prefix) else ids  # noqa: E731
        frame = ProbeFrame(strip(enc(before_ctx)), after(teacher_close), strip(enc(student_open)), chat=True)
        for kind in kinds:
            frame.seeds[kind] = after(turn + SEED_PROMPTS[kind] + after_user)
        frame.stop = _stop_ids(tokenizer)
        frame.context_end = after(_system_close(tokenizer))
        return frame
    frame = ProbeFrame([], after("\n"), [], chat=False)
    for kind in kinds:
        frame.seeds[kind] = after(SEED_PROMPTS[kind] + "\n")
    eos = getattr(tokenizer, "eos_token_id", None)
    frame.stop = [eos] if isinstance(eos, int) else []
    return frame


def frame_for(tokenizer, cfg, prefix: list[int] = ()) -> ProbeFrame | None:
    """The engine's frame for `cfg`'s probes and replay, or None when there are none. Probes are
    text: a model without a tokenizer synchronizes on Y and futures only."""
    if not (cfg.probes or cfg.replay_rounds) or tokenizer is None:
        return None
    kinds = tuple(dict.fromkeys(cfg.probe_kinds + (("recite",) if cfg.replay_rounds else ())))
    return build_frame(tokenizer, kinds, cfg.chat_probes, prefix)


def round_span(cfg, frame: ProbeFrame | None, n: int, m: int) -> tuple[int, str]:
    """The longest sequence a round with X of n and Y of m tokens has the model read (the BOS prefix
    not counted), and what it is: X·Y, X (·Y) and a future, or a probe (X in the frame, a seed, the
    answer; "recite" answers with X again). A flush's round takes X of up to n + m (and no Y)."""
    x = n + m
    spans = [(x, "chunk_tokens + sync_tokens")]
    # With no Y (a flush) and no probes the teacher samples one future regardless (teacher_targets).
    if cfg.futures or frame is None or not cfg.probes:
        spans.append((x + cfg.future_length, "X (up to n + m in a flush) + a future (future_tokens)"))
    if frame is not None:
        kinds = [k for k in frame.seeds if cfg.probes or k in FORCED_KINDS]     # replay reads recite probes
        for kind in kinds:
            answer = x + 1 if kind in FORCED_KINDS else cfg.probe_tokens
            spans.append((len(frame.context_open) + x + len(frame.context_close) + len(frame.seeds[kind]) + answer,
                          f"a {kind!r} probe (X in the frame, the seed, an answer of {answer})"))
            # The student reads the probe in its own opening, which a template's default system
            # turn can make longer than the teacher's X in a short round (replay reads recite rows).
            spans.append((len(frame.student_open) + len(frame.seeds[kind]) + answer,
                          f"the student's {kind!r} probe (its opening, the seed, an answer of {answer})"))
    return max(spans)


def check_round_span(runner, cfg, frame: ProbeFrame | None, n: int, m: int) -> None:
    """A model with a position table must fit every sequence a round reads: ConfigError up front,
    not an IndexError in the first round (or the first flush). The raw window (n + m tokens after
    the BOS prefix) must moreover fit the KV a sliding-window cache keeps: generate() puts the
    window's KV back into a fresh cache, which counts positions from the keys it holds (a cropped
    window read the prompt at wrong positions, and a batch of windows failed to stack)."""
    window, what = n + m + len(runner.prefix), "chunk_tokens + sync_tokens (+ the BOS prefix)"
    if runner.absolute_positions and window > runner.max_positions:
        raise ConfigError(f"{what} = {window} exceeds the {runner.max_positions} positions {runner.model_type} has")
    if runner.kept_kv_tokens is not None and window > runner.kept_kv_tokens:
        raise ConfigError(f"{what} = {window} exceeds the {runner.kept_kv_tokens} tokens {runner.model_type}'s "
                          f"sliding-window cache keeps (sliding_window {runner.kept_kv_tokens + 1}): lower them")
    if runner.kept_kv_tokens is not None and frame is not None and cfg.probes:
        # The teacher's probes go on from a cache of X (up to n + m in a flush) in the frame, whose
        # positions a sliding-window cache counts from the keys it keeps: past them, the probes' targets
        # were states at other positions than the model's own.
        context = window + len(frame.context_open) + len(frame.context_close)
        if context > runner.kept_kv_tokens:
            raise ConfigError(f"a probe's context (X of up to n + m tokens in the chat frame, the BOS prefix included) "
                              f"= {context} exceeds the {runner.kept_kv_tokens} tokens {runner.model_type}'s "
                              f"sliding-window cache keeps (sliding_window {runner.kept_kv_tokens + 1}): lower "
                              "chunk_tokens + sync_tokens, or set probes=0")
    longest, what = round_span(cfg, frame, n, m)
    if runner.absolute_positions and longest + len(runner.prefix) > runner.max_positions:
        raise ConfigError(f"a round would read {longest + len(runner.prefix)} tokens ({what}, the BOS prefix "
                          f"included), past the {runner.max_positions} positions {runner.model_type} has")


def question_frame(tokenizer) -> tuple[list[int], list[int]] | None:
    """(opening, turn) of the tokenizer's chat template: `turn` the ids that open a user turn after
    an earlier message (SmolLM2: "<|im_end|>\n<|im_start|>user\n"), `opening` what a fresh chat
    puts before it (the default system turn, if any), so that opening + a prompt's last user turn
    is that question asked alone in a fresh chat (routing.asked_alone). None without a template,
    or where the turn's opening does not name the role."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False)   # noqa: E731
    try:
        first = render([{"role": "user", "content": _MARK}]).split(_MARK, 1)[0]
        later = render([{"role": "user", "content": _MARK}, {"role": "assistant", "content": _MARK},
                        {"role": "user", "content": _MARK}]).split(_MARK)[2]
    except Exception:        # a template that refuses these turns: no opening to find
        return None
    enc, after = encoders(tokenizer)
    turn = _common_tail(first, later, enc, after)
    if "user" not in turn:
        return None
    return enc(first[:len(first) - len(turn)]), after(turn)


def _system_close(tokenizer) -> str:
    """What closes a system message in the chat template ("" for a template that refuses a chat of a
    system message alone, which then has no system turn of its own to give a recital)."""
    try:
        return tokenizer.apply_chat_template([{"role": "system", "content": _MARK}], tokenize=False).split(_MARK, 1)[1]
    except Exception:
        return ""


def _common_tail(a: str, b: str, enc, after) -> str:
    """The longest text both end with that each splits at a token boundary: a tail of characters
    alone can start inside a special token ("|>" ends both "<|eot_id|>" and "<|begin_of_text|>"
    under Llama 3's template), and the frame would then read ids no chat has. (`enc`, `after`:
    inputs.encoders'.)"""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    tail = a[len(a) - n:]
    splits = lambda text: enc(text[:len(text) - len(tail)]) + after(tail) == enc(text)     # noqa: E731
    while tail and not (splits(a) and splits(b)):
        tail = tail[1:]
    return tail


def _stop_ids(tokenizer) -> list[int]:
    """The template's end-of-turn token first (what a recite exchange ends with, stop[:1]), then eos:
    sorted by id, a base Qwen2's or Llama-3's eos came first and recite probes ended in it."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return list(dict.fromkeys(turn_end_ids(tokenizer) + ([eos] if isinstance(eos, int) else [])))


def kinds_per_round(kinds, count: int) -> list[tuple[str, int]]:
    """`count` probes spread over `kinds` round-robin: [(kind, how many)], kinds with none dropped."""
    out = [(k, count // len(kinds) + (1 if i < count % len(kinds) else 0)) for i, k in enumerate(kinds)]
    return [(k, c) for k, c in out if c > 0]


def answer_mask(ids: torch.Tensor, forced: int, stop: list[int]) -> torch.Tensor:
    """(b, t) bool: the positions of each probe up to and including its first stop token after the
    forced opening; what a row sampled after it is not part of the probe."""
    mask = torch.ones_like(ids, dtype=torch.bool)
    if not stop:
        return mask
    sampled = ids[:, forced:]
    is_stop = torch.isin(sampled, torch.tensor(stop, device=ids.device))
    # Positions strictly after the first stop: a cumulative count of stops seen before them > 0.
    after = (is_stop.long().cumsum(dim=1) - is_stop.long()) > 0
    mask[:, forced:] = ~after
    return mask
