"""Many streams on one engine: batched absorption and generation equal one-by-one, a failure stays
in its own session, feeding from threads while rounds run, and deltas moved by the residency budget."""

import threading

import pytest
import torch

from absorber_engine import AbsorberConfig, AbsorberEngine, InputError
from tiny_models import make_model, random_ids

# fp32: bf16 autocast rounds a batch differently from one row, which hides what these tests check.
CFG = AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=4, max_steps=4, futures=2, future_tokens=4, lr=1e-2,
                     compute_dtype="float32")
STREAMS = {"a": random_ids(64, seed=1), "b": random_ids(64, seed=2), "c": random_ids(64, seed=3)}


def _deltas(eng, names):
    return {n: eng.session(n).delta.state_dict() for n in names}


def _assert_same_deltas(x, y):
    # Batched matmuls round differently from single-row ones; AdamW's normalised first steps turn
    # 1e-7 differences in near-zero gradients into ~1e-4 ones in the delta (entries ~0.25).
    for name in x:
        for k in x[name]:
            torch.testing.assert_close(x[name][k], y[name][k], rtol=1e-3, atol=1e-3, msg=f"{name} {k}")


@pytest.mark.parametrize("objective, replay", [("absorber", {}), ("ttt", {}),
                                               ("absorber", dict(replay_rounds=2)),
                                               ("absorber", dict(replay_rounds=2, replay_batch=1))])
def test_batched_absorption_equals_one_by_one(objective, replay):
    # With replay, a stream's replay group is padded to the batch's largest buffer: the padded row
    # count decided whether it set the layers' scale (first losses apart), and at step 0 its L1 was
    # rounding noise whose sign pushed the first step (deltas 0.02 apart)
    cfg = CFG.replace(objective=objective, **replay)
    one = AbsorberEngine(make_model("llama"), config=cfg)
    for name, ids in STREAMS.items():
        one.session(name).absorb(ids)
    batched = AbsorberEngine(make_model("llama"), config=cfg)
    for name, ids in STREAMS.items():
        batched.session(name).feed(ids)
    reports = batched.run()
    assert sorted(reports) == sorted(STREAMS)
    assert all(r.rounds == 3 and not r.errors for r in reports.values())     # 64 tokens: 3 rounds of 16
    stats = batched.scheduler.stats()
    assert stats["rounds_committed"] == 9 and stats["batches"] == 3        # three streams per batch
    _assert_same_deltas(_deltas(one, STREAMS), _deltas(batched, STREAMS))
    probe = random_ids(6, seed=9)
    for name in STREAMS:
        assert one.session(name).window_tokens() == batched.session(name).window_tokens()
        torch.testing.assert_close(one.session(name).logits(probe), batched.session(name).logits(probe),
                                   rtol=1e-3, atol=1e-3)


def test_a_stream_keeps_its_teacher_distributions_whatever_it_is_batched_with(monkeypatch):
    # The budget of kept KL distributions was the batch's: alone a stream kept its own, beside others
    # it recomputed them at every step (other roundings), so its delta depended on the traffic.
    from types import SimpleNamespace

    from absorber_engine import teacher

    eng = AbsorberEngine(make_model("llama"), config=CFG)
    rows = 40
    monkeypatch.setattr(teacher, "KEPT_DISTRIBUTIONS_BYTES", rows * eng.runner.vocab_size * 4)   # one stream's, fp32
    streams = [SimpleNamespace(groups=[SimpleNamespace(final=torch.randn(rows, eng.runner.hidden_size), teacher_p=None)])
               for _ in range(3)]
    teacher._keep_teacher_distributions(eng.runner, streams, CFG)
    assert all(t.groups[0].teacher_p is not None for t in streams)      # was: the first stream's only


