"""Answers read from a recital: generate(..., recite=True).

A delta of a bank (memory_slots > 1) is trained each round on the recite probe: the student, without
X, is made to write X in answer to the recite seed. So each delta of a bank can write its round's
text back, and it does so word for word (SmolLM2-135M: docs/recall.md, "Answers read from a
recital"; absorber-tiny: 159 of 159 key-value records on each of two streams, docs/long_context.md,
"Recitals that route"). With `recite`, every delta of a row's bank recites (greedy, at most its
round's X and a token, ending at the frame's stop tokens or the config's round_cut), the row takes the recital
that shares the longest run of tokens with its question (or its raw window, when that shares as
much), and the base model answers reading it before the question, in the frame the teacher read X
in. Reading a document in the prompt is what a small model does best, and the question's own words
find the round that holds them: on two tuning streams of key-value records (absorber-tiny, 4x its
context) the longest shared run picked the record's delta for 67 of 69 questions and 65 were
answered, where route() (the delta least surprised by the question, answering itself) got 7.

What it costs: each delta's recital once while the bank keeps it (a committed delta never changes:
a round adds one recital, a load or a reset drops them all; kept as token ids beside the window's
KV, WindowCache), the bank's in one batch: SmolLM2's recitals of 118-133 tokens took 5.2-5.8 s a
delta alone at one CPU thread in bf16 (docs/performance.md, "Decode products on reordered weights"),
the tiny model's seven of 256 tokens 2.0 s in one batch; then an answer as long as the recital
and the question. What it holds: the recitals, at most n + m token ids a delta (counted in
held_bytes()'s "kv"), text the bank writes, not kept from the stream; and each delta's marks, 2
bytes for 8 tokens of its X (64 for a round of 256, beside its 1.89 MiB on SmolLM2; not counted).

A round can check, as it trains, that its delta will recite X (misses, recite_exact), and a bank's
delta keeps a mark of each run of MARK_TOKENS tokens of its X, so a recital keeps only its lines that
repeat X (vouched, true_lines): what the base model reads is the round's text, never text the delta
made up.
"""

from __future__ import annotations

import struct
import zlib
from difflib import SequenceMatcher

import torch

from . import inputs
from .errors import InputError
from .probes import ProbeFrame
from .routing import last_turn


def check_frame(frame: ProbeFrame | None) -> ProbeFrame:
    """The engine's frame when its deltas can be asked to recite, else a clear error."""
    if frame is None or "recite" not in frame.seeds:
        raise InputError("recite needs a config that trains the recite probe (probe_kinds with 'recite') "
                         "and a tokenizer")
    return frame


def longest_run(a: list[int], b: list[int]) -> int:
    """The length of the longest run of consecutive tokens that `a` and `b` share (difflib walks only
    the positions where tokens match, so a long prompt against a bank's recitals stays cheap)."""
    return SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b)).size


def asked(ids: list[int], question_frame: tuple | None) -> list[int]:
    """What a recital is matched against: the prompt's last user turn (all of it where it has none)."""
    last = last_turn(ids, question_frame[1]) if question_frame and question_frame[1] else None
    return ids if last is None else ids[last:]


def pick(question: list[int], candidates: list[list[int]]) -> int:
    """The candidate sharing the longest run of tokens with `question`; on a tie the last (the caller
    lists the bank's recitals oldest first, then the raw window)."""
    runs = [longest_run(question, c) for c in candidates]
    return max(range(len(runs)), key=lambda k: (runs[k], k))


def room(delta, stats: dict) -> int:
    """How long a delta's recital may run: its round's X and one token more, the end of turn a chat
    recital closes with (so a whole recital stops by itself, and only one cut short with its round
    stops at the length, recite_rows); n + m where the round's length is not known."""
    return delta.round_tokens + 1 if delta.round_tokens else stats["chunk_tokens"] + stats["sync_tokens"]


MARK_TOKENS = 8
"""A bank's delta keeps a 16-bit CRC of each run of 8 tokens of its round's X (the last run may be
shorter): 2 bytes for 8 tokens, a check that cannot give X back. A recital that departed from X
(absorber-tiny, 8x, before recite_exact: a delta wrote its round's last records wrong, then a question
it had learnt from the round's probes, and every question of the stream read it, 1/40) keeps only
the lines whose runs match (vouched): a wrong run passes at one of the 33 places tried about one
time in 2,000, and a line is kept only if every run under it passes."""


def marks(x: list[int]) -> list[int]:
    """The marks of X's runs of MARK_TOKENS tokens, in order."""
    return [zlib.crc32(struct.pack(f"<{len(run)}q", *run)) & 0xFFFF
            for run in (x[i:i + MARK_TOKENS] for i in range(0, len(x), MARK_TOKENS))]


