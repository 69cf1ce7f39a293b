"""The next token, sampled exactly as transformers' generate() samples it, with the draw that takes
most of a small model's decode step made vectorized.

On a CPU, torch.multinomial(p, 1) is argmax(p / q) with q ~ Exp(1) from `exponential_`, which fills
q one value at a time from the generator's Mersenne Twister: 19 ns a value, 2.4 ms of a 9 ms decode
step of 4 rows over 32,000 tokens. `exponential_draw` returns the very same q and leaves the
generator in the very same state, in about a sixth of that time: the Twister's words (the same
algorithm, started from the generator's state) paired into doubles by the package's C++ loop
(csrc/twister.cpp; numpy's MT19937 where it is not built), then torch's transform in whole-tensor
ops (-log1p(-u) of the double from the low 53 bits of two words, rounded to float32). That it matches
torch is checked once per process against `exponential_` itself, values and generator state; a torch
it does not match gets torch's own draw.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

_N = 624                                # the Twister's state words
# CPUGeneratorImpl's serialized state (get_state): the initial seed (uint64), words left before the
# next twist (int32), a seeded flag (int32), the next word's index (uint64), the 624 words (each
# widened to uint64), then the normal sampler's cached values, which an exponential draw leaves.
_STATE_BYTES = 5056
_LEFT, _NEXT, _WORDS = slice(8, 12), slice(16, 24), slice(24, 24 + 8 * _N)
_LOW53 = np.uint64((1 << 53) - 1)
_TWISTER = np.random.MT19937(0)         # reused: its state is replaced before every draw
try:                                    # the same words from the package's C++ loop, 3x faster
    from . import _twister
except ImportError:                     # pragma: no cover - a build without the extension: numpy's
    _twister = None
# One draw at a time: the Twister is shared, and a generator's state is read, advanced and written
# back, which two threads drawing from it at once would otherwise both start from.
_LOCK = threading.Lock()
_exact: bool | None = None              # whether this torch draws as exponential_draw does


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 is greedy; top_p < 1 samples the nucleus.
    Probabilities in float32, as generate() computes them, so the draw and the division are its own."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    # A temperature so small that the top logit overflows leaves only the top token (a NaN logit,
    # too: argmax as before). -inf logits are no reason: softmax gives them 0, as generate() does.
    if not torch.isfinite(scaled.amax(dim=-1)).all():
        return logits.argmax(dim=-1)
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p, and always the top token.
        outside = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        outside[..., 0] = False
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return multinomial_one(probs, generator)


def multinomial_one(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """torch.multinomial(probs, 1).squeeze(-1): the same ids, the generator left in the same state.
    `probs` as sample_next makes them (finite, non-negative, mass in every row): unlike torch, the
    vectorized path does not check them."""
    gen = generator if generator is not None else torch.default_generator
    if probs.device.type != "cpu" or probs.dtype != torch.float32 or gen.device.type != "cpu" or not _matches_torch():
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    q = exponential_draw(probs.shape, gen)
    return torch.div(probs, q, out=q).argmax(dim=-1)


def exponential_draw(shape, generator: torch.Generator) -> torch.Tensor:
    """torch.empty(shape).exponential_(generator=generator), float32, for a CPU generator."""
    with _LOCK:
        return _draw(shape, generator)


def _draw(shape, generator: torch.Generator) -> torch.Tensor:
    state = generator.get_state().numpy().copy()
    left = int(state[_LEFT].view(np.int32)[0])
    # torch counts words left before the next twist (1: twist first), numpy words used since it.
    pos = _N if left == 1 else int(state[_NEXT].view(np.uint64)[0])
    key = state[_WORDS].view(np.uint64).astype(np.uint32)
    if _twister is not None:                       # the words and their pairing in one C++ loop
        u = np.empty(math.prod(shape), dtype=np.float64)
        pos = _twister.negative_uniform53(key, pos, u)
    else:
        _TWISTER.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}
        words = _TWISTER.random_raw(2 * math.prod(shape))
        u = (((words[0::2] << np.uint64(32)) | words[1::2]) & _LOW53).astype(np.float64) * -2.0 ** -53
        key, pos = _TWISTER.state["state"]["key"], int(_TWISTER.state["state"]["pos"])
    q = torch.from_numpy(u).log1p_().neg_().to(torch.float32)
    state[_LEFT].view(np.int32)[0] = _N + 1 - pos
    state[_NEXT].view(np.uint64)[0] = pos
    state[_WORDS].view(np.uint64)[:] = key
    generator.set_state(torch.from_numpy(state))
    return q.view(shape)


def _matches_torch() -> bool:
    global _exact
    if _exact is None:
        _exact = _check()
    return _exact


def _check() -> bool:
    """exponential_draw against exponential_ over three twists, values and state bytes."""
    ours, theirs = torch.Generator().manual_seed(20261205), torch.Generator().manual_seed(20261205)
    if ours.get_state().numel() != _STATE_BYTES:
        return False
    try:
        for shape in [(3, 101), (2, 700), (1, 5)]:
            want = torch.empty(shape).exponential_(generator=theirs)
            if not torch.equal(exponential_draw(shape, ours), want):
                return False
            if not torch.equal(ours.get_state(), theirs.get_state()):
                return False
    except Exception:                    # a state this code cannot read: torch's own draw
        return False
    return True
