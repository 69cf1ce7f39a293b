"""The CPU products benchmark runs end to end: every packed product it times equals the float64
product (fp32 to 1e-4, bf16 to its rounding), both attentions are timed on every shape in both
dtypes, and the sampler draws generate()'s ids."""

import json

import pytest
import torch

from absorber_kernels import packed_linear
from benchmarks import cpu_products


@pytest.mark.skipif(not packed_linear.supported(torch.float32), reason="no oneDNN prepacked linear")
def test_cpu_products_benchmark_times_the_same_products(tmp_path):
    assert cpu_products.main(["--repeats", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {(r["rows"], r["threads"]) for r in doc["linears"]} == {(r, t) for r in (1, 4) for t in (1, 2)}
    for r in doc["linears"]:
        assert r["max_abs_err_vs_f64"] < (1e-4 if r["dtype"] == "float32" else 0.1)
        assert r["matrices"] == 211 and r["packed_ms"] > 0 and r["f_linear_ms"] > 0
    assert len(doc["attention"]) == 2 * 2 * len(cpu_products.ATTENTION_SHAPES)         # 2 dtypes x 2 thread counts
    assert all(r["sdpa_bwd_ms"] > 0 and r["cpu_attention_bwd_ms"] > 0 for r in doc["attention"])
    assert len(doc["sampler"]) == 8 and all(r["same_ids"] and r["engine_ms"] > 0 for r in doc["sampler"])
    assert "| bfloat16 | 4 | 2 |" in (tmp_path / "RESULTS.md").read_text() or not packed_linear.supported(
        torch.bfloat16)
