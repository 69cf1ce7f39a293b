"""How the suite measures: the machine and versions it states, threads, peak memory, timing helpers.

Peak memory, two honest measures, both of the work above what was resident before the measured call
(the model's weights are the same for every implementation and not counted):
- tensor bytes: every allocation and free of PyTorch's CPU allocator, as torch.profiler records them
  with profile_memory=True, summed in time order; the peak of that running sum is the most tensor
  memory alive at once. Exact and independent of the C allocator's caching. The profiler slows the
  run, so it is measured in a run of its own, never in a timed one.
- RSS: the process's resident set, sampled every 2 ms by a thread (/proc/self/statm), minus the RSS
  just before the call. What the OS sees, allocator caching and fragmentation included; a spike
  shorter than 2 ms can be missed. Measured in a fresh process, so no earlier run's heap is reused.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def set_threads() -> int:
    """Applies ABSORBER_BENCH_THREADS (set by benchmarks.run --threads) to torch; returns the count."""
    n = os.environ.get("ABSORBER_BENCH_THREADS")
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def quick() -> bool:
    return os.environ.get("ABSORBER_BENCH_QUICK") == "1"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_bytes": mem, "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def versions() -> dict:
    import peft
    import transformers

    import absorber_engine

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "absorber_engine": absorber_engine.__version__}
    try:
        import pytest_benchmark

        out["pytest_benchmark"] = pytest_benchmark.__version__
    except ImportError:
        pass
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class RssPeak:
    """Peak RSS above the RSS at entry, sampled by a thread every `interval` seconds."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "RssPeak":
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.start


def peak_tensor_bytes(fn) -> tuple[int, object]:
    """(peak bytes of CPU tensors alive at once during fn() above those alive before it, fn's result)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    results = getattr(prof.profiler, "kineto_results", None)
    events = results.events() if results is not None else []
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in mem:
        cur += nbytes
        peak = max(peak, cur)
    return peak, result


def now(device: torch.device | None = None) -> float:
    """perf_counter after the device's queued work is done (CUDA runs asynchronously)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_cuda_bytes(fn, device: torch.device) -> tuple[int, object]:
    """(peak bytes the caching allocator held for tensors during fn() above what was allocated before, fn's result)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, result


def summarize(times: list[float]) -> dict:
    return {"n": len(times), "min": min(times), "median": statistics.median(times), "max": max(times),
            "all": list(times)}


def mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2 ** 20
