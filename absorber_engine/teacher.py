"""The teacher's half of a round: what each stream's student must reproduce.

The teacher is the model as it is at the start of the round (W plus everything the stream absorbed
before), reading X. It runs without gradients, once per round, and leaves, per stream, a list of
`FutureGroup`s: token rows the student will read without X, with the teacher's residual states
h^0..h^L on them (and its final states when the KL term is on). The groups come from:

- the real continuation Y (teacher over X·Y), when the stream has one;
- `futures` continuations the teacher samples after X (or after `future_prompt`);
- self-study probes (probes.py): X framed as the chat template frames a system message, a seed
  instruction per kind, and the teacher's answer; "recite" re-reads X itself;
- replayed probes of earlier rounds (`replay_rounds`, replay.py).

Sampled rows reuse X's KV cache, and the teacher's states are recorded while they are sampled, so
no sampled row costs a second teacher pass.
"""

from __future__ import annotations

import torch

from absorber_kernels.linear_kl import teacher_side

from . import static_decode
from .config import AbsorberConfig
from .hf_cache import cache_tensors
from .model import ModelRunner
from .probes import FORCED_KINDS, answer_mask, kinds_per_round
from .replay import real_rows, replay_groups
from .sampling import sample_next
from .targets import FutureGroup, RoundBatch, SyncTargets, positions


@torch.no_grad()
def teacher_targets(runner: ModelRunner, batch: RoundBatch, cfg: AbsorberConfig) -> list[SyncTargets]:
    """What each stream's student must reproduce, per stream."""
    m = batch.y.shape[1]
    need_final = cfg.kl_weight > 0
    probing = batch.frame is not None and cfg.probes > 0
    n_futures = cfg.futures if (m > 0 or probing) else max(cfg.futures, 1)   # something to sync on
    per_stream: list[list[FutureGroup]] = [[] for _ in range(batch.streams)]

    if m > 0 or n_futures > 0:        # with probes alone, the teacher reads X in the probes' frame only
        _y_and_futures(runner, batch, cfg, n_futures, need_final, per_stream)
    if probing:
        for s, groups in enumerate(_self_study(runner, batch, cfg, need_final)):
            per_stream[s].extend(groups)
    if any(batch.replay):
        for s, group in enumerate(replay_groups(runner, batch, need_final)):
            per_stream[s].append(group)
    out = [SyncTargets(groups, sum(positions(g) for g in groups)) for groups in per_stream]
    if cfg.hidden_norm:
        for t in out:
            _normalize_layers(t, cfg.replay_batch)
    if need_final and runner.ops.name == "torch":
        _keep_teacher_distributions(runner, out, cfg)
    return out


KEPT_DISTRIBUTIONS_BYTES = 256 * 2**20
"""The teacher's next-token distributions a round keeps for the KL at most, per stream (positions ×
vocabulary, in bf16 or fp32 (_kept_dtype): 256 MiB is 2730 or 1365 positions of SmolLM2's 49,152
tokens); groups past it recompute theirs at every step. Per stream, not per batch: a budget the
batch shared kept a stream's distributions alone and recomputed them beside others (other sums),
so what a stream learnt depended on the traffic it was batched with, past the batch's rounding."""


def _keep_teacher_distributions(runner, out: list[SyncTargets], cfg) -> None:
    """The KL's teacher side, softmax(h_t·Wᵀ/T) on every synchronized position, computed once a
    round instead of at every step (the PyTorch reference's path; the Triton kernel gets it for
    free). On the chat demo it was 25 of 247 s of absorption."""
    head = runner.head
    for t in out:
        left = KEPT_DISTRIBUTIONS_BYTES
        for g in t.groups:
            if g.final is None:
                continue
            dtype = _kept_dtype(runner, g.final)
            size = g.final.shape[0] * head.weight.shape[0] * torch.finfo(dtype).bits // 8
            if size > left:
                return
            left -= size
            g.teacher_p = teacher_side(g.final, runner.head_weight(), head.bias, cfg.kl_temperature, cfg.kl_top_k, dtype)


