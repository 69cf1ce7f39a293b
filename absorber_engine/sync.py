"""One absorption round: causal synchronization (Algorithm 1 of Absorber LLM), and the TTT baseline,
for one stream or a batch of streams of the same shape, each with its own delta.

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

Self-study probes (probes.py, `probes`) are the lever on real models: the teacher reads X framed as
the model's chat template frames a system message and answers seed instructions about it (or, for
"recite", re-reads X in its answer); the student reads the exchange without X. Replayed probes of
earlier rounds (`replay_rounds`) are synchronized to the round-start model itself, so new rounds do
not wear out old ones. `ntp_weight` adds TTT's next-token loss on X.

Futures of one length go through the student as one batch (all streams' rows together, each row
reading its own stream's delta); each group's graph is freed by its own backward before the next
group runs. Every stream has its own AdamW, its own early stop and its own failure: a stream whose
loss turns NaN/inf or diverges leaves the batch with an error and the others go on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import AbsorberConfig
from .delta import LowRankDelta, bind, set_rows
from .model_support import ModelParts, ResidualCapture, cache_tensors, checkpointed
from .probes import FORCED_KINDS, ProbeFrame, answer_mask, kinds_per_round
from .sampling import sample_next


@dataclass
class StreamRound:
    """One stream's part of a round."""

    delta: LowRankDelta
    x: torch.Tensor                   # (n,) tokens to absorb
    y: torch.Tensor                   # (m,) real continuation, may be empty
    generator: torch.Generator        # samples this stream's futures
    prompt: torch.Tensor | None = None   # (k,) tokens every sampled future starts with (future_prompt)
    replay: list[torch.Tensor] = field(default_factory=list)   # earlier rounds' probes (1-D ids), replay_rounds


@dataclass
class FutureGroup:
    ids: torch.Tensor                 # (b, t) tokens the student reads with no context
    hidden: list[torch.Tensor]        # L+1 teacher states, each (b, t, D)
    final: torch.Tensor | None        # (b·t, D) teacher final states, for the KL term
    lead: torch.Tensor | None = None  # (b, l) tokens the student reads before `ids`, outside the loss
    mask: torch.Tensor | None = None  # (b, t) bool, False on positions outside the loss (after a probe's end)
    kl_cache: dict = field(default_factory=dict)   # the teacher's distribution, built at the first step


@dataclass
class SyncTargets:
    groups: list[FutureGroup]
    positions: int                    # synchronized positions in all groups: the mean's denominator
    layer_scale: list[float] | None = None   # per state h^l, 1 / the teacher's mean |h^l| (hidden_norm)


@dataclass
class RoundResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    error: str | None = None          # why the round failed; the caller restores the delta

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


@torch.no_grad()
def teacher_targets(parts: ModelParts, wrappers, rounds: list[StreamRound], cfg: AbsorberConfig,
                    frame: ProbeFrame | None = None) -> list[SyncTargets]:
    """What each stream's student must reproduce. All rounds share |X| and |Y|."""
    S, n, m = len(rounds), rounds[0].x.numel(), rounds[0].y.numel()
    need_final = cfg.kl_weight > 0
    probing = frame is not None and cfg.probes > 0
    n_futures = cfg.futures if (m > 0 or probing) else max(cfg.futures, 1)   # something to sync on
    per_stream: list[list[FutureGroup]] = [[] for _ in rounds]

    if m > 0 or n_futures > 0:        # with probes alone, the teacher reads X in the probes' frame only
        _y_and_futures(parts, wrappers, rounds, cfg, n_futures, need_final, per_stream)
    if probing:
        for s, group in enumerate(_self_study(parts, wrappers, rounds, cfg, frame, need_final)):
            per_stream[s].extend(group)
    if any(r.replay for r in rounds):
        for s, group in enumerate(_replay(parts, wrappers, rounds, cfg, frame, need_final)):
            per_stream[s].append(group)
    out = [SyncTargets(groups, sum(int(g.mask.sum()) if g.mask is not None else g.ids.numel() for g in groups))
           for groups in per_stream]
    if cfg.hidden_norm:
        for t in out:
            _normalize_layers(t)
    return out


