"""The two ways the engine replaces a decoder layer's forward for the student's passes: checkpointed
(AbsorberConfig.checkpoint_layers) and compiled (AbsorberConfig.compile_layers). Each sets the
layer's own `forward` attribute and takes it away again; they compose (a checkpointed layer
recomputes through whatever forward the layer has, compiled or not).

Compiled: what a compiler can take from a student step is the work between the matmuls: norms, rotary
positions, the MLP's gate, residual adds and the autocast's casts, dozens of small kernels per layer
that inductor fuses into a few (the matmuls themselves stay with the same BLAS). Only passes that
build a graph (gradient on) take the compiled path: the teacher's reads, probe sampling and decoding
grow their KV cache a token at a time, a new shape at every step, and stay eager.

The layers of a model share their compiled graphs (the code is the same, the weights are inputs of
the graph, not constants), and inductor keeps what it built on disk, so a second process with
the same shapes starts in seconds rather than the first's tens of seconds. A width it has not seen
recompiles once, after which the dimension is treated as dynamic; past torch's recompile limit
(`torch._dynamo.config.recompile_limit`) a new variant runs eager, correct and only slower.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError


@contextmanager
def checkpointed(layers: nn.ModuleList, enabled: bool = True):
    """Inside the block each decoder layer keeps only its input for backward and recomputes its
    activations then (less memory, one more forward). The recompute calls the layer's own forward,
    not the module, so the capture hooks see each layer once."""
    if not enabled:
        yield
        return
    patched = [(layer, layer.__dict__.get("forward")) for layer in layers]
    try:
        for layer, _ in patched:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
        yield
    finally:
        for layer, own in patched:       # back to what the layer had: its class's forward, or its own
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def compile_layers(layers: nn.ModuleList) -> None:
    """Routes each layer's forward, while gradient is on, through torch.compile; uncompile_layers()
    puts back what the layer had (its class's forward, or its own, e.g. a device-placement hook's)."""
    for layer in layers:
        layer.forward = _Compiled(layer.forward, layer.__dict__.get("forward"))


def uncompile_layers(layers: nn.ModuleList) -> None:
    for layer in layers:
        patch = layer.__dict__.get("forward")
        if isinstance(patch, _Compiled):
            if patch.own is None:
                del layer.forward
            else:
                layer.forward = patch.own


class _Compiled:
    """A layer's forward: compiled under gradient, eager otherwise."""

    def __init__(self, eager, own):
        self.eager, self.own, self.compiled = eager, own, torch.compile(eager)

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            # Most often no working C++ compiler for inductor: say so, not a page of generated code.
            cause = getattr(e, "inner_exception", None) or e
            first = (str(cause).strip().splitlines() or [""])[0][:300]
            raise ConfigError(f"compile_layers: torch.compile could not build the student's layers on this "
                              f"machine ({type(cause).__name__}: {first}); set compile_layers to false") from e
