"""Models, engines and files the harnesses share, built once per process: the shipped model (it has
a tokenizer, so text paths run), a tiny random Llama saved as a directory, and memory files."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).absolute().parent.parent       # not resolve(): a linked checkout fuzzes itself
SHIPPED = ROOT / "model" / "absorber-tiny"

# Rounds as cheap as a round gets: one step, a 24-token window, nothing sampled.
SMALL = dict(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=1, futures=0, future_tokens=4, probes=0)


@functools.lru_cache(maxsize=None)
def scratch() -> Path:
    """A private temporary directory for this process, removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="absorber-fuzz-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def fresh_dir(name: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=name + "-", dir=scratch()))
    return path


@dataclass
class Baseline:
    engine: object
    memory: Path            # the engine's memory saved: load_memory() puts it back after an accepted call
    probe: list[int]
    expected: torch.Tensor  # logits of the probe with that memory


def _baseline(engine, ids: list[int], name: str) -> Baseline:
    engine.absorb(ids)                        # one round absorbed, the rest held in the window
    path = scratch() / f"{name}.absorber"
    engine.save_memory(path)
    probe = [5, 6, 7]
    return Baseline(engine, path, probe, engine.logits(probe))


@functools.lru_cache(maxsize=None)
def shipped_engine() -> Baseline:
    """The shipped model with its tokenizer, a trained delta and a non-empty window."""
    from absorber_engine import AbsorberConfig, AbsorberEngine

    eng = AbsorberEngine.from_pretrained(SHIPPED, config=AbsorberConfig(**SMALL))
    return _baseline(eng, list(range(40, 70)), "shipped")


def tiny_llama(vocab: int = 97, layers: int = 1, hidden: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@functools.lru_cache(maxsize=None)
def tiny_engine() -> Baseline:
    """A tiny random Llama without tokenizer, replaying one round, so its memory files hold every
    kind of tensor (delta, window, replay buffer)."""
    from absorber_engine import AbsorberConfig, AbsorberEngine

    eng = AbsorberEngine(tiny_llama(), config=AbsorberConfig(**SMALL, replay_rounds=1))
    base = _baseline(eng, [(7 * i) % 90 + 3 for i in range(50)], "tiny")
    return base


@functools.lru_cache(maxsize=None)
def tiny_model_dir() -> Path:
    """A tiny Llama directory (safetensors, config, the shipped tokenizer) to copy and mutate."""
    path = scratch() / "tiny-model"
    tiny_llama(vocab=2048).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED / name, path / name)
    return path


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def remove(path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)
