"""Interop: a wrapped model's generate() takes inputs far past its window; the memory exports as
a PEFT adapter that PEFT loads and runs to the engine's logits."""

import copy

import pytest
import torch

from absorber_engine import AbsorberConfig, AbsorberEngine, InputError, wrap
from tiny_models import VOCAB, make_model, random_ids
from test_stream import SpanSpy

BOS = 1

def _short_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def test_wrapped_generate_reads_ten_times_its_window():
    model = _short_gpt2()
    ids = torch.tensor([random_ids(640, seed=1)])                 # 10x the model's 64 positions
    with pytest.raises(Exception):
        model.generate(ids, max_new_tokens=5, do_sample=False)    # the plain model cannot run it at all
    cfg = AbsorberConfig(chunk_tokens=32, sync_tokens=16, rank=2, max_steps=1, future_tokens=8)
    wrapped = wrap(model, config=cfg, tail_tokens=8)
    spy = SpanSpy(wrapped.engine.runner.base)
    out = wrapped.generate(ids, max_new_tokens=5, eos_token_id=None)
    assert out.shape == (1, 645) and torch.equal(out[0, :640], ids[0])
    assert spy.max_span <= 1 + 48 + 8 + 5                         # BOS + window + tail + new tokens, never 640
    assert wrapped.engine.absorbed_tokens > 560                   # the overflow went into the memory
    # A batch of two rows, greedy: each row equals its own single-row call.
    batch = torch.tensor([random_ids(200, seed=2), random_ids(200, seed=3)])
    both = wrapped.generate(batch, max_new_tokens=4, eos_token_id=None)
    assert torch.equal(both[1], wrapped.generate(batch[1:], max_new_tokens=4, eos_token_id=None)[0])
    # The wrapped model still behaves as the model for everything else.
    assert wrapped.config is model.config
    with pytest.raises(InputError, match="does not take"):
        wrapped.generate(ids, max_new_tokens=2, num_beams=4)



def test_wrapped_generate_of_a_tokenizers_input_ids_equals_the_models_own():
    # The shipped model's tokenizer puts BOS in input_ids and the engine starts every sequence with
    # its own: read twice, 2 of 4 greedy answers differed from model.generate on inputs that fit the window.
    from pathlib import Path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(__file__).resolve().parents[1] / "model" / "absorber-tiny"
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    plain = copy.deepcopy(model)
    wrapped = wrap(model, tokenizer=tok)
    for text in ("Once upon a time", "There was a tiny owl on the hill above Lisbon.",
                 "The pass key is 71432. Remember it. What is the pass key? The pass key is"):
        enc = tok(text, return_tensors="pt")
        assert enc.input_ids[0, 0] == plain.config.bos_token_id
        want = plain.generate(**enc, max_new_tokens=12, do_sample=False)
        assert torch.equal(wrapped.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=12), want)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "llama"])
def test_wrapped_generate_without_a_tokenizer_reads_input_ids_as_given(arch):
    # With no tokenizer the engine put the config's BOS before every row, which neither these
    # models' tokenizers nor transformers do: greedy answers differed on inputs that fit the window.
    model = make_model(arch)
    plain = copy.deepcopy(model)
    cfg = AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=1, future_tokens=4, compute_dtype="float32")
    wrapped = wrap(model, config=cfg)
    ids = torch.tensor([random_ids(6, seed=3)])
    want = plain.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(wrapped.generate(ids, max_new_tokens=8, eos_token_id=[]), want)


def test_wrapped_generate_keeps_the_eos_it_stopped_on_and_checks_its_arguments():
    cfg = AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=1, future_tokens=4, compute_dtype="float32")
    wrapped = wrap(make_model("llama"), config=cfg)
    ids = torch.tensor([random_ids(30, seed=4)])
    free = wrapped.generate(ids, max_new_tokens=6, eos_token_id=[])[0, 30:].tolist()
    other = next(t for t in range(VOCAB) if t not in free)
    out = wrapped.generate(ids, max_new_tokens=6, eos_token_id=[other, free[0]])
    assert out[0, 30:].tolist() == [free[0]]                # the eos it met, not the list's first
    assert wrapped.generate(ids, max_new_tokens=6, eos_token_id=torch.tensor([other, free[0]])).tolist() == out.tolist()
    for kwargs, message in [(dict(eos_token_id=[VOCAB]), "stop"), (dict(do_sample=True, temperature="hot"), "number"),
                            (dict(do_sample=True, temperature=0), "temperature > 0"),    # was greedy, silently
                            (dict(do_sample="no"), "do_sample must be true or false")]:  # was truthy: sampled
        with pytest.raises(InputError, match=message):
            wrapped.generate(ids, max_new_tokens=2, **kwargs)
    with pytest.raises(InputError, match="at least one row"):
        wrapped.generate(ids[:0], max_new_tokens=2)
    assert wrapped.generate(ids, max_new_tokens=2, do_sample=True, temperature=None, top_p=None).shape == (1, 32)
    with pytest.raises(InputError, match="tail_tokens"):
        wrap(make_model("llama"), config=cfg, tail_tokens=-1)


