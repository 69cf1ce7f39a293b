"""The absorbed memory: a low-rank delta A·B·(alpha/r) on chosen linears of a frozen model.

`LowRankDelta` owns the tensors (A: in × r, B: r × out; fp32 for the optimizer, bf16 once a bank
holds it: compact()). `DeltaLinear` wraps one target linear in place and adds the delta on the
fly; the base module is kept as it is, its weights frozen and never written. B starts at zero,
so a fresh delta changes nothing.

Every wrapper of a model shares one `Binding`, set by the model runner (model.py) before each
forward: the backend's op table, the scale, and the row layout of a batch of streams. The wrappers
hold only their own A and B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError, UnsupportedModelError


@dataclass
class Binding:
    """What every wrapper of one model reads at each forward, set once for all of them."""

    ops: object                       # the backend's op table (absorber_kernels.Ops)
    scale: float = 1.0
    rows: object = None               # absorber_kernels RowLayout when A and B are stacked, else None


class DeltaLinear(nn.Module):
    """A frozen linear (nn.Linear, or GPT-2's Conv1D) plus an optional low-rank delta.

    Bound to one stream, A is (in, r) and B (r, out). Bound to a batch of S streams, A is
    (S, in, r), B (S, r, out), and the binding's row layout maps each row of the input to its stream.
    """

    def __init__(self, base: nn.Module, binding: Binding):
        super().__init__()
        self.base = base
        if isinstance(base, Conv1D):
            self.layout = "conv1d"
            self.in_features, self.out_features = base.weight.shape
        else:
            self.layout = "linear"
            self.out_features, self.in_features = base.weight.shape
        self.binding = binding
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.A is None:
            return self.base(x)
        b = self.binding
        if self.A.dim() == 3:
            return b.ops.lowrank_linear_batched(x, self.base.weight, self.base.bias, self.A, self.B, b.rows, b.scale,
                                                self.layout)
        return b.ops.lowrank_linear(x, self.base.weight, self.base.bias, self.A, self.B, b.scale, self.layout)

    def merged_weight(self, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
        """W + scale·A·B in W's own layout and dtype (the base weight itself is not touched)."""
        w = self.base.weight
        with torch.no_grad():                                                    # one GEMM into a copy of W
            if self.layout == "linear":
                return torch.addmm(w.float(), B.float().t(), A.float().t(), alpha=scale).to(w.dtype)
            return torch.addmm(w.float(), A.float(), B.float(), alpha=scale).to(w.dtype)

    def extra_repr(self) -> str:
        return f"{self.layout}, in={self.in_features}, out={self.out_features}"


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def attach(model: nn.Module, targets: tuple[str, ...], binding: Binding) -> dict[str, DeltaLinear]:
    """Wraps every linear whose dotted name matches a target; returns them by original name."""
    if any(isinstance(m, DeltaLinear) for m in model.modules()):
        raise ConfigError("this model already carries an engine's deltas; call close() on that engine first "
                          "(several streams on one model: use engine sessions)")
    chosen = [(name, module) for name, module in model.named_modules() if _matches(name, targets)]
    if not chosen:
        raise ConfigError(f"no linear layer of the model matches targets {list(targets)}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in chosen:        # all checked before any is wrapped: a refusal changes nothing
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise UnsupportedModelError(f"target {name!r} is a {type(module).__name__}, not a linear layer")
        if module is head:             # the losses read the head's own weight: its delta would never train
            raise ConfigError(f"target {name!r} is the LM head, which the engine keeps frozen; target the "
                              "decoder layers' linears")
    found = {name: DeltaLinear(module, binding) for name, module in chosen}
    reattach(model, found)
    return found


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def detach(model: nn.Module, wrappers: dict[str, DeltaLinear]) -> None:
    """Puts the original modules back, leaving the model exactly as it was given."""
    for name, wrapper in wrappers.items():
        _set_module(model, name, wrapper.base)


def reattach(model: nn.Module, wrappers: dict[str, DeltaLinear]) -> None:
    """Puts the wrappers (back) in place of their base modules."""
    for name, wrapper in wrappers.items():
        _set_module(model, name, wrapper)


class LowRankDelta:
    """A and B for each target, all trained together; Δ_name = scale · A_name · B_name."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, scale: float,
                 device: torch.device, seed: int = 0):
        self.shapes, self.rank, self.scale, self.device, self.seed = dict(shapes), rank, scale, device, seed
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        self.round_tokens = 0          # a bank's delta: the length of the X it absorbed (0: not known)
        self.marks: list[int] | None = None     # and recital.marks() of that X (None: not known)
        self.reset()

    def reset(self) -> None:
        """Back to Δ = 0: B zero, A drawn again from the seed (the same A every time)."""
        gen = torch.Generator().manual_seed(self.seed)
        self.round_tokens, self.marks = 0, None
        for name, (n_in, n_out) in self.shapes.items():
            # Kaiming-uniform bound as for a linear of fan-in n_in, as LoRA does.
            bound = 1.0 / math.sqrt(n_in)
            a = (torch.rand(n_in, self.rank, generator=gen) * 2 - 1) * bound
            self.A[name] = a.to(self.device).requires_grad_(True)
            self.B[name] = torch.zeros(self.rank, n_out, device=self.device).requires_grad_(True)

    def compact(self, dtype: torch.dtype = torch.bfloat16) -> None:
        """Holds A and B in `dtype` from now on, without gradients: a bank's committed delta, which
        trains no more (half its bytes in bf16). factors() reads them in fp32; reset() makes the
        delta trainable again."""
        for name in self.shapes:
            self.A[name] = self.A[name].detach().to(dtype)
            self.B[name] = self.B[name].detach().to(dtype)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one target to compute with: the trained tensors themselves (a forward through
        them reaches their gradients), or a compact delta's read in fp32."""
        a, b = self.A[name], self.B[name]
        return (a, b) if a.dtype == torch.float32 else (a.float(), b.float())

    def is_zero(self) -> bool:
        """Δ = 0: every B is zero (as reset leaves it)."""
        return not any(bool(b.detach().any()) for b in self.B.values())

    def parameters(self) -> list[torch.Tensor]:
        return [t for name in self.shapes for t in (self.A[name], self.B[name])]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.shapes:
            out[f"{name}.A"] = self.A[name].detach().clone()
            out[f"{name}.B"] = self.B[name].detach().clone()
        return out

    def check_state(self, state: dict[str, torch.Tensor]) -> None:
        """Raises ValueError unless `state` has exactly this delta's names, shapes and finite values."""
        expected = {f"{n}.A": (i, self.rank) for n, (i, o) in self.shapes.items()}
        expected.update({f"{n}.B": (self.rank, o) for n, (i, o) in self.shapes.items()})
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(f"delta tensors differ: missing {missing[:4]}, unexpected {extra[:4]}")
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"{key} has shape {tuple(state[key].shape)}, expected {shape}")
            if not torch.isfinite(state[key].float()).all():        # as the fp32 delta would hold it
                raise ValueError(f"{key} holds NaN or inf, or values beyond float32")

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.check_state(state)
        with torch.no_grad():
            for name in self.shapes:
                self.A[name].copy_(state[f"{name}.A"])
                self.B[name].copy_(state[f"{name}.B"])

    def to(self, device) -> None:
        """Moves the tensors (the scheduler's residency decisions); a no-op where they already are."""
        device = torch.device(device)
        if device == self.device:
            return
        for name in self.shapes:
            for factors in (self.A, self.B):
                factors[name] = factors[name].detach().to(device).requires_grad_(factors[name].requires_grad)
        self.device = device

    def snapshot(self) -> dict:
        """Everything a round or its commit may change: each factor's values, dtype and
        trainability (Session.keep compacts a bank's first delta in place), its round's length and marks."""
        return {"A": {n: (t.detach().clone(), t.requires_grad) for n, t in self.A.items()},
                "B": {n: (t.detach().clone(), t.requires_grad) for n, t in self.B.items()},
                "round": (self.round_tokens, None if self.marks is None else list(self.marks))}

    def restore(self, snap: dict) -> None:
        """Back to exactly the snapshot: the tensors are replaced, not copied into, so a delta left
        half-compacted (bf16, no gradient) by a failed commit trains again as before."""
        for key, factors in (("A", self.A), ("B", self.B)):
            for name, (value, grad) in snap[key].items():
                factors[name] = value.clone().to(self.device).requires_grad_(grad)
        self.round_tokens, marks = snap["round"]
        self.marks = None if marks is None else list(marks)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parameters())

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())
