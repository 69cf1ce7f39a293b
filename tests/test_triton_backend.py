"""The engine on the Triton backend, run end to end on CPU under the interpreter (TRITON_INTERPRET=1,
set in conftest.py): a whole absorption round gives the delta the torch backend gives."""

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels run on CPU only under TRITON_INTERPRET=1", allow_module_level=True)

from absorber_engine import AbsorberConfig, AbsorberEngine  # noqa: E402
from tiny_models import make_model, random_ids  # noqa: E402


@pytest.mark.parametrize("kl_weight", [0.0, 0.5])
def test_triton_round_equals_torch_round(kl_weight):
    cfg = AbsorberConfig(chunk_tokens=12, sync_tokens=6, rank=4, max_steps=3, futures=1, future_tokens=3, lr=1e-2,
                         kl_weight=kl_weight, compute_dtype="float32")  # bf16 is wrong under the interpreter
    ids = random_ids(18, seed=1)
    engines = {}
    for backend in ("torch", "triton"):
        eng = AbsorberEngine(make_model("llama"), config=cfg.replace(backend=backend))
        assert eng.runner.backend == backend
        report = eng.absorb(ids)
        assert report.rounds == 1 and report.steps == 3
        engines[backend] = (eng, report)
    (t_eng, t_rep), (k_eng, k_rep) = engines["torch"], engines["triton"]
    assert k_eng.runner.model.config._attn_implementation == "absorber_triton"
    for k, v in t_eng.delta.state_dict().items():
        torch.testing.assert_close(k_eng.delta.state_dict()[k], v, rtol=1e-3, atol=1e-4, msg=k)
    assert abs(k_rep.final_loss - t_rep.final_loss) < 1e-4 * max(1.0, abs(t_rep.final_loss))
    probe = random_ids(4, seed=2)
    torch.testing.assert_close(k_eng.logits(probe), t_eng.logits(probe), rtol=1e-4, atol=1e-4)
    assert k_eng.generate(probe, max_new_tokens=3) == t_eng.generate(probe, max_new_tokens=3)
    k_eng.close()
    assert k_eng.runner.model.config._attn_implementation != "absorber_triton"
