"""The model runner: what the engine needs to know about a Hugging Face causal LM, and the one
place that decides how it runs: which backend's ops, which attention, which autocast dtype, and
which deltas each row of a forward reads.

Supported: the Llama family (Llama, Mistral, Qwen2, Qwen3: rotary positions, grouped-query
attention, nn.Linear projections) and GPT-2 (learned positions, fused Conv1D projections).
Anything else is refused up front with the reason, rather than absorbed wrongly.

The residual states h^0..h^L are captured with hooks on the decoder layers (h^0 is the input of
layer 0, h^l the output of layer l, before the final norm), which is the same for every
architecture and does not depend on how a transformers version fills `hidden_states`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from absorber_kernels import get_ops
from absorber_kernels.hf_attention import CPU_ATTENTION_NAME, HF_ATTENTION_NAME, register_hf_attention
from absorber_kernels.lowrank_batched import RowLayout

from .errors import ConfigError, UnsupportedModelError
from .hf_cache import cache_keyword, returned_cache
from .layer_forward import checkpointed, compile_layers, uncompile_layers
from .lora import Binding, attach, detach, reattach

# Per architecture: the linears a delta goes on by default: the attention's values and output and
# the MLP, not the queries and keys. Why: a delta on q/k moves where the model attends, and memory
# accumulated over many rounds then breaks its in-context retrieval from the raw window. Measured on
# the shipped model, 2048-token passkeys streamed through a 384-token window (6 examples, 80 steps,
# 4 prompted futures): q,k,v,o + MLP 0/6, v,o + MLP 3/6 (4/6 with futures_follow_y; MLP alone 2/6).
# GPT-2's c_attn fuses q, k and v, so it keeps it.
_LLAMA_TARGETS = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_TARGETS, "mistral": _LLAMA_TARGETS, "qwen2": _LLAMA_TARGETS, "qwen3": _LLAMA_TARGETS,
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
}
# Models whose positions are a learned table: a sequence longer than it cannot run at all.
_ABSOLUTE_POSITIONS = {"gpt2"}


@dataclass
class RunStats:
    """What the engine has run, for tests and reports: the longest attention span any forward
    had (cached tokens plus new ones), i.e. the most KV the engine ever held for one sequence."""

    max_span: int = 0


class ModelRunner:
    """One frozen causal LM with delta wrappers on its target linears, and the ways the engine runs
    it. Everything that depends on the backend is chosen here, once, at construction."""

    def __init__(self, model, tokenizer, cfg):
        inspect_model(model)
        # as given: what close() and merged_model()'s copy put back (as_given)
        self._given = (model.training, {n: p.requires_grad for n, p in model.named_parameters()})
        self.model, self.model_type = model, model.config.model_type
        self.base = model.base_model
        self.cache_keyword = cache_keyword(self.base)
        self.layers = self.base.h if self.model_type == "gpt2" else self.base.layers
        self.head = model.get_output_embeddings()
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.hidden_size = int(self.head.weight.shape[1])
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or model.config.n_positions
        self.absolute_positions = self.model_type in _ABSOLUTE_POSITIONS
        # A sliding-window layer's cache keeps only its last sliding_window - 1 keys
        sliding = [c.sliding_window for c in DynamicCache(config=model.config).layers if getattr(c, "is_sliding", False)]
        self.kept_kv_tokens = min(sliding) - 1 if sliding else None
        self.stats = RunStats()
        bos = bos_token(model, tokenizer)
        self.prefix = [bos] if cfg.prefix_bos and bos is not None else []    # tokens every sequence starts with

        self.backend = resolve_backend(cfg.backend, self.device)
        self.compute_dtype = resolve_compute_dtype(cfg.compute_dtype, self.device, self.dtype)
        self.compiled = cfg.compile_layers
        self.cuda_graphs = cfg.cuda_graphs and self.device.type == "cuda"
        if self.backend == "triton" and self.device.type != "cuda" and {self.dtype, self.compute_dtype} & {
                torch.bfloat16, torch.float64}:
            raise ConfigError("the Triton interpreter computes bf16 and fp64 wrongly (its logits were 1.6 off): "
                              "run a float32 model with compute_dtype 'float32' there, or backend 'torch'")
        if self.compiled and self.backend != "torch":
            raise ConfigError("compile_layers is for backend 'torch' (the Triton kernels are compiled code "
                              "already); set backend to 'torch' or compile_layers to false")
        self.binding = Binding(get_ops(self.backend))
        model.requires_grad_(False)         # past the checks above: a config they refuse leaves it as given
        model.eval()
        targets = cfg.targets if cfg.targets is not None else DEFAULT_TARGETS[self.model_type]
        self.wrappers = attach(model, targets, self.binding)
        self.shapes = {name: (w.in_features, w.out_features) for name, w in self.wrappers.items()}
        if self.compiled:
            compile_layers(self.layers)
        self._attn_before = self._head_cast = None
        # Triton: flash kernel but in static-cache decode steps; a CPU: cpu_attention in the student's passes.
        attn = HF_ATTENTION_NAME if self.backend == "triton" else CPU_ATTENTION_NAME if (
            self.device.type == "cpu" and model.config._attn_implementation == "sdpa") else None
        if attn is not None:
            self._attn_before = model.config._attn_implementation
            model.set_attn_implementation(register_hf_attention(attn))

    @property
    def ops(self):
        return self.binding.ops

    @property
    def num_states(self) -> int:
        return len(self.layers) + 1

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    # ------------------------------------------------------------------ deltas

    def bind(self, deltas: list, rows_per_stream: int = 1, stacked: bool = False) -> None:
        """The next forwards read `deltas`: one as it is, several (or one, `stacked`) stacked, the
        batch then holding `rows_per_stream` consecutive rows of each delta's stream in turn (one row
        layout, built here, read by every layer). Stacking copies the values through autograd, so
        gradients reach each stream's own tensors: bind again after every optimizer step."""
        if not deltas:
            raise ValueError("bind() needs at least one delta")
        self.binding.scale = deltas[0].scale
        single = len(deltas) == 1 and not stacked
        for name, w in self.wrappers.items():
            if single:
                w.A, w.B = deltas[0].factors(name)
            else:
                w.A, w.B = (torch.stack(f) for f in zip(*(d.factors(name) for d in deltas)))
        self.binding.rows = None if single else RowLayout(
            torch.arange(len(deltas), device=self.device).repeat_interleave(rows_per_stream), len(deltas))

    def set_rows(self, rows_per_stream: int) -> None:
        """Keeps the bound deltas, for a batch of `rows_per_stream` rows per stream."""
        if self.binding.rows is not None:
            S = self.binding.rows.S
            self.binding.rows = RowLayout(torch.arange(S, device=self.device).repeat_interleave(rows_per_stream), S)

    def detach(self) -> None:
        """The model exactly as it was given (no wrappers); reattach() puts them back."""
        detach(self.model, self.wrappers)
        uncompile_layers(self.layers)

    def reattach(self) -> None:
        reattach(self.model, self.wrappers)
        if self.compiled:
            compile_layers(self.layers)

    def close(self) -> None:
        self.detach()
        self.wrappers = {}
        self.as_given(self.model)
        self._attn_before = None

    def as_given(self, model) -> None:
        """`model` (this runner's, detached, or a copy of it) as the caller gave it: its mode, the
        parameters that train, its attention."""
        training, grads = self._given
        for name, p in model.named_parameters():
            p.requires_grad_(grads.get(name, False))
        model.train(training)
        if self._attn_before is not None:
            model.set_attn_implementation(self._attn_before)

    # ------------------------------------------------------------------ running

    def with_prefix(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, P + T) with the prefix in front of every row."""
        if not self.prefix:
            return ids
        pre = torch.tensor(self.prefix, dtype=ids.dtype, device=ids.device).expand(ids.shape[0], -1)
        return torch.cat([pre, ids], dim=1)

    def forward(self, ids: torch.Tensor, cache: DynamicCache | None = None, use_cache: bool = False,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
        """The decoder over `ids` (B, T) after `cache`; returns (final normed states (B, T, D), cache).
        attention_mask (B, cached + T) and position_ids (B, T) only where rows are padded."""
        past = cache.get_seq_length() if cache is not None else 0
        self.stats.max_span = max(self.stats.max_span, past + ids.shape[1])
        out = self.base(input_ids=ids, use_cache=use_cache, attention_mask=attention_mask, position_ids=position_ids,
                        return_dict=True, **{self.cache_keyword: cache})     # whatever the config's return_dict
        return out.last_hidden_state, (returned_cache(out) if use_cache else None)

    def head_weight(self) -> torch.Tensor:
        """The LM head's weight for the losses' GEMMs: under autocast on the torch backend cast to the
        compute dtype once and kept (it is frozen), not by each call (V × D: 54 MB on SmolLM2, 9 a round)."""
        w, dtype, dev = self.head.weight, self.compute_dtype, self.device.type
        if (dtype in (None, w.dtype) or self.backend != "torch" or not torch.is_autocast_enabled(dev)
                or torch.get_autocast_dtype(dev) != dtype):                # a GEMM in the model's dtype
            return w
        key = (w.data_ptr(), w._version, dtype)
        if self._head_cast is None or self._head_cast[0] != key:
            self._head_cast = (key, w.detach().to(dtype))
        return self._head_cast[1]

    def logits(self, final_states: torch.Tensor) -> torch.Tensor:
        return self.head(final_states).float()

    def make_cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]] | None, repeat: int = 1) -> DynamicCache | None:
        """A fresh cache holding copies of `kv` (per layer (B, H, S, Dh)), each row repeated `repeat` times."""
        if not kv:
            return None
        data = [(k.repeat_interleave(repeat, dim=0), v.repeat_interleave(repeat, dim=0)) for k, v in kv]
        return DynamicCache(ddp_cache_data=data, config=self.model.config)

    def capture(self, start: int = 0) -> "ResidualCapture":
        return ResidualCapture(self.layers, start)

    def checkpointed(self, enabled: bool = True):
        return checkpointed(self.layers, enabled)

    def autocast(self):
        # No cast cache: it would keep a stale low-precision copy of the delta after each step.
        return torch.autocast(self.device.type, dtype=self.compute_dtype or torch.float32,
                              enabled=self.compute_dtype is not None, cache_enabled=False)

    def model_dtype(self):
        """Inside an autocast block: run in the model's own dtype again."""
        return torch.autocast(self.device.type, enabled=False)

    @contextmanager
    def sdpa_attention(self, needed: bool = True):
        """Torch's sdpa inside the block when `needed`: padded rows need a padding mask (the flash kernel
        takes none), and only sdpa reads the static decoder's boolean mask as one (eager adds it)."""
        before = self.model.config._attn_implementation
        switch = needed and before != "sdpa"
        if switch:
            self.model.set_attn_implementation("sdpa")
        try:
            yield
        finally:
            if switch:
                self.model.set_attn_implementation(before)


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


