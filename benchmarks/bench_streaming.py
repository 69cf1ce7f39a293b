"""Streaming: held memory and generate latency from 4k tokens up (streaming.py), absorber vs full KV
vs a StreamingLLM-style window; writes streaming.png beside the results. No timing assertions."""

from tqdm import tqdm

from benchmarks.measure import quick
from benchmarks.streaming import LENGTHS_FULL, LENGTHS_QUICK, plot, run


def test_streaming(benchmark, results_dir):
    lengths = LENGTHS_QUICK if quick() else LENGTHS_FULL
    bar = tqdm(total=lengths[-1], desc="streaming: absorbed", unit="tok", unit_scale=True)
    result = benchmark.pedantic(run, args=(quick(),), kwargs=dict(progress=bar.update), rounds=1, iterations=1)
    bar.close()
    plot(result, str(results_dir / "streaming.png"))
    benchmark.group = "streaming"
    benchmark.extra_info.update(section="streaming", plot="streaming.png", **result)
