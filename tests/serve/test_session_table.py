"""The server's saved sessions: reopened on start with one reading of the model's weights for all."""

import pytest

from absorber_engine import AbsorberConfig, AbsorberEngine
from absorber_engine import memory_file, model_identity
from absorber_engine.serve.sessions import SessionTable
from absorber_engine.serve.state import StateDir
from tiny_models import make_model, random_ids

CFG = AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=2, future_tokens=4, lr=1e-2)


def test_a_restart_reopens_every_saved_session_reading_the_weights_once(tmp_path, monkeypatch):
    state = StateDir(tmp_path / "state")
    first = SessionTable(AbsorberEngine(make_model("llama"), config=CFG), state, idle_save_s=0.0)
    for i in range(3):
        conv = first.open(f"chat-{i}")
        first.session(conv).absorb(random_ids(40, seed=i))
        first.save(conv)
    reads = []
    real = model_identity._weights_checksum
    monkeypatch.setattr(model_identity, "_weights_checksum", lambda params: reads.append(1) or real(params))
    engine = AbsorberEngine(make_model("llama"), config=CFG)
    again = SessionTable(engine, state, idle_save_s=0.0)
    assert again.load() == 3 and len(reads) == 1
    for i in range(3):
        want = first.session(first.get(f"chat-{i}")).window_tokens()
        assert again.session(again.get(f"chat-{i}")).window_tokens() == want


def test_a_saved_session_that_does_not_load_is_kept_and_refused_until_deleted(tmp_path):
    # It was logged as "left on disk untouched", but a request naming its id opened an empty session
    # whose first save removed the old memory file: the memory was gone for a restart that could load it.
    import json

    import pytest
    from absorber_engine.serve.errors import APIError
    from absorber_engine.serve.state import stem

    state = StateDir(tmp_path / "state")
    first = SessionTable(AbsorberEngine(make_model("llama"), config=CFG), state, idle_save_s=0.0)
    conv = first.open("alice")
    first.session(conv).absorb(random_ids(40, seed=1))
    first.save(conv)
    (tmp_path / "state" / f"{stem('bob')}.json").write_text("{not json")        # a record cut short
    files = {p.name: p.read_bytes() for p in (tmp_path / "state").iterdir()}
    state.close()                                                 # the first server is gone: its directory free

    other = AbsorberEngine(make_model("llama"), config=CFG.replace(rank=4))     # not the rank alice was made with
    table = SessionTable(other, StateDir(tmp_path / "state"), idle_save_s=0.0)
    assert table.load() == 0
    for name, why in (("alice", "rank-2 delta"), ("bob", "does not load")):
        with pytest.raises(APIError, match=why) as refused:
            table.open(name)
        assert refused.value.status == 409 and table.get(name) is None
    assert {p.name: p.read_bytes() for p in (tmp_path / "state").iterdir()} == files
    table.delete("alice")                                                      # the one way to let the id go
    assert not list((tmp_path / "state").glob(f"{stem('alice')}.*"))
    table.save(table.open("alice"))
    assert json.loads((tmp_path / "state" / f"{stem('alice')}.json").read_text())["session"] == "alice"


def test_a_session_opened_with_nothing_fed_is_saved_and_comes_back():
    # A request whose prompt was all generation prompt (nothing fed) made a session that listed and
    # answered, but was never dirty, so never saved: a clean restart lost it.
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        state = StateDir(Path(tmp) / "state")
        first = SessionTable(AbsorberEngine(make_model("llama"), config=CFG), state, idle_save_s=0.0)
        first.open("tiny")
        first.save_all()
        again = SessionTable(AbsorberEngine(make_model("llama"), config=CFG), state, idle_save_s=0.0)
        assert again.load() == 1 and again.get("tiny") is not None


def test_one_server_a_state_directory_and_files_no_record_names_are_removed(tmp_path):
    # Two servers on one directory removed each other's writes in flight and the generations the other
    # had just recorded; a DELETE cut short between its two files left a memory file nothing named.
    from absorber_engine import InputError
    from absorber_engine.serve.state import stem

    state = StateDir(tmp_path / "state")
    with pytest.raises(InputError, match="in use by another server"):
        StateDir(tmp_path / "state")
    table = SessionTable(AbsorberEngine(make_model("llama"), config=CFG), state, idle_save_s=0.0)
    for name in ("alice", "bob"):
        table.session(table.open(name)).absorb(random_ids(40, seed=1))
        table.save(table.get(name))
    (tmp_path / "state" / f"{stem('bob')}.json").unlink()           # a DELETE stopped after its first unlink
    (tmp_path / "state" / f"{stem('alice')}.7.absorber").write_bytes(b"an older generation")
    (tmp_path / "state" / "notes.absorber").write_bytes(b"a user's own memory file")        # not the server's
    state.close()
    again = SessionTable(AbsorberEngine(make_model("llama"), config=CFG), StateDir(tmp_path / "state"), idle_save_s=0.0)
    assert again.load() == 1 and again.get("alice") is not None
    assert sorted(p.name for p in (tmp_path / "state").glob("*.absorber")) == sorted(
        [again.state.load_all()[0].memory.name, "notes.absorber"])