def _kept_dtype(runner, final: torch.Tensor) -> torch.dtype:
    """bf16 where the head's GEMM runs in bf16, fp32 (at least) otherwise. A logit from a bf16 GEMM
    is off by about 2^-9 of its size (a logit of 10: p off by 2%), ten times what bf16 storage adds
    to p. Measured against float64 on SmolLM2's and the random Llama's heads (128 rows): the KL's
    gradient 3.39% / 3.85% off kept in bf16, 3.44% / 3.91% in fp32 (the logits' rounding, either way);
    its loss 0.11% / 0.03% against 0.06% / 0.03%. Half the bytes: with p subtracted a few rows at a
    time (head_chunks.sub_) the random Llama's recite round peaked at 219 MiB, not 252."""
    gemm = runner.compute_dtype or runner.dtype
    return torch.bfloat16 if gemm == torch.bfloat16 else torch.promote_types(final.dtype, torch.float32)


def _y_and_futures(runner, batch: RoundBatch, cfg, n_futures, need_final, per_stream) -> None:
    """The real Y's group (teacher over X·Y) and the sampled futures' group of every stream."""
    S, n, m = batch.streams, batch.x.shape[1], batch.y.shape[1]
    runner.bind(batch.deltas)
    P = len(runner.prefix)
    xy = runner.with_prefix(torch.cat([batch.x, batch.y], dim=1))                   # (S, P + n + m)
    with runner.capture(P + n) as cap:
        final, cache = runner.forward(xy, use_cache=n_futures > 0)
    if m > 0:
        for s in range(S):
            per_stream[s].append(FutureGroup(batch.y[s:s + 1], [h[s:s + 1] for h in cap.states],
                                             final[s, P + n:] if need_final else None))
    if n_futures > 0:
        # Futures follow X·Y (the student then reads Y before them, as generate() reads the window
        # before a prompt), or X alone when futures_follow_y is off or there is no Y.
        after_y = cfg.futures_follow_y and m > 0
        keep = P + n + (m if after_y else 0)
        x_kv = cache_tensors(cache, keep=keep)
        first_logits = runner.logits(final[:, keep - 1])                            # (S, V)
        del cache, cap, final
        sampled = sample_with_states(runner, batch, x_kv, first_logits, n_futures, need_final, batch.prompt,
                                     cfg.future_length, cfg.future_temperature, cfg.future_top_p)
        for s in range(S):
            rows = slice(s * n_futures, (s + 1) * n_futures)
            per_stream[s].append(FutureGroup(sampled.ids[rows], [h[rows] for h in sampled.hidden],
                                             sampled.final.view(S * n_futures, -1, runner.hidden_size)[rows]
                                             .reshape(-1, runner.hidden_size) if need_final else None,
                                             lead=batch.y[s:s + 1].expand(n_futures, -1) if after_y else None))


def _normalize_layers(t: SyncTargets, replay_batch: int) -> None:
    """Deep Context Distillation's per-layer normalization: each state's L1 is divided by the
    teacher's mean |h^l| over the synchronized positions, so every layer weighs the same in the
    loss; unnormalized, the few late layers with large activations dominate it. The teacher's
    states are scaled here once; the student's by the same factors at every step."""
    # A replay buffer read a few rows a step (replay_batch) is scaled by the factors of the rows
    # read at every step, and does not set them.
    held = [g for g in t.groups if not (g.replay and 0 < replay_batch < real_rows(g))]
    L = len(held[0].hidden)
    sums = [0.0] * L
    for g in held:
        for layer in range(L):
            sums[layer] += float(g.hidden[layer].float().abs().sum())   # masked positions are zero
    count = sum(positions(g) for g in held)
    dim = held[0].hidden[0].shape[-1]
    t.layer_scale = [count * dim / max(total, 1e-12) for total in sums]
    for g in t.groups:
        g.hidden = [h * scale for h, scale in zip(g.hidden, t.layer_scale)]


