"""round_cut: the engine's rounds end at boundary tokens (one delta per document with a bank), its
shortest round is derived from the model, and configs it cannot honour are refused up front."""

import itertools
import math
from pathlib import Path

import pytest

from absorber_engine import AbsorberConfig, AbsorberEngine, ConfigError
from absorber_engine.round_cuts import boundary_ids, kv_bytes, vocabulary_texts
from tiny_models import make_model

MODEL = Path(__file__).resolve().parents[1] / "model" / "absorber-tiny"
pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="model/absorber-tiny not built")

CFG = AbsorberConfig(chunk_tokens=48, sync_tokens=8, rank=2, max_steps=1, objective="ttt",
                     compute_dtype="float32", memory_slots=16, round_cut="\n")
LINES = [f"The {w} number {i} is {i * 37 % 101}; the code word is {w}{i}.\n"
         for i, w in enumerate(["red", "green", "blue", "amber", "teal", "ivory", "jade", "coral", "plum", "sand"])]


def test_min_cut_is_the_tokens_whose_kv_weighs_one_delta():
    eng = AbsorberEngine.from_pretrained(MODEL, config=CFG)
    cfg, runner = eng.config, eng.runner
    delta_bytes = eng.default.new_delta().nbytes
    assert delta_bytes == 4 * cfg.rank * sum(a + b for a, b in runner.shapes.values())
    assert eng.scheduler.min_cut == math.ceil(delta_bytes / kv_bytes(runner.model.config, 1, runner.dtype))
    assert eng.scheduler.cut_after == boundary_ids(vocabulary_texts(eng.tokenizer), "\n") and eng.scheduler.cut_after
    assert AbsorberEngine.from_pretrained(MODEL, config=CFG.replace(round_cut_min=5)).scheduler.min_cut == 5


def test_rounds_end_at_line_ends_and_each_keeps_a_delta():
    eng = AbsorberEngine.from_pretrained(MODEL, config=CFG.replace(round_cut_min=4))
    ends, total = set(), 0
    for line in LINES:
        ids = eng.to_ids(line)
        total += len(ids)
        ends.add(total)
        eng.absorb(ids)
        assert eng.absorbed_tokens == 0 or eng.absorbed_tokens in ends   # never a line cut in two
    rounds = eng.default.rounds
    assert rounds >= 3 and len(eng.default.slots) == rounds
    assert eng.absorbed_tokens < total - CFG.sync_tokens     # a window stays raw, as without cuts
    plain = AbsorberEngine.from_pretrained(MODEL, config=CFG.replace(round_cut=""))
    for line in LINES:
        plain.absorb(line)
    assert plain.default.rounds < rounds      # rounds of n take fewer, longer bites


def test_a_blank_line_inside_one_text_ends_a_round():
    # The tokenizer reads "...\n\nThe" as "\n", "\n": no one token holds the break, and a stream
    # absorbed as one text was never cut (rounds of n, whatever they held).
    docs = ["".join(LINES[i:i + 2]) + "\n" for i in range(0, 10, 2)]
    eng = AbsorberEngine.from_pretrained(MODEL, config=CFG.replace(round_cut="\n\n", round_cut_min=4, chunk_tokens=64))
    ids = eng.to_ids("".join(docs))
    assert not any("\n\n" in eng.tokenizer.decode([i]) for i in ids[:-1])    # the breaks span two tokens
    eng.absorb(ids, flush=True)
    ends = itertools.accumulate(d.round_tokens for d in eng.default.slots)
    assert all(eng.tokenizer.decode(ids[:e]).endswith("\n\n") for e in ends)
    assert eng.default.rounds == len(docs)


def test_refused_configs():
    with pytest.raises(ConfigError, match="round_cut must be text"):
        AbsorberConfig(round_cut=5).validate()
    with pytest.raises(ConfigError, match="round_cut_min"):
        AbsorberConfig(round_cut_min=0).validate()
    with pytest.raises(ConfigError, match="needs an engine with a tokenizer"):
        AbsorberEngine(make_model("llama"), config=AbsorberConfig(round_cut="\n"))
    with pytest.raises(ConfigError, match="no token of this vocabulary, nor two in a row"):
        AbsorberEngine.from_pretrained(MODEL, config=CFG.replace(round_cut="\u2603\u2603\u2603"))


def test_a_cut_that_starts_with_a_space_is_found_under_a_sentencepiece_tokenizer():
    # "▁the" decoded alone reads "the": no token held " the", and such a cut was refused.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_tokenizers import sentencepiece_like

    tok = sentencepiece_like()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2))
    eng = AbsorberEngine(model.eval(), tokenizer=tok, config=CFG.replace(round_cut=" the", round_cut_min=4))
    assert tok.convert_tokens_to_ids("▁the") in eng.scheduler.cut_after
    ids = eng.to_ids("Hello world. The grass is green and the sky is blue. " * 6)
    eng.absorb(ids, flush=True)
    ends = list(itertools.accumulate(d.round_tokens for d in eng.default.slots))
    assert len(ends) > 1 and all(tok.convert_ids_to_tokens(ids[e - 1]) == "▁the" for e in ends[:-1])
