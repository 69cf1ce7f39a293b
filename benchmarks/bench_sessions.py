"""Many streams: batched versus one after another (sessions.py). No timing assertions."""

from benchmarks.measure import quick
from benchmarks.sessions import run


def test_sessions(benchmark):
    result = benchmark.pedantic(run, args=(quick(),), rounds=1, iterations=1)
    benchmark.group = "sessions"
    benchmark.extra_info.update(section="sessions", **result)
