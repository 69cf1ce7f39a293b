"""Every kind of bad input gets a clear error of a known type, and never changes the memory.

Each row here is a row of the README's bad-input table.
"""

import collections
import math
import sys
from pathlib import Path

import numpy as np

import pytest
import torch
from torch import nn

from absorber_engine import (AbsorberConfig, AbsorberEngine, ConfigError, InputError, UnsupportedModelError)
from absorber_engine.memory_file import FORMAT, read_memory
from tiny_models import VOCAB, make_model, random_ids

sys.path.insert(0, str(Path(__file__).absolute().parent.parent))      # fuzz/ sits at the repo root

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
    ("a bool tensor among ids", lambda e: e.absorb([3, torch.tensor(True)]), InputError, "item 1"),
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
    # A second reader's: flush="no" is truthy and flushed the window; a session of another engine
    # fed that engine's window; sizes and batches of the wrong type raised raw TypeError/AttributeError.
    ("flush that is no bool", lambda e: e.absorb(random_ids(20, seed=2), flush="no"), InputError, "flush must be"),
    ("run(flush) that is no bool", lambda e: e.run(flush="no"), InputError, "flush must be"),
    ("another engine's session", lambda e: e.absorb(random_ids(20, seed=2), session=AbsorberEngine(
        make_model("llama"), config=AbsorberConfig(**CFG)).default), InputError, "another engine"),
    ("a session size that is no int", lambda e: e.session("sized", chunk_tokens="x"), InputError, "must be an int"),
    ("generate_batch of a list", lambda e: e.generate_batch(["default"]), InputError, "dict of session"),
    # fed past the window and not run: a query read the oldest n + m tokens, not the stream's end
    ("generate past tokens fed and not run", lambda e: (e.session("queued"), e.feed(random_ids(60, seed=3), session="queued"),
                                                        e.generate([3], session="queued")), InputError, "36 tokens fed past"),
    ("logits past tokens fed and not run", lambda e: (e.session("queued2"), e.feed(random_ids(25, seed=3), session="queued2"),
                                                      e.logits([3], session="queued2")), InputError, "run\\(\\) absorbs"),
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


@pytest.mark.parametrize("when", ["before a's commit", "after a's commit"])
def test_an_interrupt_while_a_batch_commits_leaves_no_round_in_flight(monkeypatch, when):
    # Ctrl-C (or out of memory) after the round trained, while its sessions were committed one by
    # one: the rest kept a round in flight for good (later input silently dropped, reset and close
    # raising); and one landing just after a commit aborted that committed round instead.
    import absorber_engine.engine as engine_mod
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(**CFG, replay_rounds=2))
    a, b = eng.session("a"), eng.session("b")
    a.feed(random_ids(24, seed=1))
    b.feed(random_ids(24, seed=2))
    if when == "before a's commit":
        real = engine_mod.replay_probe

        def interrupted(*args):
            monkeypatch.setattr(engine_mod, "replay_probe", real)
            raise KeyboardInterrupt

        monkeypatch.setattr(engine_mod, "replay_probe", interrupted)
    else:
        class Interrupted(collections.deque):       # a's replay buffer takes its probe after the commit
            def append(self, item):
                raise KeyboardInterrupt

        a.replay = Interrupted(maxlen=a.replay.maxlen)
    with pytest.raises(KeyboardInterrupt):
        eng.run()
    if when == "after a's commit":
        a.replay = collections.deque(maxlen=a.replay.maxlen)
        assert a.absorbed_tokens > 0 and not a.delta.is_zero()      # committed, and kept
    for sess in (a, b) if when == "before a's commit" else (b,):
        assert sess.stats()["in_flight"] is None and sess.absorbed_tokens == 0 and sess.delta.is_zero()
        assert sess.held_tokens == 24                   # the round's tokens are still in the window
    assert a.stats()["in_flight"] is None
    assert b.absorb(random_ids(8, seed=3)).tokens == 8
    assert b.absorbed_tokens > 0 and len(b.replay) >= 1


def test_a_closed_engine_opens_no_session_and_absorb_many_needs_inputs(tmp_path):
    from absorber_engine.distributed import absorb_many_processes
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(**CFG))
    eng.close()
    with pytest.raises(InputError, match="closed"):
        eng.session("new")
    with pytest.raises(InputError, match="no input files"):
        absorb_many_processes(str(tmp_path), [], str(tmp_path / "out"), AbsorberConfig(**CFG))
    inputs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for path in inputs:
        path.write_text("1 2 3")
    # nccl takes a GPU a rank: two ranks on one GPU failed only once both had loaded the model.
    for device, why in (("cuda:1", "names one GPU for 2 processes"), ("cuda", "2 processes need 2 GPUs")):
        if why.startswith("2 processes") and torch.cuda.device_count() >= 2:
            continue
        with pytest.raises(InputError, match=why):
            absorb_many_processes(str(tmp_path), list(map(str, inputs)), str(tmp_path / "out"), AbsorberConfig(**CFG),
                                  nproc=2, device=device)


