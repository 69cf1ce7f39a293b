"""The server's saved sessions: reopened on start with one reading of the model's weights for all."""

from absorber_engine import AbsorberConfig, AbsorberEngine
from absorber_engine import memory_file
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
    real = memory_file._weights_checksum
    monkeypatch.setattr(memory_file, "_weights_checksum", lambda params: reads.append(1) or real(params))
    engine = AbsorberEngine(make_model("llama"), config=CFG)
    again = SessionTable(engine, state, idle_save_s=0.0)
    assert again.load() == 3 and len(reads) == 1
    for i in range(3):
        want = first.session(first.get(f"chat-{i}")).window_tokens()
        assert again.session(again.get(f"chat-{i}")).window_tokens() == want