def inspect_model(model) -> None:
    """Raises UnsupportedModelError unless `model` is a causal LM the engine supports."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a Hugging Face causal LM (torch.nn.Module), got {type(model).__name__}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported; supported: "
            f"{sorted(DEFAULT_TARGETS)}")
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(f"{type(model).__name__} is an encoder-decoder or attends across to one "
                                    "(add_cross_attention); only decoder-only causal LMs are supported")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(f"{type(model).__name__} has no linear LM head (a *ForCausalLM class is needed, "
                                    "e.g. AutoModelForCausalLM)")
    base = model.base_model
    layers = getattr(base, "layers", None) if model_type != "gpt2" else getattr(base, "h", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModelError(f"could not find the decoder layers of {type(model).__name__}")
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(max_positions, int) or max_positions <= 0:
        raise UnsupportedModelError(f"{type(model).__name__}'s config declares no positive max_position_embeddings")


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


def resolve_compute_dtype(requested: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of absorption, or None to run in the model's own dtype."""
    if requested == "auto":
        fast_bf16 = device.type == "cuda" or (
            device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
        requested = "bfloat16" if fast_bf16 else "float32"
    dtype = getattr(torch, requested)
    if model_dtype != torch.float32 or dtype == torch.float32:      # autocast casts fp32 tensors only
        return None
    return dtype


def resolve_backend(requested: str, device: torch.device) -> str:
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("backend 'triton' needs a CUDA device, or TRITON_INTERPRET=1 set before "
                              "triton is imported to run the kernels on CPU")
        return "triton"
    if device.type == "cuda":
        try:
            get_ops("triton")
            return "triton"
        except ImportError:
            return "torch"
    return "torch"
