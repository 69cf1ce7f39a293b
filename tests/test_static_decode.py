"""Sampling futures and probes over the static KV cache (static_decode.py): the tokens are what
transformers' own generate() samples with the same seed and settings, the recorded states are a
plain forward's, the growing-cache path that sliding-window models keep gives the same, sampling
ends once every row has ended, and on a GPU the replayed CUDA graph computes what eager steps do."""

import functools

import pytest
import torch
from transformers import GenerationConfig

from absorber_engine import AbsorberConfig, AbsorberEngine
from absorber_engine import decode_layers, static_decode
from absorber_engine.lora import LowRankDelta
from absorber_engine.hf_cache import cache_tensors
from absorber_engine.targets import RoundBatch
from absorber_engine.teacher import sample_with_states, teacher_targets
from tests.tiny_models import ARCHS, make_model, random_ids

FUTURES, LENGTH = 3, 9


def _config(temperature: float = 1.0, top_p: float = 1.0, compute_dtype: str = "float32") -> AbsorberConfig:
    return AbsorberConfig(chunk_tokens=16, sync_tokens=0, rank=4, futures=FUTURES, future_tokens=LENGTH,
                          future_temperature=temperature, future_top_p=top_p, compute_dtype=compute_dtype,
                          prefix_bos=False, kl_weight=0.0, hidden_norm=False)