def test_a_refused_or_closed_engine_gives_the_model_back_as_it_was_given():
    # Construction froze every parameter and set eval mode, and nothing put them back: a model
    # refused (a NaN weight) or an engine closed left it untrainable, and merged_model() copies too.
    def given():
        m = make_model("llama").train()
        m.model.layers[0].mlp.up_proj.weight.requires_grad_(False)     # the caller's own choice
        return m

    def state(m):
        return m.training, {n: p.requires_grad for n, p in m.named_parameters()}, m.config._attn_implementation

    bad = given()
    want = state(bad)
    with torch.no_grad():
        bad.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(UnsupportedModelError):
        AbsorberEngine(bad, config=AbsorberConfig(**CFG))
    assert state(bad) == want
    model = given()
    eng = AbsorberEngine(model, config=AbsorberConfig(**CFG))
    eng.absorb(random_ids(30, seed=1))
    merged = eng.default.merged_model()
    assert state(merged) == want and not model.training
    eng.close()
    assert state(model) == want


CONFIG_CASES = [
    ("chunk_tokens = 0", dict(chunk_tokens=0), "chunk_tokens must be a positive integer"),
    ("negative chunk_tokens", dict(chunk_tokens=-5), "chunk_tokens must be a positive integer"),
    ("non-integer chunk_tokens", dict(chunk_tokens=16.5), "chunk_tokens must be a positive integer"),
    ("rank = 0", dict(rank=0), "rank"),
    ("unknown objective", dict(objective="magic"), "objective"),
    ("unknown backend", dict(backend="tpu"), "backend"),
    ("NaN learning rate", dict(lr=math.nan), "lr"),
    ("futures longer than Y", dict(sync_tokens=8, future_tokens=9, futures=1), "future_tokens"),
    ("empty objective", dict(hidden_weight=0.0, kl_weight=0.0), "empty"),
    ("nothing to synchronize on", dict(sync_tokens=0, futures=0, probes=0), "nothing to synchronize"),
    ("top_p out of range", dict(future_top_p=1.5), "future_top_p"),
    ("recite_exact without a recite probe", dict(recite_exact=8, probe_kinds=("question",)), "recite_exact"),
    ("recite_exact with the ttt objective", dict(recite_exact=8, objective="ttt"), "recite_exact"),
    ("negative recite_exact", dict(recite_exact=-1), "recite_exact"),
]


@pytest.mark.parametrize("row, changes, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(row, changes, message):
    with pytest.raises(ConfigError, match=message):
        AbsorberConfig(**{**CFG, **changes})


def test_a_future_length_past_y_is_refused_only_where_a_future_is_sampled():
    # `absorber serve --sync-tokens 32 --futures 0` on the shipped model (future_tokens 64) was refused
    AbsorberConfig(**{**CFG, "sync_tokens": 8, "future_tokens": 9, "futures": 0, "probes": 1})
    with pytest.raises(ConfigError, match="future_tokens"):     # no probes: a flush still samples one
        AbsorberConfig(**{**CFG, "sync_tokens": 8, "future_tokens": 9, "futures": 0, "probes": 0})


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
    # A GPT-2 that attends across to an encoder was taken, then its first logits() or generate() raised
    # a raw AttributeError (its cache holds the cross-attention's too).
    from transformers import GPT2Config, GPT2LMHeadModel

    cross = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, add_cross_attention=True))
    with pytest.raises(UnsupportedModelError, match="add_cross_attention"):
        AbsorberEngine(cross)


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
    from absorber_engine.model_store import MODEL_CONFIG_FILE

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


# ---------------------------------------------------------------------------- found by fuzzing (fuzz/)
# Each case is a minimized input a harness found crashing (a traceback, or exit 1 on the command
# line); fuzz.contract.FIXED says where each was fixed.

def _same_memory(engine, state):
    delta, window, absorbed = state
    for k, v in engine.delta.state_dict().items():
        assert torch.equal(v, delta[k]), k
    assert engine.window_tokens() == window and engine.absorbed_tokens == absorbed


def _memory(engine):
    return ({k: v.clone() for k, v in engine.delta.state_dict().items()}, engine.window_tokens(),
            engine.absorbed_tokens)


