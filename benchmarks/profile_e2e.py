"""Where the time of one absorption goes: cProfile (by Python function) and torch.profiler (by op)
for the engine and the baseline on the same configuration as benchmarks/e2e.py.

    python -m benchmarks.profile_e2e --size llama-56m --config a_hidden_l1 [--rounds 1] [--out FILE]

The torch.profiler table is sorted by self CPU time; the cProfile one by cumulative time, cut to
the functions that matter (teacher, student forward, backward, optimizer, loss ops).
"""

from __future__ import annotations

import argparse
import cProfile
import copy
import io
import pstats
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from .e2e import _run, _warm, make_config
from .measure import set_threads
from .models import SPECS, build_model, token_stream


def profile_impl(impl: str, size: str, config: str, rounds: int, top: int = 25) -> str:
    cfg, _ = make_config(size, config)
    stream = token_stream(rounds * cfg.chunk_tokens + cfg.sync_tokens, SPECS[size]["vocab_size"], seed=1)
    pristine = build_model(size)
    _warm(pristine)
    out = io.StringIO()
    res = _run(impl, copy.deepcopy(pristine), cfg, stream)          # unprofiled: the time to compare
    # cProfile: which Python-level phase costs what (it slows Python-heavy code, PEFT's most).
    prof = cProfile.Profile()
    prof.enable()
    prof_res = _run(impl, copy.deepcopy(pristine), cfg, stream)
    prof.disable()
    out.write(f"=== {impl} {size} {config}: {res['seconds']:.2f}s unprofiled ({prof_res['seconds']:.2f}s under "
              f"cProfile), {res['rounds']} rounds, {res['steps']} steps (threads {torch.get_num_threads()})\n"
              "--- cProfile, cumulative\n")
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    # torch.profiler: which ops.
    with profile(activities=[ProfilerActivity.CPU]) as tp:
        _run(impl, copy.deepcopy(pristine), cfg, stream)
    out.write("--- torch.profiler, self CPU\n")
    out.write(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))
    return out.getvalue()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="llama-56m", choices=sorted(SPECS))
    ap.add_argument("--config", default="a_hidden_l1")
    ap.add_argument("--impl", default="both", choices=["engine", "baseline", "both"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    set_threads()
    text = f"python -m benchmarks.profile_e2e {' '.join(argv if argv is not None else sys.argv[1:])}\n"
    text += "".join(profile_impl(impl, args.size, args.config, args.rounds, args.top)
                   for impl in (["engine", "baseline"] if args.impl == "both" else [args.impl]))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
