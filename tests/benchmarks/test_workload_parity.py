"""The real-workload benchmark's hand-written loop (benchmarks/workload.py: transformers + PEFT, teacher
recomputed every step, full logits) does the engine's round: on the deterministic workloads (Y plus
the recite probe, Y alone) every step's loss equals the engine's."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from benchmarks.workload import CHATML, ROOT, WORKLOADS, run_engine, run_loop
from absorber_engine import AbsorberConfig
from tiny_models import random_ids

N, M, STEPS = 24, 16, 3
TINY = ROOT / "model" / "absorber-tiny"

pytestmark = pytest.mark.skipif(not (TINY / "tokenizer.json").exists(), reason="model/absorber-tiny not built")


def _model_and_tokenizer():
    tok = AutoTokenizer.from_pretrained(TINY)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval(), tok


@pytest.mark.parametrize("workload", ["recite", "y_only", "y_l1"])
def test_loop_matches_engine_step_by_step(workload):
    model, tok = _model_and_tokenizer()
    cfg = AbsorberConfig(chunk_tokens=N, sync_tokens=M, rank=4, max_steps=STEPS, lr=1e-2, compute_dtype="float32",
                         **WORKLOADS[workload])
    stream = random_ids(2 * N + M, seed=5)
    engine = run_engine(model, tok, cfg, stream)
    # The lean loop (the teacher once a round, the head only where a loss reads logits) too: the
    # stronger baseline does the same arithmetic.
    for lean in (False, True):
        model, tok = _model_and_tokenizer()
        loop = run_loop(model, tok, cfg, stream, lean=lean)
        assert engine["rounds"] == loop["rounds"] == 2
        for r, (e, lp) in enumerate(zip(engine["step_losses"], loop["step_losses"])):
            assert len(e) == len(lp) == STEPS
            for k, (le, ll) in enumerate(zip(e, lp)):
                assert ll == pytest.approx(le, rel=2e-4), f"lean {lean} round {r} step {k}: engine {le}, loop {ll}"
    assert engine["step_losses"][0][-1] < engine["step_losses"][0][0]


def test_loop_samples_every_probe_kind_in_one_generate_call(monkeypatch):
    # One call per kind decoded each kind's rows apart, which a user batching them would not do:
    # the loop's probe speed was half what it could be, the engine's ratio inflated.
    model, tok = _model_and_tokenizer()
    cfg = AbsorberConfig(chunk_tokens=N, sync_tokens=M, rank=4, max_steps=1, lr=1e-2, compute_dtype="float32",
                         probe_tokens=6, **WORKLOADS["probes4"])
    calls = []
    real = type(model).generate

    def counted(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", counted)
    out = run_loop(model, tok, cfg, random_ids(2 * N + M, seed=5))
    assert out["rounds"] == 2 and calls == [cfg.probes] * 2
    assert out["probe_tokens"] == 2 * cfg.probes * 6