def _futures(arch: str, seed: int, temperature: float, top_p: float, eng=None):
    eng = eng or AbsorberEngine(make_model(arch), config=_config(temperature, top_p))
    x = torch.tensor(random_ids(16, seed=seed))
    batch = RoundBatch([eng.delta], x[None], x[None, :0], [torch.Generator().manual_seed(seed)])
    (targets,) = teacher_targets(eng.runner, batch, eng.config)
    (group,) = targets.groups
    return x, group


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_futures_are_what_generate_samples_with_the_same_seed(arch, temperature, top_p):
    assert static_decode.supported(AbsorberEngine(make_model(arch), config=AbsorberConfig(chunk_tokens=8)).runner)
    x, group = _futures(arch, 3, temperature, top_p)
    model = make_model(arch)                     # the same weights, never wrapped
    model.generation_config.eos_token_id = None  # futures have a fixed length: no stop token
    torch.manual_seed(3)
    gen = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=LENGTH,
                           num_return_sequences=FUTURES, eos_token_id=None, pad_token_id=0)
    want = model.generate(input_ids=x[None], attention_mask=torch.ones_like(x[None]), generation_config=gen)
    assert group.ids.tolist() == want[:, x.numel():].tolist()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recorded_states_are_a_plain_forward_and_the_growing_cache_gives_the_same(arch, monkeypatch):
    x, static = _futures(arch, 5, 1.0, 1.0)
    model = make_model(arch)
    with torch.no_grad():
        out = model(torch.cat([x.expand(FUTURES, -1), static.ids], dim=1), output_hidden_states=True)
    for layer, h in enumerate(static.hidden[:-1]):   # the last recorded state is before the final norm
        torch.testing.assert_close(h, out.hidden_states[layer][:, -LENGTH:], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(static_decode, "supported", lambda runner: False)
    _, growing = _futures(arch, 5, 1.0, 1.0)
    assert growing.ids.tolist() == static.ids.tolist()
    for a, b in zip(growing.hidden, static.hidden):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_in_a_bf16_round_the_steps_read_bf16_copies_and_the_fp32_weights_come_back(monkeypatch):
    model = make_model("llama")
    eng = AbsorberEngine(model, config=_config(compute_dtype="bfloat16"))
    weights = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    seen = []
    step = static_decode.StaticDecoder._step
    monkeypatch.setattr(static_decode.StaticDecoder, "_step",
                        lambda self: seen.append(self.runner.head.weight.dtype) or step(self))
    x, group = _futures("llama", 5, 1.0, 1.0, eng=eng)     # outside autocast: the model's dtype
    assert seen == [torch.float32] * LENGTH
    seen.clear()
    with eng.runner.autocast():                              # as in a round
        x, group = _futures("llama", 5, 1.0, 1.0, eng=eng)
    assert seen == [torch.bfloat16] * LENGTH
    for name, p in model.named_parameters():                 # the very tensors, in fp32, untouched
        assert (p.data_ptr(), p.dtype) == (weights[name][0], torch.float32) and torch.equal(p, weights[name][1])
    with torch.no_grad():                                    # the states are the fp32 model's, to bf16 precision
        out = model(torch.cat([x.expand(FUTURES, -1), group.ids], dim=1), output_hidden_states=True)
    for layer, h in enumerate(group.hidden[:-1]):
        torch.testing.assert_close(h.float(), out.hidden_states[layer][:, -LENGTH:], rtol=0.05, atol=0.05)

    def fail(self):
        raise RuntimeError("a step failed")
    monkeypatch.setattr(static_decode.StaticDecoder, "_step", fail)
    with pytest.raises(RuntimeError, match="a step failed"), eng.runner.autocast():
        _futures("llama", 5, 1.0, 1.0, eng=eng)
    for name, p in model.named_parameters():                 # put back on the way out of a failure too
        assert (p.data_ptr(), p.dtype) == (weights[name][0], torch.float32)


def test_a_decoder_refuses_a_step_past_its_length():
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=8, prefix_bos=False))
    r = eng.runner
    r.bind([eng.delta])
    with torch.no_grad():
        _, cache = r.forward(torch.tensor([random_ids(4)]), use_cache=True)
        dec = static_decode.StaticDecoder(r, [(k, v) for k, v in ((l.keys, l.values) for l in cache.layers)], 2,
                                          None, torch.full((1, 1), 4))
        for _ in range(2):
            assert dec.step(torch.tensor([5])).shape == (1, r.vocab_size)
        with pytest.raises(RuntimeError, match="all were taken"):
            dec.step(torch.tensor([5]))
    hidden, final = dec.states()
    assert hidden[0].shape == (1, 2, r.hidden_size) and final.shape == (1, 2, r.hidden_size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_replayed_cuda_graph_computes_what_eager_steps_compute(backend):
    cfg = AbsorberConfig(chunk_tokens=8, rank=4, prefix_bos=False, backend=backend, compute_dtype="float32")
    eng = AbsorberEngine(make_model("llama").cuda(), config=cfg)
    r = eng.runner
    deltas = [LowRankDelta(r.shapes, 4, eng.config.scale, r.device, seed=s) for s in (1, 2)]
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for d in deltas:                         # non-zero deltas, so the low-rank path counts
            for b in d.B.values():
                b.copy_(torch.randn(b.shape, generator=g, device="cuda") * 0.1)
        r.bind(deltas, 2)                        # two streams of two rows: the stacked-delta ops
        _, cache = r.forward(torch.tensor([random_ids(6)] * 4, device="cuda"), use_cache=True)
        kv = [(l.keys, l.values) for l in cache.layers]
        feed = torch.tensor([random_ids(7, seed=s) for s in range(4)], device="cuda")
        runs = []
        for graphs in (False, True):
            dec = static_decode.StaticDecoder(r, kv, 7, None, torch.full((4, 1), 6, device="cuda"), graphs=graphs)
            logits = [dec.step(feed[:, t]).clone() for t in range(7)]
            runs.append((logits, *dec.states()))
            assert (dec.graph is not None) == graphs
    for a, b in zip(runs[0][0], runs[1][0]):
        torch.testing.assert_close(a, b)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(runs[0][2], runs[1][2])


@pytest.mark.parametrize("static", [True, False])
def test_sampling_ends_once_every_row_has_sampled_a_stop_token(static, monkeypatch):
    if not static:
        monkeypatch.setattr(static_decode, "supported", lambda runner: False)
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=16, rank=4, prefix_bos=False,
                                                                    compute_dtype="float32"))
    r, x, rows, length = eng.runner, torch.tensor([random_ids(16, seed=8)]), 3, 12

    def sample(stop):
        batch = RoundBatch([eng.delta], x, x[:, :0], [torch.Generator().manual_seed(8)])
        with torch.no_grad():
            r.bind([eng.delta])
            final, cache = r.forward(x, use_cache=True)
            g = sample_with_states(r, batch, cache_tensors(cache), r.logits(final[:, -1]), rows, True, None,
                                   length, 1.0, 1.0, stop=stop)
        return g.ids, g.hidden, g.final.view(rows, -1, r.hidden_size)

    ids, hidden, final = sample(None)
    stop = sorted(set(ids[:, 3].tolist()))               # every row has sampled one by its 4th token
    first = [next(t for t, tok in enumerate(row) if tok in stop) for row in ids.tolist()]
    end = max(first) + 1
    assert end < length
    short_ids, short_hidden, short_final = sample(stop)
    assert short_ids.tolist() == ids[:, :end].tolist()
    for a, b in zip(short_hidden, hidden):
        torch.testing.assert_close(a, b[:, :end])
    torch.testing.assert_close(short_final, final[:, :end])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_over_cache_segments_equals_the_growing_cache(arch, monkeypatch):
    """Rows of different windows and prompts (left-padded), sampled and greedy, across segments of
    3 tokens: what generate_batch returns is what the growing cache gives."""
    from absorber_engine import generate as generation

    def run():
        eng = AbsorberEngine(make_model(arch), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=4,
                                                                     compute_dtype="float32"))
        for name, n in (("a", 5), ("b", 11)):
            eng.session(name).absorb(random_ids(n, seed=n))
        greedy = eng.generate_batch({"a": random_ids(3, seed=1), "b": [7]}, max_new_tokens=10)
        sampled = eng.generate_batch({"a": [9, 4], "b": None}, max_new_tokens=10, temperature=1.0, seed=4)
        return greedy, sampled

    monkeypatch.setattr(generation, "SEGMENT", 3)
    static = run()
    monkeypatch.setattr(static_decode, "supported", lambda runner: False)
    assert run() == static
    assert all(len(v) == 10 for out in static for v in out.values())   # no stop token: every step was taken


