"""The baseline to beat: the engine's objective written the way a user would, with transformers + PEFT.

Same objective, same rounds, same steps as AbsorberEngine (absorber_engine/round.py), none of its
shortcuts:

- the delta is a PEFT LoRA adapter ("default": LoraConfig with the engine's r, alpha and target
  modules, no dropout), started from exactly the engine's initial A and B (A is seeded, B = 0);
- the teacher is a second adapter ("teacher"), a frozen copy of "default" taken at the start of each
  round (Algorithm 2: a round's teacher is the model with everything absorbed before it), and it is
  recomputed with its full context, X followed by each future, at EVERY step;
- hidden states come from `output_hidden_states=True`. transformers returns h^0..h^{L-1} as they are
  but the last entry after the final norm, while the engine compares the pre-norm residual h^L, so
  a forward pre-hook on the final norm takes h^L from its input (the same definition as the engine);
- the KL term reads full-vocabulary logits materialized by the model's LM head (log_softmax and
  F.kl_div, standard autograd); the LM head runs only where the loss reads logits (teacher: Y's
  positions via `logits_to_keep`; student: every position), and forwards pass use_cache=False, as a
  user training with a causal LM would. So the baseline does no work its loss does not use;
- sampled futures (cfg.futures > 0) come once per round from `model.generate` with X as the prompt
  (the teacher adapter active, the engine's temperature and top-p, top_k=0, no eos stop);
- one loss over all futures, one backward, torch.optim.AdamW on the "default" adapter (a fresh
  optimizer each round, as the engine does), stop when the loss is below cfg.stop_loss.

Loss, exactly the engine's (sync.py):
    L = hidden_weight · Σ_{l=0..L} Σ_{p, d} |h_s − h_t| / (N·(L+1)·D)  +  kl_weight · T² · Σ_p KL(p_t ‖ p_s) / N
with N the synchronized positions of the round (real Y plus the sampled futures).

Streams are cut as the engine cuts them without flush: while the window holds n + m tokens, X is
its first n and Y the next m; after the round the window slides by n. Rounds without a real Y
(the engine's flush) are not implemented here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig

from absorber_engine.config import AbsorberConfig
from absorber_engine.lora import LowRankDelta
from absorber_engine.model import DEFAULT_TARGETS

TEACHER = "teacher"
STUDENT = "default"


@dataclass
class BaselineReport:
    tokens: int = 0
    rounds: int = 0
    steps: int = 0
    final_loss: float = float("nan")
    seconds: float = 0.0
    round_losses: list[float] = field(default_factory=list)
    step_losses: list[list[float]] = field(default_factory=list)   # every loss of every round


def engine_initial_delta(model, cfg: AbsorberConfig) -> dict[str, torch.Tensor]:
    """The A and B an AbsorberEngine with `cfg` would start from on `model` (names as in the model)."""
    targets = cfg.targets if cfg.targets is not None else DEFAULT_TARGETS[model.config.model_type]
    shapes = {}
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets) and isinstance(module, torch.nn.Linear):
            shapes[name] = (module.in_features, module.out_features)
    delta = LowRankDelta(shapes, cfg.rank, cfg.scale, model.get_output_embeddings().weight.device, seed=cfg.seed)
    return delta.state_dict()


class PeftSyncBaseline:
    """Causal synchronization with a PEFT LoRA model: what a user would run instead of the engine."""

    def __init__(self, model, config: AbsorberConfig, init: dict[str, torch.Tensor] | None = None):
        cfg = config
        if cfg.objective != "absorber":
            raise ValueError("the baseline implements the absorber objective only")
        self.config = cfg
        targets = list(cfg.targets if cfg.targets is not None else DEFAULT_TARGETS[model.config.model_type])
        init = init if init is not None else engine_initial_delta(model, cfg)
        model.requires_grad_(False)
        model.eval()
        alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
        lora = dict(r=cfg.rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
        self.model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        self.model.add_adapter(TEACHER, LoraConfig(task_type="CAUSAL_LM", **lora))
        inner = self.model.base_model.model                 # the original causal LM, its linears wrapped
        self.lora_layers = {}
        with torch.no_grad():
            for name in sorted({k.rsplit(".", 1)[0] for k in init}):
                layer = inner.get_submodule(name)
                # engine: A (in, r), B (r, out), y += s·x·A·B;  PEFT: lora_A.weight (r, in), lora_B.weight (out, r)
                layer.lora_A[STUDENT].weight.copy_(init[f"{name}.A"].t())
                layer.lora_B[STUDENT].weight.copy_(init[f"{name}.B"].t())
                self.lora_layers[name] = layer
        if len(self.lora_layers) != sum(1 for m in inner.modules() if hasattr(m, "lora_A")):
            raise ValueError("the initial delta does not name every LoRA layer PEFT created")
        self.final_norm = inner.model.norm
        self.num_layers = inner.config.num_hidden_layers
        self.device = inner.get_output_embeddings().weight.device
        self.window: list[int] = []
        self.rounds_done = 0
        self.model.set_adapter(STUDENT)

    # ------------------------------------------------------------------ the delta, engine-named

    def parameters(self) -> list[torch.Tensor]:
        return [t for layer in self.lora_layers.values()
                for t in (layer.lora_A[STUDENT].weight, layer.lora_B[STUDENT].weight)]

    def delta_state(self) -> dict[str, torch.Tensor]:
        """The trained delta in the engine's layout (name.A: (in, r), name.B: (r, out))."""
        out = {}
        for name, layer in self.lora_layers.items():
            out[f"{name}.A"] = layer.lora_A[STUDENT].weight.detach().t().clone()
            out[f"{name}.B"] = layer.lora_B[STUDENT].weight.detach().t().clone()
        return out

    # ------------------------------------------------------------------ forward with h^0..h^L

    def _run(self, ids: torch.Tensor, keep: int, logits: bool):
        """Forward of the active adapter over ids (B, S): (h^0..h^L at the last `keep` positions,
        logits (B, keep, V) or None). h^L is the final norm's input, not transformers' normed state."""
        seen = {}
        hook = self.final_norm.register_forward_pre_hook(lambda mod, args: seen.__setitem__("h", args[0]))
        try:
            out = self.model(input_ids=ids, output_hidden_states=True, use_cache=False,
                             logits_to_keep=keep if logits else 1)
        finally:
            hook.remove()
        hidden = list(out.hidden_states[:-1]) + [seen["h"]]                 # L + 1 states, (B, S, D)
        hidden = [h[:, -keep:] for h in hidden]
        return hidden, (out.logits if logits else None)

    def _loss(self, x: torch.Tensor, futures: list[torch.Tensor]) -> torch.Tensor:
        """The sync loss of the "default" adapter on every future, its teacher recomputed now."""
        cfg = self.config
        need_logits = cfg.kl_weight > 0
        total_pos = sum(f.numel() for f in futures)
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        for fut in futures:                                                  # (b, t)
            b, t = fut.shape
            ctx = torch.cat([x[None].expand(b, -1), fut], dim=1)            # (b, n + t)
            self.model.set_adapter(TEACHER, inference_mode=True)
            try:
                with torch.no_grad():
                    t_hidden, t_logits = self._run(ctx, t, need_logits)
            finally:
                self.model.set_adapter(STUDENT)
            s_hidden, s_logits = self._run(fut, t, need_logits)
            if cfg.hidden_weight > 0:
                l1 = sum((s.float() - h.float()).abs().sum() for s, h in zip(s_hidden, t_hidden))
                d = s_hidden[0].shape[-1]
                loss = loss + cfg.hidden_weight * l1 / (total_pos * len(s_hidden) * d)
            if need_logits:
                temp = cfg.kl_temperature
                log_pt = F.log_softmax(t_logits.float() / temp, dim=-1)
                if cfg.kl_top_k:
                    raise NotImplementedError("the baseline uses the full vocabulary (kl_top_k = 0)")
                log_ps = F.log_softmax(s_logits.float() / temp, dim=-1)
                kl = F.kl_div(log_ps.reshape(-1, log_ps.shape[-1]), log_pt.reshape(-1, log_pt.shape[-1]),
                              log_target=True, reduction="sum")
                loss = loss + cfg.kl_weight * temp * temp * kl / total_pos
        return loss

    # ------------------------------------------------------------------ rounds

    def _sample_futures(self, x: torch.Tensor, round_index: int) -> torch.Tensor:
        cfg = self.config
        torch.manual_seed(cfg.seed * 1_000_003 + round_index)
        gen = GenerationConfig(do_sample=True, temperature=cfg.future_temperature, top_p=cfg.future_top_p,
                               top_k=0, max_new_tokens=cfg.future_length, min_new_tokens=cfg.future_length,
                               num_return_sequences=cfg.futures, eos_token_id=None, pad_token_id=0)
        self.model.set_adapter(TEACHER, inference_mode=True)
        try:
            out = self.model.generate(input_ids=x[None], attention_mask=torch.ones_like(x[None]),
                                      generation_config=gen)
        finally:
            self.model.set_adapter(STUDENT)
        return out[:, x.numel():]                                            # (futures, T)

    def absorb_round(self, x: torch.Tensor, y: torch.Tensor, round_index: int = 0) -> list[float]:
        cfg = self.config
        with torch.no_grad():                                                # teacher := current delta
            for layer in self.lora_layers.values():
                layer.lora_A[TEACHER].weight.copy_(layer.lora_A[STUDENT].weight)
                layer.lora_B[TEACHER].weight.copy_(layer.lora_B[STUDENT].weight)
        futures = [y[None]]
        if cfg.futures > 0:
            futures.append(self._sample_futures(x, round_index))
        params = self.parameters()
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        losses: list[float] = []
        for _ in range(cfg.max_steps):
            opt.zero_grad(set_to_none=True)
            loss = self._loss(x, futures)
            loss.backward()
            value = float(loss.detach())
            losses.append(value)
            if not math.isfinite(value):
                raise FloatingPointError(f"the baseline's loss became {value}")
            if value < cfg.stop_loss:
                break
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
        opt.zero_grad(set_to_none=True)
        return losses

    def absorb(self, ids, progress=None) -> BaselineReport:
        """Feeds token ids and absorbs every full window (n + m tokens), as the engine does without flush."""
        cfg = self.config
        n, m = cfg.chunk_tokens, cfg.sync_tokens
        if m == 0:
            raise ValueError("the baseline needs sync_tokens > 0 (rounds without a real Y are not implemented)")
        start = time.perf_counter()
        report = BaselineReport(tokens=len(ids))
        self.window.extend(int(t) for t in ids)
        while len(self.window) >= n + m:
            x = torch.tensor(self.window[:n], dtype=torch.long, device=self.device)
            y = torch.tensor(self.window[n:n + m], dtype=torch.long, device=self.device)
            losses = self.absorb_round(x, y, round_index=self.rounds_done)
            self.rounds_done += 1
            report.rounds += 1
            report.steps += sum(1 for v in losses if v >= cfg.stop_loss)
            report.step_losses.append(losses)
            report.round_losses.append(losses[-1])
            self.window = self.window[n:]
            if progress is not None:
                progress(n)
        report.final_loss = report.round_losses[-1] if report.round_losses else float("nan")
        report.seconds = time.perf_counter() - start
        return report

