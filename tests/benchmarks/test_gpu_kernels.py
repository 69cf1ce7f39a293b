"""The GPU kernel check (benchmarks/gpu_kernels.py) runs its parity part on tiny shapes under the
interpreter, so the script a GPU session runs is known to work before it gets there."""

import json

import pytest

pytest.importorskip("triton")

from benchmarks import gpu_kernels  # noqa: E402


def test_smoke_parity(tmp_path):
    assert gpu_kernels.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "kernels.json").read_text())
    ops = {p["op"] for p in report["parity"]}
    assert ops == {"linear_kl", "hidden_l1", "lowrank_linear", "lowrank_batched", "attention_student",
                   "attention_teacher"}
    for p in report["parity"]:
        assert p["ok"] and 0 <= p["worst"] < 1e-4, p
        # the output, and the gradients where the engine trains through the op (the teacher's attention: none)
        assert len(p["rel_err"]) >= (1 if p["op"] == "attention_teacher" else 2)