def test_decode_weights_merge_one_bound_delta_into_the_reordered_weights_and_give_it_back(monkeypatch):
    """Through the modules (the layers not fused); and in fp32 at one row on one thread, where
    reordering does not pay, they leave the weights be."""
    from absorber_kernels import packed_linear

    if not packed_linear.supported(torch.float32):
        pytest.skip("no oneDNN prepacked linear here")
    monkeypatch.setattr(decode_layers, "build", lambda *a: None)
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=8, rank=4, alpha=10.0, prefix_bos=False,
                                                                    compute_dtype="float32"))
    r = eng.runner
    assert eng.config.scale == 2.5                  # the merge must scale A·B as the layers do
    delta = LowRankDelta(r.shapes, 4, eng.config.scale, r.device, seed=1)
    with torch.no_grad():
        for b in delta.B.values():                   # a delta that moves the outputs
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
        r.bind([delta])
        ids = torch.tensor([random_ids(6)])
        want, _ = r.forward(ids)
        bound = {name: (w.A, w.B) for name, w in r.wrappers.items()}
        with static_decode.decode_weights(r, rows=2):
            assert all(w.A is None and w.B is None for w in r.wrappers.values())     # merged, not applied twice
            got, _ = r.forward(ids)
        assert all(w.A is bound[n][0] and w.B is bound[n][1] for n, w in r.wrappers.items())
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:                                         # fp32, one row, one thread: no reordered copy is made
            with static_decode.decode_weights(r, rows=1):
                assert all(w.A is bound[n][0] for n, w in r.wrappers.items())
                assert all(packed_linear.lookup(w.base.weight) is None for w in r.wrappers.values())
                alone, _ = r.forward(ids)
        finally:
            torch.set_num_threads(threads)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alone, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():                            # and the delta counts: without it the states differ
        r.bind([LowRankDelta(r.shapes, 4, eng.config.scale, r.device, seed=1)])
        plain, _ = r.forward(ids)
    assert (plain - want).abs().max() > 1e-2


def _moved_delta(eng, seed: int = 1) -> LowRankDelta:
    delta = LowRankDelta(eng.runner.shapes, 4, eng.config.scale, eng.runner.device, seed=seed)
    with torch.no_grad():
        for b in delta.B.values():                   # a delta that moves the outputs
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.3)
    return delta