def _y_and_futures(parts, wrappers, rounds, cfg, n_futures, need_final, per_stream) -> None:
    """The real Y's group (teacher over X·Y) and the sampled futures' group of every stream."""
    S, n, m = len(rounds), rounds[0].x.numel(), rounds[0].y.numel()
    bind(wrappers, [r.delta for r in rounds])
    set_rows(wrappers, S, 1, parts.device)
    P = len(parts.prefix)
    xy = parts.with_prefix(torch.stack([torch.cat([r.x, r.y]) for r in rounds]))     # (S, P + n + m)
    with ResidualCapture(parts.layers, start=P + n) as cap:
        final, cache = parts.forward(xy, use_cache=n_futures > 0)
    if m > 0:
        for s, r in enumerate(rounds):
            per_stream[s].append(FutureGroup(r.y[None], [h[s:s + 1] for h in cap.states],
                                             final[s, P + n:] if need_final else None))
    if n_futures > 0:
        # Futures follow X·Y (the student then reads Y before them, as generate() reads the window
        # before a prompt), or X alone when futures_follow_y is off or there is no Y.
        after_y = cfg.futures_follow_y and m > 0
        keep = P + n + (m if after_y else 0)
        x_kv = cache_tensors(cache, keep=keep)
        first_logits = parts.logits(final[:, keep - 1])                            # (S, V)
        del cache, cap, final
        sampled = _sample_futures(parts, wrappers, x_kv, first_logits, n_futures, cfg, rounds, need_final,
                                  rounds[0].prompt, cfg.future_length, cfg.future_temperature, cfg.future_top_p)
        for s, r in enumerate(rounds):
            rows = slice(s * n_futures, (s + 1) * n_futures)
            per_stream[s].append(FutureGroup(sampled.ids[rows], [h[rows] for h in sampled.hidden],
                                             sampled.final.view(S * n_futures, -1, parts.hidden_size)[rows]
                                             .reshape(-1, parts.hidden_size) if need_final else None,
                                             lead=r.y[None].expand(n_futures, -1) if after_y else None))


def _normalize_layers(t: SyncTargets) -> None:
    """Deep Context Distillation's per-layer normalization: each state's L1 is divided by the
    teacher's mean |h^l| over the synchronized positions, so every layer weighs the same in the
    loss; unnormalized, the few late layers with large activations dominate it. The teacher's
    states are scaled here once; the student's by the same factors at every step."""
    L = len(t.groups[0].hidden)
    sums = [0.0] * L
    for g in t.groups:
        for layer in range(L):
            sums[layer] += float(g.hidden[layer].float().abs().sum())   # masked positions are zero
    dim = t.groups[0].hidden[0].shape[-1]
    t.layer_scale = [t.positions * dim / max(total, 1e-12) for total in sums]
    for g in t.groups:
        g.hidden = [h * scale for h, scale in zip(g.hidden, t.layer_scale)]


def _self_study(parts, wrappers, rounds, cfg, frame: ProbeFrame, need_final) -> list[list[FutureGroup]]:
    """Self-study probes: the teacher reads X in its frame (a system message for chat models), then
    for each kind its seed instruction, and answers it; the answers are sampled for all streams and
    all probes of a kind in one batch, recording the teacher's states as they go. The student reads
    the seed and the answer after its own opening (frame.student_open), without X."""
    S = len(rounds)
    bind(wrappers, [r.delta for r in rounds])
    set_rows(wrappers, S, 1, parts.device)
    dev = parts.device
    before = torch.tensor(frame.context_open, dtype=torch.long, device=dev)
    after = torch.tensor(frame.context_close, dtype=torch.long, device=dev)
    ctx = parts.with_prefix(torch.stack([torch.cat([before, r.x, after]) for r in rounds]))     # (S, P + o + n + c)
    _, cache = parts.forward(ctx, use_cache=True)
    x_kv = cache_tensors(cache)
    del cache
    lead = torch.tensor(frame.student_open, dtype=torch.long, device=dev)
    out: list[list[FutureGroup]] = [[] for _ in rounds]
    for kind, count in kinds_per_round(cfg.probe_kinds, cfg.probes):
        seed = torch.tensor(frame.seeds[kind], dtype=torch.long, device=dev)
        if kind in FORCED_KINDS:
            # Every row of a stream would read the same: one row per stream, all of it forced.
            count = 1
            end = torch.tensor(frame.stop[:1], dtype=torch.long, device=dev)
            forced = torch.stack([torch.cat([seed, r.x, end]) for r in rounds])        # (S, t)
            g = _sample_futures(parts, wrappers, x_kv, None, 1, cfg, rounds, need_final, forced,
                                forced.shape[1], 1.0, 1.0)
            mask = torch.ones_like(g.ids, dtype=torch.bool)
        else:
            g = _sample_futures(parts, wrappers, x_kv, None, count, cfg, rounds, need_final, seed,
                                seed.numel() + cfg.probe_tokens, cfg.probe_temperature, cfg.probe_top_p)
            mask = answer_mask(g.ids, seed.numel(), frame.stop)                       # (S·count, t)
        for s in range(S):
            rows = slice(s * count, (s + 1) * count)
            m = mask[rows]
            hidden = [h[rows] * m[..., None] for h in g.hidden]      # padded positions: zero, out of the loss
            final = None
            if need_final:
                final = g.final.view(S * count, -1, parts.hidden_size)[rows][m]      # (real positions, D)
            out[s].append(FutureGroup(g.ids[rows], hidden, final, lead=lead.expand(count, -1) if lead.numel() else None,
                                      mask=m))
    return out