def test_batched_generation_equals_one_by_one():
    eng = AbsorberEngine(make_model("qwen2"), config=CFG)
    eng.session("a").absorb(STREAMS["a"])                # windows of different lengths: rows are padded
    eng.session("b").absorb(STREAMS["b"][:30])
    eng.session("c")                                     # empty window: its prompt is all it reads
    prompts = {"a": random_ids(3, seed=4), "b": random_ids(7, seed=5), "c": random_ids(5, seed=6)}
    batched = eng.generate_batch(prompts, max_new_tokens=6)
    for name, prompt in prompts.items():
        assert batched[name] == eng.session(name).generate(prompt, max_new_tokens=6), name
    both = eng.generate_batch({"a": None, "b": prompts["b"]}, max_new_tokens=4)
    assert both["a"] == eng.session("a").generate(None, max_new_tokens=4)
    # Sampled: each row draws with its own seed, exactly what it draws alone.
    seeds = {"a": 11, "b": 12, "c": 13}
    sampled = eng.generate_batch(prompts, max_new_tokens=6, temperature=1.5, seed=seeds)
    for name, prompt in prompts.items():
        assert sampled[name] == eng.session(name).generate(prompt, max_new_tokens=6, temperature=1.5,
                                                           seed=seeds[name]), name
    assert len({tuple(v) for v in sampled.values()}) == 3
    with pytest.raises(InputError, match="seed"):
        eng.generate_batch(prompts, seed={"a": "x"})


def test_a_call_under_the_callers_autocast_leaves_no_low_precision_window_for_later_calls():
    # The window's KV is kept for every later call: built under a caller's bf16 autocast, plain
    # logits() read it afterwards, 0.03 away from an engine that never saw the autocast.
    def engine():
        eng = AbsorberEngine(make_model("llama"), config=CFG)
        eng.absorb(STREAMS["a"][:20])                                 # held raw: no round
        return eng
    plain, touched = engine(), engine()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        touched.generate(random_ids(3, seed=7), max_new_tokens=2)
    ids = random_ids(5, seed=8)
    assert torch.equal(touched.logits(ids), plain.logits(ids))


def test_a_failing_session_does_not_touch_the_others(monkeypatch):
    from absorber_engine import round as rounds

    eng = AbsorberEngine(make_model("llama"), config=CFG.replace(futures=0))
    for name, ids in STREAMS.items():
        eng.session(name).feed(ids[:24])
    before = _deltas(eng, STREAMS)
    real = rounds.student_losses

    calls = []

    def poison_b(runner, deltas, targets, cfg, backward, **kw):      # after b took a step: it must be undone
        losses = real(runner, deltas, targets, cfg, backward, **kw)
        calls.append(1)
        b = eng.session("b").delta
        return [float("nan") if d is b and len(calls) > 1 else x for d, x in zip(deltas, losses)]

    monkeypatch.setattr(rounds, "student_losses", poison_b)
    reports = eng.run()
    assert reports["b"].rounds == 0 and "nan" in reports["b"].errors[0]
    assert reports["a"].rounds == reports["c"].rounds == 1
    after = _deltas(eng, STREAMS)
    for k, v in before["b"].items():
        assert torch.equal(after["b"][k], v)                      # b rolled back exactly
    assert any(not torch.equal(after["a"][k], before["a"][k]) for k in before["a"])
    assert eng.session("b").held_tokens == 24 and eng.session("b").absorbed_tokens == 0   # its tokens wait
    monkeypatch.setattr(rounds, "student_losses", real)
    assert eng.run()["b"].rounds == 1                             # and are absorbed on the next run


def test_feeding_from_threads_while_rounds_run():
    eng = AbsorberEngine(make_model("llama"), config=CFG.replace(max_steps=1, futures=0))
    names = [f"s{i}" for i in range(4)]
    for n in names:
        eng.session(n)
    streams = {n: random_ids(200, seed=10 + i) for i, n in enumerate(names)}

    def feeder(name):
        ids = streams[name]
        for i in range(0, len(ids), 13):
            eng.session(name).feed(ids[i:i + 13])

    threads = [threading.Thread(target=feeder, args=(n,)) for n in names]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        eng.run()
    for t in threads:
        t.join()
    eng.run(flush=True)
    for n in names:
        s = eng.session(n)
        assert s.absorbed_tokens == 200 and s.held_tokens == 0, n


