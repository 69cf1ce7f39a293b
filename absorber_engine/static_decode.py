"""Decode steps over a static KV cache: one step function, run eagerly, or (on a CUDA device with
AbsorberConfig.cuda_graphs) captured once as a CUDA graph and replayed. The teacher samples its
futures and probes with it (teacher.sample_with_states), generate() its answers.

Why: a decode step of a few rows does little arithmetic (SmolLM2 at 4 rows: some 0.5 GFLOP), and
over a growing cache it is hundreds of small launches plus Python per token: on an H200 a step of
the random Llama took 7.9x its matmuls. With every tensor a step touches allocated once (the cache,
the token, positions, the attention mask, the outputs of every step), the step has the same shapes
every time, which is what a CUDA graph needs. On a CPU it runs as fast as the growing cache did
(a decode step of the random Llama at 4 rows: 35.5 against 36.3 ms), and copies no cache per step.

Layout: keys and values of all `max_len` slots live in a transformers StaticCache; slots not yet
written are masked out by a (B, 1, 1, max_len) boolean mask that the step extends by one slot. The
step writes its residual states and final states into buffers of the whole decode, at the slot the
step counter names, so nothing per step leaves the graph but the logits the sampler reads.

Only models whose every layer attends to all positions take this path (a sliding-window layer's
static cache is a ring, which the mask cannot follow): `supported()`.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from absorber_kernels import packed_linear

from . import decode_layers
from .model import ModelRunner

_active = threading.local()     # (runner, its fused step or None) of the innermost decode_weights block


@contextlib.contextmanager
def decode_weights(runner: ModelRunner, rows: int):
    """The weights decode steps of `rows` rows read inside the block. In an autocast block (a
    round) the parameters are copies in autocast's dtype, put back after it, and the steps run with
    autocast off; outside one, the model's dtype. On a CPU the linears' weights are moreover
    reordered for oneDNN (absorber_kernels.packed_linear), which reads them 1.1-3.0x faster at 1-4
    rows; those are not cast, the reorder makes their copy.

    Why: a step of a few rows is bound by reading the weights, not by arithmetic. SmolLM2 at 4 rows
    over 512 cached positions, one CPU thread: 97-101 ms a step with its fp32 weights, 65-67 ms
    with bf16 ones; autocast would cast every weight at every step, slower than either. Casting
    or reordering once per sampling costs one pass over the weights and holds a copy of them while
    the block lasts (SmolLM2: 270 MB in bf16, 540 MB in fp32). Stacked deltas' factors stay fp32
    (the layers compute them in the activations' dtype). runner.dtype reads the head's weight,
    which is always cast, so the decoder's cache and state buffers follow.

    Where it applies on a CPU the layers' linears are reordered fused instead (decode_layers), and
    every StaticDecoder made in the block steps through that, not through the modules."""
    dev = runner.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    # Reordering pays except in fp32 at one row on one thread: there the reordered weights are read
    # 1.07x faster and a whole generate() took as long (SmolLM2, 128 tokens, a delta bound: 8.55-8.76
    # s either way), for a 540 MB copy held while it decodes.
    pays = (dtype or runner.dtype) != torch.float32 or rows > 1 or torch.get_num_threads() > 1
    pack = dev == "cpu" and not torch.is_grad_enabled() and pays and packed_linear.supported(dtype or runner.dtype)
    # What is not reordered is cast, and only a reordered weight can carry a merged delta: both
    # decided by the one test the reorder applies (a hooked or subclassed linear keeps its own path).
    linears = [m for m in runner.model.modules() if packed_linear.packable(m)] if pack else []
    packed_ids = {id(m.weight) for m in linears if m is not runner.head}
    params = [p for p in runner.model.parameters() if p.is_floating_point() and id(p) not in packed_ids]
    cast = dtype is not None and any(p.dtype != dtype for p in params)
    originals = [p.data for p in params] if cast else []
    # One delta bound to every row: merged into the weights as they are reordered, W + s·A·B, so a
    # step's delta linear is one product, not four ops and two casts of A and B (SmolLM2's bf16
    # recitals at one thread: 6.0-6.9 s apart, 5.2-5.8 s merged). Stacked deltas (a batch of
    # streams) stay apart.
    merged = {w: (w.A, w.B) for w in runner.wrappers.values()
              if id(w.base.weight) in packed_ids and w.layout == "linear" and w.A is not None and w.A.dim() == 2}
    bases = {w.base: w for w, (_, b) in merged.items() if bool(b.any())}     # a zero delta adds nothing

    def weight_of(m: nn.Linear) -> torch.Tensor:
        w = bases.get(m)
        return m.weight if w is None else w.merged_weight(*merged[w], runner.binding.scale)

    # Deltas stacked one a row (a bank's recitals, a batch of sessions): the fused step adds each
    # row's own to its products, the factors gathered and cast once for the block where
    # lowrank_linear_batched_ref gathers them at every step. SmolLM2's recitals of a bank of 17 (up
    # to 257 tokens, bf16, 2 threads): 20.4 s where the modules took 28.8 s; of 2: 13.6 s, 18.1 s.
    per_row = {}
    layout = runner.binding.rows
    if pack and layout is not None and layout.index.numel() == rows:
        act = dtype or runner.dtype
        per_row = {w.base: (w.A.index_select(0, layout.index).to(act), w.B.index_select(0, layout.index).to(act))
                   for w in runner.wrappers.values()
                   if w.A is not None and w.A.dim() == 3 and w.layout == "linear" and id(w.base.weight) in packed_ids}
    try:
        for p in params if cast else ():
            p.data = p.data.to(dtype)
        for w in merged:
            w.A = w.B = None
        fused = decode_layers.build(runner, weight_of, dtype or runner.dtype, rows, per_row) if pack else None
        reorder = [] if not pack else [runner.head] if fused is not None else linears
        before, _active.fused = getattr(_active, "fused", None), (runner, fused)
        # With the step fused, the modules' own linears hold neither the cast nor the merged delta:
        # a forward through them inside the block would be silently wrong, so it fails.
        guard = runner.base.register_forward_pre_hook(_modules_unfused) if fused is not None else None
        try:
            with packed_linear.packed(reorder, dtype or runner.dtype, rows, weight_of), runner.model_dtype():
                yield
        finally:
            _active.fused = before
            if guard is not None:
                guard.remove()
    finally:
        for p, data in zip(params, originals):
            p.data = data
        for w, (a, b) in merged.items():
            w.A, w.B = a, b


def _modules_unfused(module, args):
    raise RuntimeError("the model's layers run fused inside decode_weights: a forward through its modules there "
                       "would miss the merged delta; run it outside the block, or step a StaticDecoder")


def supported(runner: ModelRunner) -> bool:
    cache = StaticCache(config=runner.model.config, max_cache_len=1)      # layers only: nothing allocated
    return all(type(layer) is StaticLayer for layer in cache.layers)


class _LiveCache(StaticCache):
    """A StaticCache whose attention reads the slots written so far (`live`), not all of them
    masked: a 16-bit softmax over a row of masked slots rounds otherwise (an answer then depended on
    max_new_tokens, and differed from generate()'s). None: every slot, as a CUDA graph needs."""

    live: int | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        return (keys, values) if self.live is None else (keys[:, :, :self.live], values[:, :, :self.live])


class StaticDecoder:
    """`steps` decode steps after the cache `kv` (per layer (B, H, n, Dh)). `mask` (B, n) marks the
    cached positions each row may attend to (padding), `position` (B, 1) is each row's next
    position. step(tokens) returns the logits after those tokens; with `record`, states() the
    residual and final states of every step (the teacher's targets on what it samples). Made in a
    decode_weights block that fused the layers' step, it runs that step instead of the modules."""

    def __init__(self, runner: ModelRunner, kv, steps: int, mask: torch.Tensor | None, position: torch.Tensor,
                 graphs: bool = False, record: bool = True):
        self.runner = runner
        active = getattr(_active, "fused", None)
        self.fused = active[1] if active is not None and active[0] is runner else None
        dev, dtype = runner.device, runner.dtype
        B, n = kv[0][0].shape[0], kv[0][0].shape[2]
        self.max_len = n + steps
        runner.stats.max_span = max(runner.stats.max_span, self.max_len)
        self.cache = _LiveCache(config=runner.model.config, max_cache_len=self.max_len)
        for layer, (k, v) in enumerate(kv):
            self.cache.update(k.to(dtype), v.to(dtype), layer)
        self.mask = torch.zeros(B, 1, 1, self.max_len, dtype=torch.bool, device=dev)
        self.mask[:, 0, 0, :n] = True if mask is None else mask.bool()
        self.slot = torch.tensor([n], device=dev)              # the cache slot the next step writes
        self.step_index = torch.zeros(1, dtype=torch.long, device=dev)
        self.position = position.clone()
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.hidden = self.final = None
        if record:
            self.hidden = torch.empty(runner.num_states, B, steps, runner.hidden_size, dtype=dtype, device=dev)
            self.final = torch.empty(B, steps, runner.hidden_size, dtype=dtype, device=dev)
        self.steps, self.taken = steps, 0
        self.rotary = self.fused.rotary_table(self.position, steps) if self.fused is not None else None
        # The fused step's attention mask in the additive form sdpa makes of the boolean one at
        # each of its calls (a layer's where() and two scalars): made once, a slot opened a step.
        self.additive = None
        if self.fused is not None:
            self.additive = torch.zeros(self.mask.shape, dtype=dtype, device=dev).masked_fill_(~self.mask, float("-inf"))
        self.graphs = graphs
        self.graph = None

    def _step(self) -> torch.Tensor:
        r = self.runner
        self.mask.index_fill_(3, self.slot, True)
        stacked = None
        if self.fused is not None:
            self.additive.index_fill_(3, self.slot, 0.0)
            rotary = None if self.rotary is None else [t.index_select(1, self.step_index) for t in self.rotary]
            states, final = self.fused.step(self.tokens, self.position, self.additive, self.cache.layers, self.slot,
                                            self.max_len - self.steps + self.taken, rotary)      # each (B, D)
            if self.hidden is not None:
                stacked = torch.stack(states).unsqueeze(2)
            final = final.unsqueeze(1)
        else:
            live = None if self.graphs else self.max_len - self.steps + self.taken
            self.cache.live = live
            with r.capture() if self.hidden is not None else contextlib.nullcontext() as cap:
                out = r.base(input_ids=self.tokens, attention_mask=self.mask[..., :live], position_ids=self.position,
                             use_cache=True, return_dict=True, **{r.cache_keyword: self.cache})
            if self.hidden is not None:
                stacked = torch.stack(cap.states)
            final = out.last_hidden_state                                                # (B, 1, D)
        if self.hidden is not None:
            self.hidden.index_copy_(2, self.step_index, stacked.to(self.hidden.dtype))
            self.final.index_copy_(1, self.step_index, final.to(self.final.dtype))
        self.slot.add_(1)
        self.position.add_(1)
        self.step_index.add_(1)
        return r.logits(final[:, -1])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Runs one step on `tokens` (B,); returns the logits (B, V) after them. Under graphs the
        logits are a buffer the next step overwrites: read them before."""
        if self.taken >= self.steps:
            raise RuntimeError(f"StaticDecoder holds {self.steps} steps; all were taken")
        self.tokens.copy_(tokens.view(-1, 1))
        self.taken += 1
        if not self.graphs:
            return self._step()
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        # The first step runs eagerly on a side stream (it compiles and autotunes what it launches
        # and builds the kernels' cached metadata); the capture after it records the same work
        # without running it; every later step replays that.
        side = torch.cuda.Stream(self.runner.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._step()
        torch.cuda.current_stream().wait_stream(side)
        if self.taken < self.steps:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()
        return logits

    def then(self, steps: int) -> "StaticDecoder":
        """A decoder of `steps` more steps after every step of this one (which must all be taken),
        over a cache that holds what this one's did: long generations grow their cache a segment
        at a time, so neither memory nor each step's attention spans more than they need."""
        if self.taken < self.steps:
            raise RuntimeError(f"then(): {self.steps - self.taken} steps of this decoder are not taken")
        kv = [(layer.keys, layer.values) for layer in self.cache.layers]
        return StaticDecoder(self.runner, kv, steps, self.mask[:, 0, 0], self.position, graphs=self.graphs,
                             record=self.hidden is not None)

    def states(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The steps taken: L+1 residual states, each (B, taken, D), and final states (B, taken, D)."""
        t = self.taken
        return [h[:, :t] for h in self.hidden], self.final[:, :t]
