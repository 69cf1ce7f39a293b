"""Streaming: held memory and per-token generate latency as a stream grows from 4k to 128k tokens.

Three ways to keep a long stream, on the same model (models.py "stream") and the same tokens:
- absorber: AbsorberEngine, fed the stream piece by piece (absorb without flush). It holds its
  delta and at most n + m raw tokens (and their KV once a query builds it). Held = delta + window KV
  as engine.held_bytes() counts them, measured after the window's KV is built.
- full KV: the plain model with the whole history in one DynamicCache, prefilled in chunks as the
  stream arrives. Held = keys + values of every layer. It stops at the first length whose prefill,
  extrapolated from the previous one (attention makes it grow quadratically), would exceed the time
  budget, or whose KV would exceed the memory budget; the lengths it skipped are reported as such.
- window (StreamingLLM): 4 attention-sink tokens plus the most recent n + m tokens (the engine's
  largest window, so the same raw-token budget). The kept tokens are encoded afresh at each
  measured length (StreamingLLM rolls its cache and re-assigns positions inside it; the bytes held
  and the cost of a decode step are the same).
Latency: greedy decoding of `decode_tokens` tokens after the held state, the engine's generate()
and, for the two baselines, the same loop (LM head, argmax, one-token forward with the cache);
per token = wall time / tokens, the median of `latency_reps` repetitions. Building the state
(the engine's window prefill, the baselines' prefill) is not part of the latency.
"""

from __future__ import annotations

import time

import torch

from absorber_engine import AbsorberConfig, AbsorberEngine
from absorber_engine.config import PAPER_OBJECTIVE
from absorber_engine.hf_cache import cache_keyword

from .measure import mib
from .models import SPECS, build_model, token_stream

LENGTHS_FULL = [4096, 8192, 16384, 32768, 65536, 131072]
LENGTHS_QUICK = [4096, 8192, 16384]
SINKS = 4


def engine_config(quick: bool) -> AbsorberConfig:
    # Few steps per round (the point is memory and latency, not absorption quality).
    return AbsorberConfig(chunk_tokens=512, sync_tokens=512, rank=8, futures=0, max_steps=1, lr=5e-4,
                          backend="torch", seed=0, **PAPER_OBJECTIVE)


def kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


@torch.no_grad()
def decode_latency(model, cache, last_hidden, tokens: int) -> float:
    """Seconds per token of greedy decoding after `cache` (the engine's loop, for the baselines)."""
    head = model.get_output_embeddings()
    past = cache.get_seq_length()
    start = time.perf_counter()
    last = last_hidden
    for i in range(tokens):
        tok = head(last).float().argmax(-1)                                   # (1,)
        if i + 1 == tokens:
            break
        out = model.model(input_ids=tok[:, None], use_cache=True, **{cache_keyword(model.model): cache})
        last = out.last_hidden_state[:, -1]
    seconds = (time.perf_counter() - start) / tokens
    extra = cache.get_seq_length() - past
    if extra:
        cache.crop(-extra)                                                    # back to the held state
    return seconds


@torch.no_grad()
def prefill(model, ids: list[int], cache=None, chunk: int = 2048):
    from transformers import DynamicCache

    cache = cache if cache is not None else DynamicCache(config=model.config)
    last = None
    for i in range(0, len(ids), chunk):
        piece = torch.tensor([ids[i:i + chunk]])
        out = model.model(input_ids=piece, use_cache=True, **{cache_keyword(model.model): cache})
        last = out.last_hidden_state[:, -1]
    return cache, last


