"""get_ops("triton"): the table, its signatures, and the errors when the kernels cannot run."""

import inspect
import os
import subprocess
import sys

import torch

from absorber_kernels import attention_ref, get_ops, hidden_l1_ref, linear_kl_ref, lowrank_linear_ref


def test_triton_table_matches_reference_signatures():
    ops = get_ops("triton")
    assert ops.name == "triton"
    for field, ref in (("lowrank_linear", lowrank_linear_ref), ("hidden_l1", hidden_l1_ref),
                       ("linear_kl", linear_kl_ref), ("attention", attention_ref)):
        got = list(inspect.signature(getattr(ops, field)).parameters)
        want = list(inspect.signature(ref).parameters)
        assert got[:len(want)] == want, f"{field}: {got} vs reference {want}"


def test_triton_ops_agree_with_torch_ops():
    tri, ref = get_ops("triton"), get_ops("torch")
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(1, 5, 8, generator=g) for _ in range(2)]
    t = [torch.randn(1, 5, 8, generator=g) for _ in range(2)]
    assert torch.allclose(tri.hidden_l1(s, t), ref.hidden_l1(s, t), rtol=1e-5)
    h, w = torch.randn(6, 8, generator=g), torch.randn(30, 8, generator=g)
    assert torch.allclose(tri.linear_kl(h, h + 0.1, w), ref.linear_kl(h, h + 0.1, w), rtol=1e-4)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


def test_cpu_tensors_without_interpreter_raise_clear_error():
    code = ("import torch\nfrom absorber_kernels import get_ops\nops = get_ops('triton')\n"
            "try:\n    ops.hidden_l1([torch.ones(1, 2, 4)], [torch.zeros(1, 2, 4)])\n"
            "except RuntimeError as e:\n    print('RAISED', e)\n")
    out = _run(code)
    assert "RAISED" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_missing_triton_raises_import_error_and_torch_path_still_works():
    code = ("import sys\nsys.modules['triton'] = None\nimport torch\nfrom absorber_kernels import get_ops\n"
            "ops = get_ops('torch')\nprint('TORCH', float(ops.hidden_l1([torch.ones(1, 2, 4)], [torch.zeros(1, 2, 4)])))\n"
            "try:\n    get_ops('triton')\nexcept ImportError as e:\n    print('RAISED', e)\n")
    out = _run(code, TRITON_INTERPRET="1")
    assert "TORCH 1.0" in out.stdout, out.stdout + out.stderr
    assert "RAISED" in out.stdout and "triton" in out.stdout, out.stdout + out.stderr