def _replay(parts, wrappers, rounds, cfg, frame, need_final) -> list[FutureGroup]:
    """Earlier rounds' probes, each stream's right-padded to one (rows, t) shape for the batch; the
    targets are the round-start model's own states on them, read without any context (the memory
    as it is must be kept). Rows a stream lacks, padding and the student's opening are masked out."""
    S, dev = len(rounds), parts.device
    rows = max(len(r.replay) for r in rounds)
    t = max(len(q) for r in rounds for q in r.replay)
    ids = torch.zeros(S * rows, t, dtype=torch.long, device=dev)
    mask = torch.zeros(S * rows, t, dtype=torch.bool, device=dev)
    skip = len(frame.student_open) if frame is not None else 0
    for s, r in enumerate(rounds):
        for i, q in enumerate(r.replay):
            ids[s * rows + i, :len(q)] = q
            mask[s * rows + i, skip:len(q)] = True
    bind(wrappers, [r.delta for r in rounds])
    set_rows(wrappers, S, rows, dev)
    P = len(parts.prefix)
    with ResidualCapture(parts.layers, start=P) as cap:
        final, _ = parts.forward(parts.with_prefix(ids))
    out = []
    for s in range(S):
        sl = slice(s * rows, (s + 1) * rows)
        m = mask[sl]
        hidden = [h[sl] * m[..., None] for h in cap.states]
        fin = final[sl, P:][m] if need_final else None
        out.append(FutureGroup(ids[sl], hidden, fin, mask=m))
    return out


def _sample_futures(parts, wrappers, x_kv, first_logits, count, cfg, rounds, need_final, prompt, length,
                    temperature, top_p) -> FutureGroup:
    """`count` continuations of each stream's X sampled by its teacher, all streams in one batch,
    with the teacher's states at every token. Rows are stream-major.

    With a prompt (future_prompt), every future starts with it (one batched forward) and the teacher
    samples on from there, e.g. after a question opener, so the futures ask about X rather than
    continue it; a plain continuation only exercises what the model happens to bring up next."""
    S = len(rounds)
    set_rows(wrappers, S, count, parts.device)
    cache = parts.make_cache(x_kv, repeat=count)
    parts_ids, hidden_parts, final_parts = [], [], []
    p = 0 if prompt is None else prompt.shape[-1]
    if p:
        # One prompt for all rows (k,), or one per stream (S, k).
        forced = prompt.expand(S * count, -1) if prompt.dim() == 1 else prompt.repeat_interleave(count, dim=0)
        with ResidualCapture(parts.layers) as cap:
            final, cache = parts.forward(forced, cache, use_cache=True)              # (S·count, p, D)
        parts_ids.append(forced)
        hidden_parts.append(cap.states)
        final_parts.append(final)
        logits = parts.logits(final[:, -1])
    else:
        logits = first_logits.repeat_interleave(count, dim=0)                        # (S·count, V)
    for step in range(length - p):
        tok = torch.cat([sample_next(logits[s * count:(s + 1) * count], temperature, top_p,
                                     r.generator) for s, r in enumerate(rounds)])    # (S·count,)
        with ResidualCapture(parts.layers) as cap:
            final, cache = parts.forward(tok[:, None], cache, use_cache=True)        # (S·count, 1, D)
        parts_ids.append(tok[:, None])
        hidden_parts.append(cap.states)
        final_parts.append(final)
        if step + 1 < length - p:
            logits = parts.logits(final[:, -1])
    ids = torch.cat(parts_ids, dim=1)                                                # (S·count, T)
    hidden = [torch.cat([h[layer] for h in hidden_parts], dim=1) for layer in range(parts.num_states)]
    final = torch.cat(final_parts, dim=1).reshape(-1, parts.hidden_size) if need_final else None
    return FutureGroup(ids, hidden, final)


