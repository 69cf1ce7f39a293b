"""AbsorberConfig.from_dict() and a model directory's absorber_config.json: dicts of every shape
(unknown, non-string and missing keys, values of every type and size) and files of any bytes.

Contract: a ConfigError, or a config that survives the JSON round trip memory files put it through
(to_dict as JSON, then from_dict gives it back equal) and from which an engine is built on a tiny model or
refused with an AbsorberError, leaving that model without deltas.
"""

from __future__ import annotations

import dataclasses
import json

from hypothesis import strategies as st

from .contract import EDGE_FLOATS, EDGE_INTS, Reader, attempt, violate
from .fixtures import fresh_dir, tiny_llama

NAME = "config_dict"

from absorber_engine.config import AbsorberConfig  # noqa: E402
from absorber_engine.model_store import MODEL_CONFIG_FILE, recommended_config  # noqa: E402
from absorber_engine.errors import ConfigError  # noqa: E402

FIELDS = tuple(f.name for f in dataclasses.fields(AbsorberConfig))
JUNK_KEYS = ("", "chunk_size", "Rank", " rank", "__class__", "extra.x", 1, None, 2.5, True, (1, 2))
VALUES = (None, True, False, 0, 1, -1, 2, 3, 8, 16, 64, 0.5, 1e-3, "", "auto", "torch", "ttt", "absorber", "recite",
          "float32", "q_proj", "\ud800", [], [1, 2], ["recite"], ["v_proj", "o_proj"], ["recite", "x"], [[1]], {},
          {"a": 1}, {1: 2}, {"a": b"x"}, b"x", (3, 4), [None], [2**70], 1j, *EDGE_INTS, *EDGE_FLOATS)
BASE = dict(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=1, futures=0, future_tokens=4, probes=0)


def from_bytes(data: bytes) -> dict:
    r = Reader(data)
    if r.int_in(0, 3) == 0:
        return {"mode": "json", "value": r.rest()}
    d = dict(BASE) if r.bool() else {}
    for _ in range(r.int_in(0, 6)):
        key = r.choice(FIELDS) if r.int_in(0, 4) else r.choice(JUNK_KEYS)
        d[key] = r.choice(VALUES)
    return {"mode": "dict", "value": d}


def strategy():
    keys = st.one_of(st.sampled_from(FIELDS), st.sampled_from(JUNK_KEYS), st.text(max_size=8))
    json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
    json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                     st.dictionaries(st.text(max_size=4), inner,
                                                                                     max_size=3)), max_leaves=8)
    values = st.one_of(st.sampled_from(VALUES), json_values)
    dicts = st.builds(lambda base, extra: {**(BASE if base else {}), **extra}, st.booleans(),
                      st.dictionaries(keys, values, max_size=6))
    texts = st.one_of(
        json_values.map(lambda v: json.dumps(v).encode()),
        dicts.map(lambda d: json.dumps({str(k): v for k, v in d.items()}, default=repr).encode()),
        st.binary(max_size=64),
        st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),       # nesting deep enough to recurse
        st.sampled_from((b"", b"\xef\xbb\xbf{}", b"{\"rank\": NaN}", b"{\"rank\": 1e999}", b"\xff\xfe{\x00}\x00")),
    )
    return st.one_of(dicts.map(lambda d: {"mode": "dict", "value": d}),
                     texts.map(lambda b: {"mode": "json", "value": b}))


def _load(inp: dict):
    if inp["mode"] == "dict":
        return AbsorberConfig.from_dict(inp["value"])
    directory = fresh_dir("config")
    (directory / MODEL_CONFIG_FILE).write_bytes(inp["value"])
    return recommended_config(directory)


def check(inp: dict) -> None:
    outcome, cfg = attempt(lambda: _load(inp), allowed=ConfigError)
    if outcome == "refused":
        return
    what = f"config {inp['value']!r:.200}"
    if not isinstance(cfg, AbsorberConfig):
        violate(f"{what}: accepted as {type(cfg).__name__}")
    again = AbsorberConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    if again != cfg:
        violate(f"{what}: does not survive the JSON round trip")
    # Engines only where building one is cheap: a config may ask for 2**24-token windows or rank 65536.
    if cfg.rank > 64 or cfg.window_tokens > 4096 or cfg.future_length > 4096 or cfg.max_resident > 4096:
        return
    from absorber_engine import AbsorberEngine

    model = tiny_llama()
    kinds = [type(m) for m in model.modules()]
    outcome, eng = attempt(lambda: AbsorberEngine(model, config=cfg))
    if outcome == "ok":
        eng.close()
    if [type(m) for m in model.modules()] != kinds:
        violate(f"{what}: the model keeps modules the engine attached ({outcome})")
