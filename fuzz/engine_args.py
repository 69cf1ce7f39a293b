"""absorb() / logits() / generate() arguments: ids, text, tensors and arrays of any dtype and shape,
objects that are not ids at all, and sampling values (max_new_tokens, temperature, top_p, seed, stop).

Contract: a refused call raises an AbsorberError and leaves the delta's bytes, the window and the
counters as they were, and the engine answers the probe exactly as before. logits() and generate()
never change the memory, even when they succeed; an accepted absorb() is undone by reloading the
baseline memory, after which the probe must again give the baseline logits.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from .contract import EDGE_FLOATS, EDGE_INTS, Reader, violate, assert_unchanged, assert_usable, attempt
from .contract import snapshot
from .fixtures import shipped_engine

NAME = "engine_args"
VOCAB = 2048            # the shipped model's

TORCH_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
                torch.uint64, torch.bool, torch.float32, torch.float64, torch.float16, torch.bfloat16,
                torch.complex64)
NUMPY_DTYPES = ("<i8", ">i8", ">i4", "<u2", "u8", "i1", "?", "<f4", "f8", "c16", "O", "<U3", "S2")


class StrSub(str):
    pass


class Opaque:
    def __repr__(self):
        return "Opaque()"


ODD_ITEMS = (None, 1.5, True, "7", b"7", 1j, np.int64(5), np.uint8(3), np.float32(2.0), Opaque(),
             torch.tensor(4), [3], 2**64)


# ---------------------------------------------------------------------------- building values

def _tensor(dtype, shape: tuple, values: list[int]):
    n = int(np.prod(shape)) if shape else 1
    vals = (values or [0]) * (n // max(len(values), 1) + 1)
    base = torch.tensor([v % 2100 for v in vals[:n]], dtype=torch.int64) - (3 if dtype.is_signed else 0)
    return base.to(dtype).reshape(shape)


def _array(dtype: str, shape: tuple, values: list[int]):
    n = int(np.prod(shape)) if shape else 1
    vals = ((values or [0]) * (n + 1))[:n]
    if dtype == "O":
        return np.array(vals + [None], dtype=object)[:n].reshape(shape)
    if dtype.endswith(("U3", "S2")):
        return np.array([str(v) for v in vals], dtype=dtype).reshape(shape)
    return np.array([abs(v) % 2100 for v in vals]).astype(dtype).reshape(shape)


def make_value(kind: str, ints: list[int], text: str, dtype, shape: tuple, odd):
    if kind == "ids":
        return ints
    if kind == "tuple":
        return tuple(ints)
    if kind == "mixed":
        return ints[:2] + [odd] + ints[2:]
    if kind == "text":
        return text
    if kind == "strsub":
        return StrSub(text)
    if kind == "tensor":
        return _tensor(dtype if isinstance(dtype, torch.dtype) else torch.int64, shape, ints)
    if kind == "array":
        return _array(dtype if isinstance(dtype, str) else "<i8", shape, ints)
    if kind == "generator":
        return (i for i in ints)
    if kind == "range":
        return range(ints[0] if ints else 0, (ints[0] if ints else 0) + 5)
    return {"none": None, "bytes": text.encode("utf-8", "surrogatepass"), "bytearray": bytearray(b"12"),
            "dict": {1: 2}, "set": {1, 2}, "int": ints[0] if ints else 3, "float": 3.0, "odd": odd,
            "memoryview": memoryview(b"\x01\x02"), "nested": [ints, ints]}[kind]


def _quiet(n):
    pass


KINDS = ("ids", "tuple", "mixed", "text", "strsub", "tensor", "array", "generator", "range", "none", "bytes",
         "bytearray", "dict", "set", "int", "float", "odd", "memoryview", "nested")
METHODS = ("absorb", "logits", "generate")


def _sampling_value(r: Reader, name: str):
    kind = r.int_in(0, 5)
    if kind < 3:                       # sensible values, so the call usually gets as far as running
        return {"max_new_tokens": r.int_in(0, 3), "temperature": r.choice((0.0, 0.7, 1.0, 2)),
                "top_p": r.choice((1.0, 0.9, 0.5)), "seed": r.int_in(0, 9), "stop": None}[name]
    if kind == 3:
        return r.choice(EDGE_INTS[:12])
    if kind == 4:
        return r.choice(EDGE_FLOATS)
    return r.choice((None, "1", [1], True, 1j, np.float32(0.5), np.int64(2), "\ud800", [None], 3.5))


RECITE = (True, False, 1, 0, "yes", None, np.bool_(True))
"""generate(recite=...): the fuzzed engine trains no recite probe (probes=0), so True is refused with an
InputError that must leave the memory as it was; anything but a bool is refused too."""


def from_bytes(data: bytes) -> dict:
    r = Reader(data)
    method, kind = r.choice(METHODS), r.choice(KINDS)
    ints = [r.choice((r.int_in(3, 2047), r.int_any())) for _ in range(r.int_in(0, 12))]
    shape = tuple(r.int_in(0, 4) for _ in range(r.int_in(0, 3)))
    text = "".join(chr(r.int_in(0, 0x10FFFF)) if r.bool() else chr(r.int_in(32, 126)) for _ in range(r.int_in(0, 24)))
    dtype = r.choice(NUMPY_DTYPES) if kind == "array" else r.choice(TORCH_DTYPES)
    value = make_value(kind, ints, text, dtype, shape, r.choice(ODD_ITEMS))
    kwargs = {}
    if method == "generate":
        for name in ("max_new_tokens", "temperature", "top_p", "seed", "stop"):
            if r.bool():
                kwargs[name] = _sampling_value(r, name)
        kwargs.setdefault("max_new_tokens", r.int_in(0, 3))
        if r.int_in(0, 3) == 0:        # stop texts, matched in the answer's text (stops.TextWatch)
            kwargs["stop"] = r.choice((text, [text, 2], [text[:2], text[2:]], [text, ""]))
        if r.int_in(0, 3) == 0:
            kwargs["recite"] = r.choice(RECITE)
    elif method == "absorb":
        if r.bool():
            kwargs["flush"] = r.choice((True, False, 1, "yes", None))
        if r.int_in(0, 7) == 0:
            kwargs["progress"] = r.choice((None, 5, "bar", _quiet))
    return {"method": method, "value": value, "kwargs": kwargs}


def strategy():
    small = st.integers(3, 2047)
    any_int = st.one_of(small, st.integers(-5, 5000), st.sampled_from(EDGE_INTS))
    ints = st.lists(any_int, max_size=12)
    text = st.text(max_size=24)
    shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)
    value = st.one_of(
        ints, ints.map(tuple), st.builds(lambda i, o: i[:2] + [o] + i[2:], ints, st.sampled_from(ODD_ITEMS)),
        text, text.map(StrSub),
        st.builds(_tensor, st.sampled_from(TORCH_DTYPES), shapes, ints),
        st.builds(_array, st.sampled_from(NUMPY_DTYPES), shapes, ints),
        st.builds(make_value, st.sampled_from(KINDS), ints, text, st.just(torch.int64), st.just((2,)),
                  st.sampled_from(ODD_ITEMS)),
    )
    sampling = st.one_of(st.sampled_from(EDGE_INTS[:12]), st.sampled_from(EDGE_FLOATS),
                         st.sampled_from((None, "1", [1], True, 1j, np.float32(0.5), "\ud800", [None], 3.5)),
                         st.floats(), st.integers(0, 3))
    gen_kwargs = st.fixed_dictionaries({"max_new_tokens": st.one_of(st.integers(0, 3), sampling)},
                                       optional={**{k: sampling for k in ("temperature", "top_p", "seed", "stop")},
                                                 "recite": st.sampled_from(RECITE)})
    absorb_kwargs = st.fixed_dictionaries({}, optional={"flush": st.sampled_from((True, False, 1, None)),
                                                        "progress": st.sampled_from((None, 5, _quiet))})
    return st.one_of(
        st.builds(lambda v, k: {"method": "generate", "value": v, "kwargs": k}, value, gen_kwargs),
        st.builds(lambda v, k: {"method": "absorb", "value": v, "kwargs": k}, value, absorb_kwargs),
        st.builds(lambda v: {"method": "logits", "value": v, "kwargs": {}}, value),
    )


# ---------------------------------------------------------------------------- the check

def check(inp: dict) -> None:
    base = shipped_engine()
    eng, sess = base.engine, base.engine.default
    before = snapshot(sess)
    method, value, kwargs = inp["method"], inp["value"], inp["kwargs"]
    what = f"{method}({value!r:.80}, {kwargs!r:.120})"
    try:
        outcome, result = attempt(lambda: getattr(eng, method)(value, **kwargs))
        _check_outcome(base, before, method, value, kwargs, outcome, result, what)
        if outcome == "ok" and method == "absorb":
            eng.load_memory(base.memory)          # back to the baseline for the next input
        assert_usable(eng, base.probe, base.expected, what)
    except BaseException:
        eng.load_memory(base.memory)              # a crash may leave anything behind: start clean
        raise


def _check_outcome(base, before, method, value, kwargs, outcome, result, what) -> None:
    sess = base.engine.default
    if outcome == "refused" or method != "absorb":
        assert_unchanged(sess, before, what)
    if outcome == "ok" and method == "logits":
        if result.dim() != 2 or result.shape[1] != VOCAB:
            violate(f"{what}: logits of shape {tuple(result.shape)}")
    if outcome == "ok" and method == "generate":
        limit = kwargs.get("max_new_tokens", 64)
        if isinstance(value, str):
            if not isinstance(result, str):
                violate(f"{what}: text in, {type(result).__name__} out")
        elif not (isinstance(result, list) and len(result) <= limit and all(0 <= t < VOCAB for t in result)):
            violate(f"{what}: generated {result!r:.80}")