def _self_study(runner, batch: RoundBatch, cfg, need_final) -> list[list[FutureGroup]]:
    """Self-study probes: the teacher reads X in its frame (a system message for chat models), then
    for each kind its seed instruction, and answers it. The sampled kinds' answers are sampled for
    all streams and all kinds in one batch (seeds left-padded to one length), recording the
    teacher's states as they go; "recite" is forced whole. The student reads the seed and the
    answer after its own opening (frame.student_open), without X."""
    S, dev, frame = batch.streams, runner.device, batch.frame
    runner.bind(batch.deltas)
    ids = lambda t: torch.tensor(t, dtype=torch.long, device=dev)                  # noqa: E731
    before, after = ids(frame.context_open).expand(S, -1), ids(frame.context_close).expand(S, -1)
    _, cache = runner.forward(runner.with_prefix(torch.cat([before, batch.x, after], dim=1)), use_cache=True)
    x_kv = cache_tensors(cache)
    del cache
    kinds = kinds_per_round(cfg.probe_kinds, cfg.probes)
    sampled = [(kind, count) for kind, count in kinds if kind not in FORCED_KINDS]
    if sampled:
        width = max(len(frame.seeds[kind]) for kind, _ in sampled)
        rows = [(kind, width - len(frame.seeds[kind])) for kind, count in sampled for _ in range(count)]
        prompts = ids([[0] * pad + frame.seeds[kind] for kind, pad in rows])          # (rows, width)
        every = sample_with_states(runner, batch, x_kv, None, len(rows), need_final, prompts,
                                   width + cfg.probe_tokens, cfg.probe_temperature, cfg.probe_top_p,
                                   pads=[pad for _, pad in rows], stop=frame.stop)
    out: list[list[FutureGroup]] = [[] for _ in range(S)]
    first = 0                               # the kind's first row among each stream's sampled rows
    for kind, count in kinds:
        seed = frame.seeds[kind]
        if kind in FORCED_KINDS:
            # Every row of a stream would read the same: one row per stream, all of it forced.
            forced = torch.cat([ids(seed).expand(S, -1), batch.x, ids(frame.stop[:1]).expand(S, -1)], dim=1)
            g = sample_with_states(runner, batch, x_kv, None, 1, need_final, forced, forced.shape[1], 1.0, 1.0)
            _split(runner, g, 1, torch.ones_like(g.ids, dtype=torch.bool), out, x_span=(len(seed), batch.x.shape[1]))
            continue
        pad = width - len(seed)
        picked = torch.cat([torch.arange(first, first + count) + s * len(rows) for s in range(S)]).to(dev)
        g = _rows(runner, every, picked, pad)
        _split(runner, g, count, answer_mask(g.ids, len(seed), frame.stop), out)
        first += count
    lead = ids(frame.student_open)
    for groups in out:
        for g in groups:
            g.lead = lead.expand(g.ids.shape[0], -1) if lead.numel() else None
    return out


def _rows(runner, g: FutureGroup, picked: torch.Tensor, pad: int) -> FutureGroup:
    """Rows `picked` of a sampled group, without their first `pad` (padding) positions."""
    final = None
    if g.final is not None:
        final = g.final.view(g.ids.shape[0], -1, runner.hidden_size)[picked, pad:].reshape(-1, runner.hidden_size)
    return FutureGroup(g.ids[picked, pad:], [h[picked, pad:] for h in g.hidden], final)


def _split(runner, g: FutureGroup, count: int, mask: torch.Tensor, out, x_span=None) -> None:
    """A stream-major group of `count` rows per stream, cut into each stream's FutureGroup, with
    the positions outside `mask` zeroed out of the loss."""
    S = len(out)
    for s in range(S):
        rows = slice(s * count, (s + 1) * count)
        m = mask[rows]
        hidden = [h[rows] * m[..., None] for h in g.hidden]
        final = g.final.view(S * count, -1, runner.hidden_size)[rows][m] if g.final is not None else None
        out[s].append(FutureGroup(g.ids[rows], hidden, final, mask=m, x_span=x_span))