def _llama_head_dim_64(rope: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, rope_parameters=rope)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch, deltas", [(a, "merged") for a in decode_layers.FAMILY + ("llama, head dim 64", "llama, dynamic rope")]
                         + [(a, "one a row") for a in ("llama", "qwen3")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_fused_step_computes_what_the_modules_compute_to_the_bit(arch, deltas, dtype, monkeypatch):
    """Logits and recorded states, a delta merged (or each row's own, a bank's recitals), rows of
    different lengths (one left-padded), against the modules stepping a growing cache as
    transformers' generate() does (the fused step's attention reads only the slots written so far:
    over the whole static cache, masked, its sums rounded otherwise, at 60 cached tokens in fp32
    too). The rotary positions come from a table of every step, except for a dynamic rope
    (frequencies that follow the longest position: here past the 64 positions it was trained for)."""
    from absorber_kernels import packed_linear

    if not packed_linear.supported(getattr(torch, dtype)):
        pytest.skip(f"no oneDNN prepacked linear in {dtype} here")
    if arch.startswith("llama, "):
        rope = dict(rope_type="dynamic", factor=2.0) if "dynamic" in arch else dict(rope_type="default")
        model = _llama_head_dim_64(dict(rope, rope_theta=10000.0))
    else:
        model = make_model(arch)
    for m in model.modules():              # not the default 1e-6: the step must read each norm's own
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 1e-5 if m is not model.model.norm else 1e-4
    eng = AbsorberEngine(model, config=AbsorberConfig(chunk_tokens=8, rank=4, prefix_bos=False, compute_dtype=dtype))
    r = eng.runner
    r.bind([_moved_delta(eng)] if deltas == "merged" else [_moved_delta(eng, 1), _moved_delta(eng, 3)])
    context = 60 if "dynamic" in arch else 7
    ids = torch.tensor([random_ids(context, seed=1), [0, 0] + random_ids(context - 2, seed=2)])
    mask = torch.tensor([[1] * context, [0, 0] + [1] * (context - 2)])
    position = (mask.cumsum(1) - 1).clamp_min(0)
    feed = torch.tensor([random_ids(6, seed=3), random_ids(6, seed=4)])
    build, runs = decode_layers.build, []
    for fuse in (True, False):
        monkeypatch.setattr(decode_layers, "build", build if fuse else lambda *a: None)
        with torch.no_grad(), r.autocast(), r.sdpa_attention():
            _, cache = r.forward(ids, use_cache=True, attention_mask=mask, position_ids=position)
            with static_decode.decode_weights(r, rows=2):
                if fuse:
                    dec = static_decode.StaticDecoder(r, cache_tensors(cache), 6, mask, position[:, -1:] + 1)
                    assert dec.fused is not None and (dec.rotary is not None) == ("dynamic" not in arch)
                    logits = [dec.step(feed[:, t]).clone() for t in range(6)]
                    runs.append((logits, *dec.states()))
                else:
                    runs.append(_growing_steps(r, cache, feed, mask, position[:, -1:] + 1, runs[0][2].dtype))
    fused, modules = runs
    if deltas == "one a row":                        # and each row's delta counts
        r.bind([_moved_delta(eng, 1), _moved_delta(eng, 1)])
        with torch.no_grad(), r.autocast(), r.sdpa_attention():
            _, cache = r.forward(ids, use_cache=True, attention_mask=mask, position_ids=position)
            with static_decode.decode_weights(r, rows=2):
                dec = static_decode.StaticDecoder(r, cache_tensors(cache), 6, mask, position[:, -1:] + 1)
                other = [dec.step(feed[:, t]).clone() for t in range(6)]
        assert torch.equal(other[-1][0], fused[0][-1][0]) and not torch.equal(other[-1][1], fused[0][-1][1])
    assert all(torch.equal(a, b) for a, b in zip(fused[0], modules[0]))
    assert all(torch.equal(a, b) for a, b in zip(fused[1], modules[1]))
    assert torch.equal(fused[2], modules[2])


def _growing_steps(r, cache, feed, mask, position, dtype):
    """The modules' steps over a growing cache (what decode() runs for sliding-window models and
    transformers' generate() always): logits, L+1 residual states and final states as
    StaticDecoder.states() gives them."""
    logits, hidden, final = [], [], []
    cache = r.make_cache([(k.to(dtype), v.to(dtype)) for k, v in cache_tensors(cache)])    # as StaticDecoder casts it
    for t in range(feed.shape[1]):
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
        with r.capture() as cap:
            f, cache = r.forward(feed[:, t:t + 1], cache, use_cache=True, attention_mask=mask, position_ids=position)
        logits.append(r.logits(f[:, -1]))
        hidden.append([h.to(dtype) for h in cap.states])
        final.append(f.to(dtype))
        position = position + 1
    return logits, [torch.cat(hs, dim=1) for hs in zip(*hidden)], torch.cat(final, dim=1)


def test_a_forward_through_the_modules_inside_a_fused_block_fails_and_works_after_it():
    from absorber_kernels import packed_linear

    if not packed_linear.supported(torch.float32):
        pytest.skip("no oneDNN prepacked linear here")
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=8, rank=4, prefix_bos=False,
                                                                    compute_dtype="float32"))
    r, ids = eng.runner, torch.tensor([random_ids(5)])
    r.bind([_moved_delta(eng)])
    with torch.no_grad():
        want, _ = r.forward(ids)
        with static_decode.decode_weights(r, rows=2):
            with pytest.raises(RuntimeError, match="run fused inside decode_weights"):
                r.forward(ids)
        got, _ = r.forward(ids)
    assert torch.equal(got, want)


