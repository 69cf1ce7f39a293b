"""Memory files: valid files with mutated bytes, mutated safetensors headers (dtypes, shapes,
offsets), mutated metadata (format, version, fingerprint, config JSON, counters) and tensors
replaced by others of any dtype, shape and value.

Contract: load_memory() and read_memory_config() accept the file or raise MemoryFileError; a
refused file leaves the delta's bytes, the window and the counters as they were and the engine
answers as before; an accepted one leaves an engine that still answers.

An input is a list of mutations, applied in order to the tiny engine's saved memory, so a
minimized input reads as what was done to a valid file.
"""

from __future__ import annotations

import json
import struct

import torch
from hypothesis import strategies as st

from .contract import EDGE_INTS, Reader, assert_unchanged, assert_usable, attempt, snapshot
from .fixtures import fresh_dir, tiny_engine

NAME = "memory_file"

DTYPES = ("F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XYZ", "", 5, None)
META_KEYS = ("format", "version", "model_fingerprint", "model_type", "config", "tokens_absorbed", "rounds", "x")
META_VALUES = ("", "0", "1", "-1", "2", "1e3", " 7", "\u0663", "99999999999999999999999", "absorber-memory", "null",
               "{}", "[]", '{"rank": 2}', '{"rank": "2"}', "x" * 300)
CONFIG_KEYS = ("rank", "alpha", "chunk_tokens", "sync_tokens", "replay_rounds", "targets", "seed", "extra", "nope")
CONFIG_VALUES = ("DELETE", None, 0, 1, 2, 3, -1, 2.0, 1e-300, "2", [], ["q_proj"], {}, 2**63, 2**70, True)
FILLS = ("same", "nan", "inf", "neg", "big", "vocab", "zero", "huge")
TORCH_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool", "complex64")
SHAPES = ("same", "flat", "empty", "extra_dim", "transposed", "scalar", "longer")
KINDS = ("raw", "truncate", "header", "meta", "config", "tensor", "drop", "add")


# ---------------------------------------------------------------------------- safetensors pieces

