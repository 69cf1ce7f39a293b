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

Rows of groups of about the same length go through the student as one batch (all streams together,
each row reading its own stream's delta; _passes); each pass's graph is freed by its own backward
before the next pass runs.
Every stream has its own AdamW, its own early stop and its own failure: a stream whose loss turns
NaN/inf or diverges leaves the batch with an error and the others go on.
"""

from __future__ import annotations

import torch

from absorber_kernels.frozen_linear import kept_casts

from . import recital
from .config import AbsorberConfig
from .model import ModelRunner
from .replay import replay_groups, replay_rows
from .targets import FutureGroup, RoundBatch, SyncTargets
from .teacher import teacher_targets
from .train import LossScale, RoundResult, train_deltas


@kept_casts()          # each frozen weight cast to the compute dtype once a round, not at every pass
def absorber_round(runner: ModelRunner, batch: RoundBatch, cfg: AbsorberConfig) -> list[RoundResult]:
    targets = teacher_targets(runner, batch, cfg)
    scale = LossScale(runner)
    in_recite = cfg.ntp_in_recite and any(g.x_span is not None for g in targets[0].groups)
    xs = batch.x if batch.x.shape[1] + len(runner.prefix) >= 2 and not in_recite else None   # (S, n)

    step = iter(range(cfg.max_steps + cfg.recite_exact))
    misses = {} if cfg.recite_exact and any(g.x_span is not None for g in targets[0].groups) else None

    def loss_fn(active):
        at = next(step)
        got = [0] * len(active) if misses is not None and at >= cfg.max_steps else None    # checked past max_steps
        losses = student_losses(runner, [batch.deltas[i] for i in active], [targets[i] for i in active], cfg,
                                backward=True, xs=xs[active] if xs is not None else None, step=at,
                                scale=scale.value, misses=got)
        if got is not None:
            misses.update(zip(active, got))
        return losses

    def final_fn(active):
        with torch.no_grad():
            return student_losses(runner, [batch.deltas[i] for i in active], [targets[i] for i in active], cfg,
                                  backward=False, xs=xs[active] if xs is not None else None, step=cfg.max_steps)

    return train_deltas(batch.deltas, loss_fn, cfg, batch.surprise, scale, misses, final_fn)


@kept_casts()
def ttt_round(runner: ModelRunner, batch: RoundBatch, cfg: AbsorberConfig) -> list[RoundResult]:
    """The baseline: next-token cross-entropy of the contextless model on X itself (Temp-LoRA), and
    with replay_rounds on the replayed rounds' X too (rehearsal)."""
    if batch.x.shape[1] + len(runner.prefix) < 2:
        return [RoundResult() for _ in batch.deltas]
    replay = None
    if any(batch.replay):
        replay = [SyncTargets([g], 0) for g in replay_groups(runner, batch, False, text=True)]
    step = iter(range(cfg.max_steps))
    scale = LossScale(runner)

    def loss_fn(active, backward=True):
        deltas = [batch.deltas[i] for i in active]
        losses = next_token_losses(runner, deltas, batch.x[active], cfg, 1.0, backward=backward, scale=scale.value)
        if replay is not None:
            extra = student_losses(runner, deltas, [replay[i] for i in active], cfg, backward=backward,
                                   step=next(step, cfg.max_steps), scale=scale.value)
            losses = [a + b for a, b in zip(losses, extra)]
        return losses

    def final_fn(active):
        with torch.no_grad():
            return loss_fn(active, backward=False)

    return train_deltas(batch.deltas, loss_fn, cfg, batch.surprise, scale, final_fn=final_fn)


ROUNDS = {"absorber": absorber_round, "ttt": ttt_round}


def student_losses(runner: ModelRunner, deltas: list, targets: list[SyncTargets], cfg: AbsorberConfig,
                   backward: bool, xs: torch.Tensor | None = None, step: int = 0, scale: float = 1.0,
                   misses: list[int] | None = None) -> list[float]:
    """Each stream's loss under its current delta (and the gradient, when `backward`, of `scale` x
    the loss: LossScale) at step `step` of the round (which replayed rows it reads, with replay_batch);
    with `misses`, each stream's count of X's tokens its recite probe misses is added there."""
    losses = [0.0] * len(deltas)
    read = [_read_at(t, cfg, step) for t in targets]
    runner.bind(deltas)
    for part in _passes([grp for grp, _ in read[0]]):
        _student_pass(runner, [[r[i] for i in part] for r in read], targets, cfg, scale if backward else 0.0, losses,
                      misses)
    if cfg.ntp_weight > 0 and xs is not None:
        for s, ce in enumerate(next_token_losses(runner, deltas, xs, cfg, cfg.ntp_weight, backward, scale)):
            losses[s] += ce
    return losses


def _read_at(t: SyncTargets, cfg: AbsorberConfig, step: int) -> list[tuple[FutureGroup, float]]:
    """The groups one stream's student reads at `step`, each with its weight: every group whole, but a
    replay buffer read k rows a step (replay_batch; as many padded rows for every stream), and none at
    step 0, where its targets are the states of the delta the student still is: its L1 is rounding
    noise, whose gradient (the sign, at full size) trained a stream batched otherwise than alone."""
    out = []
    for grp in t.groups:
        if grp.replay and not grp.text and step == 0:
            continue
        weight = 1.0
        if grp.replay and 0 < cfg.replay_batch < grp.ids.shape[0]:
            grp, weight = replay_rows(grp, step, cfg.replay_batch)
            if grp.text:                                  # a mean over the rows read: a cycle weighs the buffer
                weight = float(weight > 0)
        out.append((grp, weight))
    return out


def _passes(groups: list[FutureGroup], slack: float = 0.25) -> list[list[int]]:
    """Which groups share a student pass: consecutive groups, their rows right-padded to the
    longest, joined while the padding stays within `slack` of the tokens read. One pass over a
    round's recite probe and the replayed row it reads, instead of two, casts the frozen weights
    half as often (benchmarks/student_pass.py: 1.03x a round alone, 1.17x with the kept KL)."""
    out: list[list[int]] = []
    for i in range(len(groups)):
        part = (out[-1] if out else []) + [i]
        rows = [groups[j].ids.shape[0] for j in part]
        widths = [_width(groups[j]) for j in part]
        if out and sum(rows) * max(widths) <= (1 + slack) * sum(r * w for r, w in zip(rows, widths)):
            out[-1] = part
        else:
            out.append([i])
    return out


def _width(grp: FutureGroup) -> int:
    return grp.ids.shape[1] + (grp.lead.shape[1] if grp.lead is not None else 0)


def _student_pass(runner: ModelRunner, read: list[list[tuple[FutureGroup, float]]], targets: list[SyncTargets],
                  cfg: AbsorberConfig, backward_scale: float, losses: list[float], misses: list[int] | None) -> None:
    """One forward (and backward) of the student over the groups read[s] of every stream s: all
    their rows in one batch, stream-major, each row its lead then its tokens, right-padded (causal
    attention: the padding changes no real position); each group's loss read off its own rows and
    positions, added to `losses`. The graph is freed by its backward before the next pass."""
    P = len(runner.prefix)
    first = [grp for grp, _ in read[0]]
    leads = [_width(grp) - grp.ids.shape[1] for grp in first]
    rows = [grp.ids.shape[0] for grp in first]
    width = max(_width(grp) for grp in first)
    seqs = []
    for stream in read:
        for grp, _ in stream:
            seq = grp.ids if grp.lead is None else torch.cat([grp.lead, grp.ids], dim=1)
            seqs.append(torch.nn.functional.pad(seq, (0, width - seq.shape[1])))
    runner.set_rows(sum(rows))
    skip = min(leads)
    with runner.capture(P + skip) as cap, runner.checkpointed(cfg.checkpoint_layers):
        final, _ = runner.forward(runner.with_prefix(torch.cat(seqs)))       # (S·rows, P + width, D)
    final = final[:, P + skip:]
    total = final.new_zeros((), dtype=torch.float32)
    row = 0
    for s, stream in enumerate(read):
        for (grp, weight), lead, n in zip(stream, leads, rows):
            sl, at = slice(row, row + n), slice(lead - skip, lead - skip + grp.ids.shape[1])
            row += n
            if weight == 0 or (grp.text and not grp.mask[:, 1:].any()):
                continue
            fin = final[sl, at]
            if grp.text:
                loss = weight * _text_loss(runner, fin, grp)
            else:
                loss = weight * _sync_loss(runner, [h[sl, at] for h in cap.states], fin, grp, targets[s], cfg)
                if misses is not None and grp.x_span is not None:
                    misses[s] += recital.misses(runner, fin, grp)
            losses[s] += float(loss.detach())
            total = total + loss
    if backward_scale and total.requires_grad:            # 0: no backward; else the round's LossScale
        (total * backward_scale if backward_scale != 1.0 else total).backward()


def _sync_loss(runner, states, final, grp, tgt: SyncTargets, cfg) -> torch.Tensor:
    """One stream's hidden L1 and KL on one group: `states` its student's h^0..h^L, `final` its
    final states (rows, t, D); on a recite probe with ntp_in_recite, plus the next-token loss on X."""
    loss = final.new_zeros((), dtype=torch.float32)
    ntp = grp.x_span is not None and cfg.ntp_in_recite and cfg.ntp_weight > 0
    if cfg.hidden_weight > 0:
        if grp.mask is not None:
            states = [h * grp.mask[..., None] for h in states]
        if tgt.layer_scale is not None:
            states = [h * scale for h, scale in zip(states, tgt.layer_scale)]
        loss = loss + runner.ops.hidden_l1(states, grp.hidden, weight=cfg.hidden_weight, denom=tgt.positions)
    if cfg.kl_weight > 0:
        student = final if grp.mask is None else final[grp.mask]
        if ntp and grp.teacher_p is not None and cfg.kl_temperature == 1.0 and (grp.mask is None or grp.mask.all()):
            # Both losses from one product with the LM head: the KL on every position, the
            # cross-entropy on those that predict X (a mean over them, weighted ntp_weight).
            ce = runner.ops.linear_ce(student.reshape(-1, runner.hidden_size), _recite_targets(grp), runner.head_weight(),
                                      runner.head.bias, teacher_p=grp.teacher_p,
                                      kl_weight=cfg.kl_weight / (cfg.ntp_weight * tgt.positions))
            return loss + cfg.ntp_weight * ce
        kl = runner.ops.linear_kl(student.reshape(-1, runner.hidden_size), grp.final, runner.head_weight(),
                                  runner.head.bias, temperature=cfg.kl_temperature, top_k=cfg.kl_top_k,
                                  denom=tgt.positions, teacher_p=grp.teacher_p)
        loss = loss + cfg.kl_weight * kl
    if ntp:
        loss = loss + cfg.ntp_weight * _recite_next_token_loss(runner, final, grp)
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


def _recite_targets(grp) -> torch.Tensor:
    """_recite_next_token_loss's targets laid on the recite probe's synchronized positions: the
    next token of X where a position predicts one, −1 (no cross-entropy) elsewhere."""
    start, n = grp.x_span
    out = torch.full_like(grp.ids, -1)
    out[:, start - 1:start - 1 + n] = grp.ids[:, start:start + n]
    return out.reshape(-1) if grp.mask is None else out[grp.mask]


def _cross_entropy(runner, final, targets) -> torch.Tensor:
    """Mean next-token cross-entropy of final states (..., D) against targets (...), from the LM
    head chunk by chunk: no tokens × vocabulary logits are kept for the backward."""
    return runner.ops.linear_ce(final.reshape(-1, runner.hidden_size), targets.reshape(-1), runner.head_weight(),
                                runner.head.bias)


def next_token_losses(runner: ModelRunner, deltas: list, xs: torch.Tensor, cfg, weight: float,
                      backward: bool, scale: float = 1.0) -> list[float]:
    """weight × the contextless model's next-token cross-entropy on each stream's X (S, n): TTT's
    loss, alone (objective "ttt") or beside synchronization (ntp_weight)."""
    runner.bind(deltas)
    ids = runner.with_prefix(xs)
    with runner.checkpointed(cfg.checkpoint_layers):
        final, _ = runner.forward(ids[:, :-1])
    per_stream = weight * torch.stack([_cross_entropy(runner, final[s], ids[s, 1:]) for s in range(len(deltas))])
    if backward:
        (per_stream.sum() * scale if scale != 1.0 else per_stream.sum()).backward()
    return per_stream.detach().tolist()
