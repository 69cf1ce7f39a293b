"""absorber serve at 1, 4 and 16 concurrent sessions (serving.py). No timing assertions."""

from benchmarks.measure import quick
from benchmarks.serving import run


def test_serving(benchmark):
    result = benchmark.pedantic(run, args=(quick(),), rounds=1, iterations=1)
    benchmark.group = "serving"
    benchmark.extra_info.update(section="serving", **result)