def split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header, ensure_ascii=False).encode("utf-8", "surrogatepass")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _retensor(t: torch.Tensor, dtype: str, shape: str, fill: str) -> torch.Tensor:
    if fill == "nan":
        t = torch.full_like(t, float("nan"), dtype=torch.float32)
    elif fill == "inf":
        t = torch.full_like(t, float("inf"), dtype=torch.float32)
    elif fill in ("neg", "big", "vocab", "zero", "huge"):
        t = torch.full_like(t, {"neg": -1, "big": 2**40, "vocab": 97, "zero": 0, "huge": 2**62}[fill],
                            dtype=torch.int64)
    t = t.to(getattr(torch, dtype))
    if shape == "flat":
        t = t.reshape(-1)
    elif shape == "empty":
        t = t.reshape(-1)[:0]
    elif shape == "extra_dim":
        t = t[None]
    elif shape == "transposed" and t.dim() == 2:
        t = t.t().contiguous()
    elif shape == "scalar":
        t = t.reshape(-1)[:1].reshape(()) if t.numel() else torch.zeros((), dtype=t.dtype)
    elif shape == "longer":       # up to 300 times as long, a million values at most: repeated, it multiplied
        t = torch.cat([t.reshape(-1)] * max(2, min(300, (1 << 20) // max(t.numel(), 1))))
    return t.contiguous()


def apply(raw: bytes, op: tuple) -> bytes:
    """One mutation of a memory file's bytes. Indices wrap, so any op applies to any file."""
    from safetensors.torch import load, save

    kind = op[0]
    if kind == "raw":
        if not raw:
            return raw
        pos = op[1] % len(raw)
        return raw[:pos] + bytes([op[2]]) + raw[pos + 1:]
    if kind == "truncate":
        return raw[:op[1] % (len(raw) + 1)]
    try:
        header, data = split(raw)
        assert isinstance(header, dict)
        meta = dict(header.get("__metadata__") or {})
        tensors = load(raw) if kind in ("tensor", "drop", "add") else None
    except Exception:
        return raw                            # an earlier op broke the file: later ops keep it as it is
    if kind == "header":
        names = sorted(k for k in header if k != "__metadata__")
        if not names:
            return raw
        entry = dict(header[names[op[1] % len(names)]])
        field, value = op[2], op[3]
        if field == "dtype":
            entry["dtype"] = value
        elif field == "shape":
            entry["shape"] = value
        else:
            entry["data_offsets"] = value
        header[names[op[1] % len(names)]] = entry
        return join(header, data)
    if kind in ("meta", "config"):
        if kind == "meta":
            meta[op[1]] = op[2]
        else:
            try:
                cfg = json.loads(meta.get("config", "{}"))
                if op[2] == "DELETE":
                    cfg.pop(op[1], None)
                else:
                    cfg[op[1]] = op[2]
                meta["config"] = json.dumps(cfg)
            except (ValueError, TypeError, AttributeError):
                return raw
        header["__metadata__"] = meta
        return join(header, data)
    names = sorted(tensors)
    if kind == "drop" and names:
        tensors.pop(names[op[1] % len(names)])
    elif kind == "tensor" and names:
        name = names[op[1] % len(names)]
        tensors[name] = _retensor(tensors[name], op[2], op[3], op[4])
    elif kind == "add":
        tensors[op[1]] = _retensor(torch.arange(6, dtype=torch.int64), op[2], "same", op[3])
    return save(tensors, metadata=meta)


def from_bytes(data: bytes) -> dict:
    r = Reader(data)
    ops = []
    for _ in range(r.int_in(1, 4)):
        kind = r.choice(KINDS)
        if kind == "raw":
            ops.append(("raw", r.int_in(0, 1 << 16), r.byte()))
        elif kind == "truncate":
            ops.append(("truncate", r.int_in(0, 1 << 16)))
        elif kind == "header":
            field = r.choice(("dtype", "shape", "data_offsets"))
            value = {"dtype": lambda: r.choice(DTYPES),
                     "shape": lambda: r.choice(([], [0], [-1], [2**40, 2**40], [3, "x"], None, [1] * 40, [2, 1])),
                     "data_offsets": lambda: r.choice(([0, 0], [0, 2**40], [8, 0], [-1, 4], None, [0], [1, 9]))}[field]()
            ops.append(("header", r.int_in(0, 99), field, value))
        elif kind == "meta":
            ops.append(("meta", r.choice(META_KEYS), r.choice(META_VALUES)))
        elif kind == "config":
            ops.append(("config", r.choice(CONFIG_KEYS), r.choice(CONFIG_VALUES)))
        elif kind == "tensor":
            ops.append(("tensor", r.int_in(0, 99), r.choice(TORCH_DTYPES), r.choice(SHAPES), r.choice(FILLS)))
        elif kind == "drop":
            ops.append(("drop", r.int_in(0, 99)))
        else:
            ops.append(("add", r.choice(("replay.0", "replay.7", "window", "delta.x", "junk")), r.choice(TORCH_DTYPES),
                        r.choice(FILLS)))
    return {"ops": ops}


def strategy():
    idx = st.integers(0, 99)
    op = st.one_of(
        st.tuples(st.just("raw"), st.integers(0, 1 << 16), st.integers(0, 255)),
        st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
        st.tuples(st.just("header"), idx, st.just("dtype"), st.sampled_from(DTYPES)),
        st.tuples(st.just("header"), idx, st.just("shape"),
                  st.one_of(st.lists(st.sampled_from((0, 1, 2, 3, -1, 2**40, *EDGE_INTS[:4])), max_size=4), st.none())),
        st.tuples(st.just("header"), idx, st.just("data_offsets"), st.lists(st.integers(-2, 2**41), max_size=3)),
        st.tuples(st.just("meta"), st.sampled_from(META_KEYS), st.one_of(st.sampled_from(META_VALUES), st.text(max_size=8))),
        st.tuples(st.just("config"), st.sampled_from(CONFIG_KEYS), st.sampled_from(CONFIG_VALUES)),
        st.tuples(st.just("tensor"), idx, st.sampled_from(TORCH_DTYPES), st.sampled_from(SHAPES), st.sampled_from(FILLS)),
        st.tuples(st.just("drop"), idx),
        st.tuples(st.just("add"), st.sampled_from(("replay.0", "replay.7", "window", "delta.x", "junk")),
                  st.sampled_from(TORCH_DTYPES), st.sampled_from(FILLS)),
    )
    return st.lists(op, min_size=1, max_size=4).map(lambda ops: {"ops": ops})


# ---------------------------------------------------------------------------- the check

def mutated_file(ops) -> bytes:
    raw = tiny_engine().memory.read_bytes()
    for op in ops:
        raw = apply(raw, op)
    return raw


def check(inp: dict) -> None:
    from absorber_engine.errors import MemoryFileError
    from absorber_engine.memory_file import read_memory_config

    base = tiny_engine()
    eng, sess = base.engine, base.engine.default
    path = fresh_dir("memory") / "mutated.absorber"
    path.write_bytes(mutated_file(inp["ops"]))
    what = f"memory file after {inp['ops']!r:.300}"
    attempt(lambda: read_memory_config(path), allowed=MemoryFileError)
    before = snapshot(sess)
    try:
        outcome, _ = attempt(lambda: eng.load_memory(path), allowed=MemoryFileError)
        if outcome == "refused":
            assert_unchanged(sess, before, what)
            assert_usable(eng, base.probe, base.expected, what)
        else:
            assert_usable(eng, base.probe, None, what)
            eng.load_memory(base.memory)
            assert_usable(eng, base.probe, base.expected, what + ", then the valid file again")
    except BaseException:
        eng.load_memory(base.memory)              # start the next input from the valid memory
        raise
    finally:
        path.unlink()
        path.parent.rmdir()
