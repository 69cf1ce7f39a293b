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


@pytest.mark.parametrize("workload", ["recite", "y_only"])
def test_loop_matches_engine_step_by_step(workload):
    model, tok = _model_and_tokenizer()
    cfg = AbsorberConfig(chunk_tokens=N, sync_tokens=M, rank=4, max_steps=STEPS, lr=1e-2, compute_dtype="float32",
                         **WORKLOADS[workload])
    stream = random_ids(2 * N + M, seed=5)
    engine = run_engine(model, tok, cfg, stream)
    model, tok = _model_and_tokenizer()
    loop = run_loop(model, tok, cfg, stream)
    assert engine["rounds"] == loop["rounds"] == 2
    for r, (e, lp) in enumerate(zip(engine["step_losses"], loop["step_losses"])):
        assert len(e) == len(lp) == STEPS
        for k, (le, ll) in enumerate(zip(e, lp)):
            assert ll == pytest.approx(le, rel=2e-4), f"round {r} step {k}: engine {le}, loop {ll}"
    assert engine["step_losses"][0][-1] < engine["step_losses"][0][0]
