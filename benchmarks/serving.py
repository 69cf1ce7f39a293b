"""Serving: `absorber serve` under 1, 4 and 16 concurrent sessions, measured from its clients.

Each session is one client thread holding a chat through the `openai` client: a short document as
the system message, then a question per turn with filler, the whole history resent every turn (as
OpenAI clients do), greedy, a few tokens per answer. The server absorbs what leaves each session's
window while it answers. Reported per concurrency: request latency p50 / p95 (queueing, absorption
and decoding included), requests per second, and the memory each session holds afterwards (delta +
window KV + raw tokens, from GET /v1/sessions/{id}), beside the tokens its conversation reached.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from absorber_engine import AbsorberConfig, AbsorberEngine
from absorber_engine.model_store import recommended_config
from absorber_engine.serve.app import ServeConfig
from absorber_engine.serve.launch import BackgroundServer

MODEL = str(Path(__file__).resolve().parent.parent / "model" / "absorber-tiny")
NAME = "absorber-tiny"
SESSIONS = (1, 4, 16)
# Rounds small enough that every session absorbs several of them in the run.
CONFIG = dict(chunk_tokens=64, sync_tokens=32, rank=8, max_steps=4, lr=5e-4, futures=0, future_tokens=None,
              future_prompt="", probes=0, max_batch=16, seed=0)
DOC = ("The pass key is 71432. Anna lives in Oslo and keeps 3 cats. The red door opens at 9. "
       "Bruno's number is 5570. ")
FILLER = "The grass is green. The sky is blue. Here we go again. "
MAX_TOKENS = 8


def _conversation(client, session: str, turns: int, latencies: list) -> None:
    messages = [{"role": "system", "content": f"{session}: {DOC}"}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"{FILLER * 2}Question {t}: what is the pass key?"})
        start = time.perf_counter()
        r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_headers={"X-Absorber-Session": session})
        latencies.append(time.perf_counter() - start)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})


def _client(args) -> None:
    client, session, turns, barrier, lock, latencies = args
    mine: list[float] = []
    barrier.wait()                     # all sessions start together
    _conversation(client, session, turns, mine)
    with lock:
        latencies.extend(mine)


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run(quick: bool) -> dict:
    import openai

    torch.manual_seed(0)
    turns = 4 if quick else 16
    rows = []
    cfg = AbsorberConfig.from_dict({**recommended_config(MODEL).to_dict(), **CONFIG})
    for n in SESSIONS:
        engine = AbsorberEngine.from_pretrained(MODEL, config=cfg)
        with BackgroundServer(engine, ServeConfig(NAME, max_queue=256, timeout_s=600)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
            _conversation(client, "warmup", 1, [])                     # first-call costs out of the timings
            latencies: list[float] = []
            lock = threading.Lock()
            barrier = threading.Barrier(n)

            start = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(_client, [(client, f"s{i}", turns, barrier, lock, latencies) for i in range(n)]))
            wall = time.perf_counter() - start
            infos = [httpx.get(f"{url}/v1/sessions/s{i}").json() for i in range(n)]
            largest_batch = httpx.get(f"{url}/health").json()["largest_batch"]
        held = [i["held_bytes"]["total"] for i in infos]
        rows.append({
            "sessions": n, "requests": len(latencies), "turns": turns, "wall_s": wall,
            "requests_per_s": len(latencies) / wall,
            "p50_s": statistics.median(latencies), "p95_s": _percentile(latencies, 0.95),
            "held_bytes_mean": statistics.mean(held), "held_bytes_max": max(held),
            "held_delta_bytes": infos[0]["held_bytes"]["delta"],
            "conversation_tokens_mean": statistics.mean(i["conversation_tokens"] for i in infos),
            "absorbed_tokens_mean": statistics.mean(i["absorbed_tokens"] for i in infos),
            "rounds_mean": statistics.mean(i["rounds"] for i in infos),
            "largest_batch": largest_batch,
        })
    return {"model": NAME, "config": CONFIG, "max_tokens": MAX_TOKENS, "threads": torch.get_num_threads(),
            "rows": rows}


def main(argv=None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer turns a session (about a minute)")
    print(json.dumps(run(ap.parse_args(argv).quick), indent=1))


if __name__ == "__main__":
    main()
