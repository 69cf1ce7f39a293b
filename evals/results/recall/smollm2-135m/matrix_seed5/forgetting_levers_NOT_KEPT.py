"""Two of issue 12's forgetting levers, run on the recall matrix without changing the engine (a
runtime patch, not kept: neither measured better than replay alone). From the repository root:

    python evals/results/recall/smollm2-135m/matrix_seed5/forgetting_levers_NOT_KEPT.py keep_opt 0 \
        --docs 4 --seed 5 --config '{"replay_rounds":4}' --out keep_opt.json
    python .../forgetting_levers_NOT_KEPT.py anchor 1 --docs 4 --seed 5 --config '{"replay_rounds":4}' --out anchor1.json

keep_opt: each stream's AdamW (its moments and step count) kept across rounds, so a round's first
steps are no longer full-size sign steps whatever its gradient.
anchor W: W · Σ_t ‖A_t B_t − A0_t B0_t‖² / Σ_t ‖A0_t B0_t‖² added to the loss, A0, B0 the round-start
delta: the round pays for moving the delta away from what it held (no anchor in the first round).
The norms come from rank × rank products, ‖A B‖² = Σ (AᵀA) ∘ (B Bᵀ).
"""

import sys

import torch

sys.path.insert(0, ".")
from absorber_engine import round as R  # noqa: E402

lever, value = sys.argv[1], float(sys.argv[2])
sys.argv = [sys.argv[0]] + sys.argv[3:]


def frob(A, B, A0, B0):
    """⟨A B, A0 B0⟩ (Frobenius) from rank × rank products."""
    return ((A.T @ A0) * (B @ B0.T)).sum()


if lever == "keep_opt":
    adamw = torch.optim.AdamW
    kept = {}

    def kept_adamw(params, **kw):        # train_deltas builds one optimizer per delta per round
        params = list(params)
        opt = kept.get(id(params[0]))
        if opt is None or opt.param_groups[0]["params"][0] is not params[0]:
            opt = kept[id(params[0])] = adamw(params, **kw)
        return opt

    torch.optim.AdamW = kept_adamw

if lever == "anchor":
    absorber_round, train_deltas = R.absorber_round, R.train_deltas

    def anchored_round(runner, batch, cfg):
        start = [{n: (d.A[n].detach().clone(), d.B[n].detach().clone()) for n in d.shapes} for d in batch.deltas]

        def train(deltas, loss_fn, cfg):
            def with_anchor(active):
                losses = loss_fn(active)
                for k, i in enumerate(active):
                    with torch.autocast("cpu", enabled=False):
                        den = sum(float(frob(A0, B0, A0, B0)) for A0, B0 in start[i].values())
                        if den <= 0:
                            continue
                        d = deltas[i]
                        num = sum(frob(d.A[n], d.B[n], d.A[n], d.B[n]) - 2 * frob(d.A[n], d.B[n], A0, B0) + frob(A0, B0, A0, B0)
                                  for n, (A0, B0) in start[i].items())
                        penalty = value * num / den
                        penalty.backward()
                        losses[k] += float(penalty.detach())
                return losses
            return train_deltas(deltas, with_anchor, cfg)

        R.train_deltas = train
        try:
            return absorber_round(runner, batch, cfg)
        finally:
            R.train_deltas = train_deltas

    R.ROUNDS["absorber"] = anchored_round

from evals.recall_matrix import main  # noqa: E402

sys.exit(main())
