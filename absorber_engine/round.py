"""One absorption round for a batch of streams of the same shape, each with its own delta:
causal synchronization (Algorithm 1 of Absorber LLM), and the TTT baseline.

    targets = teacher_targets(runner, batch, cfg)         teacher.py: no grad, once per round
    for each step (train_deltas):
        student_losses(...)                               the delta's forward and backward
        AdamW step per stream

The student, the same model without X, reads each group of rows the teacher left (Y, sampled
futures, probes, replayed probes) and its delta is trained so its states match the teacher's:

    L = hidden_weight · mean_{positions, layers, dims} |h_student − h_teacher|   (per layer normalized)
      + kl_weight · mean_{positions} KL(p_teacher || p_student)
      + ntp_weight · next-token cross-entropy on X                               (TTT's loss)

Rows of one group go through the student as one batch (all streams together, each row reading its
own stream's delta); each group's graph is freed by its own backward before the next group runs.
Every stream has its own AdamW, its own early stop and its own failure: a stream whose loss turns
NaN/inf or diverges leaves the batch with an error and the others go on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .config import AbsorberConfig
from .model import ModelRunner
from .replay import replay_groups, replay_rows, replay_states
from .targets import RoundBatch, SyncTargets
from .teacher import teacher_targets


@dataclass
class RoundResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    error: str | None = None          # why the round failed; the caller restores the delta

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def absorber_round(runner: ModelRunner, batch: RoundBatch, cfg: AbsorberConfig) -> list[RoundResult]:
    targets = teacher_targets(runner, batch, cfg)
    in_recite = cfg.ntp_in_recite and any(g.x_span is not None for g in targets[0].groups)
    xs = batch.x if batch.x.shape[1] + len(runner.prefix) >= 2 and not in_recite else None   # (S, n)

    step = iter(range(cfg.max_steps))

    def loss_fn(active):
        return student_losses(runner, [batch.deltas[i] for i in active], [targets[i] for i in active], cfg,
                              backward=True, xs=xs[active] if xs is not None else None, step=next(step))

    return train_deltas(batch.deltas, loss_fn, cfg)


def ttt_round(runner: ModelRunner, batch: RoundBatch, cfg: AbsorberConfig) -> list[RoundResult]:
    """The baseline: next-token cross-entropy of the contextless model on X itself (Temp-LoRA), and
    with replay_rounds on the replayed rounds' X too (rehearsal)."""
    if batch.x.shape[1] + len(runner.prefix) < 2:
        return [RoundResult() for _ in batch.deltas]
    replay = None
    if any(batch.replay):
        replay = [SyncTargets([g], 0) for g in replay_groups(runner, batch, False, cfg.replay_batch, text=True)]
    step = iter(range(cfg.max_steps))

    def loss_fn(active):
        deltas = [batch.deltas[i] for i in active]
        losses = next_token_losses(runner, deltas, batch.x[active], cfg, 1.0, backward=True)
        if replay is not None:
            extra = student_losses(runner, deltas, [replay[i] for i in active], cfg, backward=True, step=next(step))
            losses = [a + b for a, b in zip(losses, extra)]
        return losses

    return train_deltas(batch.deltas, loss_fn, cfg)


ROUNDS = {"absorber": absorber_round, "ttt": ttt_round}


def student_losses(runner: ModelRunner, deltas: list, targets: list[SyncTargets], cfg: AbsorberConfig,
                   backward: bool, xs: torch.Tensor | None = None, step: int = 0) -> list[float]:
    """Each stream's loss under its current delta (and the gradient, when `backward`) at step
    `step` of the round (which replayed rows it reads, with replay_batch)."""
    S, P = len(deltas), len(runner.prefix)
    losses = [0.0] * S
    runner.bind(deltas)
    for g in range(len(targets[0].groups)):
        groups = [t.groups[g] for t in targets]
        weights = [1.0] * S
        if groups[0].replay and 0 < cfg.replay_batch < groups[0].ids.shape[0]:   # this step's replayed rows
            groups, weights = zip(*[replay_rows(grp, step, cfg.replay_batch) for grp in groups])
            if groups[0].text:                            # a mean over the rows read: a cycle weighs the buffer
                weights = [float(w > 0) for w in weights]
            else:                                         # the absorber's: their targets, computed now
                groups = replay_states(runner, list(groups), cfg.kl_weight > 0, [t.layer_scale for t in targets])
                runner.bind(deltas)
        rows = groups[0].ids.shape[0]
        runner.set_rows(rows)
        ids = torch.cat([grp.ids for grp in groups])
        lead = 0
        if groups[0].lead is not None:
            lead = groups[0].lead.shape[1]
            ids = torch.cat([torch.cat([grp.lead for grp in groups]), ids], dim=1)
        with runner.capture(P + lead) as cap, runner.checkpointed(cfg.checkpoint_layers):
            final, _ = runner.forward(runner.with_prefix(ids))                    # (S·rows, P + lead + t, D)
        final = final[:, P + lead:]
        total = final.new_zeros((), dtype=torch.float32)
        for s, (grp, tgt) in enumerate(zip(groups, targets)):
            sl = slice(s * rows, (s + 1) * rows)
            if weights[s] == 0:
                continue
            if grp.text:
                if not grp.mask[:, 1:].any():
                    continue
                loss = weights[s] * _text_loss(runner, final[sl], grp)
            else:
                loss = weights[s] * _sync_loss(runner, [h[sl] for h in cap.states], final[sl], grp, tgt, cfg)
            if grp.x_span is not None and cfg.ntp_in_recite and cfg.ntp_weight > 0:
                loss = loss + cfg.ntp_weight * _recite_next_token_loss(runner, final[sl], grp)
            losses[s] += float(loss.detach())
            total = total + loss
        if backward and total.requires_grad:
            total.backward()
    if cfg.ntp_weight > 0 and xs is not None:
        for s, ce in enumerate(next_token_losses(runner, deltas, xs, cfg, cfg.ntp_weight, backward)):
            losses[s] += ce
    return losses


