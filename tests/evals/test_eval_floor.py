"""A reduced evaluation on the shipped model, with a floor set from measurements.

Passkeys at the model's trained length (512 tokens), absorbed whole (flush: no raw window is kept,
so every digit the engine answers comes from the delta). The evaluation's budget (evals/evaluate.py):
n = 256, m = 128, rank 16, 80 steps per round, lr 5e-3; Absorber with 4 prompted futures, TTT
(next-token loss on the context, same LoRA, same steps) as the baseline.

Measured when the floor was set (seeds 0-7 of this test, torch 2.13 CPU, default targets v/o + MLP):
Absorber 5/8, TTT 5/8, the model with no context 0/8 (it answers 55555; a 5-digit key is 1 in 10^5
by chance). Absorber's misses are near-misses (888935 for 88935, 788888 for 78672). With q/k in the
targets too (and futures after X·Y) it was Absorber 6/8, TTT 3/8; the README says why q/k are out.
The floor, 4 of 8, leaves one miss of slack for library versions that round differently and fails
if absorption stops carrying the key. At this length and budget Absorber and TTT are level, so the
test does not rank them (the evaluation tables compare them at every length).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evals.evaluate import build_methods, trained_context
from evals.tasks import answer_text, make_example, score

MODEL = Path(__file__).resolve().parents[2] / "model" / "absorber-tiny"
EXAMPLES = 8

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="model/absorber-tiny not built")]


def correct(method, tok, ctx: int, examples: int = EXAMPLES) -> list[bool]:
    hits = []
    for seed in range(examples):
        ex = make_example("passkey", ctx, tok, seed=seed)
        context = tok.encode(ex.context, add_special_tokens=False)
        query = tok.encode(ex.query, add_special_tokens=False)
        max_new = len(tok.encode(answer_text(ex.answers), add_special_tokens=False)) + 2
        hits.append(bool(score(ex, method.run(context, query, [], max_new).generated)))
    return hits


def test_absorbed_passkeys_come_back():
    torch.manual_seed(0)
    ctx = trained_context(str(MODEL))
    tok, methods = build_methods(["absorber+futures", "none"], str(MODEL), ctx, flush=True)
    got = {m.name: correct(m, tok, ctx) for m in methods}
    assert sum(got["none"]) == 0, f"the model alone must not know the keys: {got}"
    assert sum(got["absorber+futures"]) >= 4, f"absorption fell below the floor (4/{EXAMPLES}): {got}"


def test_the_recommended_config_absorbs_passkeys_whole():
    """The budget the model ships (absorber+recite+gate+futures, absorber_config.json), flushed:
    8/8 on seeds 0-7 when it was made the recommended config (evals/results/eval/flush1x_seed0/),
    about 60 s an example at one thread, so CI asks four of them and allows one miss."""
    torch.manual_seed(0)
    ctx = trained_context(str(MODEL))
    tok, (method,) = build_methods(["absorber+recite+gate+futures"], str(MODEL), ctx, flush=True)
    got = correct(method, tok, ctx, examples=4)
    assert sum(got) >= 3, f"the recommended config fell below the floor (3/4): {got}"
