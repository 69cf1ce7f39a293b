"""The next token, sampled exactly as transformers' generate() samples it, with the draw that takes
most of a small model's decode step done in C++ (csrc/twister.cpp).

On a CPU, torch.multinomial(p, 1) is argmax(p / q) with q ~ Exp(1) from `exponential_`, which fills
q one value at a time from the generator's Mersenne Twister and the C library's log1p: 19 ns a
value, 2.4 ms of a 9 ms decode step of 4 rows over 32,000 tokens. Only the argmax matters, and
-log1p(-u) >= u bounds every p / q from above by p / u, so `multinomial_from` runs the Twister's
words (the same algorithm, started from the generator's state) into the doubles u torch starts
from, and takes the log only for the few tokens whose bound reaches the best exact ratio found
before them: the same ids, the generator left in the same state. A sample_next of 4 rows over
32,000 tokens: 0.26-0.28 ms, against 0.69-0.80 ms computing every q and torch's own 2.2 ms. That it
matches torch is checked once per process against torch.multinomial itself, ids and generator
state; a torch it does not match, or a build without the C++ extension, gets torch's own draw.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

_N = 624                                # the Twister's state words
# CPUGeneratorImpl's serialized state (get_state): the initial seed (uint64), words left before the
# next twist (int32), a seeded flag (int32), the next word's index (uint64), the 624 words (each
# widened to uint64), then the normal sampler's cached values, which an exponential draw leaves.
_STATE_BYTES = 5056
_LEFT, _NEXT, _WORDS = slice(8, 12), slice(16, 24), slice(24, 24 + 8 * _N)
try:
    from . import _twister
except ImportError:                     # pragma: no cover - a build without the extension: torch's own draw
    _twister = None
# One draw at a time: a generator's state is read, advanced and written back, which two threads
# drawing from it at once would otherwise both start from. Draws made from the same generator by
# other code (torch.rand in another thread) during a draw are overwritten: a sampling generator
# is the sampler's alone, as the engine's are (one per round and request).
_LOCK = threading.Lock()
_exact: bool | None = None              # whether this torch samples as multinomial_from does


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 is greedy; top_p < 1 samples the nucleus."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_p)
    # A temperature so small that the top logit overflows leaves only the top token (a NaN logit,
    # too: argmax as before). -inf logits are no reason: softmax gives them 0, as generate() does.
    if probs is None:
        return logits.argmax(dim=-1)
    return multinomial_one(probs, generator)


def next_token_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor | None:
    """The probabilities generate() samples from, (B, V) float32, computed as its temperature and
    top-p warpers and softmax compute them, op for op (a nucleus summed the other way round differs
    in float32 by a token now and then: 34 rows of 3,000 at V = 49,152); None where a row's top
    logit is not finite after the temperature."""
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    if not torch.isfinite(scaled.amax(dim=-1)).all():
        return None
    if top_p < 1.0:                 # TopPLogitsWarper: drop the low tail holding at most 1 - top_p
        ascending, order = torch.sort(scaled, descending=False)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop[..., -1:] = False      # the top token always stays
        scaled = scaled.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.softmax(scaled, dim=-1)


def multinomial_one(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """torch.multinomial(probs, 1).squeeze(-1): the same ids, the generator left in the same state.
    `probs` as sample_next makes them (finite, non-negative, mass in every row): unlike torch, the
    C++ path does not check them."""
    gen = generator if generator is not None else torch.default_generator
    # torch fills its q in probs' memory order: a transposed probs pairs tokens with other draws
    # than a contiguous one would; no rows advance nothing. Both are torch's.
    if (probs.device.type != "cpu" or probs.dtype != torch.float32 or probs.dim() != 2 or 0 in probs.shape
            or not probs.is_contiguous() or gen.device.type != "cpu" or not _matches_torch()):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    with _LOCK:
        return _draw(probs.detach(), gen)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    state = generator.get_state().numpy().copy()
    left = int(state[_LEFT].view(np.int32)[0])
    # torch counts words left before the next twist (1: twist first); the C++ loop, the next word's index.
    pos = _N if left == 1 else int(state[_NEXT].view(np.uint64)[0])
    key = state[_WORDS].view(np.uint64).astype(np.uint32)
    ids = torch.empty(probs.shape[0], dtype=torch.long)
    pos = _twister.multinomial_from(key, pos, probs.numpy(), ids.numpy())
    state[_LEFT].view(np.int32)[0] = _N + 1 - pos
    state[_NEXT].view(np.uint64)[0] = pos
    state[_WORDS].view(np.uint64)[:] = key
    generator.set_state(torch.from_numpy(state))
    return ids


def _matches_torch() -> bool:
    global _exact
    if _exact is None:
        _exact = _twister is not None and _check()
    return _exact


def _check() -> bool:
    """The C++ draw against torch.multinomial over three twists: ids and state bytes, on rows
    with zeros (a nucleus) and rows peaked enough that the first token drawn often wins."""
    ours, theirs = torch.Generator().manual_seed(20261205), torch.Generator().manual_seed(20261205)
    if ours.get_state().numel() != _STATE_BYTES or _twister is None:
        return False
    data = torch.Generator().manual_seed(5)
    try:
        for rows, width, sharpness in [(3, 101, 1.0), (2, 700, 8.0), (1, 5, 1.0), (4, 300, 3.0)]:
            probs = torch.softmax(torch.randn(rows, width, generator=data) * sharpness, -1)
            probs[:, 1::4] = 0.0
            want = torch.multinomial(probs, 1, generator=theirs)[:, 0]
            if not torch.equal(_draw(probs, ours), want) or not torch.equal(ours.get_state(), theirs.get_state()):
                return False
    except Exception:                    # a state this code cannot read: torch's own draw
        return False
    return True
