"""Freed host memory kept for reuse (host_memory.py): a freed block's pages serve the next tensor
without a fault, the environment can turn it off, and building an engine on the CPU turns it on.
Each case runs in a fresh interpreter: the setting is process-wide."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

# Faults of writing 5 fresh 64 MiB tensors in turn, each freed before the next, and whether the
# setting was in effect: 16,384 pages each when the block comes back from the kernel; when kept, at
# most one of them grows the heap (an aligned request can miss a freed block by a few bytes once).
# The fewest of 3 such runs: the kernel may move a kept block's pages (compaction), and its accesses
# then fault as well (32,768 once in a full suite's run, 0 in its neighbours).
_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from absorber_engine.host_memory import keep_freed_memory
    {setup}
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20); del t       # the heap has grown once either way
    runs = []
    for _ in range(3):
        before = faults()
        for _ in range(5):
            t = torch.ones(16 * 2**20); del t
        runs.append(faults() - before)
    print(min(runs), keep_freed_memory())
""")


def _run(setup: str, env_value: str | None) -> tuple[int, bool]:
    env = dict(os.environ)
    env.pop("ABSORBER_KEEP_FREED_MEMORY", None)
    if env_value is not None:
        env["ABSORBER_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE.format(setup=setup)], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    return int(out[0]), out[1] == "True"


def test_a_freed_block_is_reused_without_faults_once_kept():
    faults, on = _run("keep_freed_memory()", None)
    assert on
    assert faults < 2 * 16384, f"{faults} page faults writing 5 tensors the size of one just freed"


def _huge_pages_always() -> bool:
    # With transparent huge pages always on, a fresh 64 MiB mapping faults in 2 MiB pages: 32, not 16,384.
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


def test_by_default_and_when_turned_off_malloc_returns_the_block():
    faults, _ = _run("", "0")               # nothing applied before the measurement
    if not _huge_pages_always():
        assert faults > 4 * 16384, f"{faults} faults: a 64 MiB block freed to the kernel faults its pages again"
    _, on = _run("keep_freed_memory()", "0")
    assert not on


def test_an_engine_on_the_cpu_turns_it_on():
    setup = textwrap.dedent("""
        sys.path.insert(0, {tests!r})
        from tiny_models import make_model
        from absorber_engine import AbsorberEngine, AbsorberConfig
        from absorber_engine import host_memory
        assert host_memory._state is None
        AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=8, sync_tokens=8)).close()
        assert host_memory._state is True
    """).format(tests=os.path.dirname(__file__))
    faults, on = _run(setup, None)
    assert on and faults < 2 * 16384
