"""Streaming (Algorithm 2): bounded KV however long the stream, a constant-size delta, rounds cut
by the scheduler, rollback on failure, and generation over memory plus window."""

import pytest
import torch

from absorber_engine import AbsorberConfig, AbsorberEngine, AbsorptionError
from tiny_models import make_model, random_ids


class SpanSpy:
    """Watches every call of the decoder: the longest (cached + new) sequence any call attends over."""

    def __init__(self, base):
        self.max_span = 0
        self.calls = 0
        base.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))     # transformers 5.25 renamed it
        past = cache.get_seq_length() if cache is not None else 0
        self.max_span = max(self.max_span, past + ids.shape[1])
        self.calls += 1


def test_20k_token_stream_keeps_kv_within_the_window_and_delta_constant():
    n, m = 384, 128
    model = make_model("llama")
    cfg = AbsorberConfig(chunk_tokens=n, sync_tokens=m, rank=4, futures=2, future_tokens=16, max_steps=1)
    eng = AbsorberEngine(model, config=cfg)
    spy = SpanSpy(eng.runner.base)
    shapes = {k: tuple(v.shape) for k, v in eng.delta.state_dict().items()}
    delta_bytes = eng.delta.nbytes
    stream = random_ids(20_000, seed=11)
    held, total_rounds = [], 0
    for i in range(0, len(stream), 2_500):          # fed in pieces, as a stream arrives
        report = eng.absorb(stream[i:i + 2_500])
        total_rounds += report.rounds
        held.append(report.held_tokens)
        assert eng.delta.nbytes == delta_bytes
        assert {k: tuple(v.shape) for k, v in eng.delta.state_dict().items()} == shapes
    eng.generate(random_ids(5, seed=12), max_new_tokens=4)
    # BOS + window + the prompt and new tokens of generate(); the window itself never passed n + m.
    assert spy.max_span <= 1 + n + m + 5 + 4 - 1 and eng.runner.stats.max_span == spy.max_span
    # During absorption alone the span never passed n + m (generate adds the prompt on top).
    assert max(held) < n + m
    assert total_rounds == (20_000 - m) // n
    assert eng.absorbed_tokens == total_rounds * n
    assert eng.absorbed_tokens + eng.held_tokens == 20_000


@pytest.mark.parametrize("follow_y", [False, True])
def test_absorption_alone_never_exceeds_its_bound(follow_y):
    n, m, t = 40, 24, 16
    eng = AbsorberEngine(make_model("qwen2"), config=AbsorberConfig(chunk_tokens=n, sync_tokens=m, rank=2,
                                                                     futures=3, future_tokens=t, max_steps=1,
                                                                     futures_follow_y=follow_y))
    spy = SpanSpy(eng.runner.base)
    eng.absorb(random_ids(1_000, seed=13), flush=True)
    # BOS, X and Y (futures after X fit in Y's place); futures after X·Y add their own length.
    assert spy.max_span == 1 + n + m + (t if follow_y else 0)
    assert eng.held_tokens == 0 and eng.absorbed_tokens == 1_000


def test_flush_absorbs_everything_and_keeps_no_window():
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=2,
                                                                     future_tokens=4))
    r = eng.absorb(random_ids(10, seed=1))
    assert r.rounds == 0 and r.held_tokens == 10 and r.tokens == 10
    r = eng.absorb(random_ids(30, seed=2), flush=True)
    # 40 tokens: one full round (16 + 8 real), then the last 24 (<= n + m) as one round with futures only.
    assert r.rounds == 2 and r.held_tokens == 0 and eng.absorbed_tokens == 40
    eng.absorb(random_ids(5, seed=3))
    r = eng.absorb([], flush=True)                           # flushes what the window holds
    assert r.rounds == 1 and r.tokens == 0 and eng.held_tokens == 0 and eng.absorbed_tokens == 45


def test_same_stream_same_memory():
    cfg = AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=3, future_tokens=4, seed=5)
    a = AbsorberEngine(make_model("llama"), config=cfg)
    b = AbsorberEngine(make_model("llama"), config=cfg)
    ids = random_ids(70, seed=3)
    a.absorb(ids)
    b.absorb(ids[:33])
    b.absorb(ids[33:])
    for k, v in a.delta.state_dict().items():
        torch.testing.assert_close(v, b.delta.state_dict()[k], rtol=1e-5, atol=1e-6)


