"""Memory files: identical logits after a round trip, and every bad file refused with the memory
held before left intact."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from absorber_engine import AbsorberConfig, AbsorberEngine, MemoryFileError
from absorber_engine import memory_file, model_identity
from tiny_models import make_model, random_ids

CFG = AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=4, max_steps=3, future_tokens=4, lr=1e-2)


@pytest.fixture
def trained(tmp_path):
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    eng.absorb(random_ids(50, seed=1))
    path = tmp_path / "mem.safetensors"
    eng.save_memory(path)
    return eng, path


def _state(eng):
    return eng.delta.state_dict(), eng.window_tokens(), eng.absorbed_tokens


def _same_state(eng, state):
    delta, window, absorbed = state
    for k, v in eng.delta.state_dict().items():
        assert torch.equal(v, delta[k]), k
    assert eng.window_tokens() == window and eng.absorbed_tokens == absorbed


def test_round_trip_gives_identical_logits(trained):
    eng, path = trained
    probe = random_ids(9, seed=2)
    expected = eng.logits(probe)
    fresh = AbsorberEngine(make_model("llama"), config=CFG)
    assert not torch.equal(fresh.logits(probe), expected)
    fresh.load_memory(path)
    assert torch.equal(fresh.logits(probe), expected)
    assert fresh.absorbed_tokens == eng.absorbed_tokens and fresh.held_tokens == eng.held_tokens
    # The stream goes on from where it was saved, to the same memory.
    more = random_ids(20, seed=3)
    eng.absorb(more)
    fresh.absorb(more)
    for k, v in eng.delta.state_dict().items():
        torch.testing.assert_close(fresh.delta.state_dict()[k], v)


def test_save_is_atomic_and_leaves_no_temporaries(trained, tmp_path, monkeypatch):
    eng, path = trained
    eng.save_memory(path)                                    # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["mem.safetensors"]
    before = path.read_bytes()

    def interrupted(*a, **k):                                # Ctrl-C while the bytes are made
        raise KeyboardInterrupt
    monkeypatch.setattr(memory_file, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        eng.save_memory(path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["mem.safetensors"]
    monkeypatch.undo()
    # Ctrl-C the moment the temporary file is made: it was left behind, full-size, its descriptor open.
    import signal

    real_open = os.open

    def open_then_interrupt(name, flags, *args):
        fd = real_open(name, flags, *args)
        if flags & os.O_CREAT:
            os.kill(os.getpid(), signal.SIGINT)
        return fd

    monkeypatch.setattr(os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        eng.save_memory(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["mem.safetensors"]


def test_every_file_written_is_on_disk_before_its_name_and_its_name_after(trained, tmp_path, monkeypatch):
    # A memory file was renamed into place unsynced: after a power cut the server's record could name
    # a file whose bytes never reached the disk, its older generation already removed.
    import stat

    from absorber_engine.serve.sessions import SessionTable
    from absorber_engine.serve.state import StateDir

    eng, _ = trained
    events, fsync, replace = [], os.fsync, os.replace

    def synced(fd):
        events.append("directory synced" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file synced")
        fsync(fd)

    def renamed(src, dst):
        events.append(f"renamed to {os.path.basename(dst)}")
        replace(src, dst)
    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", renamed)
    eng.save_memory(tmp_path / "again.absorber")
    assert events == ["file synced", "renamed to again.absorber", "directory synced"]
    events.clear()
    eng.export_peft(tmp_path / "adapter")
    assert events == ["file synced", "file synced", "renamed to adapter_model.safetensors",
                      "renamed to adapter_config.json", "directory synced"]
    events.clear()
    table = SessionTable(eng, StateDir(tmp_path / "state"), idle_save_s=0.0)
    table.save(table.open("s"))
    assert [e.split(".")[-1] for e in events] == ["file synced", "absorber", "directory synced",
                                                  "file synced", "json", "directory synced"]


def _rewrite(path, out, tensors=None, meta_changes=None, drop=()):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = tensors if tensors is not None else load_file(str(path))
    meta.update(meta_changes or {})
    meta = {k: v for k, v in meta.items() if k not in drop}
    save_file(tensors, str(out), metadata=meta)
    return out


def test_bad_files_are_refused_and_memory_kept(trained, tmp_path):
    eng, path = trained
    other = AbsorberEngine(make_model("llama"), config=CFG)
    other.absorb(random_ids(40, seed=9))
    state = _state(other)
    raw = path.read_bytes()
    cases = {
        "truncated": raw[: len(raw) // 2],
        "garbage": b"\x00\x01not a safetensors file at all",
        "empty": b"",
    }
    for name, data in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(MemoryFileError, match="not a readable memory file"):
            other.load_memory(bad)
        _same_state(other, state)
    t = load_file(str(path))
    first_delta = next(k for k in t if k.startswith("slots.0."))
    variants = {
        "version": (_rewrite(path, tmp_path / "v.st", meta_changes={"version": "99"}), "version"),
        "format": (_rewrite(path, tmp_path / "f.st", meta_changes={"format": "other"}), "not an absorber memory"),
        "nan": (_rewrite(path, tmp_path / "n.st", tensors={**t, first_delta: torch.full_like(t[first_delta], float("nan"))}), "NaN"),
        # finite as float64, inf in the fp32 delta
        "past fp32": (_rewrite(path, tmp_path / "o.st", tensors={**t, first_delta: t[first_delta].double() + 1e300}), "beyond float32"),
        "missing": (_rewrite(path, tmp_path / "m.st", tensors={k: v for k, v in t.items() if k != "window"}), "window"),
        "bad ids": (_rewrite(path, tmp_path / "i.st", tensors={**t, "window": torch.tensor([10**6])}), "vocabulary"),
        "header": (_rewrite(path, tmp_path / "h.st", meta_changes={"config": "{not json"}), "corrupt header"),
    }
    for name, (bad, msg) in variants.items():
        with pytest.raises(MemoryFileError, match=msg):
            other.load_memory(bad)
        _same_state(other, state)
    with pytest.raises(MemoryFileError, match="does not exist"):
        other.load_memory(tmp_path / "nope.safetensors")


def test_memory_of_another_model_or_shape_is_refused(trained):
    eng, path = trained
    different_weights = AbsorberEngine(make_model("llama", seed=1), config=CFG)
    with pytest.raises(MemoryFileError, match="another base model"):
        different_weights.load_memory(path)
    different_arch = AbsorberEngine(make_model("qwen2"), config=CFG)
    with pytest.raises(MemoryFileError, match="another base model"):
        different_arch.load_memory(path)
    other_rank = AbsorberEngine(make_model("llama"), config=CFG.replace(rank=8))
    with pytest.raises(MemoryFileError, match="rank"):
        other_rank.load_memory(path)
    other_targets = AbsorberEngine(make_model("llama"), config=CFG.replace(targets=("q_proj",)))
    with pytest.raises(MemoryFileError, match="targets"):
        other_targets.load_memory(path)


def test_memory_of_a_model_changed_past_the_sampled_values_is_refused_and_old_files_still_load(trained, tmp_path):
    eng, path = trained
    model = make_model("llama")
    with torch.no_grad():        # one row of one weight fine-tuned: the fingerprint's sample misses it
        model.model.layers[1].mlp.down_proj.weight[-1].mul_(1.5)
    tuned = AbsorberEngine(model, config=CFG)
    state = _state(tuned)
    with pytest.raises(MemoryFileError, match="another base model"):
        tuned.load_memory(path)
    _same_state(tuned, state)
    old_file = _rewrite(path, tmp_path / "old.st", drop=("model_checksum",))   # made before the checksum
    AbsorberEngine(make_model("llama"), config=CFG).load_memory(old_file)
    eng.save_memory(path)
    with torch.no_grad():       # the same engine's weight edited through .data: no version counter moves
        eng.runner.model.model.layers[1].mlp.down_proj.base.weight.data.view(-1)[-1] += 1.0
    with pytest.raises(MemoryFileError, match="another base model"):
        eng.load_memory(path)


def test_many_loads_in_a_read_once_block_read_the_weights_once(trained, monkeypatch):
    from absorber_engine import memory_file

    eng, path = trained
    other = AbsorberEngine(make_model("llama"), config=CFG)
    reads = []
    real = model_identity._weights_checksum
    monkeypatch.setattr(model_identity, "_weights_checksum", lambda params: reads.append(1) or real(params))
    for _ in range(3):
        other.load_memory(path)
    assert len(reads) == 3             # outside the block, every load reads every weight
    reads.clear()
    with torch.no_grad():       # an edit made before the block, through .data: the block's reading sees it
        other.runner.model.model.layers[1].mlp.down_proj.base.weight.data.view(-1)[-1] += 1.0
    with model_identity.weights_read_once(other.runner):
        with pytest.raises(MemoryFileError, match="another base model"):
            other.load_memory(path)
    reads.clear()
    fresh = AbsorberEngine(make_model("llama"), config=CFG)
    names = [fresh.session(f"s{i}") for i in range(4)]
    with model_identity.weights_read_once(fresh.runner):
        for sess in names[:2]:
            sess.load_memory(path)
        with model_identity.weights_read_once(fresh.runner):     # nested: the outer block's reading
            names[2].load_memory(path)
        names[3].load_memory(path)
    assert len(reads) == 1             # one reading for the four
    reads.clear()
    names[0].load_memory(path)         # after the block, a load reads the weights again
    assert len(reads) == 1


def test_loading_a_model_in_another_dtype_still_matches(trained):
    eng, path = trained
    model = make_model("llama")
    model.to(torch.bfloat16).to(torch.float32)   # same checkpoint, round-tripped through bf16
    # bf16-rounded values differ in the weights' low bits, the fingerprint samples bf16 values.
    AbsorberEngine(model, config=CFG).load_memory(path)


def test_corrupt_replay_buffer_is_refused(tmp_path):
    cfg = CFG.replace(replay_rounds=2)
    eng = AbsorberEngine(make_model("llama"), config=cfg)
    eng.absorb(random_ids(50, seed=1))
    assert len(eng.default.replay) == 2
    path = tmp_path / "mem.safetensors"
    eng.save_memory(path)
    other = AbsorberEngine(make_model("llama"), config=cfg)
    other.absorb(random_ids(40, seed=9))
    state = _state(other)
    replay = [q.clone() for q in other.default.replay]
    t = load_file(str(path))
    longer = torch.tensor(random_ids(other.config.window_tokens + 300, seed=4), dtype=torch.int64)  # than any round's probe
    for name, value in {"ids": torch.tensor([10**6]), "dtype": torch.tensor([1.5]), "empty": torch.tensor([], dtype=torch.int64),
                        "too long": longer}.items():
        bad = _rewrite(path, tmp_path / f"{name}.st", tensors={**t, "replay.0": value})
        with pytest.raises(MemoryFileError, match="replay"):
            other.load_memory(bad)
        _same_state(other, state)
        assert [q.tolist() for q in other.default.replay] == [q.tolist() for q in replay]
    other.load_memory(path)
    assert [q.tolist() for q in other.default.replay] == [q.tolist() for q in eng.default.replay]


def test_surprise_history_round_trips_and_a_corrupt_one_is_refused(tmp_path):
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    eng.absorb(random_ids(50, seed=1))
    assert len(eng.default.surprise) == eng.default.rounds - 1 > 0     # all rounds but the first
    path = tmp_path / "mem.safetensors"
    eng.save_memory(path)
    other = AbsorberEngine(make_model("llama"), config=CFG)
    other.absorb(random_ids(40, seed=9))
    state, history = _state(other), list(other.default.surprise)
    t = load_file(str(path))
    for name, value in {"nan": torch.tensor([1.0, float("nan")], dtype=torch.float64),
                        "negative": torch.tensor([-1.0], dtype=torch.float64),
                        "dtype": torch.tensor([1], dtype=torch.int64),
                        "shape": torch.ones(2, 2, dtype=torch.float64)}.items():
        bad = _rewrite(path, tmp_path / f"{name}.st", tensors={**t, "surprise": value})
        with pytest.raises(MemoryFileError, match="surprise"):
            other.load_memory(bad)
        _same_state(other, state)
        assert list(other.default.surprise) == history
    other.load_memory(path)
    assert list(other.default.surprise) == list(eng.default.surprise)
    # A file written before the gate existed has no history: it loads with an empty one.
    old = _rewrite(path, tmp_path / "old.st", tensors={k: v for k, v in t.items() if k != "surprise"})
    other.load_memory(old)
    assert list(other.default.surprise) == []


def test_tokens_queued_behind_the_window_are_saved_and_absorbed_after_loading(tmp_path):
    """feed() can hold more than the window's n + m; the file used to keep the window only, so the
    loaded memory absorbed 24 of 100 fed tokens."""
    cfg = CFG.replace(objective="ttt", compute_dtype="float32")
    a = AbsorberEngine(make_model("llama"), config=cfg)
    a.feed(random_ids(100, seed=4))
    a.save_memory(tmp_path / "q.absorber")
    b = AbsorberEngine(make_model("llama"), config=cfg)
    b.load_memory(tmp_path / "q.absorber")
    assert b.held_tokens == a.held_tokens == 100 and b.window_tokens() == a.window_tokens()
    ra, rb = a.run(flush=True), b.run(flush=True)
    assert ra["default"].absorbed_tokens == rb["default"].absorbed_tokens == 100
    for k, v in a.delta.state_dict().items():
        torch.testing.assert_close(b.delta.state_dict()[k], v)


def test_a_queue_loads_into_a_session_with_a_larger_window(tmp_path):
    a = AbsorberEngine(make_model("llama"), config=CFG.replace(compute_dtype="float32"))
    a.feed(random_ids(30, seed=6))
    a.save_memory(tmp_path / "q.absorber")
    a.session("wide", chunk_tokens=32, sync_tokens=8)
    a.load_memory(tmp_path / "q.absorber", session="wide")
    assert a.session("wide").held_tokens == 30 and a.session("wide").window_tokens() == random_ids(30, seed=6)


def test_runtime_flags_of_the_model_config_are_no_other_model(trained, tmp_path):
    # from_pretrained(..., output_hidden_states=True) changed the fingerprint: "made for another base
    # model" though every weight was the same. Files made before still load (their legacy hash).
    eng, path = trained
    model = make_model("llama")
    model.config.output_hidden_states, model.config.return_dict = True, False
    flagged = AbsorberEngine(model, config=CFG)
    flagged.load_memory(path)
    ids = random_ids(5, seed=2)
    assert torch.equal(flagged.logits(ids), eng.logits(ids))
    legacy = _rewrite(path, tmp_path / "legacy.st",
                      meta_changes={"model_fingerprint": model_identity.model_fingerprint(eng.runner, legacy=True)})
    AbsorberEngine(make_model("llama"), config=CFG).load_memory(legacy)


def test_a_memory_path_given_as_bytes_loads(trained):
    eng, path = trained
    other = AbsorberEngine(make_model("llama"), config=CFG)
    other.load_memory(os.fsencode(path))              # a raw TypeError from safetensors before
    assert memory_file.read_memory_config(os.fsencode(path)) == eng.config
    assert other.window_tokens() == eng.window_tokens()


def test_the_file_names_the_sizes_its_session_ran_with(tmp_path):
    # a session opened with its own n and m saved the engine's: `absorb --resume` then went on in
    # rounds its stream had not run in
    eng = AbsorberEngine(make_model("llama"), config=CFG)
    sess = eng.session("own", chunk_tokens=12, sync_tokens=6)
    sess.absorb(random_ids(30, seed=1))
    sess.save_memory(tmp_path / "own.absorber")
    got = memory_file.read_memory_config(tmp_path / "own.absorber")
    assert (got.chunk_tokens, got.sync_tokens) == (12, 6) and got.replace(chunk_tokens=16, sync_tokens=8) == CFG
    AbsorberEngine(make_model("llama"), config=got).load_memory(tmp_path / "own.absorber")


def test_two_saves_of_one_memory_are_the_same_bytes(tmp_path):
    # safetensors writes its metadata in hash-map order: five saves gave five different files.
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=1))
    eng.absorb(random_ids(30, seed=1))
    blobs = set()
    for i in range(5):
        eng.save_memory(tmp_path / f"m{i}.absorber")
        blobs.add((tmp_path / f"m{i}.absorber").read_bytes())
    assert len(blobs) == 1
    fresh = AbsorberEngine(make_model("llama"), config=eng.config)
    fresh.load_memory(tmp_path / "m4.absorber")
    assert torch.equal(fresh.logits(random_ids(5, seed=2)), eng.logits(random_ids(5, seed=2)))


def test_a_load_that_overlaps_a_save_over_the_file_reads_one_file_whole(trained, tmp_path, monkeypatch):
    # The header and the tensors were read through two opens: a save renamed over the path in between
    # gave the old file's counters with the new file's deltas.
    import builtins

    eng, path = trained
    eng.save_memory(path)
    old = path.read_bytes()
    eng.absorb(random_ids(40, seed=9), flush=True)
    eng.save_memory(tmp_path / "newer.safetensors")
    real_open, replaced = builtins.open, []

    def open_then_replace(file, *args, **kwargs):
        f = real_open(file, *args, **kwargs)
        if os.fspath(file) == str(path) and not replaced:
            os.replace(tmp_path / "newer.safetensors", path)          # a writer's rename, once this file is open
            replaced.append(True)
        return f

    monkeypatch.setattr(builtins, "open", open_then_replace)
    tensors, meta = memory_file.read_memory(path)
    monkeypatch.undo()
    assert replaced and path.read_bytes() != old
    (tmp_path / "old.safetensors").write_bytes(old)
    want_tensors, want_meta = memory_file.read_memory(tmp_path / "old.safetensors")
    assert meta == want_meta and tensors.keys() == want_tensors.keys()
    assert all(torch.equal(tensors[k], want_tensors[k]) for k in tensors)


def test_a_memory_made_in_fp32_refused_in_fp16_names_the_dtypes(trained):
    # fp16 rounds an fp32 checkpoint otherwise than bf16: the fingerprints differ, and the file was
    # refused as "made for another base model" when only --dtype differed.
    eng, path = trained
    fp16 = AbsorberEngine(make_model("llama").to(torch.float16), config=eng.config)
    with pytest.raises(MemoryFileError, match="in float32; they are in float16 here"):
        fp16.load_memory(path)
    bf16 = AbsorberEngine(make_model("llama").to(torch.bfloat16), config=eng.config)
    bf16.load_memory(path)                                  # bf16 rounds as the fingerprint does: the same model