def test_residency_budget_moves_deltas_and_keeps_results():
    # Two device slots for three sessions: rounds still come out as if nothing moved.
    tight = AbsorberEngine(make_model("llama"), config=CFG.replace(max_resident=2, futures=0))
    free = AbsorberEngine(make_model("llama"), config=CFG.replace(futures=0))
    for eng in (tight, free):
        for name, ids in STREAMS.items():
            eng.session(name).feed(ids)
        eng.run()
    stats = tight.scheduler.stats()
    assert stats["resident"] <= 2 and stats["moves_to_host"] > 0
    _assert_same_deltas(_deltas(free, STREAMS), _deltas(tight, STREAMS))


def test_session_memory_round_trip_and_isolation(tmp_path):
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    eng.session("a").absorb(STREAMS["a"])
    eng.session("b").absorb(STREAMS["b"])
    probe = random_ids(5, seed=7)
    expected = eng.session("a").logits(probe)
    assert not torch.equal(expected, eng.session("b").logits(probe))
    eng.session("a").save_memory(tmp_path / "a.safetensors")
    eng.session("z").load_memory(tmp_path / "a.safetensors")
    assert torch.equal(eng.session("z").logits(probe), expected)
    # The default session is untouched by all of it.
    assert eng.absorbed_tokens == 0 and eng.held_tokens == 0


def test_session_misuse_is_refused():
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    s = eng.session("a")
    s.close()
    with pytest.raises(InputError, match="closed"):
        s.absorb([3, 4])
    with pytest.raises(InputError, match="unknown session"):
        eng.generate_batch({"nope": [3]})
    for bad in (3.5, 1.0, True, ["a"], None):           # 1.0 and True would be session 1 by hash
        with pytest.raises(InputError, match="named by an int or a str"):
            eng.session(bad)
        with pytest.raises(InputError, match="named by an int or a str"):
            eng.absorb([3, 4], session=bad)
    with pytest.raises(InputError, match="at least one"):
        eng.generate_batch({})
    assert eng.session("a") is not s                   # a closed name can be opened again, empty
    # An open name asked for with other sizes was handed back with its own, in silence
    small = eng.session("small", chunk_tokens=8, sync_tokens=4)
    assert eng.session("small", chunk_tokens=8) is small and eng.session("small") is small
    for sizes in (dict(chunk_tokens=4), dict(sync_tokens=0), dict(chunk_tokens="x")):
        with pytest.raises(InputError, match="close it first"):
            eng.session("small", **sizes)
    with pytest.raises(InputError, match="priority must be an int"):
        eng.session("urgent", priority=True)


def test_absorb_takes_all_its_input_when_another_sessions_rounds_run_first():
    """Another session's ready round (another shape, a higher priority) runs in the first batch;
    absorb() goes on until its own input is in, rather than returning with most of it untaken."""
    eng = AbsorberEngine(make_model("llama"), config=CFG.replace(futures=0, max_steps=2))
    other = eng.session("b", priority=5, chunk_tokens=8)
    other.feed(random_ids(100, seed=2))
    ids = random_ids(200, seed=1)
    report = eng.absorb(ids)
    assert report.tokens == 200 and report.absorbed_tokens + report.held_tokens == 200
    flushed = eng.session("c", chunk_tokens=8)
    other.feed(random_ids(100, seed=3))
    assert flushed.absorb(random_ids(30, seed=4), flush=True).held_tokens == 0


def test_the_model_itself_reads_the_memory_as_reset_or_loaded(tmp_path):
    from tiny_models import base_logits

    eng = AbsorberEngine(make_model("llama"), config=CFG.replace(futures=0))
    query, bare = random_ids(6, seed=7), base_logits(make_model("llama"), random_ids(6, seed=7))
    eng.save_memory(tmp_path / "empty.absorber")
    eng.absorb(random_ids(80), flush=True)
    assert (base_logits(eng.runner.model, query) - bare).abs().max() > 1e-3
    eng.reset()
    assert torch.equal(base_logits(eng.runner.model, query), bare)
    eng.absorb(random_ids(80, seed=3), flush=True)
    eng.load_memory(tmp_path / "empty.absorber")
    assert torch.equal(base_logits(eng.runner.model, query), bare)


