"""Which of a memory's deltas (memory_slots), or its raw window, reads a prompt.

A bank of deltas, one per round, recalls what each round held only if a query reads the right one;
the engine asks route() once per prompt (GenerationMixin._routed in generate.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lora import LowRankDelta
from .model import ModelRunner


WINDOW = -1      # route(): the raw window, read by the base model, answers; not a delta alone
# route(): how many deltas a rough bf16 pass leaves for the exact score. The prompt read once per
# delta is most of a query's cost (SmolLM2, 32 deltas, 40 tokens: 2.9 s in fp32, 1.5 s in bf16 on
# this CPU), but bf16 alone routed 1 of 96 questions elsewhere than fp32; with the shortlist, 96 as
# fp32 does, 1.15x faster a question (docs/recall.md, "What a query costs with a bank").
SHORTLIST = 4
# route(): the rough pass reads at most the prompt's last ROUGH_TOKENS tokens (alone), so its cost
# stops growing with the prompt; only the shortlist reads it whole. A chat question asked alone
# (asked_alone) is shorter than this, so it changes nothing there (docs/recall.md, "Questions
# after earlier turns"). Nor does it read the template's fixed opening (`opening`): SmolLM2, banks
# of 22 deltas on two streams, 40 questions each (44 tokens, 19 of them the opening): the same
# picks, 2.5 against 3.3 s a question (docs/recall.md, "What a query costs with a bank").
ROUGH_TOKENS = 64


def route(runner: ModelRunner, deltas: list, ids: list[int], window=None, opening: int = 0) -> int:
    """Which of a memory's deltas reads `ids`: the one that makes them least surprising where it
    helps, the sum over tokens of min(0, its NLL - the base model's NLL) (each token after the
    first; after the model's prefix, the first too). Tokens a delta makes worse count for nothing:
    every delta shifts the chat template's tokens a little, and on a plain mean NLL that noise
    outweighed the few tokens that name what a question is about (SmolLM2-135M, 12 one-document
    deltas, 48 questions: 42 routed right by mean NLL, 48 by this). All deltas and the base read
    `ids` alone in one batched forward. Without a token to score: the newest delta (the text just
    before the window).

    `window` (a generate.WindowKV: its KV under the base model) is one more candidate, scored the
    same way on `ids` read after it: WINDOW when it helps more than every delta alone. A delta that wins is read
    without the window, so the raw text of other documents cannot outvote what it holds (SmolLM2,
    24 documents streamed, questions about the 20 absorbed: 66% read without the window, 48% with
    it, whose look-alike documents answered in their place). Read by the base model, the window
    separates cleanly: its gain was 1.24-1.94x the best delta's on the 32 questions about documents
    still in it and at most 0.94x on the 160 about absorbed ones (two streams); read by the newest
    delta, whose own text it continues, it overlapped (0.56-1.54x on absorbed ones) and answered
    fewer of its own questions (2/32 against 9/32).

    A bank larger than SHORTLIST is first scored roughly: on the prompt's last ROUGH_TOKENS tokens
    only, after its first `opening` tokens (the chat template's fixed opening, the same before every
    question: it names no document), in the compute dtype (bf16 where the engine absorbs in it); only
    its SHORTLIST best are scored again, on the whole prompt and exactly, to decide."""
    if len(deltas) == 1 or not scorable(runner, ids):
        return len(deltas) - 1
    picks = list(range(len(deltas)))
    rough_ids = (ids[opening:] if scorable(runner, ids[opening:]) else ids)[-ROUGH_TOKENS:]
    if len(deltas) > SHORTLIST and (runner.compute_dtype is not None or len(rough_ids) < len(ids)):
        with runner.autocast():
            rough, _ = route_gains(runner, deltas, rough_ids)
        picks = rough.topk(SHORTLIST, largest=False).indices.tolist()
    gains, window_gain = route_gains(runner, [deltas[i] for i in picks], ids, window)
    best = int(gains.argmin())
    return WINDOW if window_gain is not None and window_gain <= gains[best] else picks[best]


def asked_alone(ids: list[int], frame: tuple[list[int], list[int]] | None) -> list[int]:
    """A chat prompt as its last user turn asked alone in a fresh chat: the template's own opening,
    then the last user turn on. What came before goes: earlier turns and system messages that name
    other documents' facts, which the router followed rather than the question (SmolLM2, two
    streams of 24 documents, 80 questions each after three exchanges about other documents: 0/80
    routed to a delta of the question's document, 77/80 asked alone; 22 after a system message
    holding three other documents: 8/22, 22/22; docs/recall.md, "Questions after earlier turns").
    `frame` is probes.question_frame(); a prompt with no user turn in it is left as it is."""
    if not frame:
        return ids
    opening, turn = frame
    last = last_turn(ids, turn)
    return ids if last is None else opening + ids[last:]


def last_turn(ids: list[int], turn: list[int]) -> int | None:
    """Where the last user turn opens in `ids` (the start of `turn`, probes.question_frame's), or None."""
    n = len(turn)
    return max((i for i in range(len(ids) - n + 1) if ids[i:i + n] == turn), default=None)


def scorable(runner: ModelRunner, ids: list[int]) -> bool:
    """Whether `ids` hold a token route() can score (one after the first, or after the prefix)."""
    return len(runner.prefix) + len(ids) > max(len(runner.prefix), 1)


@torch.no_grad()
def route_gains(runner: ModelRunner, deltas: list, ids: list[int], window=None):
    """route()'s scores: each delta's gain on `ids` (a tensor, one per delta) and the window's (None
    without a raw token to read). `ids` must hold a token to score."""
    seq = runner.prefix + list(ids)
    start = max(len(runner.prefix), 1)
    runner.bind([zero_delta(deltas[0])] + list(deltas))
    x = torch.tensor([seq], dtype=torch.long, device=runner.device).expand(len(deltas) + 1, -1)
    final, _ = runner.forward(x)
    nll = torch.stack([F.cross_entropy(runner.logits(final[s, start - 1:-1]).float(), x[0, start:], reduction="none")
                       for s in range(len(deltas) + 1)])
    gains = (nll[1:] - nll[0]).clamp(max=0).sum(1)
    if window is None or len(window.tokens) <= len(runner.prefix):     # no raw token to read
        return gains, None
    # The same tokens read after the window: its last state predicts ids[0], ids[i] predicts ids[i + 1].
    runner.bind([window.delta])
    after, _ = runner.forward(torch.tensor([ids], dtype=torch.long, device=runner.device), runner.make_cache(window.kv))
    states = torch.cat([window.last[None], after[0, :-1]])[start - len(runner.prefix):]
    window_nll = F.cross_entropy(runner.logits(states), x[0, start:], reduction="none")
    return gains, float((window_nll - nll[0]).clamp(max=0).sum())


def zero_delta(like: LowRankDelta) -> LowRankDelta:
    """Δ = 0 (B = 0) in the shapes of `like`: the base model for the runner's delta-bound forwards."""
    zero = LowRankDelta(like.shapes, like.rank, like.scale, like.device, seed=like.seed)
    for t in zero.parameters():
        t.requires_grad_(False)                 # nothing trains it
    return zero