def _sync_loss(runner, states, final, grp, tgt: SyncTargets, cfg) -> torch.Tensor:
    """One stream's hidden L1 and KL on one group: `states` its student's h^0..h^L, `final` its
    final states (rows, t, D)."""
    loss = final.new_zeros((), dtype=torch.float32)
    if cfg.hidden_weight > 0:
        if grp.mask is not None:
            states = [h * grp.mask[..., None] for h in states]
        if tgt.layer_scale is not None:
            states = [h * scale for h, scale in zip(states, tgt.layer_scale)]
        loss = loss + runner.ops.hidden_l1(states, grp.hidden, weight=cfg.hidden_weight, denom=tgt.positions)
    if cfg.kl_weight > 0:
        student = final if grp.mask is None else final[grp.mask]
        kl = runner.ops.linear_kl(student.reshape(-1, runner.hidden_size), grp.final, runner.head.weight,
                                  runner.head.bias, temperature=cfg.kl_temperature, top_k=cfg.kl_top_k,
                                  denom=tgt.positions)
        loss = loss + cfg.kl_weight * kl
    return loss


def _text_loss(runner, final, grp) -> torch.Tensor:
    """Next-token cross-entropy of replayed rows on their own tokens inside the mask (TTT's replay),
    averaged over those tokens: each predicted from the position before it."""
    target = grp.mask[:, 1:]
    return _cross_entropy(runner, final[:, :-1][target], grp.ids[:, 1:][target])


def _recite_next_token_loss(runner, final, grp) -> torch.Tensor:
    """TTT's loss read off the recite probe's pass: each token of X predicted from the position
    before it (X's first token from the seed's last)."""
    start, n = grp.x_span
    return _cross_entropy(runner, final[:, start - 1:start - 1 + n], grp.ids[:, start:start + n])


def _cross_entropy(runner, final, targets) -> torch.Tensor:
    """Mean next-token cross-entropy of final states (..., D) against targets (...), from the LM
    head chunk by chunk: no tokens × vocabulary logits are kept for the backward."""
    head = runner.head
    return runner.ops.linear_ce(final.reshape(-1, runner.hidden_size), targets.reshape(-1), head.weight, head.bias)


def next_token_losses(runner: ModelRunner, deltas: list, xs: torch.Tensor, cfg, weight: float,
                      backward: bool) -> list[float]:
    """weight × the contextless model's next-token cross-entropy on each stream's X (S, n): TTT's
    loss, alone (objective "ttt") or beside synchronization (ntp_weight)."""
    runner.bind(deltas)
    ids = runner.with_prefix(xs)
    with runner.checkpointed(cfg.checkpoint_layers):
        final, _ = runner.forward(ids[:, :-1])
    per_stream = weight * torch.stack([_cross_entropy(runner, final[s], ids[s, 1:]) for s in range(len(deltas))])
    if backward:
        per_stream.sum().backward()
    return per_stream.detach().tolist()


def train_deltas(deltas: list, loss_fn, cfg: AbsorberConfig) -> list[RoundResult]:
    """Algorithm 1's loop for each stream: evaluate, stop below eps, else one AdamW step; at most
    max_steps steps. loss_fn(active) computes the losses of the streams `active` (indices) and
    accumulates their gradients. A stream whose loss is NaN/inf, or ends above divergence_factor ×
    its first loss, gets an error and leaves the batch; the caller restores its delta."""
    opts = [torch.optim.AdamW(d.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay) for d in deltas]
    results = [RoundResult() for _ in deltas]
    active = list(range(len(deltas)))
    for _ in range(cfg.max_steps):
        if not active:
            break
        for i in active:
            opts[i].zero_grad(set_to_none=True)
        losses = loss_fn(active)
        still = []
        for i, loss in zip(active, losses):
            res, params = results[i], deltas[i].parameters()
            res.losses.append(loss)
            if not math.isfinite(loss):
                res.error = f"the sync loss became {loss} at step {res.steps}"
                continue
            if loss < cfg.stop_loss:
                continue
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if not all(p.grad is None or torch.isfinite(p.grad).all() for p in params):
                res.error = f"the delta's gradient became NaN or inf at step {res.steps}"
                continue
            opts[i].step()
            res.steps += 1
            still.append(i)
        active = still
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    for res in results:
        first, last = (res.losses[0], res.losses[-1]) if res.losses else (0.0, 0.0)
        if res.error is None and cfg.divergence_factor > 0 and first > 0 and last > cfg.divergence_factor * first:
            res.error = f"the round diverged: loss went from {first:.4g} to {last:.4g}"
    return results
