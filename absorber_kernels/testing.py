"""Parity checking for the kernel tests (and anyone porting a kernel): compare a result with the
float64 reference and say where they differ."""

from __future__ import annotations

import torch

# (atol as a fraction of max |reference|, rtol) per input dtype
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 1e-2), torch.bfloat16: (1.6e-2, 1.6e-2)}


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> float:
    """Elementwise |got − want| ≤ atol·max|want| + rtol·|want| (tolerances of `dtype`, times `scale`);
    prints the max error, and on failure the first mismatching indices with both values."""
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    a, r = TOL[dtype]
    ref_max = float(want.abs().max()) if want.numel() else 0.0
    err = (got - want).abs()
    max_err = float(err.max()) if err.numel() else 0.0
    print(f"[parity] {name} {str(dtype).replace('torch.', '')}: max abs err {max_err:.3e} (max |ref| {ref_max:.3e})")
    bad = ~(err <= scale * (a * ref_max + r * want.abs()))   # NaN counts as bad
    if bad.any():
        idx = bad.nonzero()[:8]
        where = "\n".join(f"  at {tuple(i.tolist())}: got {got[tuple(i)].item():.7g}, reference {want[tuple(i)].item():.7g}"
                          for i in idx)
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ from the float64 reference "
                             f"beyond atol {scale * a:.1e}·{ref_max:.3g} + rtol {scale * r:.1e}; first ones:\n{where}")
    return max_err