READ_STREAM_CASES = [
    ("byte codec", b"abc", False, "rot13", "not a text encoding"),
    ("codec raising UnicodeError", b"\\ud800", False, "punycode", "not valid punycode"),
    ("NUL in the encoding", b"abc", False, "utf-8\x00", "unknown text encoding"),
    ("lone surrogate", b"ok \\ud800", False, "unicode_escape", "lone surrogate at character 3"),
    ("huge id", b"9" * 5000, True, "utf-8", "5000 digits"),
    ("unicode digits", "\u0663 \u00b2".encode(), True, "utf-8", "whitespace-separated integers"),
]


@pytest.mark.parametrize("row, data, as_ids, encoding, message", READ_STREAM_CASES,
                         ids=[c[0] for c in READ_STREAM_CASES])
def test_cli_inputs_found_by_fuzzing(tmp_path, row, data, as_ids, encoding, message):
    from absorber_engine.distributed import read_stream

    path = tmp_path / "input.txt"
    path.write_bytes(data)
    with pytest.raises(InputError, match=message):
        read_stream(str(path), as_ids, encoding)


def test_cli_input_that_is_a_directory(tmp_path):
    from absorber_engine.distributed import read_stream

    with pytest.raises(InputError, match="cannot read input"):
        read_stream(str(tmp_path))


CLI_CASES = [
    ("junk prompt ids", ["generate", "--ids", "--prompt", "12 x 4"], "integers; item 1 is 'x'"),
    ("config not JSON", ["absorb", "--config", "{cfg}"], "not a readable JSON config", b"{"),
    ("config null", ["absorb", "--config", "{cfg}"], "must hold a JSON object", b"null"),
    ("config nested 3000 deep", ["absorb", "--config", "{cfg}"], "not a readable JSON config", b"[" * 3000),
    ("config not UTF-8", ["absorb", "--config", "{cfg}"], "not a readable JSON config", b"\xff{}"),
]