class OwnLinear(torch.nn.Linear):
    """Stands for a quantized or offloaded linear: a class other than nn.Linear itself."""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["hooked", "subclass"])
def test_a_linear_the_reorder_leaves_keeps_its_delta_and_its_dtype(kind, dtype):
    """A base linear with a forward of its own (as accelerate's hooks set) or of another class is
    neither reordered nor merged: it is cast with the parameters (a bf16 round) and keeps its
    delta apart, so the block's states are the model's, not a dtype error or a delta dropped."""
    from absorber_kernels import packed_linear

    if not packed_linear.supported(getattr(torch, dtype)):
        pytest.skip(f"no oneDNN prepacked linear in {dtype} here")
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=8, rank=4, prefix_bos=False,
                                                                    compute_dtype=dtype))
    r, ids = eng.runner, torch.tensor([random_ids(6)])
    r.bind([_moved_delta(eng)])
    wrapper = r.layers[0].mlp.down_proj
    if kind == "hooked":
        wrapper.base.forward = functools.partial(torch.nn.Linear.forward, wrapper.base)
    else:
        wrapper.base.__class__ = OwnLinear
    with torch.no_grad(), r.autocast():
        want, _ = r.forward(ids)
        with static_decode.decode_weights(r, rows=2):
            assert static_decode._active.fused[1] is None
            assert wrapper.A is not None and packed_linear.lookup(wrapper.base.weight) is None
            got, _ = r.forward(ids)
        bound, wrapper.A = wrapper.A, None                   # what the states are with that delta dropped
        dropped, _ = r.forward(ids)
        wrapper.A = bound
    off = (dropped - want).abs().max()
    assert off > 1e-2 and (got - want).abs().max() < (1e-4 if dtype == "float32" else off / 4)


