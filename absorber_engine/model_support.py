"""What the engine needs to know about a Hugging Face causal LM, and the few ways it runs one.

Supported: the Llama family (Llama, Mistral, Qwen2, Qwen3: rotary positions, grouped-query
attention, nn.Linear projections) and GPT-2 (learned positions, fused Conv1D projections).
Anything else is refused up front with the reason, rather than absorbed wrongly.

The residual states h^0..h^L are captured with hooks on the decoder layers (h^0 is the input of
layer 0, h^l the output of layer l, before the final norm), which is the same for every
architecture and does not depend on how a transformers version fills `hidden_states`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import functools
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from .errors import UnsupportedModelError

# Per architecture: the linears a delta goes on by default: the attention's values and output and
# the MLP, not the queries and keys. Why: a delta on q/k moves where the model attends, and memory
# accumulated over many rounds then breaks its in-context retrieval from the raw window. Measured on
# the shipped model, 2048-token passkeys streamed through a 384-token window (6 examples, 80 steps,
# 4 prompted futures): q,k,v,o + MLP 0/6, v,o + MLP 3/6 (4/6 with futures_follow_y; MLP alone 2/6).
# GPT-2's c_attn fuses q, k and v, so it keeps it.
_LLAMA_TARGETS = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_TARGETS,
    "mistral": _LLAMA_TARGETS,
    "qwen2": _LLAMA_TARGETS,
    "qwen3": _LLAMA_TARGETS,
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
}
# Models whose positions are a learned table: a sequence longer than it cannot run at all.
_ABSOLUTE_POSITIONS = {"gpt2"}


@dataclass
class RunStats:
    """What the engine has run, for tests and reports: the longest attention span any forward
    had (cached tokens plus new ones), i.e. the most KV the engine ever held for one sequence."""

    max_span: int = 0


@dataclass
class ModelParts:
    model: nn.Module
    base: nn.Module                 # the decoder stack without the LM head
    layers: nn.ModuleList
    head: nn.Linear                 # the frozen LM head (V, D)
    model_type: str
    vocab_size: int
    hidden_size: int
    max_positions: int              # positions the model declares (max_position_embeddings, n_positions)
    absolute_positions: bool        # a learned position table: nothing can run past max_positions
    stats: RunStats = field(default_factory=RunStats)
    prefix: list[int] = field(default_factory=list)   # tokens every sequence starts with (BOS), see config

    def with_prefix(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, P + T) with the prefix in front of every row."""
        if not self.prefix:
            return ids
        pre = torch.tensor(self.prefix, dtype=ids.dtype, device=ids.device).expand(ids.shape[0], -1)
        return torch.cat([pre, ids], dim=1)

    @property
    def num_states(self) -> int:
        return len(self.layers) + 1

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def forward(self, ids: torch.Tensor, cache: DynamicCache | None = None, use_cache: bool = False,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
        """The decoder over `ids` (B, T) after `cache`; returns (final normed states (B, T, D), cache).
        attention_mask (B, cached + T) and position_ids (B, T) only where rows are padded."""
        past = cache.get_seq_length() if cache is not None else 0
        self.stats.max_span = max(self.stats.max_span, past + ids.shape[1])
        out = self.base(input_ids=ids, past_key_values=cache, use_cache=use_cache, attention_mask=attention_mask,
                        position_ids=position_ids)
        return out.last_hidden_state, (out.past_key_values if use_cache else None)

    def logits(self, final_states: torch.Tensor) -> torch.Tensor:
        return self.head(final_states).float()

    def make_cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]] | None, repeat: int = 1) -> DynamicCache | None:
        """A fresh cache holding copies of `kv` (per layer (B, H, S, Dh)), each row repeated `repeat` times."""
        if not kv:
            return None
        data = [(k.repeat_interleave(repeat, dim=0), v.repeat_interleave(repeat, dim=0)) for k, v in kv]
        return DynamicCache(ddp_cache_data=data, config=self.model.config)


def cache_tensors(cache: DynamicCache, keep: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer (keys, values) of `cache`, cut to the first `keep` positions."""
    out = []
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        if keep is not None:
            k, v = k[..., :keep, :], v[..., :keep, :]
        out.append((k, v))
    return out


def bos_token(model, tokenizer=None) -> int | None:
    """The model's BOS id, when its config names one inside the vocabulary and the tokenizer (if
    any) puts it in front of what it encodes: a model reads BOS first only if it was trained that
    way. SmolLM2's config names <|im_start|> as BOS, which its tokenizer never adds; a sequence of
    that model starts with its own first token, which serves as the attention sink."""
    bos = getattr(model.config, "bos_token_id", None)
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    n = model.get_input_embeddings().num_embeddings
    if not (isinstance(bos, int) and 0 <= bos < n):
        return None
    if tokenizer is not None:
        try:
            first = tokenizer("a")["input_ids"][:1]
        except Exception:        # a tokenizer that cannot encode plain text says nothing about BOS
            return bos
        if first != [bos]:
            return None
    return bos


def inspect_model(model) -> ModelParts:
    """Checks that `model` is a causal LM the engine supports and finds its parts."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a Hugging Face causal LM (torch.nn.Module), got {type(model).__name__}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported; supported: "
            f"{sorted(DEFAULT_TARGETS)}")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{type(model).__name__} is an encoder-decoder; only decoder-only causal LMs are supported")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no linear LM head (a *ForCausalLM class is needed, e.g. "
            "AutoModelForCausalLM)")
    base = model.base_model
    layers = getattr(base, "layers", None) if model_type != "gpt2" else getattr(base, "h", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(f"could not find the decoder layers of {type(model).__name__}")
    embed = model.get_input_embeddings()
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(max_positions, int) or max_positions <= 0:
        raise UnsupportedModelError(f"{type(model).__name__}'s config declares no positive max_position_embeddings")
    return ModelParts(
        model=model, base=base, layers=layers, head=head, model_type=model_type,
        vocab_size=int(embed.num_embeddings), hidden_size=int(head.weight.shape[1]),
        max_positions=max_positions, absolute_positions=model_type in _ABSOLUTE_POSITIONS,
    )


class ResidualCapture:
    """Records h^0..h^L of every forward run inside it, from position `start` on."""

    def __init__(self, layers: nn.ModuleList, start: int = 0):
        self.layers, self.start = layers, start
        self.states: list[torch.Tensor] = []
        self._handles = []

    def _keep(self, h: torch.Tensor) -> torch.Tensor:
        # A slice of a no-grad tensor keeps the whole tensor alive; copy it so the rest can go.
        return h[:, self.start:].clone() if self.start else h

    def _pre(self, module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        self.states.append(self._keep(h))

    def _post(self, module, args, kwargs, output):
        h = output[0] if isinstance(output, tuple) else output
        self.states.append(self._keep(h))

    def __enter__(self) -> "ResidualCapture":
        self._handles.append(self.layers[0].register_forward_pre_hook(self._pre, with_kwargs=True))
        for layer in self.layers:
            self._handles.append(layer.register_forward_hook(self._post, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


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
