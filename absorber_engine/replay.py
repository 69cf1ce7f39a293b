"""Replay: what a round of a stream rehearses of the rounds before it (replay_rounds), so that
documents with the same kinds of facts do not overwrite each other.

Each round that commits leaves its recite exchange (replay_probe) in the stream's bounded buffer.
Later rounds read the buffered rows without context and are trained toward:
- the absorber: the round-start model's own states on them (Dark Experience Replay): the memory as
  it is must be kept. Measured against the alternatives on SmolLM2-135M (docs/recall.md): the states of the
  round that absorbed each row (its teacher reading that X again) collapsed every answer to one
  statement, and the rows' own tokens recalled no more than no replay at all;
- TTT: its own loss, next-token cross-entropy, on the replayed documents (rehearsal).
With replay_batch = k, the student reads k buffered rows a step, in turn (replay_rows); the targets
of the whole buffer are computed once, at the round's start, in one pass without gradient.
"""

from __future__ import annotations

import torch

from .probes import ProbeFrame
from .targets import FutureGroup, RoundBatch


def replay_probe(frame: ProbeFrame | None, x: list[int]) -> torch.Tensor:
    """What later rounds replay of a round that absorbed X (replay_rounds): the student's recite
    exchange of X (its opening, the recite seed, X, the end of turn), or X itself without a frame."""
    if frame is None:
        return torch.tensor(x, dtype=torch.long)
    return torch.tensor(frame.student_open + frame.seeds["recite"] + list(x) + frame.stop[:1], dtype=torch.long)


def replay_groups(runner, batch: RoundBatch, need_final, text: bool = False) -> list[FutureGroup]:
    """Earlier rounds' probes, each stream's right-padded to one (rows, t) shape for the batch. Rows
    a stream lacks, padding and the student's opening are masked out. The targets:
    - states (the absorber): the round-start model's own states on them, read without context, all
      rows at once. Holding them for the round costs rows × t × (L+1) × D floats (about 6 MB a row
      of 80 tokens on SmolLM2-135M); computing a replay_batch's rows again at every step instead
      cost 20 of the chat demo's 290 s.
    - `text` (TTT): none held; the student predicts each replayed X (and its end of turn) token by
      token. The mask then keeps X's tokens only."""
    S, dev = batch.streams, runner.device
    rows = max(len(r) for r in batch.replay)
    t = max(len(q) for r in batch.replay for q in r)
    ids = torch.zeros(S * rows, t, dtype=torch.long, device=dev)
    mask = torch.zeros(S * rows, t, dtype=torch.bool, device=dev)
    skip = len(batch.frame.student_open) if batch.frame is not None else 0
    if text and batch.frame is not None:
        skip += len(batch.frame.seeds["recite"])
    for s, probes in enumerate(batch.replay):
        for i, q in enumerate(probes):
            ids[s * rows + i, :len(q)] = q
            mask[s * rows + i, skip:len(q)] = True
    groups = [FutureGroup(ids[s * rows:(s + 1) * rows], [], None, mask=mask[s * rows:(s + 1) * rows], replay=True,
                          source=d, text=text) for s, d in enumerate(batch.deltas)]
    return groups if text else replay_states(runner, groups, need_final)


@torch.no_grad()
def replay_states(runner, groups: list[FutureGroup], need_final) -> list[FutureGroup]:
    """The replay groups of all streams (as many rows each) with their targets filled in: each
    stream's `source` delta reading the rows alone, masked."""
    rows = groups[0].ids.shape[0]
    runner.bind([g.source for g in groups], rows)
    P = len(runner.prefix)
    with runner.capture(P) as cap:
        final, _ = runner.forward(runner.with_prefix(torch.cat([g.ids for g in groups])))
    out = []
    for s, g in enumerate(groups):
        sl, m = slice(s * rows, (s + 1) * rows), g.mask
        hidden = [h[sl] * m[..., None] for h in cap.states]
        fin = final[sl, P:][m] if need_final else None
        out.append(FutureGroup(g.ids, hidden, fin, mask=m, replay=True))
    return out


def real_rows(grp: FutureGroup) -> int:
    """A stream's replayed rounds in its replay group; the rows after them pad it to the batch's
    largest buffer, so the group's shape is not the stream's own (alone and batched then differed)."""
    return int(grp.mask.any(dim=1).sum())


def replay_rows(grp: FutureGroup, step: int, k: int) -> tuple[FutureGroup, float]:
    """The k replayed rows (and their targets) one stream's student reads at `step` (replay_batch),
    taken in turn so every earlier round is read as often as the others, and their weight: the
    stream's replayed rounds / k, so that over a cycle the replay weighs what the whole buffer read
    at every step does."""
    real = real_rows(grp)
    rows = torch.arange(k) if real <= k else (step * k + torch.arange(k)) % real
    counts = grp.mask.sum(dim=1).tolist()
    starts = [sum(counts[:r]) for r in rows.tolist()]

    def positions(t):                                             # (positions, ...): the rows' masked positions in turn
        return None if t is None else torch.cat([t[a:a + counts[r]] for a, r in zip(starts, rows.tolist())])

    kept = None if grp.teacher_p is None else (positions(grp.teacher_p[0]), positions(grp.teacher_p[1]))
    rows = rows.to(grp.ids.device)
    sub = FutureGroup(grp.ids[rows], [h[rows] for h in grp.hidden], positions(grp.final), mask=grp.mask[rows],
                      replay=True, text=grp.text, teacher_p=kept)
    return sub, (real / k if real > k else float(real > 0))       # 0: nothing to replay yet