def test_the_fused_step_is_not_taken_where_the_modules_would_compute_something_else(monkeypatch):
    """GPT-2's layers, deltas stacked for other rows than the steps', a hook on a layer, a linear of
    another class, a layout without the model-level rotary module, transformers told to hand
    grouped heads to sdpa."""
    from absorber_kernels import packed_linear

    if not packed_linear.supported(torch.float32):
        pytest.skip("no oneDNN prepacked linear here")

    def fused(eng, deltas, rows=2, per_stream=None):
        with torch.no_grad():
            eng.runner.bind(deltas, per_stream or rows // len(deltas))
            with static_decode.decode_weights(eng.runner, rows=rows):
                active = static_decode._active.fused
                return active[1] is not None

    cfg = AbsorberConfig(chunk_tokens=8, rank=4, prefix_bos=False, compute_dtype="float32")
    llama, gpt2 = AbsorberEngine(make_model("llama"), config=cfg), AbsorberEngine(make_model("gpt2"), config=cfg)
    assert fused(llama, [_moved_delta(llama)])
    assert not fused(gpt2, [_moved_delta(gpt2)])
    assert fused(llama, [_moved_delta(llama, 1), _moved_delta(llama, 3)])          # each row's own delta
    assert fused(llama, [_moved_delta(llama, 1), _moved_delta(llama, 3)], rows=4)  # two rows a delta
    assert not fused(llama, [_moved_delta(llama, 1), _moved_delta(llama, 3)], rows=4, per_stream=1)  # other rows
    hook = llama.runner.layers[1].mlp.register_forward_hook(lambda *a: None)
    try:
        assert not fused(llama, [_moved_delta(llama)])
    finally:
        hook.remove()

    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    assert not fused(llama, [_moved_delta(llama)])
    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA")
    mlp = llama.runner.layers[0].mlp
    plain, mlp.down_proj.base.__class__ = mlp.down_proj.base.__class__, OwnLinear
    try:
        assert not fused(llama, [_moved_delta(llama)])
    finally:
        mlp.down_proj.base.__class__ = plain
    base = llama.runner.base
    rotary = base.rotary_emb                     # a layout it does not know (no model-level rotary)
    del base.rotary_emb
    try:
        assert not fused(llama, [_moved_delta(llama)])
    finally:
        base.rotary_emb = rotary
    assert fused(llama, [_moved_delta(llama)])


def test_a_bf16_answer_equals_generates_and_does_not_depend_on_max_new_tokens():
    """A bf16 Llama, greedy, 40 tokens after a 20-token window: the fused step read the whole static
    cache, masked, whose length follows max_new_tokens, and its sums rounded otherwise: the 14-token
    answer was not the 40-token one's start, and token 13 of 40 differed from generate()'s."""
    from absorber_kernels import packed_linear

    if not packed_linear.supported(torch.bfloat16):
        pytest.skip("no oneDNN prepacked linear in bf16 here: the step is not fused")
    eng = AbsorberEngine(make_model("llama").to(torch.bfloat16),
                         config=AbsorberConfig(chunk_tokens=64, sync_tokens=32, rank=2, max_steps=2, future_tokens=4))
    ref = make_model("llama").to(torch.bfloat16)
    window, prompt = random_ids(20, seed=10), random_ids(4, seed=40)
    eng.absorb(window)                                  # held raw: no round yet
    x = torch.tensor([eng.runner.prefix + window + prompt])
    want = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=40,
                        eos_token_id=None, pad_token_id=0)[0, x.shape[1]:].tolist()
    got = eng.generate(prompt, max_new_tokens=40, stop=[])
    assert got == want
    for n in (14, 16, 20):
        assert eng.generate(prompt, max_new_tokens=n, stop=[]) == want[:n]


@pytest.mark.parametrize("arch, seed", [("llama-gelu", 0), ("gpt2", 3)])
def test_a_bf16_answer_through_the_modules_equals_generates(arch, seed):
    """Where the step is not fused (a GELU Llama, GPT-2), the modules attended over the whole static
    cache, masked, and a bf16 softmax over that longer row rounded otherwise: greedy answers of 250
    tokens left generate()'s at token 16 and 141."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import _COMMON

    def model():
        if arch == "gpt2":
            return make_model("gpt2").to(torch.bfloat16)
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(**_COMMON, hidden_act="gelu"))
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() >= 2:
                    p.mul_(3.0)
        return m.eval().to(torch.bfloat16)

    eng, ref = AbsorberEngine(model(), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2)), model()
    prompt = random_ids(12, seed=seed)
    x = torch.tensor([eng.runner.prefix + prompt])
    want = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=250,
                        min_new_tokens=250, eos_token_id=None, pad_token_id=0)[0, x.shape[1]:].tolist()
    assert eng.generate(prompt, max_new_tokens=250, stop=[]) == want
