"""The benchmark suite as one command.

    python -m benchmarks.run            # everything, ~15 min on a 2-core CPU
    python -m benchmarks.run --quick    # the ~2 minute version (tiny model, shorter streams)
    python -m benchmarks.run --threads 1 --only e2e,kernels

Runs pytest-benchmark over benchmarks/bench_*.py, then writes into the results directory (benchmarks/results,
or for --quick runs/benchmarks-quick, which git ignores: a trial run leaves the tree clean): pytest-benchmark.json (raw), results.json (every number with machine,
versions and conditions), SUMMARY.md (tables and the goals) and streaming.png.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

SECTIONS = {"kernels": "bench_kernels.py", "e2e": "bench_e2e.py", "streaming": "bench_streaming.py",
            "sessions": "bench_sessions.py", "serving": "bench_serving.py",
            "workload": "bench_workload.py"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="absorber bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the ~2 minute version")
    ap.add_argument("--threads", default="auto",
                    help="torch intra-op threads; 'auto' (default): one per core not busy with other work "
                         "(cores minus the 1-minute load average, at least 1): on a shared machine more threads than "
                         "free cores make OpenMP spin and times explode")
    ap.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--results", help="results directory (default benchmarks/results; --quick: runs/benchmarks-quick)")
    ap.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = ap.parse_args(argv)

    sections = args.only.split(",") if args.only else list(SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:                                  # before anything is made on disk
        ap.error(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")
    if args.threads != "auto" and not (args.threads.isdigit() and int(args.threads) >= 1):
        ap.error(f"--threads takes 'auto' or a count of at least 1, got {args.threads!r}")
    here = Path(__file__).resolve().parent
    results = Path(args.results) if args.results else (here.parent / "runs" / "benchmarks-quick" if args.quick
                                                        else here / "results")
    results.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, ABSORBER_BENCH_RESULTS=str(results), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["ABSORBER_BENCH_QUICK"] = "1" if args.quick else "0"
    threads = auto_threads() if args.threads == "auto" else int(args.threads)
    env["ABSORBER_BENCH_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONWARNINGS"] = "ignore::FutureWarning"
    env.pop("TRITON_INTERPRET", None)          # never time the interpreter
    cmd = [sys.executable, "-m", "pytest", *[str(here / SECTIONS[s]) for s in sections],
           "-o", "python_files=bench_*.py", "-o", "addopts=", "-p", "no:cacheprovider", "-s", "-q",
           f"--rootdir={here.parent}", f"--benchmark-json={results / 'pytest-benchmark.json'}",
           "--benchmark-columns=min,median,max,rounds", "--benchmark-sort=name", *args.pytest_args]
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    rc = subprocess.call(cmd, env=env, cwd=here.parent)
    wall = time.perf_counter() - start
    load_after = [round(x, 2) for x in os.getloadavg()]
    if not (results / "pytest-benchmark.json").exists():
        print("no benchmark results were written", file=sys.stderr)
        return rc or 1
    from .report import build

    build(results, command.strip(), wall, dict(load_before=load_before, load_after=load_after,
                                                threads_requested=args.threads, threads=threads,
                                                sections=sections))
    print(f"\nwrote {results / 'results.json'} and {results / 'SUMMARY.md'} ({wall / 60:.1f} min)")
    print((results / "SUMMARY.md").read_text())
    return rc


def auto_threads() -> int:
    cores = os.cpu_count() or 1
    return max(1, min(cores, cores - round(os.getloadavg()[0])))


if __name__ == "__main__":
    sys.exit(main())
