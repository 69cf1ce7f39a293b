"""Replay: what a round of a stream rehearses of the rounds before it (replay_rounds), so that
documents with the same kinds of facts do not overwrite each other.

Each round that commits leaves its recite exchange (replay_probe) in the stream's bounded buffer.
Later rounds read the buffered rows without context, trained toward one of (replay_target):
- "states": the round-start model's own states on them: the memory as it is must be kept;
- "teacher": the states of the round that absorbed each: the round-start model reads that round's
  X in its frame, then the recite exchange, as that round's teacher did;
- "text": the document's own tokens (next-token loss), no states held.
With replay_batch = k, the student reads k buffered rows a step, in turn (replay_rows).
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


def replay_groups(runner, batch: RoundBatch, need_final, cfg) -> list[FutureGroup]:
    """Earlier rounds' probes, each stream's right-padded to one (rows, t) shape for the batch. Rows
    a stream lacks, padding and the student's opening are masked out. The targets (replay_target):
    - "states": the round-start model's own states on them, read without any context (the memory as
      it is must be kept). When the student reads only replay_batch rows a step and there are more,
      the states are left to replay_states at each step, from a frozen copy of the round-start
      delta, so the targets held stay those of replay_batch rows however long the buffer.
    - "text": none held: the student predicts each replayed X (and its end of turn) token by token,
      the document itself being a target that no later round blurs. The mask keeps X's tokens."""
    S, dev = batch.streams, runner.device
    rows = max(len(r) for r in batch.replay)
    t = max(len(q) for r in batch.replay for q in r)
    ids = torch.zeros(S * rows, t, dtype=torch.long, device=dev)
    mask = torch.zeros(S * rows, t, dtype=torch.bool, device=dev)
    skip = len(batch.frame.student_open) if batch.frame is not None else 0
    text = cfg.replay_target == "text"
    if text and batch.frame is not None:
        skip += len(batch.frame.seeds["recite"])
    for s, probes in enumerate(batch.replay):
        for i, q in enumerate(probes):
            ids[s * rows + i, :len(q)] = q
            mask[s * rows + i, skip:len(q)] = True
    groups = [FutureGroup(ids[s * rows:(s + 1) * rows], [], None, mask=mask[s * rows:(s + 1) * rows], replay=True,
                          source=d, text=text) for s, d in enumerate(batch.deltas)]
    if text:
        return groups
    if cfg.replay_target == "teacher":
        return [_reread_states(runner, batch, g, need_final) for g in groups]
    if 0 < cfg.replay_batch < rows:
        for g in groups:
            g.source = g.source.frozen()
        return groups
    return replay_states(runner, groups, need_final)


@torch.no_grad()
def _reread_states(runner, batch: RoundBatch, g: FutureGroup, need_final) -> FutureGroup:
    """One stream's replay rows with the targets of the round that absorbed each: the round-start
    model reads that round's X in its frame, then the recite probe, as the absorbing round's teacher
    did; X is cut back out of the row (opening, seed, X, end of turn)."""
    frame = batch.frame
    open_, close = (frame.context_open, frame.context_close) if frame is not None else ([], [])
    skip = len(frame.student_open) if frame is not None else 0
    head = skip + (len(frame.seeds["recite"]) if frame is not None else 0)
    tail = 1 if frame is not None and frame.stop else 0
    runner.bind([g.source])
    P, L = len(runner.prefix), None
    hidden, finals = None, []
    for i in range(g.ids.shape[0]):
        n = int(g.mask[i].sum())
        if n == 0:
            continue
        row = g.ids[i, skip:skip + n]
        x = g.ids[i, head:skip + n - tail] if frame is not None else row
        before = torch.tensor(open_, dtype=torch.long, device=row.device)
        after = torch.tensor(close, dtype=torch.long, device=row.device)
        seq = torch.cat([before, x, after, row])[None]
        start = P + len(open_) + len(x) + len(close)
        with runner.capture(start) as cap:
            final, _ = runner.forward(runner.with_prefix(seq))
        if hidden is None:
            L = len(cap.states)
            hidden = [torch.zeros(*g.ids.shape, runner.hidden_size, dtype=cap.states[0].dtype, device=row.device)
                      for _ in range(L)]
        for layer in range(L):
            hidden[layer][i, skip:skip + n] = cap.states[layer][0]
        if need_final:
            finals.append(final[0, start:])
    fin = torch.cat(finals) if need_final and finals else None
    return FutureGroup(g.ids, hidden or [], fin, mask=g.mask, replay=True, source=g.source)


@torch.no_grad()
def replay_states(runner, groups: list[FutureGroup], need_final, layer_scale=None) -> list[FutureGroup]:
    """The replay groups of all streams (as many rows each) with their targets filled in: each
    stream's `source` delta reading the rows alone, masked; scaled by each stream's layer_scale
    (hidden_norm) when given. Leaves the sources bound."""
    rows = groups[0].ids.shape[0]
    runner.bind([g.source for g in groups], rows)
    P = len(runner.prefix)
    with runner.capture(P) as cap:
        final, _ = runner.forward(runner.with_prefix(torch.cat([g.ids for g in groups])))
    out = []
    for s, g in enumerate(groups):
        sl, m = slice(s * rows, (s + 1) * rows), g.mask
        hidden = [h[sl] * m[..., None] for h in cap.states]
        if layer_scale is not None and layer_scale[s] is not None:
            hidden = [h * scale for h, scale in zip(hidden, layer_scale[s])]
        fin = final[sl, P:][m] if need_final else None
        out.append(FutureGroup(g.ids, hidden, fin, mask=m, replay=True, source=g.source))
    return out


def replay_rows(grp: FutureGroup, step: int, k: int) -> tuple[FutureGroup, float]:
    """The k replayed rows one stream's student reads at `step` (replay_batch), taken in turn so
    every earlier round is read as often as the others, and their weight: the stream's replayed
    rounds / k, so that over a cycle the replay weighs what the whole buffer read at every step does."""
    real = int(grp.mask.any(dim=1).sum())                         # the stream's earlier rounds (rows after are padding)
    rows = torch.arange(k) if real <= k else (step * k + torch.arange(k)) % real
    rows = rows.to(grp.ids.device)
    final = None
    if grp.final is not None:                                     # held targets ("teacher"): rows of the flat final
        ends = grp.mask.sum(dim=1).cumsum(0).tolist()
        final = torch.cat([grp.final[(ends[r - 1] if r else 0):ends[r]] for r in rows.tolist()])
    sub = FutureGroup(grp.ids[rows], [h[rows] for h in grp.hidden], final, mask=grp.mask[rows], replay=True,
                      source=grp.source, text=grp.text)
    return sub, (real / k if real > k else float(real > 0))       # 0: nothing to replay yet