MARK_SHIFT = 16
"""How far (tokens) a run of a recital may sit from where the runs before it put X's run: a recital
that starts at X's first whole line, where X starts inside one, or that dropped or doubled a token."""


def vouched(ids: list[int], kept: list[int] | None, length: int) -> list[bool]:
    """Per token of a recital, whether the marks `kept` of an X of `length` tokens vouch for it: it
    lies in a run that repeats one of X's runs, found in X's order, each within MARK_SHIFT tokens of
    where the runs found before it put it and not before the last one's end (every token without
    marks). A wrong digit loses its run; the runs after it are found again. A run that joins the one
    before it where X's runs do not join (X's runs swapped, one skipped) loses its first token, so
    that line is not read."""
    if kept is None:
        return [True] * len(ids)
    ok, shift, end = [False] * len(ids), 0, 0
    for k, mark in enumerate(kept):
        start, n = k * MARK_TOKENS, min(MARK_TOKENS, length - k * MARK_TOKENS)
        for s in sorted(range(-MARK_SHIFT, MARK_SHIFT + 1), key=abs):
            at = start + shift + s
            if end <= at and at + n <= len(ids) and marks(ids[at:at + n]) == [mark]:
                ok[at:at + n] = [True] * n
                ok[at] = not (s and at == end and end > 0)
                shift, end = shift + s, at + n
                break
    return ok


def true_lines(tokenizer, ids: list[int], ok: list[bool]) -> list[int]:
    """The recital's lines (each ending at a token that holds a line break) whose every token is
    vouched for, in order: the base model reads whole lines of the round's text, none made up."""
    out, line = [], []
    for i, t in enumerate(ids):
        line.append(i)
        if "\n" in tokenizer.decode([t]) or i == len(ids) - 1:
            if all(ok[j] for j in line):
                out += [ids[j] for j in line]
            line = []
    return out


def recite_rows(runner, frame: ProbeFrame, deltas: list, windows: list, longest: list[int], cut: str,
                cut_min: int, tokenizer, generate_rows) -> list[list[int]]:
    """Each delta's recital of its round (token ids, at most `longest[row]` of them, the round's cut
    and what follows it dropped, or a half line it stops in at that length; [] when it wrote nothing),
    read after its window (the model's prefix). A cut ends a recital only once it holds `cut_min` tokens, as the scheduler cuts a
    round: a round's X may hold breaks before that. generate_rows is generate.py's."""
    prompt = frame.student_open + frame.seeds["recite"]
    written: list[list[int]] = [[] for _ in deltas]

    def goes_on(row: int, tok: int) -> bool:
        written[row].append(tok)
        return len(written[row]) < longest[row] and _cut_at(tokenizer, written[row], cut, cut_min) < 0

    gens = [torch.Generator(device=runner.device) for _ in deltas]          # greedy: never drawn from
    # The recital is the engine's own text, like its probes: written in the rounds' compute dtype,
    # on weights cast (and on a CPU reordered) once for all its steps (static_decode.decode_weights).
    # Stacked, even alone: a delta merged into bf16 weights recited otherwise than beside others, and a
    # kept recital, written alone after its round or with the bank after a load, was not the same text.
    with runner.autocast():
        out = generate_rows(runner, deltas, windows, [prompt] * len(deltas), max(longest), 0.0, 1.0, set(frame.stop),
                            gens, goes_on, stacked=True)
    recitals = []
    for ids, most, delta in zip(out, longest, deltas):
        # What follows X is not X's: cut at X's length, or where the last run found of X ends when the
        # recital wrote X later than its place (a token doubled, or one before it: found shifted).
        ok = vouched(ids, delta.marks, delta.round_tokens)
        end = max([delta.round_tokens] + [i + 1 for i, v in enumerate(ok) if v])
        past = delta.marks is not None and len(ids) > end
        ids, ok = (ids[:end], ok[:end]) if past else (ids, ok)
        departed = past or not all(ok)
        ids = ids if all(ok) else true_lines(tokenizer, ids, ok)
        text, at = tokenizer.decode(ids), _cut_at(tokenizer, ids, cut, cut_min)
        if at >= 0:
            text = text[:at]
        elif (departed or len(ids) >= most) and _half_line(text):
            # Stopped at its length, not by itself: a round the scheduler cut at n tokens, mid-line (a
            # plain delta writes no end after it); the line's rest is the next round's. A half record before the question (absorber-tiny: `"humble sail`, its quote
            # left open) made the base model misread it: trimmed, 38/39 where 30/39 (8x, seed 401).
            text = text[:text.rindex("\n")]
        recitals.append(inputs.to_ids(text, tokenizer, runner.vocab_size) if text.strip() else [])
    return recitals


