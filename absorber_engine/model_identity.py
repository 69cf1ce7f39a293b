"""Which base model a memory was made for: a fingerprint of its config, parameter names and shapes
and a sample of each weight's values, and a checksum of every value, both over values rounded to
bf16 so one checkpoint loaded in fp32 or bf16 agrees (memory files name both in their header)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref

import torch

# Config keys that say nothing about the weights (paths, versions, the dtype it was loaded in).
_VOLATILE_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                  "_attn_implementation", "_attn_implementation_autoset", "architectures", "use_cache"}


# Switches a caller may set when loading (from_pretrained(..., output_hidden_states=True)): they made
# a memory "made for another base model" though the weights were the same. Files written before
# 2026-12-07 hashed them (`legacy`).
_RUNTIME_KEYS = {"output_hidden_states", "output_attentions", "return_dict", "pad_token_id"}


def model_fingerprint(runner, legacy: bool = False) -> str:
    """A hash that changes when the base model's architecture, shapes or weights change."""
    h = hashlib.sha256()
    skip = _VOLATILE_KEYS if legacy else _VOLATILE_KEYS | _RUNTIME_KEYS
    cfg = {k: v for k, v in runner.model.config.to_dict().items() if k not in skip}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in _base_parameters(runner.model):
        h.update(f"{name}:{tuple(p.shape)};".encode())
        # A few values per tensor, rounded to bf16 so one checkpoint loaded in fp32 or bf16 agrees.
        sample = p.detach().reshape(-1)[:64].to(torch.bfloat16).view(torch.int16).cpu()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


# model_checksum(): per tensor, the dot product of its bf16 bit patterns (int16) with fixed weights
# in [1, 2^15), CHECK_CHUNK values at a time. Every term and partial sum is an integer below 2^52,
# so float64 adds them exactly in any order: the same number on every CPU, GPU and thread count.
CHECK_CHUNK = 1 << 22
_checksums = weakref.WeakKeyDictionary()      # runner -> (its parameters' identity and versions, checksum)
_read_once = weakref.WeakKeyDictionary()      # runner -> how many weights_read_once blocks hold it


@contextlib.contextmanager
def weights_read_once(runner):
    """Memory files loaded inside the block are checked against one reading of the weights, made
    at the block's first load, not one reading each: for a caller that loads many files while
    nothing else can touch the model (a server opening its saved sessions; SmolLM2 0.2 s a file,
    an 8B model on a CPU some 40 s). Outside it every load reads the weights again; a block inside
    another shares the outer one's reading."""
    if runner not in _read_once:
        _checksums.pop(runner, None)          # a reading from before the block is not trusted
    _read_once[runner] = _read_once.get(runner, 0) + 1
    try:
        yield
    finally:
        _read_once[runner] -= 1
        if not _read_once[runner]:
            del _read_once[runner]


def is_read_once(runner) -> bool:
    """Whether a weights_read_once block holds `runner`: its loads may take the checksum read before."""
    return runner in _read_once


def model_checksum(runner, cached: bool = False) -> str:
    """A hash of every base weight value (rounded to bf16), beside model_fingerprint's sample: a
    model fine-tuned in a few rows or a few tensors passes the sample, not this. It reads every
    weight: SmolLM2-135M 0.2 s on 2 CPU threads, about 0.35 s per 64M fp32 values on one (an 8B
    model's first save, or any load, some 40 s). `cached`: the last result while no weight tensor
    was replaced or changed in place through itself (saves; an edit through `.data` keeps the
    version counter, so a load, the safety check, always reads the weights)."""
    params = list(_base_parameters(runner.model))
    key = tuple((name, p.data_ptr(), p._version) for name, p in params)
    held = _checksums.get(runner)
    if cached and held is not None and held[0] == key:
        return held[1]
    digest = _weights_checksum(params)
    _checksums[runner] = (key, digest)
    return digest


def _weights_checksum(params) -> str:
    h = hashlib.sha256()
    weights = None
    with torch.no_grad():
        for name, p in params:
            flat = p.detach().reshape(-1)
            if weights is None or weights.device != flat.device:
                g = torch.Generator().manual_seed(0)
                weights = torch.randint(1, 1 << 15, (CHECK_CHUNK,), generator=g).double().to(flat.device)
            sums = [int(flat[s:s + CHECK_CHUNK].to(torch.bfloat16).view(torch.int16).double()
                        @ weights[:min(CHECK_CHUNK, flat.numel() - s)]) for s in range(0, flat.numel(), CHECK_CHUNK)]
            h.update(f"{name}:{sums};".encode())
    return h.hexdigest()


def _base_parameters(model):
    # Parameter names as the model had them before deltas were attached (".base." is ours).
    for name, p in model.named_parameters():
        yield name.replace(".base.", "."), p
