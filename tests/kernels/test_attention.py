"""Flash attention under the Triton interpreter against the float64 reference, forward and backward."""

import pytest
import torch

from absorber_kernels import attention as AT
from absorber_kernels.attention import attention_ref, attention_triton
from absorber_kernels.testing import assert_close


def _check(name, dtype, b, hq, hkv, t, s, d, causal=True, hf_layout=False, seed=0, config=None):
    g = torch.Generator().manual_seed(seed)
    if hf_layout:   # as HF's projections produce them: (B, T, H, D) viewed as (B, H, T, D)
        q = torch.randn(b, t, hq, d, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(b, s, hkv, d, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(b, s, hkv, d, generator=g).to(dtype).transpose(1, 2)
    else:
        q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for h, n in ((hq, t), (hkv, s), (hkv, s)))
    qk, kk, vk = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = attention_triton(qk, kk, vk, causal=causal, config=config)
    do = torch.randn(o.shape, generator=g).to(dtype)                       # grad_output ≠ 1
    o.backward(do)
    q6, k6, v6 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o6 = attention_ref(q6, k6, v6, causal=causal)
    o6.backward(do.double())
    assert o.dtype == dtype and o.shape == o6.shape
    assert_close(f"attention {name} out", o, o6, dtype)
    assert_close(f"attention {name} dq", qk.grad, q6.grad, dtype)
    assert_close(f"attention {name} dk", kk.grad, k6.grad, dtype)
    assert_close(f"attention {name} dv", vk.grad, v6.grad, dtype)


CASES = {
    # name: (B, Hq, Hkv, T, S, D, causal)
    "gqa2+prefix": (1, 4, 2, 37, 53, 24, True),      # teacher shape: 16 cached keys, then 37 queries
    "mha": (2, 2, 2, 29, 29, 32, True),              # student shape: no prefix
    "gqa4+prefix": (1, 4, 1, 18, 45, 16, True),
    "decode": (1, 4, 2, 1, 30, 16, True),            # one new token over a 29-token cache
    "noncausal": (1, 3, 1, 20, 45, 16, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_cases(dtype, case):
    _check(case, dtype, *CASES[case])


def test_attention_hf_layout():
    _check("hf layout", torch.float32, 2, 4, 2, 21, 33, 16, hf_layout=True, seed=1)


def test_attention_output_layout():
    q = torch.randn(1, 4, 5, 16)
    k = v = torch.randn(1, 2, 5, 16)
    o = attention_triton(q, k, v)
    assert o.shape == (1, 4, 5, 16) and o.transpose(1, 2).is_contiguous()   # HF's (B, T, H, D) without a copy


def test_attention_gpu_tiles():
    # the GPU tile sizes (forward 128 × 64, backward 32/64) under the interpreter
    _check("gpu tiles", torch.float32, 1, 2, 1, 70, 150, 32, seed=2, config=AT.ATTN_CONFIG_GPU)


def test_attention_errors():
    q = torch.randn(1, 3, 5, 16)
    with pytest.raises(ValueError):
        attention_triton(q, torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))   # 3 % 2 heads
    with pytest.raises(ValueError):
        attention_triton(q, torch.randn(1, 3, 4, 16), torch.randn(1, 3, 4, 16))   # S < T


def test_attention_gpu_fp32_tiles():
    # The fp32 tiles a GPU launch picks (smaller: fp32 operands need twice the shared memory)
    _check("gpu fp32 tiles", torch.float32, 1, 2, 1, 70, 150, 32, seed=3, config=AT.gpu_config(torch.float32))