def student_losses(parts: ModelParts, wrappers, deltas: list[LowRankDelta], targets: list[SyncTargets],
                   cfg: AbsorberConfig, ops, backward: bool, xs: torch.Tensor | None = None) -> list[float]:
    """Each stream's sync loss under its current delta (and the gradient, when `backward`)."""
    S = len(deltas)
    bind(wrappers, deltas)
    losses = [0.0] * S
    P = len(parts.prefix)
    for g in range(len(targets[0].groups)):
        groups = [t.groups[g] for t in targets]
        rows = groups[0].ids.shape[0]
        set_rows(wrappers, S, rows, parts.device)
        ids = torch.cat([grp.ids for grp in groups])
        lead = 0
        if groups[0].lead is not None:
            lead = groups[0].lead.shape[1]
            ids = torch.cat([torch.cat([grp.lead for grp in groups]), ids], dim=1)
        ids = parts.with_prefix(ids)                                                # (S·rows, P + lead + t)
        with ResidualCapture(parts.layers, start=P + lead) as cap, checkpointed(parts.layers, cfg.checkpoint_layers):
            final, _ = parts.forward(ids)
        final = final[:, P + lead:]                                                 # (S·rows, t, D)
        total = final.new_zeros((), dtype=torch.float32)
        for s, (grp, tgt) in enumerate(zip(groups, targets)):
            sl = slice(s * rows, (s + 1) * rows)
            loss = final.new_zeros((), dtype=torch.float32)
            keep = grp.mask[..., None] if grp.mask is not None else None              # (rows, t, 1)
            if cfg.hidden_weight > 0:
                states = [h[sl] if keep is None else h[sl] * keep for h in cap.states]
                if tgt.layer_scale is not None:
                    states = [h * scale for h, scale in zip(states, tgt.layer_scale)]
                loss = loss + ops.hidden_l1(states, grp.hidden, weight=cfg.hidden_weight, denom=tgt.positions)
            if cfg.kl_weight > 0:
                student = final[sl] if grp.mask is None else final[sl][grp.mask]
                kl = ops.linear_kl(student.reshape(-1, parts.hidden_size), grp.final, parts.head.weight,
                                   parts.head.bias, temperature=cfg.kl_temperature, top_k=cfg.kl_top_k,
                                   denom=tgt.positions, teacher_cache=grp.kl_cache)
                loss = loss + cfg.kl_weight * kl
            losses[s] += float(loss.detach())
            total = total + loss
        if backward:
            total.backward()
    if cfg.ntp_weight > 0 and xs is not None:
        for s, ce in enumerate(next_token_losses(parts, wrappers, deltas, xs, cfg, cfg.ntp_weight, backward)):
            losses[s] += ce
    return losses


def next_token_losses(parts, wrappers, deltas, xs: torch.Tensor, cfg, weight: float, backward: bool) -> list[float]:
    """weight × the contextless model's next-token cross-entropy on each stream's X (S, n): TTT's
    loss, alone (objective "ttt") or beside synchronization (ntp_weight)."""
    bind(wrappers, deltas)
    set_rows(wrappers, len(deltas), 1, parts.device)
    ids = parts.with_prefix(xs)
    with checkpointed(parts.layers, cfg.checkpoint_layers):
        final, _ = parts.forward(ids[:, :-1])
    logits = parts.logits(final)                                                    # (S, n - 1, V)
    per_stream = weight * F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1)
    if backward:
        per_stream.sum().backward()
    return per_stream.detach().tolist()


def train_deltas(deltas: list[LowRankDelta], loss_fn, cfg: AbsorberConfig) -> list[RoundResult]:
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


def absorber_round(parts, wrappers, rounds: list[StreamRound], cfg, ops, frame=None) -> list[RoundResult]:
    targets = teacher_targets(parts, wrappers, rounds, cfg, frame)
    deltas = [r.delta for r in rounds]
    xs = torch.stack([r.x for r in rounds]) if rounds[0].x.numel() + len(parts.prefix) >= 2 else None   # (S, n)

    def loss_fn(active):
        return student_losses(parts, wrappers, [deltas[i] for i in active], [targets[i] for i in active], cfg, ops,
                              backward=True, xs=xs[active] if xs is not None else None)

    return train_deltas(deltas, loss_fn, cfg)


def ttt_round(parts, wrappers, rounds: list[StreamRound], cfg, ops, frame=None) -> list[RoundResult]:
    """The baseline: next-token cross-entropy of the contextless model on X itself (Temp-LoRA)."""
    if rounds[0].x.numel() + len(parts.prefix) < 2:
        return [RoundResult() for _ in rounds]
    deltas = [r.delta for r in rounds]
    xs = torch.stack([r.x for r in rounds])                                         # (S, n)

    def loss_fn(active):
        return next_token_losses(parts, wrappers, [deltas[i] for i in active], xs[active], cfg, 1.0, backward=True)

    return train_deltas(deltas, loss_fn, cfg)


ROUNDS = {"absorber": absorber_round, "ttt": ttt_round}