def _latency(fn, reps: int) -> dict:
    """ms per token: the median of `reps` repetitions (what the plot shows) and the best one."""
    xs = sorted(fn() * 1e3 for _ in range(reps))
    return dict(ms_per_token=xs[len(xs) // 2], ms_per_token_best=xs[0])


def run(quick: bool, decode_tokens: int = 32, latency_reps: int = 5, full_kv_budget_s: float | None = None,
        full_kv_max_bytes: int = 4 << 30, progress=None) -> dict:
    lengths = LENGTHS_QUICK if quick else LENGTHS_FULL
    budget = full_kv_budget_s if full_kv_budget_s is not None else (30.0 if quick else 150.0)
    spec = SPECS["stream"]
    stream = token_stream(lengths[-1], spec["vocab_size"], seed=2)
    cfg = engine_config(quick)
    model_engine = build_model("stream")
    model_plain = build_model("stream")
    engine = AbsorberEngine(model_engine, config=cfg)
    rows = {"absorber": [], "full_kv": [], "window": []}
    window_keep = cfg.chunk_tokens + cfg.sync_tokens

    per_token_kv = 2 * spec["num_hidden_layers"] * spec["num_key_value_heads"] * \
        (spec["hidden_size"] // spec["num_attention_heads"]) * 4              # fp32 keys + values, all layers
    fed = 0
    absorb_s = 0.0
    full_cache, full_last, full_len, full_stopped = None, None, 0, None
    last_prefill = None            # (from_len, to_len, seconds) of the previous full-KV prefill
    for length in lengths:
        # --- absorber: feed the new part of the stream
        t0 = time.perf_counter()
        piece = 8192
        for i in range(fed, length, piece):
            engine.absorb(stream[i:min(i + piece, length)])
            if progress:
                progress(min(i + piece, length) - i)
        absorb_s += time.perf_counter() - t0
        fed = length
        engine.generate(max_new_tokens=1)                  # builds the window's KV (not timed)
        lat = _latency(lambda: _engine_latency(engine, decode_tokens), latency_reps)
        held = engine.held_bytes()
        rows["absorber"].append(dict(length=length, held_bytes=held["delta"] + held["kv"], kv_bytes=held["kv"],
                                     delta_bytes=held["delta"], raw_tokens=engine.held_tokens,
                                     **lat, absorbed_tokens=engine.absorbed_tokens,
                                     absorb_tokens_per_s=engine.absorbed_tokens / absorb_s if absorb_s else None))

        # --- full KV: extend the cache to `length`, unless the projection says it will not fit
        if full_stopped is None:
            projected_s = None
            if last_prefill is not None:
                a, b, s = last_prefill
                projected_s = s * (length ** 2 - full_len ** 2) / max(b ** 2 - a ** 2, 1)
            if per_token_kv * length > full_kv_max_bytes:
                full_stopped = f"KV of {length} tokens ({mib(per_token_kv * length):.0f} MiB) exceeds the memory budget"
            elif projected_s is not None and projected_s > budget:
                full_stopped = (f"prefill to {length} tokens projected at {projected_s:.0f}s, over the "
                                f"{budget:.0f}s budget")
            else:
                t0 = time.perf_counter()
                full_cache, full_last = prefill(model_plain, stream[full_len:length], full_cache)
                last_prefill = (full_len, length, time.perf_counter() - t0)
                full_len = length
                lat = _latency(lambda: decode_latency(model_plain, full_cache, full_last, decode_tokens), latency_reps)
                rows["full_kv"].append(dict(length=length, held_bytes=kv_bytes(full_cache), kv_bytes=kv_bytes(full_cache),
                                            **lat, prefill_s=last_prefill[2]))
        if full_stopped is not None:
            rows["full_kv"].append(dict(length=length, skipped=full_stopped))

        # --- window: sinks + the most recent tokens
        kept = stream[:SINKS] + stream[length - window_keep:length]
        cache, last = prefill(model_plain, kept)
        lat = _latency(lambda c=cache, t=last: decode_latency(model_plain, c, t, decode_tokens), latency_reps)
        rows["window"].append(dict(length=length, held_bytes=kv_bytes(cache), kv_bytes=kv_bytes(cache),
                                   raw_tokens=len(kept), **lat))
        del cache
    engine.close()

    a = rows["absorber"]
    full_ok = [r for r in rows["full_kv"] if "skipped" not in r]
    return {
        "conditions": dict(model="stream", lengths=lengths, n=cfg.chunk_tokens, m=cfg.sync_tokens, rank=cfg.rank,
                           steps_per_round=cfg.max_steps, futures=cfg.futures, decode_tokens=decode_tokens,
                           latency_reps=latency_reps, window_sinks=SINKS, window_recent=window_keep,
                           full_kv_time_budget_s=budget, full_kv_memory_budget_bytes=full_kv_max_bytes,
                           absorber_max_held_bytes=a[0]["delta_bytes"] + per_token_kv * window_keep),
        "rows": rows,
        "summary": {
            "absorber_held_growth": a[-1]["held_bytes"] / a[0]["held_bytes"] - 1,
            "absorber_latency_growth": a[-1]["ms_per_token"] / a[0]["ms_per_token"] - 1,
            "absorber_latency_growth_best": a[-1]["ms_per_token_best"] / a[0]["ms_per_token_best"] - 1,
            "full_kv_longest": full_ok[-1]["length"] if full_ok else None,
            "full_kv_held_growth": (full_ok[-1]["held_bytes"] / full_ok[0]["held_bytes"] - 1) if full_ok else None,
            "full_kv_latency_growth": (full_ok[-1]["ms_per_token"] / full_ok[0]["ms_per_token"] - 1) if full_ok else None,
            "window_held_growth": rows["window"][-1]["held_bytes"] / rows["window"][0]["held_bytes"] - 1,
            "window_latency_growth": rows["window"][-1]["ms_per_token"] / rows["window"][0]["ms_per_token"] - 1,
        },
    }


def _engine_latency(engine, tokens: int) -> float:
    start = time.perf_counter()
    out = engine.generate(max_new_tokens=tokens, stop=[])
    return (time.perf_counter() - start) / max(len(out), 1)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"absorber": ("Absorber (delta + window KV)", "o-"), "full_kv": ("full KV cache", "s-"),
              "window": ("window (StreamingLLM: 4 sinks + recent)", "^-")}
    for key, (label, style) in styles.items():
        rows = [r for r in result["rows"][key] if "skipped" not in r]
        if not rows:
            continue
        xs = [r["length"] for r in rows]
        ax_m.plot(xs, [mib(r["held_bytes"]) for r in rows], style, label=label)
        ax_l.plot(xs, [r["ms_per_token"] for r in rows], style, label=label)
    for ax in (ax_m, ax_l):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("stream length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    ax_m.set_yscale("log")
    ax_m.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_m.set_ylabel("held memory (MiB)")
    ax_m.set_title("memory held for the stream")
    ax_l.set_ylabel("generate latency (ms / token)")
    ax_l.set_title("per-token generate latency")
    ax_l.set_ylim(bottom=0)
    ax_m.legend(fontsize=8)
    c = result["conditions"]
    fig.suptitle(f"stream model ({SPECS['stream']['num_hidden_layers']} layers, d {SPECS['stream']['hidden_size']}), "
                 f"n={c['n']}, m={c['m']}, rank {c['rank']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
