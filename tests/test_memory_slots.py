"""memory_slots: each round trains a delta of its own from the base model, a bank keeps the latest
K, and a query reads the delta its prompt routes to; memory files, exports and failures with a
bank."""

import pytest
import torch
from safetensors.torch import load_file

from absorber_engine import AbsorberConfig, AbsorberEngine, ConfigError, InputError, MemoryFileError
from absorber_engine import generate
from absorber_engine.routing import WINDOW, route
from tiny_models import make_model, random_ids

# TTT rounds: nothing sampled, so a round's delta depends only on its text and its start.
CFG = AbsorberConfig(chunk_tokens=24, sync_tokens=8, rank=4, max_steps=8, lr=2e-2, objective="ttt",
                     compute_dtype="float32", memory_slots=3)
TEXTS = [random_ids(24, seed=s) for s in (1, 2, 3)]


def _state(delta):
    return delta.state_dict()


def _banked(delta):
    """What a bank holds of `delta` (Session.keep compacts to bf16)."""
    return {k: v.to(torch.bfloat16) for k, v in delta.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _alone(text, cfg=CFG):
    """The delta an engine with one delta absorbs from `text` alone."""
    eng = AbsorberEngine(make_model("llama"), config=cfg.replace(memory_slots=1))
    eng.absorb(text, flush=True)
    return eng


def test_each_round_trains_a_delta_of_its_own_from_the_base_model():
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    for text in TEXTS[:2]:
        eng.absorb(text, flush=True)
    slots = list(eng.default.slots)
    assert len(slots) == 2 and eng.held_bytes()["delta"] == 2 * slots[0].nbytes
    # The second round did not start from the first's delta: it is what absorbing its text alone gives.
    for slot, text in zip(slots, TEXTS):
        _assert_same(_state(slot), _banked(_alone(text).delta))


def test_a_bank_holds_its_deltas_in_bf16_and_reads_them_in_fp32():
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    eng.absorb(TEXTS[0], flush=True)
    (slot,) = eng.default.slots
    assert all(t.dtype == torch.bfloat16 and not t.requires_grad for t in slot.parameters())
    assert slot.nbytes * 2 == eng.default.new_delta().nbytes
    # It answers as its round's fp32 delta rounded to bf16 would.
    alone = _alone(TEXTS[0])
    alone.delta.load_state_dict(_banked(alone.delta))
    prompt = TEXTS[1][:12]
    torch.testing.assert_close(eng.logits(prompt), alone.logits(prompt), rtol=1e-5, atol=1e-5)
    # The next round trains a delta of its own, in fp32, then holds it compact too.
    eng.absorb(TEXTS[1], flush=True)
    assert [s.A[next(iter(s.shapes))].dtype for s in eng.default.slots] == [torch.bfloat16] * 2
    _assert_same(_state(eng.default.slots[1]), _banked(_alone(TEXTS[1]).delta))
    # One delta (memory_slots = 1) keeps training: it stays fp32.
    assert all(t.dtype == torch.float32 and t.requires_grad for t in alone.delta.parameters())


def test_a_full_bank_drops_its_oldest():
    eng = AbsorberEngine(make_model("llama"), config=CFG.replace(memory_slots=2))
    for text in TEXTS:
        eng.absorb(text, flush=True)
    assert len(eng.default.slots) == 2
    for slot, text in zip(eng.default.slots, TEXTS[1:]):
        _assert_same(_state(slot), _banked(_alone(text).delta))
    eng.reset()
    assert len(eng.default.slots) == 1 and eng.delta.is_zero()


def test_a_prompt_reads_the_delta_that_absorbed_it():
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    for text in TEXTS:
        eng.absorb(text, flush=True)
    deltas = list(eng.default.slots)
    for i, text in enumerate(TEXTS):
        prompt = text[:12]
        assert route(eng.runner, deltas, prompt) == i
        alone = _alone(text)
        alone.delta.load_state_dict(_banked(alone.delta))
        # The whole answer is the routed delta's (as the bank holds it): logits and tokens as with it alone.
        torch.testing.assert_close(eng.logits(prompt), alone.logits(prompt), rtol=1e-5, atol=1e-5)
        assert eng.generate(prompt, max_new_tokens=5) == alone.generate(prompt, max_new_tokens=5)
    # Nothing to score: the newest delta. After the model's prefix (BOS) one token is scored.
    assert eng.runner.prefix
    assert route(eng.runner, deltas, []) == 2 and route(eng.runner, deltas, TEXTS[0][:1]) == 0
    eng.runner.prefix = []
    assert route(eng.runner, deltas, TEXTS[0][:1]) == 2


def test_route_picks_the_least_surprised_delta():
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    for text in TEXTS:
        eng.absorb(text, flush=True)
    prompt = random_ids(10, seed=7)
    seq = torch.tensor([eng.runner.prefix + prompt])

    def token_nll(delta):                      # one delta at a time, the plain way
        eng.runner.bind([delta])
        with torch.no_grad():
            final, _ = eng.runner.forward(seq)
            return torch.nn.functional.cross_entropy(eng.runner.logits(final[0, :-1]), seq[0, 1:], reduction="none")

    base = token_nll(eng.default.new_delta())   # Δ = 0: the base model
    gains = [(token_nll(d) - base).clamp(max=0).sum().item() for d in eng.default.slots]
    assert route(eng.runner, list(eng.default.slots), prompt) == min(range(3), key=gains.__getitem__)
    assert len(set(gains)) == 3                 # no tie decides it


def test_a_large_bank_is_shortlisted_in_bf16_then_decided_exactly(monkeypatch):
    from absorber_engine import routing

    cfg = CFG.replace(memory_slots=6, compute_dtype="bfloat16")
    eng = AbsorberEngine(make_model("llama"), config=cfg)
    for s in range(6):
        eng.absorb(random_ids(24, seed=20 + s), flush=True)
    slots = list(eng.default.slots)
    assert len(slots) == 6 > routing.SHORTLIST and eng.runner.compute_dtype == torch.bfloat16
    rough_calls = []
    real = routing.route_gains

    def spy(runner, deltas, ids, window=None):
        rough_calls.append((len(deltas), torch.is_autocast_enabled("cpu"), list(ids)))
        return real(runner, deltas, ids, window)

    monkeypatch.setattr(routing, "route_gains", spy)
    for s in range(6):
        prompt = random_ids(24, seed=20 + s)[:12]
        exact, _ = real(eng.runner, slots, prompt)                # every delta, the model's dtype
        rough_calls.clear()
        assert route(eng.runner, slots, prompt) == int(exact.argmin())
        # One rough pass over the bank under autocast, then the exact one over the shortlist only.
        assert rough_calls == [(6, True, prompt), (routing.SHORTLIST, False, prompt)]
    # A prompt longer than ROUGH_TOKENS: the rough pass reads its end alone, the decision all of it.
    monkeypatch.setattr(routing, "ROUGH_TOKENS", 8)
    long = random_ids(40, seed=7) + random_ids(24, seed=23)[:10]
    exact, _ = real(eng.runner, slots, long)
    with eng.runner.autocast():
        rough, _ = real(eng.runner, slots, long[-8:])
    picks = rough.topk(routing.SHORTLIST, largest=False).indices.tolist()
    rough_calls.clear()
    assert route(eng.runner, slots, long) == picks[int(exact[picks].argmin())]
    assert [(n, ids) for n, _, ids in rough_calls] == [(6, long[-8:]), (routing.SHORTLIST, long)]
    # The template's fixed opening (the prompt's first `opening` tokens) is left out of the rough
    # pass, unless nothing to score would be left; the decision still reads the whole prompt.
    prompt = random_ids(24, seed=22)[:12]
    for opening, read in ((5, prompt[5:]), (12, prompt[-8:])):          # ROUGH_TOKENS is 8 here
        with eng.runner.autocast():
            rough, _ = real(eng.runner, slots, read)
        picks = rough.topk(routing.SHORTLIST, largest=False).indices.tolist()
        exact, _ = real(eng.runner, [slots[i] for i in picks], prompt)
        rough_calls.clear()
        assert route(eng.runner, slots, prompt, opening=opening) == picks[int(exact.argmin())]
        assert [(n, ids) for n, _, ids in rough_calls] == [(6, read), (routing.SHORTLIST, prompt)]


def test_the_raw_window_is_one_more_candidate():
    """A prompt reads a delta of the bank alone, unless the raw window read by the base model
    explains it better (route's gain, the window's scored on the prompt read after it); then it
    reads the base model and the window. A stream continued (no prompt) reads the newest delta and
    the window."""
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    for text in TEXTS[:2]:
        eng.absorb(text, flush=True)
    raw = random_ids(20, seed=9)
    eng.absorb(raw)                                   # fewer than n + m tokens: stays raw
    assert eng.window_tokens() == raw
    slots, prefix = list(eng.default.slots), eng.runner.prefix

    def plain_logits(delta, ids):                     # the plain way: one forward over the whole sequence
        eng.runner.bind([delta])
        with torch.no_grad():
            final, _ = eng.runner.forward(torch.tensor([ids]))
            return eng.runner.logits(final[0])

    base = eng.default.new_delta()                    # B = 0: the base model
    taken = set()
    for prompt in [TEXTS[0][:12], TEXTS[1][:12], raw[:12]] + [random_ids(12, seed=100 + s) for s in range(6)]:
        seq = prefix + prompt
        target = torch.tensor(seq[1:])
        nll = {}
        for name, delta, ids in [("base", base, seq), ("window", base, prefix + raw + prompt)] + \
                [(i, d, seq) for i, d in enumerate(slots)]:
            logits = plain_logits(delta, ids)[-len(seq):-1]
            nll[name] = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        gain = {k: (v - nll["base"]).clamp(max=0).sum().item() for k, v in nll.items() if k != "base"}
        best = min(range(len(slots)), key=lambda i: gain[i])
        want = WINDOW if gain["window"] <= gain[best] else best
        window = generate._window_kv(eng.runner, base, prefix + raw)
        assert route(eng.runner, slots, prompt, window) == want
        taken.add(want)
        if want == WINDOW:                            # the base model, the window and the prompt
            expect = plain_logits(base, prefix + raw + prompt)[-len(prompt):]
        else:                                         # the delta alone: no raw token read
            expect = plain_logits(slots[want], seq)[-len(prompt):]
        torch.testing.assert_close(eng.logits(prompt), expect, rtol=1e-4, atol=1e-4)
    assert taken >= {0, 1}
    # The window's path (a random model reads no fact from context, so route is told): base model.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate, "route", lambda *a: WINDOW)
        expect = plain_logits(base, prefix + raw + TEXTS[0][:12])[-12:]
        torch.testing.assert_close(eng.logits(TEXTS[0][:12]), expect, rtol=1e-4, atol=1e-4)
    # Nothing to score: the stream continued, read by the newest delta and the window.
    first = int(plain_logits(slots[-1], prefix + raw)[-1].argmax())
    assert eng.generate(None, max_new_tokens=1) == [first]
    eng.discard_window()                              # no window: the deltas alone, as before
    assert route(eng.runner, slots, TEXTS[1][:12], generate._window_kv(eng.runner, base, prefix)) == 1


def test_a_failed_round_leaves_every_delta_as_it_was(monkeypatch):
    from absorber_engine import round as rounds

    eng = AbsorberEngine(make_model("llama"), config=CFG)
    for text in TEXTS[:2]:
        eng.absorb(text, flush=True)
    before = [_state(d) for d in eng.default.slots]
    monkeypatch.setattr(rounds, "next_token_losses", lambda *a, **k: [float("nan")])
    with pytest.raises(Exception, match="rolled back"):
        eng.absorb(TEXTS[2], flush=True)
    assert len(eng.default.slots) == 2
    for slot, state in zip(eng.default.slots, before):
        _assert_same(_state(slot), state)



def test_a_bank_first_commit_that_fails_leaves_its_delta_trainable(monkeypatch):
    # A bank's first round trains its own Δ = 0, and keeping it compacts it to bf16 in place: a failure
    # after that (here the marks of X) restored the values into the bf16 tensors, which then took no
    # gradient, and every later round of the session failed.
    import absorber_engine.session as session_mod

    eng = AbsorberEngine(make_model("llama"), config=CFG)
    before = _state(eng.default.delta)

    def failing(x):
        raise MemoryError("injected")

    monkeypatch.setattr(session_mod, "marks", failing)
    with pytest.raises(MemoryError):
        eng.absorb(TEXTS[0], flush=True)
    monkeypatch.undo()
    delta = eng.default.delta
    assert len(eng.default.slots) == 1 and delta.round_tokens == 0 and delta.marks is None
    assert all(t.dtype == torch.float32 and t.requires_grad for t in delta.parameters())
    _assert_same(_state(delta), before)
    eng.absorb([], flush=True)                      # the held tokens, absorbed as a clean engine would
    clean = AbsorberEngine(make_model("llama"), config=CFG)
    clean.absorb(TEXTS[0], flush=True)
    _assert_same(_state(eng.default.delta), _state(clean.default.delta))

def test_ctrl_c_while_a_round_commits_is_raised_once_the_commit_is_whole(monkeypatch):
    """A SIGINT that arrives after the bank took the round's delta but before the scheduler let go of
    its tokens: the interrupt comes after the commit, the bank holds the round's delta (not a restored,
    empty one in place of the dropped oldest) and the tokens are not absorbed again."""
    import os
    import signal
    from absorber_engine.session import Session

    eng = AbsorberEngine(make_model("llama"), config=CFG.replace(memory_slots=2))
    for text in TEXTS[:2]:
        eng.absorb(text, flush=True)
    keep = Session.keep

    def keep_then_ctrl_c(self, delta, x_tokens):
        keep(self, delta, x_tokens)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Session, "keep", keep_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        eng.absorb(TEXTS[2], flush=True)
    monkeypatch.setattr(Session, "keep", keep)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert eng.default.rounds == 3 and eng.held_tokens == 0
    for slot, text in zip(eng.default.slots, TEXTS[1:]):
        _assert_same(_state(slot), _banked(_alone(text).delta))
    with pytest.raises(InputError, match="nothing to absorb"):     # no token left to absorb twice
        eng.absorb([], flush=True)



def test_a_commit_that_fails_leaves_a_full_bank_as_it_was():
    # The bank took the round's delta (a full one dropping its oldest) before the scheduler committed
    # the round: a commit that raised (an allocation in C++) left the restored delta in the bank and
    # the oldest gone.
    eng = AbsorberEngine(make_model("llama"), config=CFG.replace(memory_slots=2))
    for text in TEXTS[:2]:
        eng.absorb(text, flush=True)
    slots, before = list(eng.default.slots), [_state(d) for d in eng.default.slots]

    class FailingCommit:
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def commit(self, *args):
            raise MemoryError("injected")

    real, eng.scheduler = eng.scheduler, FailingCommit(eng.scheduler)
    with pytest.raises(MemoryError):
        eng.absorb(TEXTS[2], flush=True)
    eng.scheduler = real
    assert list(eng.default.slots) == slots and eng.default.stats()["in_flight"] is None
    for slot, state in zip(eng.default.slots, before):
        _assert_same(_state(slot), state)
    eng.absorb([], flush=True)                      # the round again: the bank as if it had never failed
    for slot, text in zip(eng.default.slots, TEXTS[1:]):
        _assert_same(_state(slot), _banked(_alone(text).delta))

def test_replay_needs_the_one_delta():
    with pytest.raises(ConfigError, match="replay_rounds"):
        AbsorberConfig(memory_slots=2, replay_rounds=4)
    with pytest.raises(ConfigError, match="memory_slots"):
        AbsorberConfig(memory_slots=0)


def test_a_bank_saves_and_loads_and_a_smaller_engine_refuses_it(tmp_path):
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    for text in TEXTS[:2]:
        eng.absorb(text, flush=True)
    path = tmp_path / "bank.safetensors"
    eng.save_memory(path)
    back = AbsorberEngine(make_model("llama"), config=CFG)
    back.load_memory(path)
    assert len(back.default.slots) == 2
    for a, b in zip(eng.default.slots, back.default.slots):
        _assert_same(_state(a), _state(b))
    # Each delta keeps its round's length (how long its recital may be: recital.py).
    assert [d.round_tokens for d in back.default.slots] == [d.round_tokens for d in eng.default.slots] == [24, 24]
    # ... and the marks of its round's X a recital must match (3 runs of 8 tokens).
    assert [d.marks for d in back.default.slots] == [d.marks for d in eng.default.slots]
    assert [len(d.marks) for d in back.default.slots] == [3, 3]
    prompt = TEXTS[0][:12]
    torch.testing.assert_close(back.logits(prompt), eng.logits(prompt))
    one = AbsorberEngine(make_model("llama"), config=CFG.replace(memory_slots=1))
    one.absorb(TEXTS[2], flush=True)
    kept = _state(one.delta)
    with pytest.raises(MemoryFileError, match="holds 2 deltas.*memory_slots"):
        one.load_memory(path)
    _assert_same(_state(one.delta), kept)


def test_a_version_1_file_still_loads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    eng = _alone(TEXTS[0])
    path = tmp_path / "v2.safetensors"
    eng.save_memory(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta["version"] = "1"
    del meta["slots"]
    old = {k.replace("slots.0.", "delta.", 1): v for k, v in load_file(str(path)).items()}
    save_file(old, str(tmp_path / "v1.safetensors"), metadata=meta)
    back = AbsorberEngine(make_model("llama"), config=CFG)
    back.load_memory(tmp_path / "v1.safetensors")
    _assert_same(_state(back.delta), _banked(eng.delta))


def test_one_adapter_cannot_stand_for_a_bank(tmp_path):
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    eng.absorb(TEXTS[0], flush=True)
    eng.export_peft(tmp_path / "one")                     # one delta so far: a plain adapter
    eng.absorb(TEXTS[1], flush=True)
    with pytest.raises(InputError, match="holds 2"):
        eng.export_peft(tmp_path / "two")
    with pytest.raises(InputError, match="holds 2"):
        eng.default.merged_model()


def test_a_bank_file_that_lies_about_its_deltas_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    eng = AbsorberEngine(make_model("llama"), config=CFG)
    for text in TEXTS[:2]:
        eng.absorb(text, flush=True)
    path = tmp_path / "bank.safetensors"
    eng.save_memory(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    other = AbsorberEngine(make_model("llama"), config=CFG)
    other.absorb(TEXTS[2], flush=True)
    kept = _state(other.delta)
    cases = {"count": ({**meta, "slots": "two"}, tensors, "slot count"),
             "fewer": ({**meta, "slots": "1"}, tensors, "does not count"),
             "more": ({**meta, "slots": "3"}, tensors, "does not fit"),
             "zero": ({**meta, "slots": "0"}, tensors, "holds 0 deltas"),
             "lengths": (meta, {**tensors, "slot_tokens": torch.tensor([24])}, "round lengths"),
             "length": (meta, {**tensors, "slot_tokens": torch.tensor([24, 10**6])}, "round lengths"),
             "marks": (meta, {**tensors, "marks.1": torch.tensor([1, 2])}, "corrupt marks"),
             "mark": (meta, {**tensors, "marks.0": torch.tensor([1, 2, 70_000])}, "corrupt marks"),
             "marks as floats": (meta, {**tensors, "marks.0": torch.tensor([1.0, 2.0, 3.0])}, "corrupt marks")}
    for name, (m, t, msg) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        save_file(t, str(bad), metadata=m)
        with pytest.raises(MemoryFileError, match=msg):
            other.load_memory(bad)
        assert len(other.default.slots) == 1
        _assert_same(_state(other.delta), kept)
    # A file from before the marks loads, its deltas' recitals then kept whole (recital.verified).
    older = tmp_path / "older.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("marks.")}, str(older), metadata=meta)
    other.load_memory(older)
    assert [d.marks for d in other.default.slots] == [None, None] and [d.round_tokens for d in other.default.slots] == [24, 24]


def test_a_load_that_fails_part_way_leaves_the_bank_as_it_was(tmp_path, monkeypatch):
    """Out of memory while the file's second delta is made used to leave one delta of the file, the
    file's window and the old replay: the held bank was lost without a word."""
    from absorber_engine import session as session_mod

    src = AbsorberEngine(make_model("llama"), config=CFG)
    for t in TEXTS:
        src.absorb(t, flush=True)
    src.save_memory(tmp_path / "bank.absorber")
    dst = AbsorberEngine(make_model("llama"), config=CFG)
    for t in TEXTS[:2]:
        dst.absorb(list(reversed(t)), flush=True)
    dst.absorb(TEXTS[2][:10])
    before = [_state(d) for d in dst.default.slots]
    window, stats = dst.window_tokens(), dst.default.stats()
    real, made = session_mod.Session.new_delta, []

    def fail_second(self):
        made.append(1)
        if len(made) == 2:
            raise torch.OutOfMemoryError("simulated")
        return real(self)

    monkeypatch.setattr(session_mod.Session, "new_delta", fail_second)
    with pytest.raises(torch.OutOfMemoryError):
        dst.load_memory(tmp_path / "bank.absorber")
    assert len(dst.default.slots) == len(before) and dst.window_tokens() == window
    assert dst.default.stats()["absorbed"] == stats["absorbed"]
    for kept, was in zip(dst.default.slots, before):
        _assert_same(_state(kept), was)
    monkeypatch.setattr(session_mod.Session, "new_delta", real)
    dst.load_memory(tmp_path / "bank.absorber")
    assert len(dst.default.slots) == len(src.default.slots)


def test_a_delta_past_bf16s_range_is_refused_by_a_bank(tmp_path):
    # finite in fp32, inf once the bank rounds it: the bank held inf, its logits were NaN, and its
    # next save wrote a file no load took
    from safetensors.torch import save_file

    src = AbsorberEngine(make_model("llama"), config=CFG.replace(memory_slots=1))
    src.absorb(TEXTS[0], flush=True)
    src.save_memory(tmp_path / "one.absorber")
    tensors = load_file(tmp_path / "one.absorber")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "one.absorber"), framework="pt") as f:
        meta = f.metadata()
    key = next(k for k in tensors if k.endswith(".B"))
    tensors[key][0, 0] = 3.4e38
    save_file(tensors, str(tmp_path / "big.absorber"), metadata=meta)
    dst = AbsorberEngine(make_model("llama"), config=CFG)
    dst.absorb(TEXTS[1], flush=True)
    before = [_state(d) for d in dst.default.slots]
    with pytest.raises(MemoryFileError, match="past the range of torch.bfloat16"):
        dst.load_memory(tmp_path / "big.absorber")
    for kept, was in zip(dst.default.slots, before):
        _assert_same(_state(kept), was)


def test_ctrl_c_while_a_load_swaps_the_memory_in_is_raised_once_the_swap_is_whole(tmp_path, monkeypatch):
    # A signal between the window's restore and the deltas' swap left the file's window with the old
    # deltas, or (after slots.clear()) no delta at all: every later call an IndexError.
    import signal

    from absorber_engine import session as session_mod

    src = AbsorberEngine(make_model("llama"), config=CFG)
    for t in TEXTS:
        src.absorb(t, flush=True)
    src.save_memory(tmp_path / "bank.absorber")
    dst = AbsorberEngine(make_model("llama"), config=CFG)
    dst.absorb(TEXTS[0][:20])
    real = session_mod.Session.restore_window

    def interrupted(self, *args):
        real(self, *args)
        signal.raise_signal(signal.SIGINT)       # Ctrl-C right after the window, before the deltas

    monkeypatch.setattr(session_mod.Session, "restore_window", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dst.load_memory(tmp_path / "bank.absorber")
    assert len(dst.default.slots) == len(src.default.slots)
    for got, want in zip(dst.default.slots, src.default.slots):
        _assert_same(_state(got), _state(want))
    # Between calls the model itself carries the memory: the interrupt skipped its rebinding.
    x = torch.tensor([random_ids(6, seed=5)])
    with torch.no_grad():
        assert torch.equal(dst.runner.model(x).logits, src.runner.model(x).logits)
    ids = random_ids(6, seed=5)
    assert torch.equal(dst.logits(ids), src.logits(ids))


def test_a_delta_that_rounds_to_zero_in_the_bank_leaves_a_delta_that_trains_on(tmp_path):
    # B of about 1e-42 is nonzero in fp32 and zero in bf16: the bank held a compacted Δ = 0, reused it
    # as the next round's delta, and every later round raised a raw RuntimeError (no gradient).
    cfg = AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=2, future_tokens=4, memory_slots=2,
                         lr=1e-42)
    eng = AbsorberEngine(make_model("llama"), config=cfg)
    eng.absorb(random_ids(24, seed=1))
    assert eng.default.rounds == 1 and eng.delta.is_zero() and eng.delta.B[next(iter(eng.delta.B))].requires_grad
    eng.absorb(random_ids(16, seed=5))
    assert eng.default.rounds == 2
    src = AbsorberEngine(make_model("llama"), config=cfg.replace(memory_slots=1))
    with torch.no_grad():
        for b in src.delta.B.values():
            b.fill_(1e-42)
    src.save_memory(tmp_path / "tiny.absorber")
    eng = AbsorberEngine(make_model("llama"), config=cfg.replace(lr=1e-2))
    eng.load_memory(tmp_path / "tiny.absorber")
    assert eng.delta.is_zero() and eng.delta.B[next(iter(eng.delta.B))].requires_grad
    eng.absorb(random_ids(24, seed=1))
    assert not eng.delta.is_zero()
