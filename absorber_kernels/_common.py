"""What every Triton kernel file shares: the optional Triton import, the device check and a few
launch helpers. Nothing here needs a GPU, and nothing here needs Triton to import."""

from __future__ import annotations


import torch

try:  # Triton is optional: the references in each file are the CPU path.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

LOG2E = 1.4426950408889634   # log2(e): exp(x) = exp2(x·LOG2E)
LN2 = 0.6931471805599453     # ln(2):   log(x) = log2(x)·LN2


def interpreting() -> bool:
    """True when the kernels were built for the Triton interpreter. `triton.jit` decides that once,
    when a kernel is decorated (at import), from TRITON_INTERPRET; setting the variable later has no
    effect on kernels already imported, so ask the kernels, not the environment."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe, InterpretedFunction)


if HAS_TRITON:
    @triton.jit
    def _probe(x):  # only inspected, never launched
        pass


def check_tensors(op: str, *tensors: torch.Tensor | None) -> torch.device:
    """Raise a clear error unless the Triton kernels can run on these tensors."""
    if not HAS_TRITON:
        raise ImportError(f"{op}: triton is not installed; use backend='torch' (pip install triton for the kernels)")
    ts = [t for t in tensors if t is not None]
    devices = {t.device for t in ts}
    if len(devices) > 1:
        raise RuntimeError(f"{op}: tensors are on different devices: {sorted(str(d) for d in devices)}")
    device = ts[0].device
    if device.type == "cuda":
        return device
    if device.type == "cpu":
        if interpreting():
            # numpy has no bf16, and fp64 products came back as zeros: garbage, never an error
            odd = sorted({str(t.dtype) for t in ts if t.dtype in (torch.bfloat16, torch.float64)})
            if odd:
                raise TypeError(f"{op}: the Triton interpreter computes {', '.join(odd)} wrongly; pass float32 "
                                "(or float16) tensors, or use backend='torch'")
            return device
        raise RuntimeError(
            f"{op}: the Triton kernels got CPU tensors, which they can only run on under the Triton interpreter: "
            "set TRITON_INTERPRET=1 before triton is first imported (slow; for tests), or use backend='torch', "
            "the CPU path")
    raise RuntimeError(f"{op}: the Triton kernels run on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; a small stand-in under the interpreter (keeps grids small)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def cuda_arch(device: torch.device) -> int | None:
    """Compute capability as 80, 90, ...; None off CUDA (the interpreter)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: fp32 operands use 3xTF32 (about fp32 accuracy on tensor cores);
    16-bit operands ignore it."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def grad_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of a gradient an op forms in its forward and keeps for its backward: fp32 for fp16
    inputs, x's own otherwise. A loss's gradient is its weight over the positions it averages (1e-8
    for a hidden L1 over a round), below fp16's range until grad_output brings the round's loss
    scale (train.LossScale): the product is cast to x's dtype only then."""
    return torch.float32 if x.dtype == torch.float16 else x.dtype


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


TL_DTYPE = {} if not HAS_TRITON else {
    torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
}
