"""End-to-end absorption: the engine against the PEFT baseline (benchmarks/baseline.py), same inputs.

What one comparison runs (`compare`):
- timing: one fresh process builds the model once and alternates engine and baseline runs (engine
  first on even repetitions, baseline first on odd ones), each on its own copy of the model, over the
  same token stream: R rounds of n + m (the stream is R·n + m tokens, absorbed without flush), the
  same steps per round. Each run reports seconds, rounds, steps and every step's loss.
- memory: for each implementation a fresh process runs one round of two steps (the per-round peak
  is the same in every round) once under an RSS sampler, then again under torch.profiler for the
  peak of live tensor bytes (measure.py says how each is taken).
Throughput is tokens absorbed (R·n) per second; ratios are engine / baseline of the same process.

Run as a module, it is the worker: `python -m benchmarks.e2e JOB_JSON OUT_JSON`.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from absorber_engine import AbsorberConfig, AbsorberEngine
from absorber_engine.config import PAPER_OBJECTIVE

from .baseline import PeftSyncBaseline, engine_initial_delta
from .engine_hooks import record_round_losses
from .measure import RssPeak, peak_tensor_bytes, set_threads, summarize
from .models import build_model, token_stream

# Per model size: the round shape and budget (n, m, rank, steps per round K, rounds R, lr).
SIZES = {
    "tiny": dict(chunk_tokens=128, sync_tokens=256, rank=8, max_steps=8, rounds=3),
    "llama-56m": dict(chunk_tokens=256, sync_tokens=512, rank=32, max_steps=4, rounds=2),
}
# The configurations of issue 6: (a) the paper's objective, (b) + full-vocabulary KL, (c) to the
# baseline's final loss with early stop: the engine's stop_loss is the final loss the baseline reached
# in (a) while the baseline runs its K steps (c), or both stop at that loss (c2); (d) (a) with
# sampled futures as well as the real Y; and what bf16 compute buys on a CPU with AVX512-BF16:
# (e) the engine's default compute_dtype="auto" (bf16 autocast, fp32 weights, delta and AdamW)
# against the fp32 baseline users run by default, without and with KL, (f) both on bf16 weights.
# (g) is (e) with checkpointed student layers: the memory-lean setting. Configurations a-d pin the
# engine to fp32 so the comparison is like for like.
CONFIGS = {
    "a_hidden_l1": dict(hidden_weight=1.0, kl_weight=0.0, futures=0),
    "b_hidden_l1_kl": dict(hidden_weight=1.0, kl_weight=1.0, futures=0),
    "c_early_stop": dict(hidden_weight=1.0, kl_weight=0.0, futures=0),
    "c2_early_stop_both": dict(hidden_weight=1.0, kl_weight=0.0, futures=0),
    "d_futures": dict(hidden_weight=1.0, kl_weight=0.0, futures=4, future_tokens=32),
    "e_bf16_engine": dict(hidden_weight=1.0, kl_weight=0.0, futures=0, compute_dtype="auto"),
    "e2_bf16_engine_kl": dict(hidden_weight=1.0, kl_weight=1.0, futures=0, compute_dtype="auto"),
    "f_bf16_both": dict(hidden_weight=1.0, kl_weight=0.0, futures=0),
    "g_checkpoint": dict(hidden_weight=1.0, kl_weight=0.0, futures=0, compute_dtype="auto", checkpoint_layers=True),
}
# (engine dtype, baseline dtype) of the model weights; fp32 unless named here.
DTYPES = {"f_bf16_both": ("bfloat16", "bfloat16")}


def make_config(size: str, config: str, **changes) -> tuple[AbsorberConfig, int]:
    shape = dict(SIZES[size])
    rounds = shape.pop("rounds")
    # prefix_bos off: the baseline reads X·Y as a user's loop would, so both compute the same losses.
    cfg = AbsorberConfig(**{"compute_dtype": "float32", **PAPER_OBJECTIVE, **shape, **CONFIGS[config]}, lr=5e-4,
                         backend="torch", seed=0, prefix_bos=False)
    return cfg.replace(**changes), rounds


# ---------------------------------------------------------------------------------------- worker

def _warm(model) -> None:
    """One small forward and backward through the model, so neither implementation pays first-call costs."""
    ids = torch.arange(3, 35)[None]
    with torch.enable_grad():
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model.model(inputs_embeds=emb).last_hidden_state.sum().backward()


def _run(impl: str, model, cfg: AbsorberConfig, stream: list[int]) -> dict:
    if impl == "engine":
        engine = AbsorberEngine(model, config=cfg)
        with record_round_losses() as losses:
            rep = engine.absorb(stream)
        engine.close()
        return dict(seconds=rep.seconds, rounds=rep.rounds, steps=rep.steps, final_loss=rep.final_loss,
                    absorbed=rep.absorbed_tokens, step_losses=losses)
    baseline = PeftSyncBaseline(model, cfg, init=engine_initial_delta(model, cfg))
    rep = baseline.absorb(stream)
    return dict(seconds=rep.seconds, rounds=rep.rounds, steps=rep.steps, final_loss=rep.final_loss,
                absorbed=rep.rounds * cfg.chunk_tokens, step_losses=rep.step_losses)


def _model(name: str, dtype: str):
    model = build_model(name)
    return model if dtype == "float32" else model.to(getattr(torch, dtype))


def job_time(job: dict) -> dict:
    cfg = AbsorberConfig.from_dict(job["config"])
    stream = token_stream(job["rounds"] * cfg.chunk_tokens + cfg.sync_tokens, job["vocab"], seed=1)
    pristine = {impl: _model(job["model"], job["dtypes"][impl]) for impl in ("engine", "baseline")}
    for model in pristine.values():
        _warm(model)
    configs = {"engine": cfg, "baseline": AbsorberConfig.from_dict(job.get("baseline_config", job["config"]))}
    runs = {"engine": [], "baseline": []}
    for rep in range(job["reps"]):
        order = ("engine", "baseline") if rep % 2 == 0 else ("baseline", "engine")
        for impl in order:
            model = copy.deepcopy(pristine[impl])
            runs[impl].append(_run(impl, model, configs[impl], stream))
            del model
            gc.collect()
            print(f"  {job['model']} {job['name']} rep {rep} {impl}: {runs[impl][-1]['seconds']:.2f}s",
                  file=sys.stderr, flush=True)
    return runs


def job_memory(job: dict) -> dict:
    cfg = AbsorberConfig.from_dict(job["config"]).replace(max_steps=2, stop_loss=0.0)
    stream = token_stream(cfg.chunk_tokens + cfg.sync_tokens, job["vocab"], seed=1)
    model = _model(job["model"], job["dtype"])
    _warm(model)
    pristine = copy.deepcopy(model)
    gc.collect()
    with RssPeak() as rss:
        _run(job["impl"], model, cfg, stream)
    del model
    gc.collect()
    tensor_peak, _ = peak_tensor_bytes(lambda: _run(job["impl"], pristine, cfg, stream))
    return dict(peak_rss_delta=rss.delta, rss_before=rss.start, peak_rss=rss.peak, peak_tensor_bytes=tensor_peak)


def main(argv: list[str]) -> None:
    job = json.loads(argv[0])
    set_threads()
    out = job_time(job) if job["kind"] == "time" else job_memory(job)
    with open(argv[1], "w") as f:
        json.dump(out, f)


# ---------------------------------------------------------------------------------------- orchestration

def run_job(job: dict) -> dict:
    """Runs one worker job in a fresh Python process and returns what it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        subprocess.run([sys.executable, "-m", "benchmarks.e2e", json.dumps(job), out], check=True)
        with open(out) as f:
            return json.load(f)


