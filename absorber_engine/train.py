"""The optimizer's side of a round: each stream's AdamW steps on its own delta, its early stop,
and its failure (Algorithm 1's loop, train_deltas), the result a round reports per stream, and the
loss scale fp16 activations need."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

from .config import AbsorberConfig
from .model import ModelRunner


@dataclass
class RoundResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    error: str | None = None          # why the round failed; the caller restores the delta
    gated: bool = False               # the surprise gate skipped it: no step taken
    misses: list[int] = field(default_factory=list)   # recite_exact: per check past max_steps, tokens of X short
    read_after: float | None = None   # the loss read after the last step, where the steps ran out (final_fn)

    @property
    def final_loss(self) -> float:
        """The loss of the delta the round keeps."""
        if self.read_after is not None:
            return self.read_after
        return self.losses[-1] if self.losses else float("nan")


class LossScale:
    """The factor a round's backward starts from: 2^16 where the student's activations are fp16 (a
    compute_dtype of float16, or an fp16 model), 1 elsewhere. A loss's gradient at a hidden state is
    its weight over the positions it averages, 1e-8 and below for a hidden L1 over a round, which
    fp16 (smallest subnormal 6e-8) rounds to zero: an fp16 round trained on nothing but the
    next-token loss. The deltas (fp32) get their gradients divided back before the step; a step
    whose gradients overflowed halves the factor and is skipped, as torch.amp's GradScaler does."""

    def __init__(self, runner: ModelRunner):
        fp16 = (runner.compute_dtype or runner.dtype) == torch.float16
        self.value = 2.0 ** 16 if fp16 else 1.0



def train_deltas(deltas: list, loss_fn, cfg: AbsorberConfig, surprise: list | None = None,
                 scale: LossScale | None = None, misses: dict | None = None, final_fn=None) -> list[RoundResult]:
    """Algorithm 1's loop for each stream: evaluate, stop below eps, else one AdamW step; at most
    max_steps steps. loss_fn(active) computes the losses of the streams `active` (indices) and
    accumulates their gradients. A stream whose loss is NaN/inf, or ends above divergence_factor ×
    its first loss, gets an error and leaves the batch; the caller restores its delta. With
    surprise_gate, a stream whose first loss is below surprise_gate × the median of surprise[i]
    (its earlier rounds' first losses) takes no step at all. With `misses` (recite_exact: stream ->
    the tokens of X its recital misses, filled by loss_fn), a stream past max_steps goes on, at most
    cfg.recite_exact steps, until its delta recites X exactly. With `final_fn` (loss_fn's losses, no
    gradient), the streams whose last step no loss has read yet are read once more, so a last step
    that blew the delta up (NaN, inf, or past divergence_factor) fails the round like any other."""
    opts = [torch.optim.AdamW(d.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay) for d in deltas]
    results = [RoundResult() for _ in deltas]
    active = list(range(len(deltas)))
    for step in range(cfg.max_steps + (cfg.recite_exact if misses is not None else 0)):
        if not active:
            break
        for i in active:
            opts[i].zero_grad(set_to_none=True)
        losses = loss_fn(active)
        still, overflow = [], False
        for i, loss in zip(active, losses):
            res, params = results[i], deltas[i].parameters()
            res.losses.append(loss)
            if not math.isfinite(loss):
                res.error = f"the sync loss became {loss} at step {res.steps}"
                continue
            if loss < cfg.stop_loss:
                continue
            if misses is not None and step >= cfg.max_steps:
                res.misses.append(misses[i])
                if misses[i] == 0:
                    continue
            if (cfg.surprise_gate > 0 and len(res.losses) == 1 and surprise and surprise[i]
                    and loss < cfg.surprise_gate * statistics.median(surprise[i])):
                res.gated = True
                continue
            if scale is not None and scale.value != 1.0:
                for p in params:
                    if p.grad is not None:
                        p.grad.div_(scale.value)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if not all(p.grad is None or torch.isfinite(p.grad).all() for p in params):
                if scale is not None and scale.value > 1.0:     # the loss scale overflowed: no step
                    overflow = True
                    still.append(i)
                    continue
                res.error = f"the delta's gradient became NaN or inf at step {res.steps}"
                continue
            opts[i].step()
            res.steps += 1
            still.append(i)
        if overflow:
            scale.value /= 2
        active = still
    if active and final_fn is not None:        # the loop ran out of steps: the last one is unread
        for i, loss in zip(active, final_fn(active)):
            results[i].read_after = loss
            if not math.isfinite(loss):
                results[i].error = f"the sync loss became {loss} after step {results[i].steps}"
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    for res in results:
        first, last = (res.losses[0], res.final_loss) if res.losses else (0.0, 0.0)
        if res.error is None and cfg.divergence_factor > 0 and first > 0 and last > cfg.divergence_factor * first:
            res.error = f"the round diverged: loss went from {first:.4g} to {last:.4g}"
    return results
