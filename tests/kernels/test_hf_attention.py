"""The attention kernel inside a Hugging Face model (a tiny random Llama with grouped-query heads):
same logits and gradients as sdpa, a cached prefix, decoding, switching back, and refusals."""

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from absorber_engine.hf_cache import cache_keyword  # noqa: E402
from absorber_kernels.hf_attention import register_hf_attention  # noqa: E402
from absorber_kernels.testing import assert_close  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def name():
    return register_hf_attention()


def _logits(model, impl, ids, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kw).logits


def test_register_returns_name(name):
    from transformers import AttentionInterface

    assert name == "absorber_triton" and name in AttentionInterface._global_mapping


def test_full_sequence_matches_sdpa(model, name):
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    want = _logits(model, "sdpa", ids)
    got = _logits(model, name, ids)
    assert_close("hf llama logits (no cache)", got, want, torch.float32)
    back = _logits(model, "sdpa", ids)                    # and back: the switch is reversible
    assert torch.equal(back, want)


def test_cached_prefix_and_decode_match_sdpa(model, name):
    ids = torch.randint(0, 97, (1, 25), generator=torch.Generator().manual_seed(2))
    out, kw = {}, cache_keyword(model)
    for impl in ("sdpa", name):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(ids[:, :11], use_cache=True, **{kw: cache})          # X: the prefix
            y = model(ids[:, 11:24], use_cache=True, **{kw: cache}).logits  # Y over X's cache (mask built)
            step = model(ids[:, 24:25], use_cache=True, **{kw: cache}).logits  # one decode step
        out[impl] = (y, step)
    model.set_attn_implementation("sdpa")
    assert_close("hf llama logits (13 tokens over an 11-token cache)", out[name][0], out["sdpa"][0], torch.float32)
    assert_close("hf llama logits (decode step)", out[name][1], out["sdpa"][1], torch.float32)


def test_gradients_match_sdpa(model, name):
    ids = torch.randint(0, 97, (1, 17), generator=torch.Generator().manual_seed(3))
    grads = {}
    for impl in ("sdpa", name):
        model.set_attn_implementation(impl)
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if "self_attn" in n}
    model.set_attn_implementation("sdpa")
    model.zero_grad()
    for n in grads["sdpa"]:
        assert_close(f"hf llama grad {n}", grads[name][n], grads["sdpa"][n], torch.float32, scale=5.0)


def test_refuses_padding_mask(model, name):
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0                                          # left padding in the second row
    model.set_attn_implementation(name)
    try:
        with pytest.raises(ValueError, match="not plain causal"):
            with torch.no_grad():
                model(ids, attention_mask=mask)
        with torch.no_grad():                                # an all-ones mask is plain causal: accepted
            model(ids, attention_mask=torch.ones(2, 9, dtype=torch.long))
    finally:
        model.set_attn_implementation("sdpa")


def test_refuses_dropout_and_bidirectional(name):
    from absorber_kernels.hf_attention import hf_attention_forward

    q = torch.randn(1, 2, 4, 16)
    k = v = torch.randn(1, 2, 4, 16)
    mod = torch.nn.Module()
    with pytest.raises(ValueError, match="dropout"):
        hf_attention_forward(mod, q, k, v, None, dropout=0.1)
    mod.is_causal = False
    with pytest.raises(ValueError, match="causal only"):
        hf_attention_forward(mod, q, k, v, None)
    with pytest.raises(ValueError, match="sliding window"):
        hf_attention_forward(torch.nn.Module(), q, k, v, None, sliding_window=2)
