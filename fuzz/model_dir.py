"""Model directories and GGUF files: config.json with fields missing, of the wrong type or absurd
(10**12 layers), not JSON at all; weights missing, cut short, garbage or with a mutated header;
tokenizer files that are garbage; absorber_config.json of any bytes; GGUF files cut short.

Contract: from_pretrained() gives an engine that answers, or raises an AbsorberError (the CLI's
exit 2 or 3); nothing half-converted is left in the model cache.
"""

from __future__ import annotations

import json
import shutil

from hypothesis import strategies as st

from .contract import Reader, attempt, violate
from .fixtures import SMALL, fresh_dir, tiny_model_dir

NAME = "model_dir"

CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "max_position_embeddings", "rope_parameters", "head_dim",
               "architectures", "dtype", "torch_dtype", "tie_word_embeddings", "bos_token_id", "rms_norm_eps",
               "hidden_act", "attention_bias", "pad_token_id")
CONFIG_VALUES = ("DELETE", None, "x", "llama", "gpt2", "bert", -1, 0, 1, 2, 3, 16, 17, 2048, 10**6, 10**12, 2**63,
                 3.5, float("nan"), True, [], ["LlamaForCausalLM"], {}, {"rope_type": "nope"}, "float32", "int8")
GGUF_HEADS = (b"", b"GGUF", b"GGUF\x03\x00\x00\x00", b"GGUF\x03\x00\x00\x00" + b"\xff" * 16,
              b"GGUF\x03\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00",
              b"GGUF\x02\x00\x00\x00", b"GGUF\x63\x00\x00\x00", b"GGML")
WEIGHT_OPS = ("missing", "truncate", "garbage", "header", "empty", "bin")


def from_bytes(data: bytes) -> dict:
    r = Reader(data)
    if r.int_in(0, 4) == 0:
        return {"gguf": r.choice(GGUF_HEADS) + r.blob(64), "ops": []}
    ops = []
    for _ in range(r.int_in(1, 3)):
        kind = r.int_in(0, 5)
        if kind <= 1:
            ops.append(("config", r.choice(CONFIG_KEYS), r.choice(CONFIG_VALUES)))
        elif kind == 2:
            ops.append(("config_bytes", r.choice((b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"model_type": 5}'))
                        + r.blob(8)))
        elif kind == 3:
            ops.append(("weights", r.choice(WEIGHT_OPS), r.int_in(0, 255)))
        elif kind == 4:
            ops.append(("tokenizer", r.choice((b"", b"{", b"{}", b'{"model": {}}', b"\x00" * 8))))
        else:
            ops.append(("absorber_config", r.choice((b"{", b"[]", b'{"rank": 0}', b'{"rank": 2}')) + r.blob(4)))
    return {"gguf": None, "ops": ops}


def strategy():
    op = st.one_of(
        st.tuples(st.just("config"), st.sampled_from(CONFIG_KEYS), st.sampled_from(CONFIG_VALUES)),
        st.tuples(st.just("config_bytes"), st.binary(max_size=16)),
        st.tuples(st.just("weights"), st.sampled_from(WEIGHT_OPS), st.integers(0, 255)),
        st.tuples(st.just("tokenizer"), st.binary(max_size=16)),
        st.tuples(st.just("absorber_config"), st.binary(max_size=16)),
    )
    dirs = st.lists(op, min_size=1, max_size=3).map(lambda ops: {"gguf": None, "ops": ops})
    gguf = st.builds(lambda h, b: {"gguf": h + b, "ops": []}, st.sampled_from(GGUF_HEADS), st.binary(max_size=64))
    return st.one_of(dirs, dirs, gguf)


def _apply(directory, op) -> None:
    kind = op[0]
    if kind == "config":
        try:
            cfg = json.loads((directory / "config.json").read_bytes())
        except ValueError:
            return                            # an earlier op left no JSON to edit
        if not isinstance(cfg, dict):
            return
        if op[2] == "DELETE":
            cfg.pop(op[1], None)
        else:
            cfg[op[1]] = op[2]
        (directory / "config.json").write_text(json.dumps(cfg))
    elif kind == "config_bytes":
        (directory / "config.json").write_bytes(op[1])
    elif kind == "weights":
        w = directory / "model.safetensors"
        raw = w.read_bytes() if w.exists() else b""
        how, n = op[1], op[2]
        if how == "missing":
            w.unlink(missing_ok=True)
        elif how == "truncate":
            w.write_bytes(raw[: len(raw) * n // 256])
        elif how == "garbage":
            w.write_bytes(bytes(range(256)) * (n + 1))
        elif how == "header" and len(raw) > 16:
            pos = 8 + n % 64
            w.write_bytes(raw[:pos] + bytes([(raw[pos] + 1 + n) % 256]) + raw[pos + 1:])
        elif how == "empty":
            w.write_bytes(b"")
        elif how == "bin":
            w.unlink(missing_ok=True)
            (directory / "pytorch_model.bin").write_bytes(raw[:n * 64])
    elif kind == "tokenizer":
        (directory / "tokenizer.json").write_bytes(op[1])
    elif kind == "absorber_config":
        (directory / "absorber_config.json").write_bytes(op[1])


def check(inp: dict) -> None:
    import os

    from absorber_engine import AbsorberConfig, AbsorberEngine

    work = fresh_dir("model")
    cache = work / "cache"
    env = os.environ.get("ABSORBER_CACHE")
    os.environ["ABSORBER_CACHE"] = str(cache)
    try:
        if inp["gguf"] is not None:
            target = work / "model.gguf"
            target.write_bytes(inp["gguf"])
        else:
            target = work / "model"
            shutil.copytree(tiny_model_dir(), target)
            for op in inp["ops"]:
                _apply(target, op)
        what = f"model {inp!r:.300}"
        outcome, eng = attempt(lambda: AbsorberEngine.from_pretrained(target, config=AbsorberConfig(**SMALL)))
        if outcome == "ok":
            eng.logits([3, 4, 5])
            if eng.tokenizer is not None:
                eng.logits("a")
        if cache.exists():
            partial = [p.name for p in (cache / "gguf").iterdir() if not p.name.endswith(".lock")] \
                if (cache / "gguf").exists() else []
            if outcome == "refused" and partial:
                violate(f"{what}: refused, but left {partial} in the cache")
    finally:
        if env is None:
            os.environ.pop("ABSORBER_CACHE", None)
        else:
            os.environ["ABSORBER_CACHE"] = env
        shutil.rmtree(work, ignore_errors=True)