@pytest.mark.parametrize("row, argv, message, config", [c + (None,) * (4 - len(c)) for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_cli_arguments_found_by_fuzzing(tmp_path, capsys, row, argv, message, config):
    from absorber_engine.cli import main

    model = tmp_path / "model"
    make_model("llama").save_pretrained(model)
    (tmp_path / "ids.txt").write_text("5 6 7")
    if config is not None:
        (tmp_path / "cfg.json").write_bytes(config)
    argv = [a.format(cfg=tmp_path / "cfg.json") for a in argv] + ["--model", str(model)]
    if argv[0] == "absorb":
        argv += ["--input", str(tmp_path / "ids.txt"), "--ids", "--memory", str(tmp_path / "m")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


CONFIG_FUZZ_CASES = [
    ("non-string key", {1: 2, "chunk_size": 3}, "unknown config fields"),
    ("targets = 5", dict(targets=5), "targets"),
    ("probe_kinds = 5", dict(probe_kinds=5), "probe_kinds"),
    ("future_prompt = None", dict(future_prompt=None), "future_prompt"),
    ("lr = 10**400", dict(lr=10**400), "lr must be a finite number"),
    ("chunk_tokens = 2**64", dict(chunk_tokens=2**64), "chunk_tokens must be a positive integer"),
    ("max_resident = 2**64", dict(max_resident=2**64), "max_resident"),
    ("seed = 2**63", dict(seed=2**63), "seed"),
    ("objective = []", dict(objective=[]), "objective"),
    ("prefix_bos = 'no'", dict(prefix_bos="no"), "prefix_bos must be true or false"),
    ("cuda_graphs = 1", dict(cuda_graphs=1), "cuda_graphs must be true or false"),
    # AdamW divides lr by its bias correction in float32: 1e38 raised a RuntimeError in the first round
    ("lr = 1e38", dict(lr=1e38), "lr must be a finite number > 0 \\(at most 1e\\+30\\)"),
    # below 1, a round whose loss fell by less than 1 - f was rolled back as diverged
    ("divergence_factor = 0.5", dict(divergence_factor=0.5), "divergence_factor must be 0 \\(off\\) or at least 1"),
]


@pytest.mark.parametrize("row, values, message", CONFIG_FUZZ_CASES, ids=[c[0] for c in CONFIG_FUZZ_CASES])
def test_configs_found_by_fuzzing(row, values, message):
    with pytest.raises(ConfigError, match=message):
        AbsorberConfig.from_dict({**CFG, **values} if all(isinstance(k, str) for k in values) else values)


def test_a_config_error_names_its_field_however_the_config_is_made():
    # replace() with an unknown field was a TypeError; a future_prompt the engine could not read an
    # InputError about text or ids the caller never passed, naming no field
    with pytest.raises(ConfigError, match="unknown config fields: \\['chunk_size'\\]"):
        AbsorberConfig().replace(chunk_size=3)
    cfg = AbsorberConfig(chunk_tokens=16, sync_tokens=8, futures=1, future_tokens=4)
    for prompt, why in (("What is", "no tokenizer"), ((500,), "outside the vocabulary")):
        with pytest.raises(ConfigError, match=f"future_prompt: .*{why}"):
            AbsorberEngine(make_model("llama"), config=cfg.replace(future_prompt=prompt))


def test_model_config_nested_too_deep_is_a_config_error(tmp_path):
    from absorber_engine.model_store import MODEL_CONFIG_FILE, recommended_config

    (tmp_path / MODEL_CONFIG_FILE).write_bytes(b"[" * 5000)
    with pytest.raises(ConfigError, match="not a readable JSON config"):
        recommended_config(tmp_path)


MEMORY_FUZZ_CASES = [
    ("counter past int64", [("meta", "tokens_absorbed", "99999999999999999999999")], "counters out of range"),
    # int64's largest loaded, then wrapped negative on the next round and saved a file no load took
    ("counter at int64's largest", [("meta", "tokens_absorbed", str(2**63 - 1))], "counters out of range"),
    ("config nested 200,000 deep", [("meta", "config", "[" * 200_000 + "]" * 200_000)], "corrupt header"),
    # Tensors by sorted name: 0 is the bank's round lengths ("slot_tokens"), then the deltas'.
    ("complex delta", [("tensor", 2, "complex64", "same", "same")], "not floating point"),
    ("bool delta", [("tensor", 1, "bool", "same", "same")], "not floating point"),
    ("round lengths as floats", [("tensor", 0, "float32", "same", "same")], "corrupt round lengths"),
    # a second reader's: int() read these as 12 and 10
    ("arabic-indic digits in a counter", [("meta", "tokens_absorbed", "\u0661\u0662")], "corrupt header"),
    ("a counter with a sign, spaces and an underscore", [("meta", "rounds", " +1_0 ")], "corrupt header"),
    ("a slot count in other digits", [("meta", "slots", "\u0661")], "no valid slot count"),
]


@pytest.mark.parametrize("row, ops, message", MEMORY_FUZZ_CASES, ids=[c[0] for c in MEMORY_FUZZ_CASES])
def test_memory_files_found_by_fuzzing(tmp_path, row, ops, message):
    from absorber_engine import MemoryFileError
    from fuzz.memory_file import apply

    source = AbsorberEngine(make_model("llama"), config=AbsorberConfig(**CFG))
    source.absorb(random_ids(40, seed=3))
    source.save_memory(tmp_path / "valid")
    raw = (tmp_path / "valid").read_bytes()
    for op in ops:
        raw = apply(raw, op)
    (tmp_path / "mutated").write_bytes(raw)
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(**CFG))
    eng.absorb(random_ids(30, seed=1))
    state = _memory(eng)
    with pytest.raises(MemoryFileError, match=message):
        eng.load_memory(tmp_path / "mutated")
    _same_memory(eng, state)


def _target(tmp_path, kind):
    if kind == "file in the way":
        (tmp_path / "f").write_bytes(b"x")
        return tmp_path / "f"
    if kind == "under a file":
        (tmp_path / "f").write_bytes(b"x")
        return tmp_path / "f" / "out"
    if kind == "directory":
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "adapter_config.json").mkdir()
        return tmp_path / "d"
    if kind == "symlink loop":
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        return tmp_path / "loop" / "out"
    return {"None": None, "a number": 3, "empty": "", "NUL": str(tmp_path / "a\x00b"),
            "name too long": str(tmp_path / ("n" * 300))}[kind]


@pytest.mark.parametrize("api", ["save_memory", "export_peft"])
@pytest.mark.parametrize("kind", ["None", "a number", "empty", "NUL", "name too long", "file in the way",
                                  "under a file", "directory", "symlink loop"])
def test_output_targets_found_by_fuzzing(eng, tmp_path, api, kind):
    target = _target(tmp_path, kind)
    if api == "save_memory" and kind == "file in the way":     # a file at a memory path is overwritten: that is the point
        eng.save_memory(target)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["f"] and read_memory(target)[1]["format"] == FORMAT
        return
    state, before = _memory(eng), sorted(tmp_path.rglob("*"))
    with pytest.raises(InputError):
        getattr(eng, api)(target)
    _same_memory(eng, state)
    assert sorted(tmp_path.rglob("*")) == before                      # nothing written, no temporary left


def _model_dir(tmp_path, change):
    import json as _json

    path = tmp_path / "model"
    make_model("llama").save_pretrained(path)
    cfg = path / "config.json"
    if change == "no config.json":
        cfg.unlink()
    elif change == "config not JSON":
        cfg.write_bytes(b"{")
    elif change == "weights missing":
        (path / "model.safetensors").unlink()
    elif change == "weights cut short":
        raw = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(raw[: len(raw) // 3])
    elif change == "pickled weights garbage":
        (path / "model.safetensors").unlink()
        (path / "pytorch_model.bin").write_bytes(b"\x80\x02garbage")
    else:
        key, value = {"model_type 17": ("model_type", 17), "hidden_size 'x'": ("hidden_size", "x"),
                      "absurd layers": ("num_hidden_layers", 10**6), "heads 10**6": ("num_attention_heads", 10**6),
                      "vocabulary unlike the weights": ("vocab_size", 98)}[change]
        values = _json.loads(cfg.read_text())
        values[key] = value
        cfg.write_text(_json.dumps(values))
    return path


@pytest.mark.parametrize("change", ["no config.json", "config not JSON", "model_type 17", "hidden_size 'x'",
                                    "absurd layers", "heads 10**6", "vocabulary unlike the weights",
                                    "weights missing", "weights cut short", "pickled weights garbage"])
def test_model_directories_found_by_fuzzing(tmp_path, change):
    with pytest.raises(UnsupportedModelError):
        AbsorberEngine.from_pretrained(_model_dir(tmp_path, change), config=AbsorberConfig(**CFG), tokenizer=False)


def test_gguf_cut_short_after_its_header(tmp_path, monkeypatch):
    monkeypatch.setenv("ABSORBER_CACHE", str(tmp_path / "cache"))
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x07")
    with pytest.raises(UnsupportedModelError, match="not a GGUF causal LM"):
        AbsorberEngine.from_pretrained(short)


def test_a_model_on_meta_or_in_float8_and_token_ids_no_plain_tensor_holds_are_refused():
    # each crashed with a traceback: isfinite on meta or float8 weights, .tolist() of meta, sparse,
    # nested or quantized tensors, int() of a masked array's masked entry
    import numpy as np

    for build in (lambda m: m.to("meta"), lambda m: m.to(torch.float8_e4m3fn)):
        with pytest.raises(UnsupportedModelError, match="the engine runs weights held in memory"):
            AbsorberEngine(build(make_model("llama")), config=AbsorberConfig(**CFG))
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(**CFG))
    plain = torch.tensor([3, 4, 5])
    for ids in (plain.to("meta"), plain.to_sparse(), torch.nested.nested_tensor([plain]),
                torch.quantize_per_tensor(plain.float(), 1.0, 0, torch.quint8),
                np.ma.masked_array([3, 4, 5], mask=[0, 1, 0])):
        with pytest.raises(InputError, match="token ids must"):
            eng.logits(ids)


def test_engine_refused_after_attaching_leaves_the_model_plain():
    model = make_model("llama")
    with pytest.raises(ConfigError, match="future_prompt: .*tokenizer"):
        AbsorberEngine(model, config=AbsorberConfig(**CFG, futures=1, future_prompt="What is"))
    assert type(model.model.layers[0].self_attn.v_proj) is nn.Linear


# Crashes found by fuzzing in the engine's input checks and sampling, fixed there (inputs.py,
# sampling.sample_next, engine.absorb); each is its minimized input.


@pytest.mark.parametrize("seed", [2**70, -2**63 - 1, "a", True, 1.5], ids=["2**70", "below int64", "str", "bool", "float"])
def test_generate_seed_that_is_no_int64(eng, seed):
    state = _memory(eng)
    with pytest.raises(InputError, match="seed"):
        eng.generate([3, 4], max_new_tokens=2, seed=seed)
    _same_memory(eng, state)


@pytest.mark.parametrize("stop", [3.5, [None], ["x", object()]], ids=["float", "[None]", "object"])
def test_generate_stop_that_is_no_ids(eng, stop):
    with pytest.raises(InputError, match="stop"):
        eng.generate([3, 4], max_new_tokens=2, stop=stop)


@pytest.mark.parametrize("value", [np.array(["1"]), np.array([1, "a"], dtype=object)], ids=["strings", "objects"])
def test_numpy_arrays_that_are_no_ids(eng, value):
    state = _memory(eng)
    with pytest.raises(InputError, match="integers"):
        eng.absorb(value)
    _same_memory(eng, state)


def test_big_endian_numpy_ids_read_like_native_ones(eng):
    assert torch.equal(eng.logits(np.array([5, 6], dtype=">i4")), eng.logits([5, 6]))


def test_progress_that_is_not_callable():
    e = AbsorberEngine(make_model("llama"), config=AbsorberConfig(**CFG))
    state = _memory(e)
    with pytest.raises(InputError, match="progress"):
        e.absorb(random_ids(30, seed=1), progress=5)
    _same_memory(e, state)


@pytest.mark.parametrize("temperature, top_p", [(1e-300, 1.0), (5e-324, 1.0), (10**400, 1.0), (2.0, 1e-300)],
                         ids=["temperature 1e-300", "subnormal temperature", "temperature 10**400", "top_p 1e-300"])
def test_sampling_at_extremes(eng, temperature, top_p):
    try:
        out = eng.generate([3, 4], max_new_tokens=2, temperature=temperature, top_p=top_p)
    except InputError:
        return
    assert len(out) == 2 and all(0 <= t < VOCAB for t in out)


def test_text_with_lone_surrogates():
    from absorber_engine.cli_args import SHIPPED_MODEL

    e = AbsorberEngine.from_pretrained(SHIPPED_MODEL, config=AbsorberConfig(**CFG))
    with pytest.raises(InputError):
        e.absorb("notes \ud800 more")


def test_second_readers_findings_on_models_targets_seeds_and_ids(tmp_path, eng):
    """A NaN weight, the LM head as a target, a seed whose round seed passes int64, ids that are
    tensors of the wrong kind: each a clear error or a working run, none a raw crash."""
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(UnsupportedModelError, match="NaN or inf .*layers.0.mlp.down_proj.weight"):
        AbsorberEngine(model, config=AbsorberConfig(**CFG))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear      # left as it was given
    with pytest.raises(ConfigError, match="LM head"):
        AbsorberEngine(make_model("llama"), config=AbsorberConfig(**CFG, targets=("lm_head",)))
    big_seed = AbsorberEngine(make_model("llama"), config=AbsorberConfig(**CFG, seed=2**62))
    assert big_seed.absorb(random_ids(30, seed=2), flush=True).rounds > 0
    for bad in ([torch.tensor(1.5)], [torch.tensor([3, 4])], [np.array([3, 4])]):
        with pytest.raises(InputError, match="item 0"):
            eng.absorb(bad)
    assert eng.to_ids([torch.tensor(3), np.int64(4)]) == [3, 4]


def test_files_written_take_the_mode_a_plain_open_gives(tmp_path, eng):
    """mkstemp's 0600 survived the rename: an adapter a server running as another user could not read."""
    import os
    eng.save_memory(tmp_path / "m.absorber")
    eng.export_peft(tmp_path / "adapter")
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "m.absorber", tmp_path / "adapter" / "adapter_model.safetensors",
              tmp_path / "adapter" / "adapter_config.json"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_a_round_past_a_position_table_is_refused_up_front():
    """GPT-2's positions are a table: a probe (X in the frame, the seed, X again for recite) or a
    future after X·Y may run past it although X·Y fits. Refused as a ConfigError at construction (was
    an IndexError in the first round)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(Path(__file__).absolute().parent.parent / "model" / "absorber-tiny")

    def gpt2():
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64))

    base = dict(rank=2, max_steps=1, futures=0, probes=0, compute_dtype="float32")
    refused = [dict(chunk_tokens=40, sync_tokens=20, probes=1, probe_kinds=("recite",)),
               dict(chunk_tokens=40, sync_tokens=20, futures=1, future_tokens=8, futures_follow_y=True),
               dict(chunk_tokens=16, sync_tokens=0, futures=1, future_tokens=60),
               # a flush's X is all the window holds, n + m: 53 + a future of 12 (was an IndexError
               # at the first flush; X was counted as n)
               dict(chunk_tokens=41, sync_tokens=12, futures=1, future_tokens=12),
               # no tokenizer, so no probes: a round with no Y samples one future of 64 regardless
               dict(chunk_tokens=16, sync_tokens=0, probes=1, tokenizer=None)]
    for changes in refused:
        model = gpt2()
        changes = dict(changes)
        with pytest.raises(ConfigError, match="past the 64 positions"):
            AbsorberEngine(model, tokenizer=changes.pop("tokenizer", tok), config=AbsorberConfig(**{**base, **changes}))
        assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"      # left as given
    # X of up to 22 (a flush), twice (recite) in an 18-token frame, and BOS: 63 positions
    fits = AbsorberEngine(gpt2(), tokenizer=tok, config=AbsorberConfig(**{**base, "chunk_tokens": 14, "sync_tokens": 8,
                                                                          "probes": 1, "probe_kinds": ("recite",)}))
    assert fits.absorb("one two three four five six seven eight nine ten " * 3, flush=True).rounds > 0
    with pytest.raises(ConfigError, match="past the 64 positions"):
        fits.session("long", chunk_tokens=40, sync_tokens=20)


def test_a_failed_flush_leaves_no_drain_behind(monkeypatch):
    # The scheduler's draining flag outlived a flush whose round failed: the next plain absorb()
    # absorbed its tokens as X with no Y and emptied the window, though no flush was asked.
    import absorber_engine.engine as engine_mod
    from absorber_engine import AbsorptionError
    from absorber_engine.train import RoundResult

    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(**{**CFG, "chunk_tokens": 8, "sync_tokens": 8}))
    eng.absorb(random_ids(5, seed=1))
    monkeypatch.setitem(engine_mod.ROUNDS, "absorber", lambda runner, batch, cfg: [RoundResult(error="injected")])
    with pytest.raises(AbsorptionError):
        eng.absorb([], flush=True)
    monkeypatch.undo()
    assert eng.default.stats()["draining"] is False and eng.held_tokens == 5
    rep = eng.absorb(random_ids(6, seed=2))                   # 11 held: under n + m, nothing to absorb
    assert rep.rounds == 0 and eng.held_tokens == 11



def test_a_flush_run_that_ends_early_leaves_no_drain_behind(monkeypatch):
    # run(flush=True) ended the drain only of sessions whose round failed: a round that raised, or a
    # flushed session whose batch never ran after the failures, went on draining, and the next plain
    # absorb() absorbed what it held as a round of X with no Y.
    import absorber_engine.engine as engine_mod
    from absorber_engine.train import RoundResult

    def raising(runner, batch, cfg):
        raise MemoryError("injected")

    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(**{**CFG, "chunk_tokens": 8, "sync_tokens": 8}))
    eng.absorb(random_ids(5, seed=1))
    monkeypatch.setitem(engine_mod.ROUNDS, "absorber", raising)
    with pytest.raises(MemoryError):
        eng.run(flush=True)
    monkeypatch.undo()
    assert eng.default.stats()["draining"] is False
    assert eng.absorb(random_ids(6, seed=2)).rounds == 0 and eng.held_tokens == 11
    a, b = eng.session("a"), eng.session("b")
    a.feed(random_ids(5, seed=4))
    b.feed(random_ids(7, seed=5))                            # another length: another batch
    monkeypatch.setitem(engine_mod.ROUNDS, "absorber", lambda runner, batch, cfg: [
        RoundResult(error="injected") for _ in batch.deltas])
    eng.run(flush=True)                                      # the first batch fails: run() stops there
    monkeypatch.undo()
    for s in (eng.default, a, b):
        assert s.stats()["draining"] is False
        assert s.absorb(random_ids(1, seed=6)).rounds == 0



def test_any_error_out_of_absorb_says_how_many_tokens_it_took(monkeypatch):
    # Only AbsorptionError said how many of the call's tokens were taken: after an out-of-memory or a
    # Ctrl-C mid-call a caller retrying the same input fed those tokens, held in the window, twice.
    import absorber_engine.engine as engine_mod

    def raising(runner, batch, cfg):
        raise MemoryError("injected")

    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(**{**CFG, "chunk_tokens": 8, "sync_tokens": 8}))
    ids = random_ids(20, seed=3)
    monkeypatch.setitem(engine_mod.ROUNDS, "absorber", raising)
    with pytest.raises(MemoryError) as info:
        eng.absorb(ids)
    monkeypatch.undo()
    assert info.value.tokens_taken == 16 and eng.window_tokens() == ids[:16]      # n + m fed, then the round
    eng.absorb(ids[info.value.tokens_taken:])
    assert eng.absorbed_tokens + eng.held_tokens == len(ids)

def test_an_interrupt_as_a_batch_is_handed_out_leaves_no_round_in_flight():
    # The batch was taken from the scheduler before the block that aborts it on any way out: a
    # Ctrl-C there left its rounds in flight for good, and every later absorb() of the session did nothing.
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(**{**CFG, "chunk_tokens": 8, "sync_tokens": 8}))

    class Interrupting(dict):
        armed = True

        def __getitem__(self, key):
            if Interrupting.armed:
                Interrupting.armed = False
                raise KeyboardInterrupt
            return dict.__getitem__(self, key)

    eng.sessions = Interrupting(eng.sessions)
    with pytest.raises(KeyboardInterrupt):
        eng.absorb(random_ids(16, seed=1))
    assert eng.default.stats()["in_flight"] is None and eng.held_tokens == 16
    rep = eng.absorb([], flush=True)
    assert rep.rounds >= 1 and eng.held_tokens == 0

def test_cli_paths_refused_before_the_work(tmp_path, capsys, monkeypatch):
    """An unusable --memory was found only after every round ran, and the rounds were lost; the
    delegated commands and the model cache raised raw OSErrors."""
    from absorber_engine import cli

    model = tmp_path / "model"
    make_model("llama").save_pretrained(model)
    (tmp_path / "ids.txt").write_text(" ".join(map(str, random_ids(40, seed=5))))
    (tmp_path / "adir").mkdir()
    (tmp_path / "plain").write_text("x")
    loads = []
    real = cli._load_engine
    monkeypatch.setattr(cli, "_load_engine", lambda *a, **k: loads.append(1) or real(*a, **k))
    absorb = ["absorb", "--model", str(model), "--ids", "--input", str(tmp_path / "ids.txt"), "--memory"]
    cases = [(absorb + [str(tmp_path / "adir")], "is a directory"),
             (absorb + [str(tmp_path / "plain" / "m.absorber")], "is not a directory"),
             (["absorb-many", "--model", str(model), "--ids", "--out-dir", str(tmp_path / "plain"),
               "--inputs", str(tmp_path / "ids.txt")], "cannot be made: [Errno 17] File exists"),
             (["demo", "--model", str(tmp_path / "nonexistent")], "does not exist")]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not loads                                       # refused before any model was loaded
    monkeypatch.setenv("ABSORBER_CACHE", str(tmp_path / "plain"))
    monkeypatch.setattr("absorber_engine.model_store._sha256", lambda path: "0" * 64)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert cli.main(["generate", "--model", str(tmp_path / "m.gguf"), "--ids", "--prompt", "3 4"]) == 2
    assert "cannot use the model cache" in capsys.readouterr().err


def test_cli_bad_ids_leave_an_existing_memory_file_alone(tmp_path, capsys):
    """The save-what-was-done handler took an out-of-vocabulary id for a failed round and wrote an
    empty memory over the file --memory named."""
    from absorber_engine.cli import main

    model = tmp_path / "model"
    make_model("llama").save_pretrained(model)
    (tmp_path / "ids.txt").write_text(" ".join(map(str, random_ids(40, seed=7) + [VOCAB + 5])))
    (tmp_path / "old.absorber").write_bytes(b"precious")
    argv = ["absorb", "--model", str(model), "--ids", "--input", str(tmp_path / "ids.txt"), "--memory",
            str(tmp_path / "old.absorber"), "--quiet", "--chunk-tokens", "16", "--sync-tokens", "8"]
    assert main(argv) == 2
    assert (tmp_path / "old.absorber").read_bytes() == b"precious" and "Traceback" not in capsys.readouterr().err


def test_device_meta_is_refused_and_absorb_many_quiet_loads_quietly(tmp_path, capsys):
    from absorber_engine.cli import main

    model = tmp_path / "model"
    make_model("llama").save_pretrained(model)
    with pytest.raises(InputError, match="meta"):
        AbsorberEngine.from_pretrained(model, device="meta", tokenizer=False)
    (tmp_path / "ids.txt").write_text(" ".join(map(str, random_ids(40, seed=8))))
    argv = ["absorb-many", "--model", str(model), "--ids", "--out-dir", str(tmp_path / "out"), "--inputs",
            str(tmp_path / "ids.txt"), "--chunk-tokens", "16", "--sync-tokens", "8", "--max-steps", "1", "--quiet"]
    assert main(argv) == 0
    assert "Loading weights" not in capsys.readouterr().err


def test_the_engine_called_from_inside_its_own_callbacks_refuses_clearly():
    # The lock is re-entrant: logits() from on_token ran inside the decode block of a batch of two rows
    # and raised a raw RuntimeError ("layers run fused inside decode_weights").
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=1))
    eng.session("a").absorb(random_ids(30, seed=1))
    eng.session("b")
    errors = []

    def call_back(*args):
        try:
            eng.logits([5, 6], session="a")
        except InputError as err:
            errors.append(str(err))

    alone = eng.generate_batch({"a": [3, 4], "b": [3]}, max_new_tokens=3)
    assert eng.generate_batch({"a": [3, 4], "b": [3]}, max_new_tokens=3, on_token=call_back) == alone
    eng.absorb(random_ids(30, seed=2), progress=call_back)
    assert len(errors) >= 7 and all("inside its own on_token or progress callback" in e for e in errors)
    eng.logits([5, 6], session="a")                    # once the call returned, the engine takes calls again