def test_closing_the_default_session_leaves_an_empty_default_the_model_reads():
    from tiny_models import base_logits

    eng = AbsorberEngine(make_model("llama"), config=CFG.replace(futures=0))
    query, bare = random_ids(6, seed=7), base_logits(make_model("llama"), random_ids(6, seed=7))
    eng.absorb(random_ids(80), flush=True)
    closed = eng.default
    closed.close()
    assert closed.closed and not eng.default.closed and eng.absorbed_tokens == 0 and eng.delta.is_zero()
    assert torch.equal(base_logits(eng.runner.model, query), bare)
    assert eng.absorb(random_ids(30, seed=5)).tokens == 30


def test_a_batch_larger_than_the_resident_budget_is_refused_and_pins_nothing():
    eng = AbsorberEngine(make_model("llama"), config=CFG.replace(max_resident=1))
    a, b = eng.session("a"), eng.session("b")
    a.absorb(STREAMS["a"][:30])
    b.absorb(STREAMS["b"][:30])
    with pytest.raises(InputError, match="max_resident is 1"):
        eng.generate_batch({"a": [3, 4], "b": [5, 6]}, max_new_tokens=2)
    assert not a.stats()["acquired"] and not b.stats()["acquired"]
    b.generate([5, 6], max_new_tokens=2)                  # each alone still works
    assert b.absorb(STREAMS["b"][30:], flush=True).rounds > 0
    a.close()


def test_a_failure_before_the_round_starts_aborts_it(monkeypatch):
    """Out of memory while a bank's fresh delta is made (before any training) used to leave the
    round in flight for good: every later call on the session was refused."""
    from absorber_engine import session as session_mod

    eng = AbsorberEngine(make_model("llama"), config=CFG.replace(memory_slots=3))
    eng.absorb(STREAMS["a"][:30])
    before = eng.delta.state_dict()
    real = session_mod.Session.new_delta

    def fail_once(self):
        monkeypatch.setattr(session_mod.Session, "new_delta", real)
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(session_mod.Session, "new_delta", fail_once)
    with pytest.raises(torch.OutOfMemoryError):
        eng.absorb(STREAMS["a"][30:])
    assert eng.default.stats()["in_flight"] is None
    assert all(torch.equal(v, before[k]) for k, v in eng.delta.state_dict().items())
    assert eng.absorb(STREAMS["a"][30:]).rounds > 0
    eng.reset()


def test_a_closed_engine_refuses_calls_instead_of_ignoring_its_memory():
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    eng.absorb(STREAMS["a"], flush=True)
    eng.close()
    for call in (lambda: eng.logits([3, 4]), lambda: eng.generate([3, 4], max_new_tokens=2),
                 lambda: eng.absorb([3, 4]), lambda: eng.run(), lambda: eng.default.merged_model()):
        with pytest.raises(InputError, match="engine is closed"):
            call()


def test_a_failed_run_leaves_the_model_reading_the_default_memory(monkeypatch):
    from absorber_engine import engine as engine_mod

    eng = AbsorberEngine(make_model("llama"), config=CFG.replace(objective="ttt"))
    eng.absorb(STREAMS["a"][:40])
    x = torch.tensor([STREAMS["c"][:7]])
    with torch.no_grad():
        want = eng.runner.model(x).logits
    eng.session("a").feed(STREAMS["a"][:24])
    eng.session("b").feed(STREAMS["b"][:24])

    def interrupted(runner, batch, cfg):
        runner.bind(batch.deltas)
        raise KeyboardInterrupt

    monkeypatch.setitem(engine_mod.ROUNDS, "ttt", interrupted)
    with pytest.raises(KeyboardInterrupt):
        eng.run()
    with torch.no_grad():
        assert torch.equal(eng.runner.model(x).logits, want)


def test_save_memory_waits_for_a_round_in_another_thread(tmp_path):
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    saved = threading.Event()
    with eng._lock:                                       # as a round in another thread holds it
        t = threading.Thread(target=lambda: (eng.save_memory(tmp_path / "m.absorber"), saved.set()))
        t.start()
        assert not saved.wait(0.3)
    t.join(10)
    assert saved.is_set()
