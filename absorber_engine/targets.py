"""What a round hands from its teacher to its student: the batch of rounds it runs, and per stream
the groups of token rows the student reads without X, each with the targets it must reproduce."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .lora import LowRankDelta
from .probes import ProbeFrame


@dataclass
class RoundBatch:
    """The rounds of one batch, all streams with the same |X| and |Y|, built once per batch."""

    deltas: list[LowRankDelta]        # each stream's delta, trained in place
    x: torch.Tensor                   # (S, n) tokens to absorb
    y: torch.Tensor                   # (S, m) real continuations, m may be 0
    generators: list[torch.Generator]    # each stream's sampler, seeded by the round's index in its stream
    prompt: torch.Tensor | None = None   # (k,) tokens every sampled future starts with (future_prompt)
    replay: list[list[torch.Tensor]] = field(default_factory=list)   # per stream, earlier rounds' probes
    frame: ProbeFrame | None = None   # how probes are framed; None: no probes
    surprise: list[list[float]] = field(default_factory=list)   # per stream, recent rounds' first losses

    @property
    def streams(self) -> int:
        return len(self.deltas)


@dataclass
class FutureGroup:
    ids: torch.Tensor                 # (b, t) tokens the student reads with no context
    hidden: list[torch.Tensor]        # L+1 teacher states, each (b, t, D)
    final: torch.Tensor | None        # (b·t, D) teacher final states, for the KL term
    lead: torch.Tensor | None = None  # (b, l) tokens the student reads before `ids`, outside the loss
    mask: torch.Tensor | None = None  # (b, t) bool, False on positions outside the loss (after a probe's end)
    x_span: tuple[int, int] | None = None   # recite probes: (start, length) of X in `ids` (ntp_in_recite)
    replay: bool = False              # earlier rounds' probes (replay_rounds)
    source: LowRankDelta | None = None   # replay: the round-start delta the states are computed from
    text: bool = False                # TTT's replay: the loss is next-token CE on the masked tokens
    teacher_p: tuple[torch.Tensor, torch.Tensor] | None = None   # the KL's teacher side of `final`, kept


@dataclass
class SyncTargets:
    groups: list[FutureGroup]
    positions: int                    # synchronized positions in all groups: the mean's denominator
    layer_scale: list[float] | None = None   # per state h^l, 1 / the teacher's mean |h^l| (hidden_norm)


def positions(g: FutureGroup) -> int:
    return int(g.mask.sum()) if g.mask is not None else g.ids.numel()
