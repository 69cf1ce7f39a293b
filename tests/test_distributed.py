"""absorb-many over two CPU processes (gloo) gives the same memories as one process."""

import pytest
import torch
from safetensors.torch import load_file

from absorber_engine import AbsorberConfig
from absorber_engine.distributed import absorb_many_processes
from tiny_models import make_model, random_ids


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path):
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    inputs = []
    for i in range(3):
        f = tmp_path / f"stream{i}.txt"
        f.write_text(" ".join(map(str, random_ids(40 + 10 * i, seed=i))))
        inputs.append(str(f))
    # fp32: one rank runs with both cores' threads, two ranks with one each, and a bf16 matmul's
    # rounding depends on how its sums are split over threads (the KL's bf16 logits then differ in
    # their last bits); the fan-out's own equality is what this test is about.
    cfg = AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=3, future_tokens=4, lr=1e-2,
                         compute_dtype="float32")
    one = absorb_many_processes(str(model_dir), inputs, str(tmp_path / "one"), cfg, nproc=1, as_ids=True)
    two = absorb_many_processes(str(model_dir), inputs, str(tmp_path / "two"), cfg, nproc=2, as_ids=True)
    assert sorted(one) == sorted(two) == sorted(inputs)
    for path in inputs:
        assert one[path]["rounds"] == two[path]["rounds"] > 0
        a, b = load_file(one[path]["memory"]), load_file(two[path]["memory"])
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