def sample_with_states(runner, batch: RoundBatch, x_kv, first_logits, count, need_final, prompt, length,
                       temperature, top_p, pads: list[int] | None = None, stop: list[int] | None = None) -> FutureGroup:
    """`count` continuations of each stream's X sampled by its teacher, all streams in one batch,
    with the teacher's states at every token. Rows are stream-major.

    With a prompt, every row starts with it (one batched forward) and the teacher samples on from
    there: a future_prompt (k,) shared by all rows, e.g. a question opener, so the futures ask about
    X rather than continue it; one per stream (S, k), a probe forced whole; or, with `pads`, one
    per row of a stream (count, k), each left-padded by pads[row] (masked, positions counted from
    the row's first real token), so probes of different seeds sample in one batch. With `stop`
    tokens, sampling ends once every row has sampled one (what a row samples after its stop is
    outside its probe), so the rows are up to `length` long."""
    S = batch.streams
    runner.bind(batch.deltas, count)
    cache = runner.make_cache(x_kv, repeat=count)
    parts_ids, hidden_parts, final_parts = [], [], []
    p = 0 if prompt is None else prompt.shape[-1]
    mask = position = None
    if pads is not None:
        cached = x_kv[0][0].shape[2]
        pad = torch.tensor(pads, device=runner.device).repeat(S)[:, None]                # (S·count, 1)
        cols = torch.arange(p, device=runner.device)[None, :]
        mask = torch.cat([torch.ones(S * count, cached, dtype=torch.long, device=runner.device),
                          (cols >= pad).long()], dim=1)
        position = (cached + cols - pad).clamp(min=0)
    if p:
        if pads is not None:
            forced = prompt.repeat(S, 1)
        else:
            forced = prompt.expand(S * count, -1) if prompt.dim() == 1 else prompt.repeat_interleave(count, dim=0)
        with runner.capture() as cap, runner.sdpa_attention(mask is not None):
            final, cache = runner.forward(forced, cache, use_cache=True, attention_mask=mask,
                                          position_ids=position)                      # (S·count, p, D)
        parts_ids.append(forced)
        hidden_parts.append(cap.states)
        final_parts.append(final)
        logits = runner.logits(final[:, -1])
    else:
        logits = first_logits.repeat_interleave(count, dim=0)                        # (S·count, V)
    # Decode steps read each weight once: in autocast's dtype, from copies cast once for all the
    # steps (static_decode.decode_weights), not under autocast, which would cast every weight at
    # every step (1.7x slower per step than fp32 on a CPU). The cache is cast to it.
    steps = length - p
    ended = _stops(stop, S * count, runner.device)
    if steps and static_decode.supported(runner):
        with static_decode.decode_weights(runner, S * count), runner.sdpa_attention():
            kv = cache_tensors(cache)
            nxt = position[:, -1:] + 1 if position is not None else torch.full(
                (S * count, 1), kv[0][0].shape[2], device=runner.device)
            decoder = static_decode.StaticDecoder(runner, kv, steps, mask, nxt, graphs=runner.cuda_graphs)
            for _ in range(steps):
                tok = _sample(logits, batch, count, temperature, top_p)
                parts_ids.append(tok[:, None])
                logits = decoder.step(tok)
                if ended(tok):
                    break
            hidden, final = decoder.states()
        hidden_parts.append(hidden)
        final_parts.append(final)
    elif steps:
        with runner.model_dtype(), runner.capture() as cap, runner.sdpa_attention(mask is not None):
            for step in range(steps):
                tok = _sample(logits, batch, count, temperature, top_p)
                before = len(cap.states)
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(S * count, 1)], dim=1)
                    position = position[:, -1:] + 1
                final, cache = runner.forward(tok[:, None], cache, use_cache=True, attention_mask=mask,
                                              position_ids=position)                  # (S·count, 1, D)
                parts_ids.append(tok[:, None])
                hidden_parts.append(cap.states[before:])
                final_parts.append(final)
                if ended(tok) or step + 1 == steps:
                    break
                logits = runner.logits(final[:, -1])
    ids = torch.cat(parts_ids, dim=1)                                                # (S·count, T)
    hidden = [torch.cat([h[layer] for h in hidden_parts], dim=1) for layer in range(runner.num_states)]
    final = torch.cat(final_parts, dim=1).reshape(-1, runner.hidden_size) if need_final else None
    return FutureGroup(ids, hidden, final)


def _stops(stop: list[int] | None, rows: int, device):
    """A check called with each step's tokens: true once every row has sampled a stop token."""
    if not stop:
        return lambda tok: False
    stops, done = torch.tensor(stop, device=device), torch.zeros(rows, dtype=torch.bool, device=device)

    def ended(tok: torch.Tensor) -> bool:
        done.logical_or_(torch.isin(tok, stops))
        return bool(done.all())
    return ended


def _sample(logits: torch.Tensor, batch: RoundBatch, count: int, temperature, top_p) -> torch.Tensor:
    """The next token of every row (S·count,), each stream's rows from its own generator."""
    return torch.cat([sample_next(logits[s * count:(s + 1) * count], temperature, top_p, gen)
                      for s, gen in enumerate(batch.generators)])
