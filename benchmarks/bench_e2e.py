"""End to end: tokens absorbed per second and peak memory, engine vs the PEFT baseline (e2e.py).

The pytest-benchmark time of each test is the wall time of the whole comparison (both
implementations, every repetition, the memory runs); the measurements are in extra_info, written
out by benchmarks.run into results.json and SUMMARY.md. No timing assertions.
"""

import pytest
from tqdm import tqdm

from benchmarks.e2e import compare
from benchmarks.measure import quick

# (size, configuration, repetitions, measure memory). The c configurations run after a_hidden_l1 of
# their size: their stop loss is the final loss the baseline reached there (engine only: c; both: c2).
if quick():
    PLAN = [("tiny", "a_hidden_l1", 2, True), ("tiny", "b_hidden_l1_kl", 2, True), ("tiny", "c_early_stop", 2, False),
            ("tiny", "c2_early_stop_both", 2, False)]
else:
    PLAN = [("tiny", c, 3, not c.startswith("c")) for c in ("a_hidden_l1", "b_hidden_l1_kl", "c_early_stop",
                                                           "c2_early_stop_both", "d_futures")]
    PLAN += [("llama-56m", "a_hidden_l1", 2, True), ("llama-56m", "b_hidden_l1_kl", 2, True),
             ("llama-56m", "c_early_stop", 2, False), ("llama-56m", "c2_early_stop_both", 2, False),
             ("llama-56m", "d_futures", 2, True), ("llama-56m", "e_bf16_engine", 2, True),
             ("llama-56m", "e2_bf16_engine_kl", 2, True), ("llama-56m", "f_bf16_both", 2, False),
             ("llama-56m", "g_checkpoint", 2, True)]

DONE: dict = {}


@pytest.mark.parametrize("size,config,reps,memory", PLAN, ids=[f"{s}-{c}" for s, c, _, _ in PLAN])
def test_e2e(benchmark, size, config, reps, memory):
    changes, baseline_changes = {}, {}
    if config.startswith("c"):
        ref = DONE.get((size, "a_hidden_l1"))
        if ref is None:
            pytest.skip("needs a_hidden_l1 of the same size earlier in the same run")
        changes = dict(stop_loss=ref["baseline"]["final_loss"] * (1 + 1e-6))
        if config == "c2_early_stop_both":
            baseline_changes = changes
    bar = tqdm(total=1 + 2 * memory, desc=f"e2e {size} {config}", unit="job", leave=True)
    result = benchmark.pedantic(compare, args=(size, config, reps),
                                kwargs=dict(memory=memory, engine_changes=changes, baseline_changes=baseline_changes,
                                            progress=bar.update),
                                rounds=1, iterations=1)
    bar.close()
    DONE[(size, config)] = result
    benchmark.group = "e2e"
    benchmark.extra_info.update(section="e2e", **result)
