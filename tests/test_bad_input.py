"""Every kind of bad input gets a clear error of a known type, and never changes the memory.

Each row here is a row of the README's bad-input table.
"""

import math

import pytest
import torch
from torch import nn

from absorber_engine import (AbsorberConfig, AbsorberEngine, ConfigError, InputError, UnsupportedModelError)
from tiny_models import VOCAB, make_model, random_ids

CFG = dict(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=2, future_tokens=4)


@pytest.fixture(scope="module")
def eng():
    e = AbsorberEngine(make_model("llama"), config=AbsorberConfig(**CFG))
    e.absorb(random_ids(30, seed=1))
    return e


ENGINE_CASES = [
    # (row, call, error, message)
    ("empty token list", lambda e: e.absorb([]), InputError, "empty"),
    ("empty text", lambda e: e.absorb(""), InputError, "no tokenizer"),
    ("nothing to flush", lambda e: AbsorberEngine(make_model("qwen2"), config=AbsorberConfig(**CFG)).absorb([], flush=True),
     InputError, "nothing to absorb"),
    ("id >= vocabulary", lambda e: e.absorb([5, VOCAB]), InputError, "outside the vocabulary"),
    ("negative id", lambda e: e.absorb([5, -1]), InputError, "outside the vocabulary"),
    ("float ids", lambda e: e.absorb([1.5, 2.0]), InputError, "integers"),
    ("float tensor", lambda e: e.absorb(torch.rand(5)), InputError, "integers"),
    ("bool ids", lambda e: e.absorb([True, False]), InputError, "integers"),
    ("batched 2-D ids", lambda e: e.absorb(torch.zeros(2, 5, dtype=torch.long)), InputError, "1-D"),
    ("None", lambda e: e.absorb(None), InputError, "None"),
    ("bytes", lambda e: e.absorb(b"abc"), InputError, "bytes"),
    ("text without a tokenizer", lambda e: e.generate("hello"), InputError, "no tokenizer"),
    ("logits of nothing", lambda e: e.logits([]), InputError, "empty"),
    ("query longer than the model", lambda e: e.logits([3] * 5000), InputError, "absorb"),
    ("negative max_new_tokens", lambda e: e.generate([3], max_new_tokens=-1), InputError, "max_new_tokens"),
    ("top_p = 0", lambda e: e.generate([3], top_p=0), InputError, "top_p"),
    ("negative temperature", lambda e: e.generate([3], temperature=-1), InputError, "temperature"),
    ("generate with nothing to continue", lambda e: AbsorberEngine(make_model("mistral"), config=AbsorberConfig(**CFG)).generate(),
     InputError, "needs a prompt"),
]


@pytest.mark.parametrize("row, call, error, message", ENGINE_CASES, ids=[c[0] for c in ENGINE_CASES])
def test_bad_engine_input(eng, row, call, error, message):
    before = eng.delta.state_dict()
    window, absorbed = eng.window_tokens(), eng.absorbed_tokens
    with pytest.raises(error, match=message):
        call(eng)
    for k, v in eng.delta.state_dict().items():
        assert torch.equal(v, before[k])
    assert eng.window_tokens() == window and eng.absorbed_tokens == absorbed


CONFIG_CASES = [
    ("chunk_tokens = 0", dict(chunk_tokens=0), "chunk_tokens must be a positive integer"),
    ("negative chunk_tokens", dict(chunk_tokens=-5), "chunk_tokens must be a positive integer"),
    ("non-integer chunk_tokens", dict(chunk_tokens=16.5), "chunk_tokens must be a positive integer"),
    ("rank = 0", dict(rank=0), "rank"),
    ("unknown objective", dict(objective="magic"), "objective"),
    ("unknown backend", dict(backend="tpu"), "backend"),
    ("NaN learning rate", dict(lr=math.nan), "lr"),
    ("futures longer than Y", dict(sync_tokens=8, future_tokens=9), "future_tokens"),
    ("empty objective", dict(hidden_weight=0.0, kl_weight=0.0), "empty"),
    ("nothing to synchronize on", dict(sync_tokens=0, futures=0, probes=0), "nothing to synchronize"),
    ("top_p out of range", dict(future_top_p=1.5), "future_top_p"),
]


