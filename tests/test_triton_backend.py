"""The engine on the Triton backend, run end to end: on CPU under the interpreter (TRITON_INTERPRET=1,
set in conftest.py), or on a CUDA GPU when the interpreter is off (TRITON_INTERPRET=0 pytest ...). A
whole absorption round gives the delta the torch backend gives."""

import os

import pytest
import torch

pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("the Triton kernels run on CUDA, or on CPU under TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

from absorber_engine import AbsorberConfig, AbsorberEngine  # noqa: E402
from tiny_models import make_model, random_ids  # noqa: E402


@pytest.mark.parametrize("kl_weight", [0.0, 0.5])
def test_triton_round_equals_torch_round(kl_weight):
    cfg = AbsorberConfig(chunk_tokens=12, sync_tokens=6, rank=4, max_steps=3, futures=1, future_tokens=3, lr=1e-2,
                         kl_weight=kl_weight, compute_dtype="float32")  # bf16 is wrong under the interpreter
    ids = random_ids(18, seed=1)
    engines = {}
    for backend in ("torch", "triton"):
        eng = AbsorberEngine(make_model("llama").to(DEVICE), config=cfg.replace(backend=backend))
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


@pytest.mark.skipif(INTERPRET, reason="bf16 autocast: the GPU's default compute, wrong under the interpreter")
def test_triton_round_bf16_on_gpu():
    # What a GPU user runs by default: bf16 compute, the KL on. The two backends round differently
    # (fused kernels vs cuBLAS) and AdamW's first steps are near sign(gradient), so the deltas agree in
    # direction and size, not bits. No sampled futures: a flipped sample would be a different round.
    cfg = AbsorberConfig(chunk_tokens=48, sync_tokens=24, rank=8, max_steps=4, futures=0, lr=1e-2, kl_weight=0.5)
    ids = random_ids(72, seed=3)
    deltas, losses = {}, {}
    for backend in ("torch", "triton"):
        eng = AbsorberEngine(make_model("llama").to(DEVICE), config=cfg.replace(backend=backend))
        assert eng.runner.compute_dtype == torch.bfloat16
        flat = lambda: torch.cat([v.flatten().float() for _, v in sorted(eng.delta.state_dict().items())])  # noqa: E731
        start = flat()
        losses[backend] = eng.absorb(ids).final_loss
        deltas[backend] = flat() - start           # what the round learned (A starts from the same seed)
        eng.close()
    t, k = deltas["torch"], deltas["triton"]
    assert torch.isfinite(k).all() and t.norm() > 0
    cos = float(torch.nn.functional.cosine_similarity(t, k, dim=0))
    print(f"bf16 round: delta cosine {cos:.4f}, norm ratio {float(k.norm() / t.norm()):.4f}, losses {losses}")
    assert cos > 0.9, cos
    assert abs(k.norm() / t.norm() - 1) < 0.1
    assert abs(losses["triton"] - losses["torch"]) < 0.05 * abs(losses["torch"])
