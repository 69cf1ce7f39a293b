"""A kernel engineer calls the ops directly: inputs the kernels cannot compute right get a clear
error, never a result read past a tensor's end or garbage (found by a second reader), and both
backends compute what the engine asks for under autocast."""

import pytest
import torch

from absorber_kernels import get_ops
from absorber_kernels.attention import attention_ref
from absorber_kernels.hidden_sync import hidden_l1_ref
from absorber_kernels.linear_ce import linear_ce_ref
from absorber_kernels.linear_kl import linear_kl_ref, linear_kl_triton, teacher_side
from absorber_kernels.lowrank_linear import lowrank_linear_triton
from absorber_engine import AbsorberConfig, AbsorberEngine, ConfigError
from tiny_models import make_model

G = torch.Generator().manual_seed(0)
X, W, A, B = torch.randn(3, 40, generator=G), torch.randn(36, 40, generator=G), torch.randn(40, 4, generator=G), \
    torch.randn(4, 36, generator=G)
H, HEAD = torch.randn(5, 16, generator=G), torch.randn(70, 16, generator=G)

CASES = [
    # (row, call, error, message)
    ("low-rank bias of one entry", lambda: lowrank_linear_triton(X, W, torch.randn(1), A, B, 1.0), ValueError, "bias"),
    ("low-rank bias too long", lambda: lowrank_linear_triton(X, W, torch.randn(39), A, B, 1.0), ValueError, "bias"),
    ("KL bias of one entry", lambda: linear_kl_triton(H, H, HEAD, torch.randn(1)), ValueError, "head bias"),
    ("KL reference bias of one entry", lambda: linear_kl_ref(H, H, HEAD, torch.randn(1)), ValueError, "head bias"),
    ("bf16 under the interpreter", lambda: lowrank_linear_triton(X.bfloat16(), W.bfloat16(), None, A.bfloat16(),
                                                                B.bfloat16(), 1.0), TypeError, "interpreter"),
    ("fp64 under the interpreter", lambda: get_ops("triton").attention(*(torch.randn(1, 2, 8, 16).double(),) * 3),
     TypeError, "interpreter"),
    ("teacher_p's second part of another shape", lambda: linear_kl_ref(H, H, HEAD, teacher_p=(
        teacher_side(H, HEAD)[0], teacher_side(H, HEAD)[1][:1])), ValueError, "teacher_p"),
    ("(T, D) states in the L1", lambda: hidden_l1_ref([torch.randn(3, 4)], [torch.randn(3, 4)]), ValueError, "(B, T, D)"),
    ("integer states in the KL", lambda: linear_kl_ref(H.long(), H.long(), HEAD), TypeError, "floating point"),
    ("integer states in the CE", lambda: linear_ce_ref(H.long(), torch.zeros(5, dtype=torch.long), HEAD), TypeError,
     "floating point"),
    ("integer q, k, v", lambda: attention_ref(*(torch.ones(1, 2, 4, 8, dtype=torch.long),) * 3), TypeError, "floating"),
    ("temperature 0", lambda: linear_kl_ref(H, H, HEAD, temperature=0.0), ValueError, "temperature"),
    ("negative temperature, fused", lambda: linear_kl_triton(H, H, HEAD, temperature=-1.0), ValueError, "temperature"),
]


@pytest.mark.parametrize("row, call, error, message", CASES, ids=[c[0] for c in CASES])
def test_bad_kernel_input(row, call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_a_tie_at_the_kth_teacher_logit_keeps_both_in_loss_and_gradient():
    # Two head rows alike: the teacher's top-1 is a tie. The fused top-k loss read one of them and
    # its gradient pass both (0.42 off a largest entry of 0.59); now both read the tied pair.
    head = HEAD.clone()
    head[1] = head[0]
    ht, hs = 3 * head[0].repeat(5, 1), H.clone()
    got_h, want_h = hs.clone().requires_grad_(), hs.clone().double().requires_grad_()
    got = linear_kl_triton(got_h, ht, head, top_k=1)
    want = linear_kl_ref(want_h, ht.double(), head.double(), top_k=2)
    got.backward()
    want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_h.grad.double(), want_h.grad, rtol=1e-4, atol=1e-5)


def test_top_k_past_the_interpreters_tiles_takes_the_threshold_path():
    # the interpreter's 64-wide tiles cannot hold 65 candidates a split: refused before, computed now
    hs, head = torch.randn(4, 16, generator=G), torch.randn(300, 16, generator=G)
    got = linear_kl_triton(hs, hs + 0.1, head, top_k=65)
    torch.testing.assert_close(got.double(), linear_kl_ref(hs.double(), (hs + 0.1).double(), head.double(), top_k=65),
                               rtol=1e-4, atol=1e-6)


def test_the_fused_ops_follow_autocast_as_the_torch_ops_do():
    tri, ref = get_ops("triton"), get_ops("torch")
    with torch.autocast("cpu", dtype=torch.float16):
        y_tri = tri.lowrank_linear(X, W, None, A, B, 0.5)
        y_ref = ref.lowrank_linear(X, W, None, A, B, 0.5)
        kl_tri, kl_ref = tri.linear_kl(H, H + 0.2, HEAD), ref.linear_kl(H, H + 0.2, HEAD)
    assert y_tri.dtype == y_ref.dtype == torch.float16          # was float32: the kernels ignored autocast
    torch.testing.assert_close(y_tri, y_ref, rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(kl_tri, kl_ref.float(), rtol=1e-2, atol=1e-4)     # fp16 sums, each its order


def test_an_engine_on_the_interpreter_refuses_bf16():
    with pytest.raises(ConfigError, match="interpreter"):
        AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=8, sync_tokens=4, backend="triton",
                                                                  compute_dtype="bfloat16"))
