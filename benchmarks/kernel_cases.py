"""Each kernel's plain PyTorch formulation (what a user writes) against the engine's CPU path (the
references in absorber_kernels/, which the torch backend runs), forward and backward, on CPU only.

| op             | plain                                                 | engine CPU path                     |
| -------------- | ----------------------------------------------------- | ----------------------------------- |
| linear_kl      | full logits h·Wᵀ for both, log_softmax, F.kl_div, autograd | linear_kl_ref: rows in chunks, gradient formed in forward |
| hidden_l1      | torch.stack of the L+1 states, one |s − t| sum, autograd | hidden_l1_ref: per layer, no stack  |
| lowrank_linear | PEFT's lora.Linear around nn.Linear                   | lowrank_linear_ref: x·W + s·(x·A)·B |
| attention      | eager: repeat_interleave K/V, softmax(QKᵀ)V (attention_ref) | the model's sdpa (what the engine runs on CPU) |
The Triton kernels are never timed here (under the interpreter they say nothing about speed).
Each case returns a zero-argument callable doing one forward + backward (forward only where the
engine only runs forward: the teacher's attention over a cached prefix).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from absorber_kernels import attention_ref, hidden_l1_ref, linear_kl_ref, lowrank_linear_ref

SHAPES = {
    "full": dict(kl=dict(N=512, D=512, V=32000), l1=dict(L=9, T=512, D=512), lora=dict(T=512, IN=512, OUT=1376, R=32),
                 attn=dict(H=8, KV=4, T=512, P=256, Dh=64)),
    "quick": dict(kl=dict(N=256, D=256, V=32000), l1=dict(L=5, T=256, D=256), lora=dict(T=256, IN=256, OUT=688, R=16),
                  attn=dict(H=4, KV=2, T=256, P=128, Dh=64)),
}


def _g(seed):
    return torch.Generator().manual_seed(seed)


def linear_kl(impl: str, N: int, D: int, V: int):
    hs = torch.randn(N, D, generator=_g(0)).requires_grad_(True)
    ht = torch.randn(N, D, generator=_g(1))
    w = torch.randn(V, D, generator=_g(2)) / math.sqrt(D)

    if impl == "plain":
        def step():
            zs = hs @ w.t()                                                   # (N, V) student logits
            with torch.no_grad():
                log_pt = F.log_softmax(ht @ w.t(), dim=-1)                    # (N, V) teacher
            loss = F.kl_div(F.log_softmax(zs, dim=-1), log_pt, log_target=True, reduction="sum") / N
            loss.backward()
            hs.grad = None
            return loss
    else:
        def step():
            loss = linear_kl_ref(hs, ht, w)
            loss.backward()
            hs.grad = None
            return loss
    return step


def hidden_l1(impl: str, L: int, T: int, D: int):
    student = [torch.randn(1, T, D, generator=_g(10 + i)).requires_grad_(True) for i in range(L)]
    teacher = [torch.randn(1, T, D, generator=_g(100 + i)) for i in range(L)]
    norm = 1.0 / (T * L * D)

    if impl == "plain":
        def step():
            loss = (torch.stack(student) - torch.stack(teacher)).abs().sum() * norm
            loss.backward()
            for s in student:
                s.grad = None
            return loss
    else:
        def step():
            loss = hidden_l1_ref(student, teacher)
            loss.backward()
            for s in student:
                s.grad = None
            return loss
    return step


def lowrank_linear(impl: str, T: int, IN: int, OUT: int, R: int):
    x = torch.randn(1, T, IN, generator=_g(20)).requires_grad_(True)
    base = torch.nn.Linear(IN, OUT, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(OUT, IN, generator=_g(23)) / math.sqrt(IN))
    base.requires_grad_(False)
    A = (torch.randn(IN, R, generator=_g(21)) / math.sqrt(IN)).requires_grad_(True)
    B = (torch.randn(R, OUT, generator=_g(22)) * 0.01).requires_grad_(True)

    if impl == "plain":
        from peft import LoraConfig
        from peft.tuners.lora import Linear as LoraLinear

        layer = LoraLinear(base, "default", LoraConfig(r=R, lora_alpha=R, lora_dropout=0.0), r=R, lora_alpha=R)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(A.t())
            layer.lora_B["default"].weight.copy_(B.t())
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, x]

        def step():
            y = layer(x)
            y.square().mean().backward()
            for p in params:
                p.grad = None
            return y
    else:
        def step():
            y = lowrank_linear_ref(x, base.weight, None, A, B, 1.0)
            y.square().mean().backward()
            for p in (A, B, x):
                p.grad = None
            return y
    return step


def attention(impl: str, H: int, KV: int, T: int, P: int, Dh: int, prefix: bool):
    """prefix=False: the student (T = m queries over themselves, causal), forward + backward.
    prefix=True: the teacher (X and Y in one causal pass, P + T = n + m positions), forward only."""
    S = T + P if prefix else T
    q = torch.randn(1, H, S, Dh, generator=_g(30)).requires_grad_(not prefix)
    k = torch.randn(1, KV, S, Dh, generator=_g(31)).requires_grad_(not prefix)
    v = torch.randn(1, KV, S, Dh, generator=_g(32)).requires_grad_(not prefix)

    def run():
        if impl == "plain":
            return attention_ref(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    if prefix:
        def step():
            with torch.no_grad():
                return run()
    else:
        def step():
            out = run()
            out.square().mean().backward()
            for t in (q, k, v):
                t.grad = None
            return out
    return step


def cases(size: str) -> dict[str, tuple]:
    """name -> (builder, kwargs), every builder taking impl ("plain" or "engine") first."""
    sh = SHAPES[size]
    return {
        "linear_kl": (linear_kl, sh["kl"]),
        "hidden_l1": (hidden_l1, sh["l1"]),
        "lowrank_linear": (lowrank_linear, sh["lora"]),
        "attention_student": (attention, dict(sh["attn"], prefix=False)),
        "attention_teacher": (attention, dict(sh["attn"], prefix=True)),
    }


def check_same(name: str, size: str) -> float:
    """Largest relative difference of the two formulations' outputs (they must compute the same)."""
    builder, kw = cases(size)[name]
    a, b = builder("plain", **kw)(), builder("engine", **kw)()
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