@pytest.mark.parametrize("row, changes, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(row, changes, message):
    with pytest.raises(ConfigError, match=message):
        AbsorberConfig(**{**CFG, **changes})


def test_config_round_trips_and_rejects_unknown_fields():
    cfg = AbsorberConfig(**CFG, targets=["q_proj", "v_proj"])
    assert AbsorberConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config fields"):
        AbsorberConfig.from_dict({**cfg.to_dict(), "chunk_size": 3})


def test_window_past_gpt2_positions_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(ConfigError, match="positions"):
        AbsorberEngine(model, config=AbsorberConfig(chunk_tokens=48, sync_tokens=32))


def test_config_must_be_a_config():
    with pytest.raises(ConfigError, match="AbsorberConfig"):
        AbsorberEngine(make_model("llama"), config={"chunk_tokens": 4})


@pytest.mark.parametrize("model, message", [
    (nn.Linear(4, 4), "not supported"),
    ("gpt2", "expected a Hugging Face causal LM"),
], ids=["plain module", "a string"])
def test_unsupported_objects(model, message):
    with pytest.raises(UnsupportedModelError, match=message):
        AbsorberEngine(model)


def test_unsupported_architectures():
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    with pytest.raises(UnsupportedModelError, match="'bert'.*not supported"):
        AbsorberEngine(bert)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(UnsupportedModelError, match="'t5'.*not supported"):
        AbsorberEngine(t5)


def test_llama_without_lm_head_is_refused():
    from transformers import LlamaConfig, LlamaModel

    model = LlamaModel(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="LM head"):
        AbsorberEngine(model)


def test_from_pretrained_refuses_missing_and_unsupported_dirs(tmp_path):
    from transformers import BertConfig

    with pytest.raises(InputError, match="does not exist"):
        AbsorberEngine.from_pretrained(tmp_path / "missing")
    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="'bert'"):
        AbsorberEngine.from_pretrained(tmp_path)


def test_targets_matching_nothing_or_non_linear():
    with pytest.raises(ConfigError, match="no linear layer"):
        AbsorberEngine(make_model("llama"), config=AbsorberConfig(**CFG, targets=("not_a_module",)))
    model = make_model("llama")
    with pytest.raises(UnsupportedModelError, match="not a linear"):
        AbsorberEngine(model, config=AbsorberConfig(**CFG, targets=("q_proj", "mlp")))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear      # nothing was wrapped


def test_model_directory_config_is_used_and_checked(tmp_path):
    from absorber_engine.config import MODEL_CONFIG_FILE

    make_model("llama").save_pretrained(tmp_path)
    (tmp_path / MODEL_CONFIG_FILE).write_text('{"chunk_tokens": 24, "sync_tokens": 8, "rank": 3}')
    assert AbsorberEngine.from_pretrained(tmp_path, tokenizer=False).config.rank == 3
    given = AbsorberConfig(**CFG)
    assert AbsorberEngine.from_pretrained(tmp_path, config=given, tokenizer=False).config == given
    for text, message in (("{not json", "not a readable JSON config"), ('{"chunk_size": 4}', "unknown config fields"),
                          ('{"rank": 0}', "rank")):
        (tmp_path / MODEL_CONFIG_FILE).write_text(text)
        with pytest.raises(ConfigError, match=message):
            AbsorberEngine.from_pretrained(tmp_path, tokenizer=False)


def test_bad_gguf_files_and_unknown_model_names(tmp_path, monkeypatch):
    monkeypatch.setenv("ABSORBER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InputError, match="does not exist"):
        AbsorberEngine.from_pretrained(tmp_path / "missing.gguf")
    with pytest.raises(InputError, match="named model"):
        AbsorberEngine.from_pretrained("no-such-model-135m")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)      # the magic, then nonsense: a file cut short
    with pytest.raises(UnsupportedModelError, match="not a GGUF causal LM"):
        AbsorberEngine.from_pretrained(garbage)
    # Nothing half-converted is left behind to be mistaken for a model later.
    leftovers = [p for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
