"""Many streams: N sessions absorbed batched (one student pass per round for all of them, each row
reading its own delta) versus one session after another, same engine, same streams, same run.

Batched: every session is fed its whole stream, then engine.run() takes the ready rounds of all
sessions together (same shapes pack into one batch, up to max_batch). Sequential: session.absorb()
one stream at a time, so every round runs alone. Both give the same memories (tests/test_sessions.py
checks that); only the packing differs.
"""

from __future__ import annotations

import time

import torch

from absorber_engine import AbsorberConfig, AbsorberEngine
from absorber_engine.config import PAPER_OBJECTIVE

from .measure import peak_tensor_bytes
from .models import build_model, model_config, token_stream

STREAMS_FULL = (1, 4, 16)
STREAMS_QUICK = (1, 4)
MODEL = "tiny"
# A round shape where per-call overheads matter, as they do for the many small streams of a server.
CONFIG = dict(chunk_tokens=64, sync_tokens=64, rank=8, max_steps=4, lr=5e-4, futures=0, backend="torch",
              compute_dtype="float32", max_batch=16, seed=0, **PAPER_OBJECTIVE)
ROUNDS = 3


def _absorb(model, n_streams: int, batched: bool) -> tuple[float, int]:
    cfg = AbsorberConfig(**CONFIG)
    eng = AbsorberEngine(model, config=cfg)
    length = cfg.chunk_tokens * ROUNDS + cfg.sync_tokens
    vocab = model.config.vocab_size
    streams = [token_stream(length, vocab, seed=i) for i in range(n_streams)]
    sessions = [eng.session(f"s{i}") for i in range(n_streams)]
    start = time.perf_counter()
    if batched:
        for sess, ids in zip(sessions, streams):
            sess.feed(ids)
        reports = eng.run()
        if any(r.errors for r in reports.values()):
            raise RuntimeError(f"a batched round failed: {[r.errors for r in reports.values()]}")
    else:
        for sess, ids in zip(sessions, streams):
            sess.absorb(ids)
    seconds = time.perf_counter() - start
    absorbed = sum(s.absorbed_tokens for s in sessions)
    eng.close()
    return seconds, absorbed


def run(quick: bool, reps: int = 3) -> dict:
    torch.manual_seed(0)
    model = build_model(MODEL)
    _absorb(model, 2, batched=True)                     # first-call costs out of the timings
    rows = []
    for n in (STREAMS_QUICK if quick else STREAMS_FULL):
        times = {"batched": [], "sequential": []}
        absorbed = {}
        for _ in range(reps):                           # interleaved, so load changes hit both alike
            for mode in ("sequential", "batched"):
                seconds, absorbed[mode] = _absorb(model, n, batched=mode == "batched")
                times[mode].append(seconds)
        if absorbed["batched"] != absorbed["sequential"]:
            raise RuntimeError(f"batched and sequential absorbed different amounts: {absorbed}")
        peak = {mode: peak_tensor_bytes(lambda: _absorb(model, n, batched=mode == "batched"))[0]
                for mode in ("sequential", "batched")}
        med = {m: sorted(t)[len(t) // 2] for m, t in times.items()}
        rows.append({
            "streams": n, "tokens": absorbed["batched"],
            "batched_tok_s": absorbed["batched"] / med["batched"],
            "sequential_tok_s": absorbed["sequential"] / med["sequential"],
            "ratio": med["sequential"] / med["batched"],
            "batched_peak_bytes": peak["batched"], "sequential_peak_bytes": peak["sequential"],
            "times": times,
        })
    spec = model_config(MODEL)
    return {"model": MODEL, "hidden": spec.hidden_size, "layers": spec.num_hidden_layers, "config": CONFIG,
            "rounds_per_stream": ROUNDS, "reps": reps, "rows": rows}
