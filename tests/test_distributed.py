"""absorb-many over two CPU processes (gloo) gives the same memories as one process; a rank's
error reaches the caller as it would with one process, and none is left running after it."""

import multiprocessing

import pytest
import torch
from safetensors.torch import load_file

from absorber_engine import AbsorberConfig, InputError
from absorber_engine.distributed import absorb_many_processes
from tiny_models import make_model, random_ids


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path, capfd):
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
    capfd.readouterr()
    two = absorb_many_processes(str(model_dir), inputs, str(tmp_path / "two"), cfg, nproc=2, as_ids=True, quiet=True)
    assert "Loading weights" not in capfd.readouterr().err    # --quiet reaches the ranks' own processes
    assert list(one) == list(two) == inputs                 # the inputs' order, whatever the ranks
    for path in inputs:
        assert one[path]["rounds"] == two[path]["rounds"] > 0
        a, b = load_file(one[path]["memory"]), load_file(two[path]["memory"])
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def _streams(tmp_path, sizes):
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    inputs = []
    for i, n in enumerate(sizes):
        f = tmp_path / f"stream{i}.txt"
        f.write_text(" ".join(map(str, random_ids(n, seed=i))))
        inputs.append(str(f))
    return str(model_dir), inputs


@pytest.mark.slow
def test_a_ranks_error_is_the_callers_and_an_interrupt_stops_every_rank(tmp_path, monkeypatch):
    """An empty input in a rank: the InputError naming it (it was spawn's ProcessRaisedException, a
    traceback from the CLI). Ctrl-C while the ranks run: they were left absorbing on their own."""
    import torch.multiprocessing as mp

    model_dir, inputs = _streams(tmp_path, [40, 0, 40])
    cfg = AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=2, compute_dtype="float32")
    with pytest.raises(InputError, match=r"stream1\.txt: nothing to absorb"):
        absorb_many_processes(model_dir, inputs[:2], str(tmp_path / "out"), cfg, nproc=2, as_ids=True)
    assert multiprocessing.active_children() == []

    def interrupted(self, timeout=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(mp.ProcessContext, "join", interrupted)
    with pytest.raises(KeyboardInterrupt):
        absorb_many_processes(model_dir, [inputs[0], inputs[2]], str(tmp_path / "o2"), cfg, nproc=2, as_ids=True)
    assert multiprocessing.active_children() == []


def test_a_rank_that_failed_otherwise_is_an_absorption_error_naming_it(tmp_path):
    """Out of memory, nccl: no error file from the rank; the caller gets which process and what."""
    import torch.multiprocessing as mp

    from absorber_engine.distributed import _rank_error
    from absorber_engine.errors import AbsorptionError

    raised = mp.ProcessRaisedException("\n\n-- Process 1 terminated with the following error:\nTraceback (most "
                                       "recent call last):\n  File \"x\", line 1\nRuntimeError: out of memory", 1, 99)
    err = _rank_error(str(tmp_path / "result.json"), 2, raised)
    assert isinstance(err, AbsorptionError) and "Process 1 terminated" in str(err) and "out of memory" in str(err)
    (tmp_path / "result.json.error1").write_text('{"type": "InputError", "message": "b.txt: empty"}')
    err = _rank_error(str(tmp_path / "result.json"), 2, raised)
    assert isinstance(err, InputError) and str(err) == "b.txt: empty"