def test_nan_round_is_rolled_back_and_engine_goes_on(monkeypatch):
    from absorber_engine import round as rounds

    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2,
                                                                     max_steps=3, future_tokens=4, lr=1e-2))
    eng.absorb(random_ids(24, seed=1))                      # one good round first
    before = eng.delta.state_dict()
    window_before, absorbed_before = eng.window_tokens(), eng.absorbed_tokens
    calls = {"n": 0}
    real = rounds.student_losses

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:                                  # after one real step the loss turns NaN
            for p in eng.delta.parameters():
                p.grad = None
            return [float("nan")]
        return real(*args, **kwargs)

    monkeypatch.setattr(rounds, "student_losses", poisoned)
    with pytest.raises(AbsorptionError, match="rolled back") as info:
        eng.absorb(random_ids(30, seed=2))
    assert info.value.tokens_taken == 16                    # fills the window to n + m, then fails
    for k, v in eng.delta.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert eng.absorbed_tokens == absorbed_before
    assert eng.window_tokens()[:len(window_before)] == window_before
    monkeypatch.setattr(rounds, "student_losses", real)
    report = eng.absorb(random_ids(14, seed=2)[:14])        # the engine goes on
    assert report.rounds >= 1
    # A round that keeps failing can be skipped: the raw window goes, the memory and counters stay.
    memory, absorbed, held = eng.delta.state_dict(), eng.absorbed_tokens, eng.held_tokens
    assert eng.discard_window() == held > 0
    assert eng.window_tokens() == [] and eng.absorbed_tokens == absorbed
    assert all(torch.equal(v, memory[k]) for k, v in eng.delta.state_dict().items())


def test_diverging_round_is_rolled_back():
    # A learning rate far too high: the loss ends many times above where the round started.
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2,
                                                                     max_steps=6, future_tokens=4, lr=1.0))
    before = eng.delta.state_dict()
    with pytest.raises(AbsorptionError, match="rolled back.*diverged"):
        eng.absorb(random_ids(24, seed=1))
    for k, v in eng.delta.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert eng.absorbed_tokens == 0


def test_keyboard_interrupt_mid_round_keeps_memory():
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2,
                                                                     max_steps=5, future_tokens=4, lr=1e-2))
    eng.absorb(random_ids(24, seed=1))
    before = eng.delta.state_dict()
    steps = {"n": 0}

    def interrupt(module, args, output):
        if torch.is_grad_enabled():
            steps["n"] += 1
            if steps["n"] == 3:
                raise KeyboardInterrupt

    handle = eng.runner.layers[0].register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        eng.absorb(random_ids(16, seed=2))
    handle.remove()
    for k, v in eng.delta.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_generate_greedy_sampling_and_stops():
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2,
                                                                     max_steps=2, future_tokens=4))
    eng.absorb(random_ids(30, seed=4))
    prompt = random_ids(5, seed=5)
    greedy = eng.generate(prompt, max_new_tokens=12)
    assert len(greedy) == 12 and greedy == eng.generate(prompt, max_new_tokens=12)
    # Greedy generation is the argmax of logits() step by step.
    seq = list(prompt)
    for tok in greedy[:4]:
        assert int(eng.logits(seq)[-1].argmax()) == tok
        seq.append(tok)
    s1 = eng.generate(prompt, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1)
    assert s1 == eng.generate(prompt, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1)
    cut = eng.generate(prompt, max_new_tokens=12, stop=[greedy[3]])
    assert cut == greedy[:greedy.index(greedy[3])]
    assert eng.generate(prompt, max_new_tokens=0) == []
    assert len(eng.generate(None, max_new_tokens=3)) == 3    # continues the window itself


def test_absorb_inside_no_grad_and_inference_mode():
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2,
                                                                     max_steps=2, future_tokens=4, lr=1e-2))
    with torch.no_grad():
        assert eng.absorb(random_ids(24, seed=1)).steps == 2
    with torch.inference_mode():
        assert eng.absorb(random_ids(16, seed=2)).steps == 2
    assert any(float(b.detach().abs().max()) > 0 for b in eng.delta.B.values())


def test_text_absorbed_in_pieces_reads_as_the_whole_text_under_a_sentencepiece_tokenizer():
    # A "▁" tokenizer puts a space before the first word of a text encoded alone: every absorb() call
    # after the first read " The" where the stream had "\nThe".
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_tokenizers import sentencepiece_like

    tok = sentencepiece_like()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2))
    eng = AbsorberEngine(model.eval(), tokenizer=tok, config=AbsorberConfig(chunk_tokens=64, sync_tokens=8, rank=2,
                                                                            objective="ttt", max_steps=1))
    pieces = ["Hello world.\n", "The grass is green.\n", " Tom liked milk.\n"]
    for piece in pieces:
        eng.absorb(piece)
    whole = tok.encode("".join(pieces), add_special_tokens=False)
    assert eng.window_tokens() == whole
    assert eng.to_ids(pieces[1]) != eng.to_ids(pieces[1], session=eng.default)     # alone: "▁The"
    eng.reset()                                     # a new stream: its first text opens it, as alone
    eng.absorb(pieces[1])
    assert eng.window_tokens() == tok.encode(pieces[1], add_special_tokens=False)
