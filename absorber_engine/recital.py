"""Answers read from a recital: generate(..., recite=True).

A delta of a bank (memory_slots > 1) is trained each round on the recite probe: the student, without
X, is made to write X in answer to the recite seed. So the delta a question is routed to can write
its round's text back, and it does so word for word (SmolLM2-135M: docs/recall.md, "Answers
read from a recital"). With `recite`, a row routed to a delta of its bank first recites (greedy, at
most n + m tokens, the longest round a flush absorbs, ending at the frame's stop tokens or the
config's round_cut), and the base model then answers reading the recital as a system message, in the
frame the teacher read X in. Reading a document in the prompt is what a small chat model does best;
answering from the delta directly recalled less.

What it costs: a query decodes up to n + m tokens more (the recitals of a batch's rows in
one batch), in the rounds' compute dtype: SmolLM2's recitals of 118-133 tokens took 5.2-5.8 s at one
CPU thread in bf16 on reordered weights with the delta merged, 7.3-8.5 s in fp32, the same text in
6 of 6 (docs/performance.md, "Decode products on reordered weights"). What it holds: nothing after
the query. The recital's KV lives as long as the answer, and no text of the stream is kept, so
held memory is the bank alone, as without it.
"""

from __future__ import annotations

import torch

from . import inputs
from .errors import InputError
from .probes import ProbeFrame
from .routing import last_turn


def check_frame(frame: ProbeFrame | None) -> ProbeFrame:
    """The engine's frame when its deltas can be asked to recite, else a clear error."""
    if frame is None or not frame.chat or "recite" not in frame.seeds:
        raise InputError("recite needs a chat model whose config trains the recite probe (probe_kinds with "
                         "'recite', chat_probes on, a tokenizer with a chat template)")
    return frame


def recite_rows(runner, frame: ProbeFrame, deltas: list, windows: list, longest: list[int], cut: str,
                cut_min: int, tokenizer, generate_rows) -> list[list[int]]:
    """Each delta's recital of its round (token ids, at most `longest[row]` of them, the round's cut
    and what follows it dropped; [] when it wrote nothing), read after its window (the model's
    prefix). A cut ends a recital only once it holds `cut_min` tokens, as the scheduler cuts a
    round: a round's X may hold breaks before that. generate_rows is generate.py's."""
    prompt = frame.student_open + frame.seeds["recite"]
    written: list[list[int]] = [[] for _ in deltas]

    def goes_on(row: int, tok: int) -> bool:
        written[row].append(tok)
        return len(written[row]) < longest[row] and _cut_at(tokenizer, written[row], cut, cut_min) < 0

    gens = [torch.Generator(device=runner.device) for _ in deltas]          # greedy: never drawn from
    # The recital is the engine's own text, like its probes: written in the rounds' compute dtype,
    # on weights cast (and on a CPU reordered) once for all its steps (static_decode.decode_weights).
    with runner.autocast():
        out = generate_rows(runner, deltas, windows, [prompt] * len(deltas), max(longest), 0.0, 1.0, set(frame.stop),
                            gens, goes_on)
    recitals = []
    for ids in out:
        text, at = tokenizer.decode(ids), _cut_at(tokenizer, ids, cut, cut_min)
        if at >= 0:
            text = text[:at]
        recitals.append(inputs.to_ids(text, tokenizer, runner.vocab_size) if text.strip() else [])
    return recitals


def _cut_at(tokenizer, ids: list[int], cut: str, cut_min: int) -> int:
    """Where the round's cut is in the text of `ids` (-1: not there): the first that ends past the
    first cut_min - 1 tokens, as the scheduler ends X at a cut once X holds cut_min tokens."""
    if not cut or len(ids) < cut_min:
        return -1
    return tokenizer.decode(ids).find(cut, max(0, len(tokenizer.decode(ids[:cut_min - 1])) - len(cut) + 1))


def answer_prompt(frame: ProbeFrame, question_frame: tuple | None, recital: list[int], ids: list[int]) -> list[int]:
    """`ids` with the recital as a system message: in place of the template's default opening in a
    plain chat of one question (the frame the teacher read X in), else right before the prompt's
    last user turn, or before the whole prompt when it has none. Right before the question, not at
    the top of a chat: after three earlier exchanges about other documents, SmolLM2 answered 19/40
    that way against 8/40 with the recital first (tuning stream of seed 41)."""
    opening, turn = question_frame or ([], [])
    last = last_turn(ids, turn) if turn else None
    if opening and ids[:len(opening)] == opening and last == len(opening):
        return frame.context_open + recital + frame.context_close + ids[len(opening):]
    if not frame.context_end:
        raise InputError("recite: this chat template holds no system message of its own before the prompt; "
                         "ask in a plain chat (one user turn after the template's default opening)")
    at, close = last or 0, frame.context_end
    if ids[at:at + len(close)] == close:        # the turn opens by closing the message before it
        at += len(close)
    return ids[:at] + frame.context_open + recital + close + ids[at:]
