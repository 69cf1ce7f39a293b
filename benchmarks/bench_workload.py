"""The real workload (workload.py): the engine's round with its default objective against the same
round written with transformers + PEFT, on a random Llama and SmolLM2-135M (quick: the random Llama
only, small rounds). The pytest-benchmark time is the wall time of all of it; the numbers are in
extra_info and in workload/workload.json + TABLE.md beside the suite's results. No timing assertions."""

from tqdm import tqdm

from benchmarks.measure import quick
from benchmarks.workload import MODELS, WORKLOADS, run


def test_workload(benchmark, results_dir):
    models = ["llama-4l"] if quick() else list(MODELS)
    bar = tqdm(total=len(models) * len(WORKLOADS) * 2, desc="workload runs", unit="run", leave=True)
    result = benchmark.pedantic(run, args=(models, quick(), None, results_dir / "workload"),
                                kwargs=dict(log=lambda s: bar.update(1) if " rep 0 " in s else None),
                                rounds=1, iterations=1)
    bar.close()
    benchmark.group = "workload"
    benchmark.extra_info.update(section="workload", **result)
