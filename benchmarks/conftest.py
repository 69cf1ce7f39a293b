"""pytest setup of the benchmark suite (benchmarks/bench_*.py; run it with `python -m benchmarks.run`).

Environment (set by benchmarks.run): ABSORBER_BENCH_QUICK=1 for the ~2 minute version,
ABSORBER_BENCH_THREADS for torch's intra-op threads (default: torch's own), ABSORBER_BENCH_RESULTS
for where the plot goes (default benchmarks/results, or runs/benchmarks-quick for quick runs).
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks.measure import machine, quick, set_threads, versions  # noqa: E402

set_threads()


def results_path() -> Path:
    here = Path(__file__).parent
    default = here.parent / "runs" / "benchmarks-quick" if quick() else here / "results"
    path = Path(os.environ.get("ABSORBER_BENCH_RESULTS") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def results_dir() -> Path:
    return results_path()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["absorber_bench"] = {"machine": machine(), "versions": versions(), "quick": quick()}