def test_a_wrapped_model_copies_and_misses_attributes_as_attribute_errors():
    # __getattr__ read self.model before __init__ had set it: copy.copy asked for __setstate__ on a
    # bare instance and got KeyError('model')
    cfg = AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=1, future_tokens=4, compute_dtype="float32")
    wrapped = wrap(make_model("llama"), config=cfg)
    twin = copy.copy(wrapped)
    assert twin.engine is wrapped.engine and twin.config is wrapped.config
    assert not hasattr(wrapped, "no_such_attribute")

@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_peft_adapter_reproduces_engine_logits(arch, tmp_path):
    from peft import PeftModel

    model = make_model(arch)
    base = copy.deepcopy(model)
    eng = AbsorberEngine(model, config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=4, alpha=8.0,
                                                      max_steps=5, lr=1e-2, future_tokens=4))
    eng.absorb(random_ids(40, seed=4), flush=True)                # no raw window: the adapter is all of it
    eng.export_peft(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    probe = random_ids(11, seed=5)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor([[BOS] + probe])).logits[0, 1:].float()     # the engine reads BOS first
    ours = eng.logits(probe)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    with peft_model.disable_adapter(), torch.no_grad():
        bare = peft_model(torch.tensor([[BOS] + probe])).logits[0, 1:].float()
    assert (bare - ours).abs().max() > 1e-3                      # the adapter carries the memory


def test_wrapped_sampling_draws_from_torchs_generator_like_transformers():
    cfg = AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=1, future_tokens=4, compute_dtype="float32")
    wrapped = wrap(make_model("llama"), config=cfg)
    ids = torch.tensor([random_ids(12, seed=6)] * 2)
    draws = {}
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        out = wrapped.generate(ids, max_new_tokens=12, do_sample=True, eos_token_id=[])
        draws.setdefault(seed, []).append(out[:, 12:].tolist())
    assert draws[0][0] == draws[0][1]                        # torch.manual_seed reproduces a call
    assert draws[0][0] != draws[1][0]                        # another seed, another sample
    assert draws[0][0][0] != draws[0][0][1]                  # two rows of one prompt differ, as transformers' do


def test_an_export_cut_off_between_its_renames_leaves_no_config_to_misread_the_weights(tmp_path, monkeypatch):
    """Over an earlier adapter of another rank and scale: cut off after the weights' rename, the
    directory holds no config (PEFT says so by name), never the old config beside the new weights."""
    import os

    from peft import PeftModel

    def exported(rank, seed):
        eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=rank,
                                                                        max_steps=2, lr=1e-2, future_tokens=4))
        eng.absorb(random_ids(24, seed=seed), flush=True)
        return eng

    exported(2, 1).export_peft(tmp_path)
    replace, calls = os.replace, []

    def cut_off_after_the_first(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt                  # as a kill would leave it: the second rename never ran
        replace(src, dst)

    monkeypatch.setattr(os, "replace", cut_off_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        exported(4, 2).export_peft(tmp_path)
    monkeypatch.setattr(os, "replace", replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors"]    # no temporary left
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftModel.from_pretrained(make_model("llama"), str(tmp_path))


def test_wrapped_generate_keeps_a_token_to_read_and_checks_pad_mask_and_narrow_ids():
    # sync_tokens = 0 (smollm2-135m's config) left no tail: an input a multiple of the round long was
    # absorbed whole and generate() had nothing to read; pad_token_id "x" / 2**70 and a mask "abc"
    # were raw TypeErrors; uint8 ids could not hold the new tokens (RuntimeError)
    cfg = AbsorberConfig(chunk_tokens=16, sync_tokens=0, rank=2, max_steps=1, probes=0, futures=1, future_tokens=4,
                         compute_dtype="float32")
    wrapped = wrap(make_model("llama"), config=cfg)
    ids = torch.tensor([random_ids(32, seed=4)])
    assert wrapped.generate(ids, max_new_tokens=3, eos_token_id=[]).shape == (1, 35)
    for kwargs, message in [(dict(pad_token_id="x"), "pad_token_id"), (dict(pad_token_id=2**70), "pad_token_id"),
                            (dict(attention_mask="abc"), "attention_mask")]:
        with pytest.raises(InputError, match=message):
            wrapped.generate(ids, max_new_tokens=2, **kwargs)
    out = wrapped.generate(ids.to(torch.uint8), max_new_tokens=3, eos_token_id=[])
    assert out.dtype == torch.long and out[0, :32].tolist() == ids[0].tolist()
