"""Every fuzz harness (fuzz/) for a bounded number of examples: the CI share of the fuzzing.

Each example must meet the contract (fuzz/contract.py): a typed error or success, the memory and
the window unchanged by a refused call, the engine still answering. Crashes listed in
fuzz.contract.KNOWN are counted apart (their xfail tests are in test_bad_input.py); any other
failure fails the test with hypothesis's minimized input. `python -m fuzz.campaign` runs the
same harnesses for longer.
"""

import importlib
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).absolute().parents[2]))      # fuzz/ sits at the repo root

from fuzz import TARGETS  # noqa: E402
from fuzz.contract import KnownCrash  # noqa: E402

# Examples per target, sized so all six take about 2-3 minutes on one core.
EXAMPLES = {"engine_args": 1200, "config_dict": 1500, "memory_file": 800, "cli_input": 300, "model_dir": 500,
            "export_targets": 600, "server_requests": 400}


@pytest.mark.parametrize("target", TARGETS)
def test_harness_meets_the_contract(target):
    mod = importlib.import_module(f"fuzz.{target}")
    known = []

    @settings(max_examples=EXAMPLES[target], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(mod.strategy())
    def run(inp):
        try:
            mod.check(inp)
        except KnownCrash as exc:
            known.append(exc.entry.name)

    run()


@pytest.mark.parametrize("target", TARGETS)
def test_any_bytes_decode_to_an_input(target):
    """The coverage-guided fuzzer hands over raw bytes: every byte string, the empty one too, must
    decode to an input the harness can check."""
    import random

    mod = importlib.import_module(f"fuzz.{target}")
    rng = random.Random(0)
    for data in [b"", b"\x00", b"\xff" * 64] + [rng.randbytes(rng.randint(1, 128)) for _ in range(5)]:
        try:
            mod.check(mod.from_bytes(data))
        except KnownCrash:
            pass


def test_repeated_longer_tensors_stay_small():
    """The fuzzer's 28 bytes that lengthened one tensor 300 times, three times over: the harness
    itself asked for 27 million times the tensor and died of memory (8 GB), not the engine."""
    import base64

    from fuzz import memory_file

    inp = memory_file.from_bytes(base64.b64decode("97W1tbW1tbW1tbW1tbW1tbW16gCBPMo2NTUyLQ=="))
    assert [op[3] for op in inp["ops"]][:3] == ["longer"] * 3
    assert len(memory_file.mutated_file(inp["ops"])) < 64 << 20
    memory_file.check(inp)


def test_known_crashes_are_matched_narrowly():
    """A listed crash is tolerated only with its type, message and place; anything else is a crash."""
    from fuzz.contract import ContractViolation, known

    def raise_in(exc):
        try:
            raise exc
        except Exception as e:
            return e

    assert known(raise_in(TypeError("'float' object is not iterable"))) is None       # not raised in the engine
    assert known(raise_in(TypeError("TextEncodeInput must be Union"))) is None         # the right message, no frame
    assert known(ContractViolation("the delta changed")) is None
