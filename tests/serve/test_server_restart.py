"""A killed server (SIGKILL) loses at most the round in flight: restarted on the same state
directory, a session's memory is back, equal to what was saved."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from absorber_engine.serve.launch import free_port  # noqa: E402
from test_server import DOC, FILLER, MODEL, NAME, SMALL  # noqa: E402

ROOT = Path(__file__).absolute().parents[2]


def start(state_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = state_dir.parent / "config.json"
    config.write_text(json.dumps(SMALL))
    cmd = [sys.executable, "-m", "absorber_engine.cli", "serve", "--model", MODEL, "--port", str(port),
           "--state-dir", str(state_dir), "--idle-save", "0.2", "--quiet", "--config", str(config)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def test_sigkill_then_restart_gives_the_saved_memory_back(tmp_path):
    tmp_path = tmp_path / "state"
    proc, url = start(tmp_path)
    try:
        assert httpx.post(f"{url}/v1/sessions/k/absorb", json={"text": DOC * 3}, timeout=120).status_code == 200
        question = {"model": NAME, "prompt": DOC + FILLER * 4 + "The pass key is", "max_tokens": 8, "temperature": 0}
        hdr = {"X-Absorber-Session": "k"}
        first = httpx.post(f"{url}/v1/completions", json=question, headers=hdr, timeout=120)
        assert first.status_code == 200
        # The same history again feeds nothing new: this is the answer of the memory as it stands.
        answer = httpx.post(f"{url}/v1/completions", json=question, headers=hdr, timeout=120).json()
        info = httpx.get(f"{url}/v1/sessions/k").json()
        assert info["rounds"] >= 3
        time.sleep(1.0)                                  # idle: the raw window is saved too
        # A long document for another session, killed while it is being absorbed.
        def absorb_long():
            try:
                httpx.post(f"{url}/v1/sessions/inflight/absorb", json={"text": (DOC + FILLER) * 40}, timeout=120)
            except httpx.HTTPError:
                pass                                     # the server is killed under it

        threading.Thread(target=absorb_long, daemon=True).start()
        record = None
        deadline = time.monotonic() + 60
        while record is None or record["generation"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
            found = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
            record = next((r for r in found if r["session"] == "inflight"), None)
    finally:
        kill(proc)

    proc, url = start(tmp_path)
    try:
        again = httpx.get(f"{url}/v1/sessions/k").json()
        # The window's KV cache is rebuilt on the first query, not loaded: all else is back as it was.
        assert {**again, "held_bytes": None} == {**info, "held_bytes": None}
        assert {k: v for k, v in again["held_bytes"].items() if k not in ("kv", "total")} == \
            {k: v for k, v in info["held_bytes"].items() if k not in ("kv", "total")}
        replay = httpx.post(f"{url}/v1/completions", json=question, headers=hdr, timeout=120)
        assert replay.headers["x-absorber-session-reset"] == "false" and replay.headers["x-absorber-fed-tokens"] == "0"
        assert replay.json()["choices"] == answer["choices"]
        assert httpx.get(f"{url}/v1/sessions/k").json() == info
        inflight = httpx.get(f"{url}/v1/sessions/inflight").json()
        assert inflight["rounds"] >= record["generation"] - 1 >= 2      # every checkpoint up to the kill survived
        assert not list(tmp_path.glob(".*.tmp"))                         # nothing half-written left behind
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        proc.stderr.close()