def _loss_gap(engine_runs: list[dict], baseline_runs: list[dict]) -> float | None:
    """Largest relative difference of the per-step losses (deterministic configs only)."""
    e, b = engine_runs[0]["step_losses"], baseline_runs[0]["step_losses"]
    pairs = [(x, y) for re, rb in zip(e, b) for x, y in zip(re, rb)]
    if not pairs or len(e) != len(b) or any(len(re) != len(rb) for re, rb in zip(e, b)):
        return None
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in pairs)


def compare(size: str, config: str, reps: int, memory: bool = True, engine_changes: dict | None = None,
            baseline_changes: dict | None = None, progress=None) -> dict:
    """One configuration, engine vs baseline: timings interleaved in one process, memory in fresh ones."""
    cfg, rounds = make_config(size, config)
    engine_cfg = cfg.replace(**(engine_changes or {}))
    cfg = cfg.replace(**(baseline_changes or {}))
    vocab = build_vocab(size)
    dtypes = dict(zip(("engine", "baseline"), DTYPES.get(config, ("float32", "float32"))))
    job = dict(kind="time", name=config, model=size, vocab=vocab, rounds=rounds, reps=reps, dtypes=dtypes,
               config=engine_cfg.to_dict(), baseline_config=cfg.to_dict())
    t0 = time.perf_counter()
    runs = run_job(job)
    if progress:
        progress()
    tokens = rounds * cfg.chunk_tokens
    out = {
        "size": size, "config": config,
        "conditions": dict(n=cfg.chunk_tokens, m=cfg.sync_tokens, rank=cfg.rank, steps_per_round=cfg.max_steps,
                           rounds=rounds, tokens_absorbed=tokens, futures=cfg.futures,
                           future_tokens=cfg.future_length if cfg.futures else 0, hidden_weight=cfg.hidden_weight,
                           kl_weight=cfg.kl_weight, lr=cfg.lr, engine_stop_loss=engine_cfg.stop_loss,
                           baseline_stop_loss=cfg.stop_loss, reps=reps, engine_dtype=dtypes["engine"],
                           baseline_dtype=dtypes["baseline"]),
    }
    for impl in ("engine", "baseline"):
        rs = runs[impl]
        secs = summarize([r["seconds"] for r in rs])
        out[impl] = dict(seconds=secs, tokens_per_s=tokens / secs["median"], tokens_per_s_best=tokens / secs["min"],
                         rounds=rs[0]["rounds"], steps=rs[0]["steps"], final_loss=rs[0]["final_loss"],
                         step_losses=rs[0]["step_losses"])
        assert all(r["absorbed"] == tokens for r in rs), f"{impl} absorbed {[r['absorbed'] for r in rs]}, expected {tokens}"
    per_rep = [b["seconds"] / e["seconds"] for e, b in zip(runs["engine"], runs["baseline"])]
    out["throughput_ratio"] = dict(median=out["baseline"]["seconds"]["median"] / out["engine"]["seconds"]["median"],
                                   best=out["baseline"]["seconds"]["min"] / out["engine"]["seconds"]["min"],
                                   per_rep=per_rep)
    same = cfg.futures == 0 and dtypes["engine"] == dtypes["baseline"] and engine_cfg.stop_loss == cfg.stop_loss
    out["loss_gap_rel"] = _loss_gap(runs["engine"], runs["baseline"]) if same else None
    for impl, c in (("engine", engine_cfg), ("baseline", cfg)):
        out[impl]["round_final_losses"] = [r[-1] for r in out[impl]["step_losses"]]
        if c.stop_loss > 0:   # did the last round end below the stop loss (the final sync loss reached)?
            out[impl]["reached_stop_loss"] = out[impl]["step_losses"][-1][-1] < c.stop_loss
    if memory:
        for impl in ("engine", "baseline"):
            mem_cfg = engine_cfg if impl == "engine" else cfg
            out[impl]["memory"] = run_job(dict(kind="memory", impl=impl, model=size, vocab=vocab,
                                               dtype=dtypes[impl], config=mem_cfg.to_dict()))
            if progress:
                progress()
        e, b = out["engine"]["memory"], out["baseline"]["memory"]
        out["memory_ratio"] = dict(tensor=e["peak_tensor_bytes"] / max(b["peak_tensor_bytes"], 1),
                                   rss=e["peak_rss_delta"] / max(b["peak_rss_delta"], 1))
    out["wall_s"] = time.perf_counter() - t0
    return out


def build_vocab(size: str) -> int:
    from .models import SPECS

    return SPECS[size]["vocab_size"]


if __name__ == "__main__":
    main(sys.argv[1:])