def _half_line(text: str) -> bool:
    """Whether the text ends in a line no longer than the longest before it: a piece of a list, log or
    table cut short. A longer last line is prose the cut ran through (a pass key's filler after one
    line of instructions), kept whole."""
    lines = text.split("\n")
    return len(lines) > 1 and len(lines[-1]) <= max(map(len, lines[:-1]))


def _cut_at(tokenizer, ids: list[int], cut: str, cut_min: int) -> int:
    """Where the round's cut is in the text of `ids` (-1: not there): the first that ends past the
    first cut_min - 1 tokens, as the scheduler ends X at a cut once X holds cut_min tokens."""
    if not cut or len(ids) < cut_min:
        return -1
    return tokenizer.decode(ids).find(cut, max(0, len(tokenizer.decode(ids[:cut_min - 1])) - len(cut) + 1))


RECITE_MARGIN = 1.0
"""How far, in logits, X's token must lead every other for recite_exact to count it recited. A recital
runs on other sums than the student's pass (the bank's delta in bf16, merged into bf16 weights): on
absorber-tiny a delta whose pass picked every token of X, one by a lead of 0.125, wrote another
token there (key-value records, seed 402); three that recited their rounds whole had least leads of
0.81 to 1.5."""


def misses(runner, final, grp) -> int:
    """Tokens of X the student's greedy pick would miss on the recite probe, each read after the true
    ones before it: those that do not lead every other token by RECITE_MARGIN. 0: its greedy
    recital writes X back token for token (recite_exact)."""
    start, n = grp.x_span
    w, b = runner.head.weight.detach().float(), runner.head.bias
    target = grp.ids[:, start:start + n].reshape(-1)
    with torch.no_grad():
        states = final[:, start - 1:start - 1 + n].reshape(-1, runner.hidden_size).float()
        short = 0
        for c, t in zip(states.split(256), target.split(256)):
            logits = torch.nn.functional.linear(c, w, None if b is None else b.float())
            lead = logits.gather(1, t[:, None])[:, 0]
            logits.scatter_(1, t[:, None], float("-inf"))
            short += int((lead - logits.max(1).values < RECITE_MARGIN).sum())
    return short


def answer_prompt(frame: ProbeFrame, question_frame: tuple | None, recital: list[int], ids: list[int]) -> list[int]:
    """`ids` with the recital as a system message: in place of the template's default opening in a
    plain chat of one question (the frame the teacher read X in), else right before the prompt's
    last user turn, or before the whole prompt when it has none. Right before the question, not at
    the top of a chat: after three earlier exchanges about other documents, SmolLM2 answered 19/40
    that way against 8/40 with the recital first (tuning stream of seed 41)."""
    if not frame.chat:                          # plain text: the recital, a line break, the prompt
        return recital + frame.context_close + ids
    check_prompt(frame, question_frame, ids)
    opening, turn = question_frame or ([], [])
    last = last_turn(ids, turn) if turn else None
    if _plain_chat(opening, last, ids):
        return frame.context_open + recital + frame.context_close + ids[len(opening):]
    at, close = last or 0, frame.context_end
    if ids[at:at + len(close)] == close:        # the turn opens by closing the message before it
        at += len(close)
    return ids[:at] + frame.context_open + recital + close + ids[at:]


def check_prompts(frame: ProbeFrame | None, question_frame: tuple | None, prompts: list[list[int]]) -> None:
    """Refuse, before any recital is written, an engine whose deltas cannot recite, or a prompt
    answer_prompt() could put no recital into (a template with no system turn of its own, asked
    anything but a plain chat of one question)."""
    check_frame(frame)
    for ids in prompts:
        check_prompt(frame, question_frame, ids)


def check_prompt(frame: ProbeFrame, question_frame: tuple | None, ids: list[int]) -> None:
    if frame.chat and not frame.context_end:
        opening, turn = question_frame or ([], [])
        if not opening:            # Llama 2's: its turns name no role, so no plain chat is found either
            raise InputError("recite: this chat template holds no system message of its own, nor a user turn "
                             "that names its role: there is no place in its prompts to read a recital")
        if not _plain_chat(opening, last_turn(ids, turn) if turn else None, ids):
            raise InputError("recite: this chat template holds no system message of its own before the prompt; "
                             "ask in a plain chat (one user turn after the template's default opening)")


def _plain_chat(opening: list[int], last: int | None, ids: list[int]) -> bool:
    """A chat of one question after the template's default opening (`last`: where its last user turn opens)."""
    return bool(opening) and ids[:len(opening)] == opening and last == len(opening)
