"""One absorption round: causal synchronization (Algorithm 1 of Absorber LLM), and the TTT baseline.

Teacher (no grad, once per round): the current model, W plus the delta absorbed so far, reads
X followed by each future, and its residual states h^0..h^L at the futures' positions are kept
(with its final states when the KL term is on). The futures are the real continuation Y when the
stream has one, plus `futures` continuations the teacher samples itself after X; the sampled ones
reuse X's KV cache, and their teacher states are recorded while they are sampled, so no future
costs a second teacher pass.

Student (the delta's steps): the same model reads each future alone, without X, and the delta is
trained so its states match the teacher's:

    L = hidden_weight · mean_{positions, layers, dims} |h_student − h_teacher|
      + kl_weight · mean_{positions} KL(p_teacher || p_student)

Futures of one length go through the student as one batch; each group's graph is freed by its
own backward before the next group runs, so peak memory is one group's activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import AbsorberConfig
from .model_support import ModelParts, ResidualCapture, cache_tensors
from .sampling import sample_next


@dataclass
class FutureGroup:
    ids: torch.Tensor                 # (b, t) tokens the student reads with no context
    hidden: list[torch.Tensor]        # L+1 teacher states, each (b, t, D)
    final: torch.Tensor | None        # (b·t, D) teacher final states, for the KL term


@dataclass
class SyncTargets:
    groups: list[FutureGroup]
    positions: int                    # synchronized positions in all groups: the mean's denominator


@dataclass
class RoundResult:
    steps: int
    losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


@torch.no_grad()
def teacher_targets(parts: ModelParts, x: torch.Tensor, y: torch.Tensor, cfg: AbsorberConfig,
                    generator: torch.Generator) -> SyncTargets:
    """x (n,), y (m,) token ids (y may be empty) -> what the student must reproduce."""
    n, m = x.numel(), y.numel()
    need_final = cfg.kl_weight > 0
    n_futures = cfg.futures if m > 0 else max(cfg.futures, 1)   # no real Y: sample at least one
    groups: list[FutureGroup] = []

    xy = torch.cat([x, y])[None]                                           # (1, n + m)
    with ResidualCapture(parts.layers, start=n) as cap:
        final, cache = parts.forward(xy, use_cache=n_futures > 0)
    if m > 0:
        groups.append(FutureGroup(y[None], cap.states, final[0, n:] if need_final else None))
    if n_futures > 0:
        x_kv = cache_tensors(cache, keep=n)
        first_logits = parts.logits(final[:, n - 1])                      # (1, V)
        del cache, cap, final
        groups.append(_sample_futures(parts, x_kv, first_logits, n_futures, cfg, generator, need_final))
    return SyncTargets(groups, sum(g.ids.numel() for g in groups))


def _sample_futures(parts, x_kv, first_logits, count, cfg, generator, need_final) -> FutureGroup:
    """`count` continuations of X sampled by the teacher, batched, with its states at each token."""
    cache = parts.make_cache(x_kv, repeat=count)
    logits = first_logits.expand(count, -1)
    tokens, hidden_steps, final_steps = [], [], []
    for step in range(cfg.future_length):
        tok = sample_next(logits, cfg.future_temperature, cfg.future_top_p, generator)    # (count,)
        tokens.append(tok)
        with ResidualCapture(parts.layers) as cap:
            final, cache = parts.forward(tok[:, None], cache, use_cache=True)           # (count, 1, D)
        hidden_steps.append(cap.states)
        final_steps.append(final)
        if step + 1 < cfg.future_length:
            logits = parts.logits(final[:, -1])
    ids = torch.stack(tokens, dim=1)                                                     # (count, T)
    hidden = [torch.cat([s[layer] for s in hidden_steps], dim=1) for layer in range(parts.num_states)]
    final = torch.cat(final_steps, dim=1).reshape(-1, parts.hidden_size) if need_final else None
    return FutureGroup(ids, hidden, final)


def student_loss(parts: ModelParts, targets: SyncTargets, cfg: AbsorberConfig, ops, backward: bool) -> float:
    """The sync loss of the current delta on every future (and its gradient when `backward`)."""
    total = 0.0
    for g in targets.groups:
        with ResidualCapture(parts.layers) as cap:
            final, _ = parts.forward(g.ids)                                             # (b, t, D)
        loss = final.new_zeros((), dtype=torch.float32)
        if cfg.hidden_weight > 0:
            loss = loss + ops.hidden_l1(cap.states, g.hidden, weight=cfg.hidden_weight, denom=targets.positions)
        if cfg.kl_weight > 0:
            kl = ops.linear_kl(final.reshape(-1, parts.hidden_size), g.final, parts.head.weight, parts.head.bias,
                               temperature=cfg.kl_temperature, top_k=cfg.kl_top_k, denom=targets.positions)
            loss = loss + cfg.kl_weight * kl
        if backward:
            loss.backward()
        total += float(loss.detach())
    return total


def train_delta(delta_params: list[torch.Tensor], loss_fn, cfg: AbsorberConfig) -> RoundResult:
    """Algorithm 1's loop: evaluate, stop below eps, else one AdamW step; at most max_steps steps.

    loss_fn() computes the loss and accumulates its gradient into the delta. A round whose loss
    is NaN/inf, or ends above divergence_factor × its first loss, raises FloatingPointError; the
    caller restores the delta it held before the round.
    """
    opt = torch.optim.AdamW(delta_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    result = RoundResult(steps=0)
    for _ in range(cfg.max_steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        result.losses.append(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the sync loss became {loss} at step {result.steps}")
        if loss < cfg.stop_loss:
            break
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(delta_params, cfg.grad_clip)
        if not all(p.grad is None or torch.isfinite(p.grad).all() for p in delta_params):
            raise FloatingPointError(f"the delta's gradient became NaN or inf at step {result.steps}")
        opt.step()
        result.steps += 1
    opt.zero_grad(set_to_none=True)
    first, last = result.losses[0], result.losses[-1]
    if cfg.divergence_factor > 0 and first > 0 and last > cfg.divergence_factor * first:
        raise FloatingPointError(f"the round diverged: loss went from {first:.4g} to {last:.4g}")
    return result


def absorber_round(parts, delta, x, y, cfg, ops, generator) -> RoundResult:
    targets = teacher_targets(parts, x, y, cfg, generator)
    return train_delta(delta.parameters(), lambda: student_loss(parts, targets, cfg, ops, backward=True), cfg)


def ttt_round(parts, delta, x, y, cfg, ops, generator) -> RoundResult:
    """The baseline: next-token cross-entropy of the contextless model on X itself (Temp-LoRA)."""
    if x.numel() < 2:
        return RoundResult(steps=0)
    ids = x[None]

    def loss_fn() -> float:
        final, _ = parts.forward(ids[:, :-1])
        loss = F.cross_entropy(parts.logits(final[0]), ids[0, 1:])
        loss.backward()
        return float(loss.detach())

    return train_delta(delta.parameters(), loss_fn, cfg)


ROUNDS = {"absorber": absorber_round, "ttt": ttt_round}
