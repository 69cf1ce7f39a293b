"""A sliding-window model (Mistral with sliding_window set): its cache keeps only the last
sliding_window - 1 keys, so the raw window must fit in them (ConfigError otherwise: its KV, put back
into a fresh cache, counted positions from the keys left and read prompts at wrong positions), and
rows of a batch, whose padding would take slots of the window, run apart. Prompts and answers may go
past the window: what the engine computes is then what the model itself computes."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from absorber_engine import AbsorberConfig, AbsorberEngine, ConfigError
from tiny_models import _COMMON, random_ids

CFG = AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=2, future_tokens=4, compute_dtype="float32")


def _mistral(window: int):
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=window))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model.eval()


def test_a_raw_window_past_what_the_sliding_cache_keeps_is_a_config_error():
    with pytest.raises(ConfigError, match="sliding-window cache keeps"):
        AbsorberEngine(_mistral(8), config=CFG)
    with pytest.raises(ConfigError, match="sliding-window cache keeps"):
        AbsorberEngine(_mistral(40), config=CFG).session("long", chunk_tokens=40)
    AbsorberEngine(_mistral(26), config=CFG)               # BOS + 16 + 8 = 25 tokens: kept whole


def test_probes_whose_context_the_sliding_cache_cannot_keep_are_a_config_error():
    # The teacher's probes go on from X in its frame: BOS + 24 + the frame's tokens are past the 25 keys
    # kept, and the probes' targets were states at positions the model never computes.
    from tiny_tokenizers import sentencepiece_like

    tok = sentencepiece_like()
    probes = CFG.replace(probes=1, probe_kinds=("recite",))

    def mistral(window):
        torch.manual_seed(0)
        return MistralForCausalLM(MistralConfig(**{**_COMMON, "vocab_size": len(tok)}, sliding_window=window)).eval()

    AbsorberEngine(mistral(26), tokenizer=tok, config=CFG.replace(probes=0))    # no probes: X's cache is kept whole
    with pytest.raises(ConfigError, match="a probe's context"):
        AbsorberEngine(mistral(26), tokenizer=tok, config=probes)
    with pytest.raises(ConfigError, match="a probe's context"):
        AbsorberEngine(mistral(80), tokenizer=tok, config=probes).session("long", chunk_tokens=70)   # 79 kept whole
    AbsorberEngine(mistral(80), tokenizer=tok, config=probes).absorb(random_ids(24, seed=1), flush=True)


def test_past_the_sliding_window_the_engine_reads_what_the_model_reads_and_a_batch_what_each_row_alone():
    eng, ref = AbsorberEngine(_mistral(40), config=CFG), _mistral(40)
    window, prompt = random_ids(20, seed=10), random_ids(30, seed=4)
    eng.absorb(window)                                     # held raw: no round yet
    full = torch.tensor([eng.runner.prefix + window + prompt])
    with torch.no_grad():
        torch.testing.assert_close(eng.logits(prompt), ref(full).logits[0, -len(prompt):], rtol=1e-5, atol=1e-5)
    want = ref.generate(input_ids=full, attention_mask=torch.ones_like(full), do_sample=False, max_new_tokens=12,
                        eos_token_id=None, pad_token_id=0)[0, full.shape[1]:].tolist()
    assert eng.generate(prompt, max_new_tokens=12, stop=[]) == want
    eng.session("b").absorb(random_ids(60, seed=3))        # rounds absorbed, a shorter window
    prompts = {"default": prompt[:3], "b": prompt}
    alone = {name: eng.generate_batch({name: p}, max_new_tokens=12, stop=[])[name] for name, p in prompts.items()}
    assert eng.generate_batch(prompts, max_new_tokens=12, stop=[]) == alone
    sampled = {name: eng.generate_batch({name: p}, max_new_tokens=12, stop=[], temperature=1.0, seed=5)[name]
               for name, p in prompts.items()}
    assert eng.generate_batch(prompts, max_new_tokens=12, stop=[], temperature=1.0, seed=5) == sampled
