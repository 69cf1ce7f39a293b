"""The model that ships in model/absorber-tiny: loads offline with the Auto classes, is a Llama
with grouped-query attention, stays small, and recalls from its context at the trained length."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from evals.tasks import make_example, score

MODEL = Path(__file__).resolve().parents[1] / "model" / "absorber-tiny"
sys.path.insert(0, str(MODEL.parent))
import evaluate_recall  # noqa: E402

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="model/absorber-tiny not built")


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(MODEL, local_files_only=True, dtype=torch.float32)
    model.eval()
    return model, tok


def trained_ctx() -> int:
    return json.loads((MODEL / "training_summary.json").read_text())["config"]["ctx"]


def test_is_llama_with_gqa(loaded):
    model, _ = loaded
    cfg = model.config
    assert cfg.model_type == "llama"
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.max_position_embeddings >= 2 * trained_ctx()


def test_checkpoint_small():
    files = list(MODEL.glob("*.safetensors"))
    assert files
    assert sum(f.stat().st_size for f in files) <= 20 * 2**20


def test_special_tokens(loaded):
    model, tok = loaded
    assert tok.bos_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id is not None
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert model.config.bos_token_id == tok.bos_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.vocab_size >= len(tok)
    ids = tok.encode("The pass key is 40712.")
    assert ids[0] == tok.bos_token_id
    # Digits are single tokens; decoding round-trips.
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digits == list("40712")
    assert tok.decode(ids, skip_special_tokens=True) == "The pass key is 40712."


def test_in_context_recall(loaded):
    """Greedy answers to 20 seeded kv_recall / passkey examples with the full context."""
    model, tok = loaded
    torch.set_num_threads(2)
    stop = evaluate_recall.stop_ids(tok)
    n_tokens = trained_ctx()
    scores = []
    for task in ("kv_recall", "passkey"):
        for seed in range(10):
            ex = make_example(task, n_tokens, tok, seed)
            scores.append(score(ex, evaluate_recall.answer_example(model, tok, ex, stop)))
    assert sum(scores) / len(scores) >= 0.9, scores


def test_recommended_config_fits_the_trained_context():
    from absorber_engine.model_store import recommended_config

    from evals.evaluate import GATED_FUTURES, engine_config

    cfg = recommended_config(MODEL)
    assert cfg is not None
    assert cfg.window_tokens < trained_ctx()          # the raw window plus a question fit where it was trained
    # The budget the model ships is the one its evaluation measured (absorber+recite+gate+futures):
    # one source of numbers.
    assert cfg == engine_config(trained_ctx(), **GATED_FUTURES)
