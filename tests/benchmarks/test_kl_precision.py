"""The KL precision benchmark runs end to end and times the same op both ways: the bf16 and fp32
matmuls give the same loss to bf16's rounding, for both heads, teacher kept and recomputed."""

import json

from benchmarks import kl_precision


def test_kl_precision_benchmark_compares_the_same_loss(tmp_path):
    assert kl_precision.main(["--rows", "4", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert {(r["head"], r["kept"]) for r in rows} == {(h, k) for h in kl_precision.HEADS for k in (False, True)}
    for r in rows:
        assert abs(r["loss_bf16"] - r["loss_fp32"]) <= 1e-2 * abs(r["loss_fp32"]) and r["loss_fp32"] > 0
        assert len(r["fp32_s"]) == len(r["bf16_s"]) == 1 and r["speedup"] > 0
    assert "| smollm2-135m" in (tmp_path / "RESULTS.md").read_text()
