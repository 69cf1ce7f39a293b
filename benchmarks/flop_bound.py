"""How far ahead of the hand-written loop the engine can get on this machine, from arithmetic alone.

The loop and the engine compute the same losses (benchmarks/workload.py), so the engine can win
time only three ways: fewer matrix FLOPs (the teacher once per round instead of at every step),
cheaper FLOPs (bf16 where the loop runs fp32), and less time that is not FLOPs (Python, launches,
casts, decode steps bound by reading the weights). This measures the first two and bounds the
ratio by them: the engine's round cannot take less than its FLOPs at the best GEMM rate this CPU
reaches, so

    ratio = T_loop / T_engine <= T_loop / (F_engine / R_peak)

with F counted by torch's FlopCounterMode over a whole absorption (every matmul and attention,
forward and backward, sampling included), T_loop timed in the same process, and R_peak the best of
large GEMMs shaped like the model's in the engine's compute dtype (bf16 on a CPU that has it).
A goal above the bound cannot be met by engineering the engine's passes; only by less arithmetic.

    python -m benchmarks.flop_bound [--models llama-4l,smollm2-135m] [--workloads probes4] [--steps N]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .measure import machine, now, set_threads, versions
from .models import token_stream
from .workload import WORKLOADS, _engine_dtype, _warm, engine_config, load_model, run_engine, run_loop


def gemm_rate(shapes: list[tuple[int, int, int]], dtype: torch.dtype, reps: int = 5) -> float:
    """The best FLOP/s of (M, K) @ (K, N) products over `shapes`, best of `reps` each."""
    best = 0.0
    for M, K, N in shapes:
        a, b = torch.randn(M, K, dtype=dtype), torch.randn(K, N, dtype=dtype)
        a @ b
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * M * K * N / (time.perf_counter() - t))
    return best


def _cpu_flash(q, k, v, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    # A causal CPU flash kernel skips the blocks above the diagonal: half the products.
    return sdpa_flop_count(q, k, v) // (2 if is_causal else 1)


def _cpu_flash_backward(grad, q, k, v, out, lse, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad, q, k, v) // (2 if is_causal else 1)


CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}
"""torch's FLOP table has no entry for the CPU's flash attention (the kernel both sides run here)."""


def counted_flops(fn) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    with counter:
        fn()
    return counter.get_total_flops()


def _workload(name: str, workload: str, quick: bool = False, **changes):
    """The model, config and stream benchmarks.workload times for `name` and `workload`."""
    model, tok = load_model(name)
    cfg, rounds = engine_config(name, workload, quick, **changes)
    stream = token_stream(rounds * cfg.chunk_tokens + cfg.sync_tokens, min(model.config.vocab_size, 32000), seed=1)
    return model, tok, cfg, rounds, stream


IMPLS = (("engine", run_engine), ("loop", run_loop))


def round_flops(name: str, workload: str, quick: bool = False, **changes) -> dict:
    """Matrix FLOPs of a whole absorption by the engine and by the loop, the same config and stream."""
    model, tok, cfg, _, stream = _workload(name, workload, quick, **changes)
    return {impl: counted_flops(lambda: run(copy.deepcopy(model), tok, cfg, stream)) for impl, run in IMPLS}


def bound(name: str, workload: str, steps: int | None = None, log=print) -> dict:
    model, tok, cfg, rounds, stream = _workload(name, workload, **({"max_steps": steps} if steps else {}))
    engine_dtype = _engine_dtype(cfg)
    _warm(model, engine_dtype)
    flops, seconds = {}, {}
    for impl, run in IMPLS:
        flops[impl] = counted_flops(lambda: run(copy.deepcopy(model), tok, cfg, stream))
        start = now(torch.device("cpu"))
        run(copy.deepcopy(model), tok, cfg, stream)
        seconds[impl] = now(torch.device("cpu")) - start
        log(f"  {name} {workload} {impl}: {flops[impl] / 1e12:.2f} TFLOP, {seconds[impl]:.1f} s")
    c = model.config
    tokens = cfg.chunk_tokens + cfg.sync_tokens
    shapes = [(tokens, c.hidden_size, c.intermediate_size), (tokens, c.intermediate_size, c.hidden_size),
              (tokens, c.hidden_size, c.vocab_size)]
    peak = {d: gemm_rate(shapes, getattr(torch, d)) for d in {"float32", engine_dtype}}
    floor = flops["engine"] / peak[engine_dtype]
    return dict(model=name, workload=workload, steps=cfg.max_steps, rounds=rounds, engine_dtype=engine_dtype,
                flops=flops, seconds=seconds, gemm_peak_flops_per_s=peak,
                achieved_flops_per_s={k: flops[k] / seconds[k] for k in flops},
                measured_ratio=seconds["loop"] / seconds["engine"], flop_ratio=flops["loop"] / flops["engine"],
                ceiling_ratio=seconds["loop"] / floor, engine_floor_seconds=floor)


def table(rows: list[dict]) -> str:
    out = ["| model | workload | steps | TFLOP engine / loop | loop / engine FLOPs | GEMM peak GFLOP/s (fp32 / engine dtype) "
           "| achieved GFLOP/s engine / loop | s engine / loop | measured ratio | ceiling |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, a, s, p = r["flops"], r["achieved_flops_per_s"], r["seconds"], r["gemm_peak_flops_per_s"]
        peaks = " / ".join(f"{p[k] / 1e9:.0f}" for k in sorted(p, key=lambda k: k != "float32"))
        out.append(f"| {r['model']} | {r['workload']} | {r['steps']} | {f['engine'] / 1e12:.2f} / {f['loop'] / 1e12:.2f} | "
                   f"{r['flop_ratio']:.2f}x | {peaks} | {a['engine'] / 1e9:.0f} / {a['loop'] / 1e9:.0f} | "
                   f"{s['engine']:.1f} / {s['loop']:.1f} | {r['measured_ratio']:.2f}x | **{r['ceiling_ratio']:.2f}x** |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-4l,smollm2-135m")
    ap.add_argument("--workloads", default="probes4", help=f"a subset of {', '.join(WORKLOADS)}")
    ap.add_argument("--steps", type=int, help="AdamW steps per round (default: the model's plan)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "flop_bound"))
    args = ap.parse_args(argv)
    set_threads()
    log = lambda s: print(s, file=sys.stderr, flush=True)   # noqa: E731
    rows = [bound(m, w, args.steps, log) for m in args.models.split(",") for w in args.workloads.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flop_bound.json").write_text(json.dumps(dict(machine=machine(), versions=versions(), threads=torch.get_num_threads(),
                                                         results=rows), indent=1))
    (out / "TABLE.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
