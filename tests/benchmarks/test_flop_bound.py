"""The FLOP count behind benchmarks/flop_bound.py: attention on the CPU counted, and the loop's
teacher recomputed at every step where the engine's runs once a round."""

import torch
import torch.nn.functional as F

from benchmarks.flop_bound import counted_flops, round_flops


def test_cpu_flash_attention_is_counted_half_when_causal():
    q = torch.randn(1, 2, 64, 32, requires_grad=True)
    full = counted_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())
    causal = counted_flops(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward())
    # QK^T and PV forward (2 products), 5 in the backward, each 2·B·H·T·T·Dh FLOPs.
    assert full == 7 * 2 * 2 * 64 * 64 * 32
    assert causal == full // 2


def test_each_step_costs_the_loop_its_teacher_again():
    one, two = (round_flops("llama-4l", "probes4", quick=True, max_steps=k) for k in (1, 2))
    step_engine, step_loop = two["engine"] - one["engine"], two["loop"] - one["loop"]
    assert step_engine > 0
    # The loop's extra step reads every group with the teacher again, the engine's does not.
    assert step_loop > 1.3 * step_engine
