"""Kernels: each op's plain PyTorch formulation vs the engine's CPU path (kernel_cases.py), CPU only.
Timed by pytest-benchmark (forward + backward per round); the peak of live tensor bytes of one call
and the two formulations' output difference go into extra_info. No timing assertions."""

import pytest

from benchmarks.kernel_cases import cases, check_same
from benchmarks.measure import peak_tensor_bytes, quick

SIZE = "quick" if quick() else "full"
ROUNDS = 3 if quick() else 7
PAIRS = [(name, impl) for name in cases(SIZE) for impl in ("plain", "engine")]


@pytest.mark.parametrize("name,impl", PAIRS, ids=[f"{n}-{i}" for n, i in PAIRS])
def test_kernel(benchmark, name, impl):
    builder, shape = cases(SIZE)[name]
    step = builder(impl, **shape)
    peak, _ = peak_tensor_bytes(step)                      # also the warm-up call
    benchmark.group = f"kernel {name}"
    benchmark.extra_info.update(section="kernels", op=name, impl=impl, size=SIZE,
                                shape={k: v for k, v in shape.items()}, peak_tensor_bytes=peak,
                                max_rel_diff_plain_vs_engine=check_same(name, SIZE) if impl == "engine" else None)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
