"""The student's CPU attention (absorber_kernels/cpu_attention.py): forward and backward against the
float64 reference through autograd (grouped heads, lengths off the block size), what it refuses,
the right-padding masks it takes through transformers, and a model that computes with it what it
computes with torch's sdpa on every real position."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from absorber_engine import AbsorberConfig, AbsorberEngine
from absorber_kernels.attention import attention_ref
from absorber_kernels.cpu_attention import BLOCK, MAX_TOKENS, causal_attention, usable
from absorber_kernels import cpu_attention, hf_attention
from absorber_kernels.hf_attention import CPU_ATTENTION_NAME, _right_padded_causal


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("b, hq, hk, t", [(1, 4, 4, 2), (2, 6, 2, BLOCK + 37), (3, 9, 3, 96), (1, 2, 1, 2 * BLOCK)])
@pytest.mark.parametrize("torch_forward", [False, True])
def test_forward_and_backward_match_float64(monkeypatch, dtype, tol, b, hq, hk, t, torch_forward):
    """Both forwards (the one timed faster is taken) with the blocks' backward."""
    monkeypatch.setattr(cpu_attention, "_sdpa_forward_taken", lambda q: torch_forward)
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(b, h, t, 32, generator=g).to(dtype).requires_grad_() for h in (hq, hk, hk))
    dout = torch.randn(b, hq, t, 32, generator=g).to(dtype)
    out = causal_attention(q, k, v, scale=0.2)
    out.backward(dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention_ref(q64, k64, v64, scale=0.2)
    ref.backward(dout.double())
    for got, want in ((out, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_it_takes_only_cpu_training_passes_without_a_cache():
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    assert usable(q, q)
    with torch.no_grad():
        assert not usable(q, q)                                        # the teacher's reads keep sdpa
    assert not usable(q, torch.randn(1, 2, 12, 16))                    # keys beyond the queries: a cache
    assert not usable(q[:, :, :1], q[:, :, :1])                        # a decode step
    for dtype, limit in MAX_TOKENS.items():                           # past where it measured faster
        at, past = (torch.randn(1, 2, t, 16, dtype=dtype, requires_grad=True) for t in (limit, limit + 1))
        assert usable(at, at) and not usable(past, past)
        with pytest.raises(ValueError, match="CPU training passes"):
            causal_attention(past, past, past)


def test_masks_it_reads_as_causal_are_right_padding_only():
    t = 6
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    right = (causal & valid[:, None, :])[:, None]                      # what sdpa_mask builds for right padding
    assert _right_padded_causal(right, t)
    left = (causal & valid.flip(-1)[:, None, :])[:, None]
    assert not _right_padded_causal(left, t)
    assert not _right_padded_causal(torch.ones(2, 1, t, t, dtype=torch.bool), t)   # bidirectional
    assert not _right_padded_causal(right.float(), t)                  # an additive mask: sdpa's business


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def test_a_padded_batch_through_the_model_gives_sdpas_values_and_gradients_on_real_positions(monkeypatch):
    calls = []
    apply = hf_attention.CausalAttention.apply
    monkeypatch.setattr(hf_attention.CausalAttention, "apply", lambda *a: calls.append(1) or apply(*a))
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 13:] = 0
    real = mask.bool()
    runs = {}
    for impl, dtype in (("sdpa", torch.float64), ("sdpa", torch.float32), (CPU_ATTENTION_NAME, torch.float32)):
        model = _model().to(dtype)
        engine = AbsorberEngine(model, config=AbsorberConfig(chunk_tokens=8, compute_dtype="float32"))
        assert model.config._attn_implementation == CPU_ATTENTION_NAME
        model.set_attn_implementation(impl)
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        hidden = model.model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        (hidden[real] ** 2).sum().backward()
        runs[impl, dtype] = hidden[real].detach().double(), emb.grad[real].double()
        engine.close()
        assert model.config._attn_implementation == "sdpa"              # given back as it was
    assert len(calls) == 2                                             # one per layer, in the last run only
    # fp32 rounding through the model's two layers moves the gradients by up to ~3e-5 of their size
    # with either attention; a query reading one key past its own moves them by more than the largest
    for want, fp32_sdpa, ours in zip(runs["sdpa", torch.float64], runs["sdpa", torch.float32],
                                     runs[CPU_ATTENTION_NAME, torch.float32]):
        for got in (fp32_sdpa, ours):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("needs", [(False, False, True), (True, False, False), (False, True, True)])
def test_the_gradients_asked_for_alone_match_float64(needs):
    """The backward skips what no input needs (the first layer's q and k); what it does compute holds."""
    g = torch.Generator().manual_seed(5)
    base = [torch.randn(2, h, BLOCK + 9, 16, generator=g) for h in (4, 2, 2)]
    dout = torch.randn(2, 4, BLOCK + 9, 16, generator=g)
    q, k, v = (x.clone().requires_grad_(need) for x, need in zip(base, needs))
    causal_attention(q, k, v).backward(dout)
    ref = [x.double().requires_grad_() for x in base]
    attention_ref(*ref).backward(dout.double())
    for x, r, need in zip((q, k, v), ref, needs):
        if need:
            torch.testing.assert_close(x.grad.double(), r.grad, rtol=1e-5, atol=1e-5)


def test_the_forward_is_torchs_in_bf16_on_a_cpu_with_amx_unless_pinned(monkeypatch):
    bf16, fp32 = torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16), torch.zeros(1, 2, 4, 8)
    monkeypatch.delenv("ABSORBER_CPU_ATTENTION_FORWARD", raising=False)
    for amx in (True, False):
        monkeypatch.setattr(cpu_attention, "_cpu_has_amx", lambda: amx)
        assert cpu_attention._sdpa_forward_taken(bf16) is amx and not cpu_attention._sdpa_forward_taken(fp32)
    for pinned in ("sdpa", "blocks"):
        monkeypatch.setenv("ABSORBER_CPU_ATTENTION_FORWARD", pinned)
        assert cpu_attention._sdpa_forward_taken(fp32) is cpu_attention._sdpa_forward_taken(bf16) is (pinned == "sdpa")
