"""absorber_kernels: the engine's compute kernels, each a PyTorch reference (the CPU path) and,
where Triton is available, a fused Triton kernel beside it in the same file."""

from .attention import attention_ref
from .hf_attention import HF_ATTENTION_NAME, register_hf_attention
from .hidden_sync import hidden_l1_ref
from .linear_ce import linear_ce_ref
from .linear_kl import linear_kl_ref
from .lowrank_linear import lowrank_linear_ref
from .ops import Ops, get_ops

__all__ = ["HF_ATTENTION_NAME", "Ops", "attention_ref", "get_ops", "hidden_l1_ref", "linear_ce_ref", "linear_kl_ref",
           "lowrank_linear_ref", "register_hf_attention"]
