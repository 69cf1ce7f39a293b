"""The real workload: one engine round with the engine's default objective, against the same round
written by hand with transformers + PEFT.

What a round of the default objective does (absorber_engine/teacher.py, round.py), and so what the
hand-written loop below does too:

- Y group: the teacher reads X·Y, the student reads Y; loss on Y's positions;
- probes: the teacher reads X framed as a system message of the chat template, then a seed
  instruction, then its answer. "recite" (the default, one probe) answers with X itself,
  teacher-forced; the sampled kinds ("question", "facts", ...) answer with `probe_tokens` tokens
  sampled from the teacher (a row's tokens after its end-of-turn are masked out of the loss). The
  student reads the seed and the answer after the template's own opening, without X;
- loss = hidden L1 over h^0..h^L (each layer divided by the teacher's mean |h^l|) + full-vocabulary
  KL(teacher || student) on every synchronized position + next-token cross-entropy on X;
- AdamW on the delta, K steps.

The loop is written the way a user would: a PEFT LoRA ("default") with the engine's rank, targets
and initial A/B, a frozen copy ("teacher") taken at the round's start, the teacher recomputed with
`output_hidden_states=True` at every step, full logits (`F.kl_div`, `F.cross_entropy`), one
backward, torch AdamW. Sampled probes come from `model.generate` (teacher adapter on, prompt =
framed X + seed, the engine's temperature and top-p, every probe `probe_tokens` long as the engine
writes them), once per round before the steps. The token ids of the frame are the engine's own
(probes.build_frame splits the chat template around X), so both read exactly the same sequences.

Workloads (`WORKLOADS`): "recite" (the default: Y + one recite probe + next-token loss),
"probes4" (Y + four sampled probes: question, facts, summary, use + next-token loss), "y_only"
(Y + next-token loss, no probes), and the synchronization on Y alone: "y_l1" (hidden L1 only) and
"y_l1_kl" (hidden L1 + the full-vocabulary KL). Models (`MODELS`): a random Llama (d 512, 4 layers, 8 heads,
vocab 32000; n = m = 256) and SmolLM2-135M-Instruct (its recommended config, fewer steps).

Measured, per model and workload, in one process, runs alternating (engine first on even
repetitions): absorbed tokens per second (rounds·n / wall time of the whole absorption), generated
probe tokens per second (sampled probe tokens / time spent reading X and writing the probes), and
the peak of live tensor bytes of one round (measure.peak_tensor_bytes, its own run). Plus, per
model, one decode step of probe sampling against the matmuls of that step alone, and the engine's
round broken down by phase (`profile_round`).

    python -m benchmarks.workload [--quick] [--models llama-4l,smollm2-135m] [--compile-layers] [--steps N]
                                  [--device cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from absorber_engine import AbsorberConfig, AbsorberEngine
from absorber_engine.model import DEFAULT_TARGETS
from absorber_engine.probes import FORCED_KINDS, answer_mask, build_frame, kinds_per_round

from .baseline import engine_initial_delta
from .engine_hooks import record_round_losses
from .measure import machine, mib, now, peak_cuda_bytes, peak_tensor_bytes, set_threads, summarize, versions
from .models import SPECS, token_stream

TEACHER, STUDENT = "teacher", "default"
ROOT = Path(__file__).resolve().parents[1]

WORKLOADS = {
    "recite": dict(),
    "probes4": dict(probes=4, probe_kinds=("question", "facts", "summary", "use")),
    "y_only": dict(probes=0),
    "y_l1": dict(probes=0, ntp_weight=0.0, kl_weight=0.0),
    "y_l1_kl": dict(probes=0, ntp_weight=0.0),
}
# Per model: the config the engine would use on it, and the rounds of the timed stream.
MODELS = {
    "llama-4l": dict(config=dict(chunk_tokens=256, sync_tokens=256, max_steps=4), rounds=2, reps=2),
    # m = 256 and rounds of n, as measured since the start: the recommended config's streams now cut
    # rounds at document breaks with no Y (m = 0), which leaves the Y-only workloads nothing to read.
    "smollm2-135m": dict(config=dict(chunk_tokens=512, sync_tokens=256, round_cut="", max_steps=4), rounds=1, reps=1),
}
MODELS["smollm2-135m-random"] = dict(MODELS["smollm2-135m"], reps=2)
QUICK = {"llama-4l": dict(config=dict(chunk_tokens=64, sync_tokens=64, max_steps=2, probe_tokens=16), rounds=1, reps=1)}

CHATML = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
          "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


# ---------------------------------------------------------------------------------------- models

def load_model(name: str, device: str = "cpu"):
    """(model, tokenizer), fp32 on `device`. The random Llama borrows the shipped model's
    tokenizer (its ids all lie inside the 32000-token vocabulary) with a ChatML template whose
    default system turn mirrors SmolLM2's, so probes are framed as on a chat model.
    "smollm2-135m-random" is SmolLM2's architecture and tokenizer with random weights, read from the
    files beside its converted weights in the cache (where the weights cannot travel, as to a GPU
    machine with no network): the same work per round, except that sampled probes never end early."""
    from transformers import AutoConfig, AutoTokenizer

    if name == "smollm2-135m":
        from absorber_engine.model_store import load_pretrained

        model, tok, _ = load_pretrained(name, dtype=torch.float32, device=device)
        return model.eval(), tok
    if name == "smollm2-135m-random":
        from absorber_engine.model_store import cache_root

        where = cache_root() / "models" / "smollm2-135m"
        torch.manual_seed(0)
        model = LlamaForCausalLM(AutoConfig.from_pretrained(where, local_files_only=True))
        return model.to(device).eval(), AutoTokenizer.from_pretrained(where, local_files_only=True)

    tok = AutoTokenizer.from_pretrained(ROOT / "model" / "absorber-tiny")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    spec = dict(SPECS["llama-56m"], num_hidden_layers=4)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**spec, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                         tie_word_embeddings=False)).eval()
    return model.to(device), tok


def engine_config(name: str, workload: str, quick: bool = False, **changes) -> tuple[AbsorberConfig, int]:
    """The config the engine would run on `name` (a named model's recommended one, else the
    defaults), cut to the plan's shape and steps, with the workload's probes."""
    from absorber_engine.model_store import NAMED_MODELS

    named = name.removesuffix("-random")
    base = AbsorberConfig.from_dict(NAMED_MODELS[named].config) if named in NAMED_MODELS else AbsorberConfig()
    plan = (QUICK if quick else MODELS)[name]
    cfg = base.replace(**{**plan["config"], **WORKLOADS[workload], "seed": 0, **changes})
    return cfg, plan["rounds"]


# ---------------------------------------------------------------------------------------- the loop

class HandWrittenLoop:
    """The engine's default objective with transformers + PEFT, recomputing the teacher every step
    with full logits (the issue's loop). `lean`: the teacher's states computed once a round (its
    adapter is frozen for the round) and the LM head run only where a loss reads logits, as a
    careful user would write it: a stronger baseline, reported beside."""

    def __init__(self, model, tokenizer, cfg: AbsorberConfig, init: dict[str, torch.Tensor], lean: bool = False):
        self.cfg, self.tokenizer, self.lean = cfg, tokenizer, lean
        self._teachers = None
        targets = list(cfg.targets if cfg.targets is not None else DEFAULT_TARGETS[model.config.model_type])
        model.requires_grad_(False)
        lora = dict(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank, target_modules=targets,
                    lora_dropout=0.0, bias="none")
        self.device = model.get_output_embeddings().weight.device
        self.model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        self.model.add_adapter(TEACHER, LoraConfig(task_type="CAUSAL_LM", **lora))
        self.inner = self.model.base_model.model
        self.lora_layers = {}
        with torch.no_grad():
            for name in sorted({k.rsplit(".", 1)[0] for k in init}):
                layer = self.inner.get_submodule(name)
                # engine: A (in, r), B (r, out); PEFT: lora_A.weight (r, in), lora_B.weight (out, r)
                layer.lora_A[STUDENT].weight.copy_(init[f"{name}.A"].t())
                layer.lora_B[STUDENT].weight.copy_(init[f"{name}.B"].t())
                self.lora_layers[name] = layer
        self.model.set_adapter(STUDENT)
        # A sequence starts with BOS when the tokenizer puts one in front of what it encodes.
        bos = model.config.bos_token_id
        self.prefix = [bos] if cfg.prefix_bos and tokenizer("a")["input_ids"][:1] == [bos] else []
        self.frame = build_frame(tokenizer, cfg.probe_kinds, cfg.chat_probes) if cfg.probes else None
        self.probe_seconds = 0.0
        self.probe_tokens = 0
        self.recite = None                 # (group, where X starts in it) of this round's recite probe

    def _t(self, ids) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def parameters(self):
        return [p for layer in self.lora_layers.values()
                for p in (layer.lora_A[STUDENT].weight, layer.lora_B[STUDENT].weight)]

    def _states(self, ids: list[int] | torch.Tensor, t: int, logits: bool = True):
        """Forward of the active adapter: (h^0..h^L, logits) at the last t positions, (b, t, D) / (b, t, V)
        (logits None without `logits` in a lean loop: the decoder alone, no head).
        transformers' last hidden state is after the final norm; h^L is taken before it."""
        ids = torch.as_tensor(ids, device=self.device)
        ids = ids[None] if ids.dim() == 1 else ids
        seen = {}
        hook = self.inner.model.norm.register_forward_pre_hook(lambda mod, args: seen.__setitem__("h", args[0]))
        try:
            if self.lean and not logits:
                out = self.inner.model(input_ids=ids, output_hidden_states=True, use_cache=False)
            else:
                out = self.model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=t)
        finally:
            hook.remove()
        hidden = [h[:, -t:] for h in list(out.hidden_states[:-1]) + [seen["h"]]]
        return hidden, getattr(out, "logits", None)

    def _probes(self, x: list[int], round_index: int) -> list[tuple[list, list, torch.Tensor]]:
        """(teacher ids, student ids (rows, t) tail, mask (rows, t)) of each probe kind."""
        f, cfg = self.frame, self.cfg
        context = self.prefix + f.context_open + x + f.context_close
        out = []
        self.recite = None
        sampled_kinds = []
        for kind, count in kinds_per_round(cfg.probe_kinds, cfg.probes):
            seed = f.seeds[kind]
            if kind in FORCED_KINDS:
                answer = self._t([seed + x + f.stop[:1]])                                      # (1, t)
                self.recite = (len(out), len(seed))       # which probe, and where X starts in it
                out.append((answer, torch.ones_like(answer, dtype=torch.bool)))
            else:
                sampled_kinds.append((len(out), seed, count))
                out.append(None)
        if sampled_kinds:
            # Every kind's rows in one generate() call, prompts left-padded, as a user batches them
            # (one call per kind decoded each kind's rows apart: half the loop's probe speed).
            rows = [context + seed for _, seed, count in sampled_kinds for _ in range(count)]
            width = max(len(r) for r in rows)
            prompt = self._t([[0] * (width - len(r)) + r for r in rows])
            mask = self._t([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            torch.manual_seed(cfg.seed * 1_000_003 + round_index)
            gen = GenerationConfig(do_sample=True, temperature=cfg.probe_temperature, top_p=cfg.probe_top_p, top_k=0,
                                   max_new_tokens=cfg.probe_tokens, eos_token_id=f.stop or None,
                                   pad_token_id=0)                       # all rows ended: stop, as the engine
            start = now(self.device)
            self.model.set_adapter(TEACHER, inference_mode=True)
            try:
                sampled = self.model.generate(input_ids=prompt, attention_mask=mask,
                                              generation_config=gen)[:, width:]   # (rows, probe_tokens at most)
            finally:
                self.model.set_adapter(STUDENT)
            self.probe_seconds += now(self.device) - start
            self.probe_tokens += len(rows) * cfg.probe_tokens   # as the engine counts them: rows x the most tokens
            row = 0
            for at, seed, count in sampled_kinds:
                answer = torch.cat([self._t(seed).expand(count, -1), sampled[row:row + count]], dim=1)
                out[at] = (answer, answer_mask(answer, len(seed), f.stop))
                row += count
        return [(torch.cat([self._t(context).expand(a.shape[0], -1), a], dim=1),
                 torch.cat([self._t(self.prefix + f.student_open).expand(a.shape[0], -1), a], dim=1), m)
                for a, m in out]

    def loss(self, x: list[int], groups) -> torch.Tensor:
        """The round's loss under the current delta, the teacher recomputed for every group."""
        cfg = self.cfg
        # ntp_in_recite: the next-token loss on X is read off the recite probe's student pass.
        in_recite = cfg.ntp_in_recite and self.recite is not None
        teachers = self._teachers or []
        if not teachers:
            self.model.set_adapter(TEACHER, inference_mode=True)
            try:
                with torch.no_grad():
                    for t_ids, s_ids, mask in groups:
                        teachers.append(self._states(t_ids, mask.shape[1], logits=cfg.kl_weight > 0))
            finally:
                self.model.set_adapter(STUDENT)
            if self.lean:
                self._teachers = teachers
        positions = sum(int(m.sum()) for _, _, m in groups)
        L1 = len(teachers[0][0])
        D = teachers[0][0][0].shape[-1]
        # Each layer's L1 divided by the teacher's mean |h^l| over the synchronized positions.
        scale = [positions * D / sum(float((h[l] * m[..., None]).abs().sum()) for (h, _), (_, _, m) in zip(teachers, groups))
                 for l in range(L1)]
        loss = torch.zeros((), device=self.device)
        for g, ((t_hidden, t_logits), (_, s_ids, mask)) in enumerate(zip(teachers, groups)):
            ce_here = in_recite and g == self.recite[0] and cfg.ntp_weight > 0
            s_hidden, s_logits = self._states(s_ids, mask.shape[1], logits=cfg.kl_weight > 0 or ce_here)
            if ce_here:
                at = self.recite[1]
                ce = F.cross_entropy(s_logits[0, at - 1:at - 1 + len(x)].float(), self._t(x))
                loss = loss + cfg.ntp_weight * ce
            if cfg.hidden_weight > 0:
                keep = mask[..., None]
                l1 = sum(((s - t) * keep).abs().sum() * c for s, t, c in zip(s_hidden, t_hidden, scale))
                loss = loss + cfg.hidden_weight * l1 / (positions * L1 * D)
            if cfg.kl_weight > 0:
                T = cfg.kl_temperature
                log_pt = F.log_softmax(t_logits[mask].float() / T, dim=-1)
                log_ps = F.log_softmax(s_logits[mask].float() / T, dim=-1)
                kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="sum")
                loss = loss + cfg.kl_weight * T * T * kl / positions
        if cfg.ntp_weight > 0 and not in_recite:
            ids = self._t([self.prefix + x])
            logits = self.model(input_ids=ids[:, :-1], use_cache=False).logits
            loss = loss + cfg.ntp_weight * F.cross_entropy(logits[0].float(), ids[0, 1:])
        return loss

    def absorb_round(self, x: list[int], y: list[int], round_index: int) -> list[float]:
        cfg = self.cfg
        self._teachers = None
        with torch.no_grad():
            for layer in self.lora_layers.values():
                layer.lora_A[TEACHER].weight.copy_(layer.lora_A[STUDENT].weight)
                layer.lora_B[TEACHER].weight.copy_(layer.lora_B[STUDENT].weight)
        groups = []
        if y:
            yt = self._t([y])
            groups.append((self.prefix + x + y, self.prefix + y, torch.ones_like(yt, dtype=torch.bool)))
        self.recite = None
        if self.frame is not None:
            first = len(groups)
            groups += self._probes(x, round_index)
            if self.recite is not None:
                self.recite = (first + self.recite[0], self.recite[1])
        params = self.parameters()
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        losses = []
        for _ in range(cfg.max_steps):
            opt.zero_grad(set_to_none=True)
            loss = self.loss(x, groups)
            loss.backward()
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]) or losses[-1] < cfg.stop_loss:
                break
            opt.step()
        opt.zero_grad(set_to_none=True)
        return losses

    def absorb(self, stream: list[int]) -> dict:
        """Every full window of n + m tokens, sliding by n, as the engine does without flush."""
        n, m = self.cfg.chunk_tokens, self.cfg.sync_tokens
        start, rounds, step_losses = now(self.device), 0, []
        while len(stream) - rounds * n >= n + m:
            w = stream[rounds * n:rounds * n + n + m]
            step_losses.append(self.absorb_round(w[:n], w[n:], rounds))
            rounds += 1
        return dict(seconds=now(self.device) - start, rounds=rounds, absorbed=rounds * n, step_losses=step_losses,
                    probe_seconds=self.probe_seconds, probe_tokens=self.probe_tokens)


# ---------------------------------------------------------------------------------------- the engine, timed

@contextlib.contextmanager
def _timed_self_study(record: dict):
    """Time the engine spends reading X in the probes' frame and writing the probes."""
    from absorber_engine import teacher

    real = teacher._self_study

    def timed(runner, batch, cfg, need_final):
        start = now(runner.device)
        out = real(runner, batch, cfg, need_final)
        record["seconds"] += now(runner.device) - start
        sampled = sum(c for k, c in kinds_per_round(cfg.probe_kinds, cfg.probes) if k not in FORCED_KINDS)
        record["tokens"] += batch.streams * sampled * cfg.probe_tokens
        return out

    teacher._self_study = timed
    try:
        yield record
    finally:
        teacher._self_study = real


def run_engine(model, tok, cfg: AbsorberConfig, stream: list[int]) -> dict:
    engine = AbsorberEngine(model, tokenizer=tok, config=cfg)
    with record_round_losses() as losses, _timed_self_study(dict(seconds=0.0, tokens=0)) as probes:
        start = now(engine.runner.device)
        rep = engine.absorb(stream)
        seconds = now(engine.runner.device) - start
    engine.close()
    return dict(seconds=seconds, rounds=rep.rounds, absorbed=rep.absorbed_tokens, step_losses=losses,
                probe_seconds=probes["seconds"], probe_tokens=probes["tokens"])


def run_loop(model, tok, cfg: AbsorberConfig, stream: list[int], lean: bool = False) -> dict:
    loop = HandWrittenLoop(model, tok, cfg, engine_initial_delta(model, cfg), lean=lean)
    # On a GPU a user runs the loop under bf16 autocast (LOOP_DTYPE); fp32 is the CPU's usual choice.
    dtype = LOOP_DTYPE[loop.device.type]
    with torch.autocast(loop.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return loop.absorb(stream)


def run_loop_lean(model, tok, cfg: AbsorberConfig, stream: list[int]) -> dict:
    return run_loop(model, tok, cfg, stream, lean=True)


def run_engine_compiled(model, tok, cfg: AbsorberConfig, stream: list[int]) -> dict:
    return run_engine(model, tok, cfg.replace(compile_layers=True), stream)


def run_engine_torch(model, tok, cfg: AbsorberConfig, stream: list[int]) -> dict:
    return run_engine(model, tok, cfg.replace(backend="torch"), stream)


def run_engine_cuda_graphs(model, tok, cfg: AbsorberConfig, stream: list[int]) -> dict:
    return run_engine(model, tok, cfg.replace(cuda_graphs=True), stream)


LOOP_DTYPE = {"cpu": None, "cuda": torch.bfloat16}
RUNNERS = {"engine": run_engine, "loop": run_loop, "loop_lean": run_loop_lean, "engine_compiled": run_engine_compiled,
           "engine_torch": run_engine_torch, "engine_cuda_graphs": run_engine_cuda_graphs}


def _warm(model, engine_dtype: str) -> None:
    """One forward and backward in fp32 (the loop's) and in the engine's autocast dtype, so neither
    implementation's first timed run pays the one-off creation of its matmul kernels."""
    dev = model.get_output_embeddings().weight.device
    for dtype in sorted({"float32", engine_dtype}):
        with torch.enable_grad(), torch.autocast(dev.type, dtype=getattr(torch, dtype), enabled=dtype != "float32"):
            emb = model.get_input_embeddings()(torch.arange(3, 35, device=dev)[None]).detach().requires_grad_(True)
            model.model(inputs_embeds=emb).last_hidden_state.float().sum().backward()


def compare(name: str, workload: str, reps: int, quick: bool = False, memory: bool = True,
            model_and_tok=None, log=print, compiled: bool = False, steps: int | None = None,
            torch_backend: bool = False, cuda_graphs: bool = False, lean_loop: bool = False) -> dict:
    """Engine (its config for the model) vs the loop (the same config, fp32 as a user runs it on a
    CPU, bf16 autocast on a GPU); with `compiled`, the engine with compile_layers too, after one
    untimed run that compiles; with `torch_backend`, the engine on backend "torch" too (on a GPU:
    cuBLAS and SDPA in place of the Triton kernels); with `cuda_graphs`, the engine with cuda_graphs
    on too (on a GPU: decode steps replayed as a CUDA graph); `steps` per round instead of the plan's. On a GPU
    every implementation runs once untimed first (Triton's JIT, cuBLAS handles, the allocator)."""
    model, tok = model_and_tok or load_model(name)
    device = model.get_output_embeddings().weight.device
    cfg, rounds = engine_config(name, workload, quick, **({"max_steps": steps} if steps else {}))
    stream = token_stream(rounds * cfg.chunk_tokens + cfg.sync_tokens, min(model.config.vocab_size, 32000), seed=1)
    _warm(model, _engine_dtype(cfg, device))
    impls = ["engine", "loop"] + (["loop_lean"] if lean_loop else []) + (["engine_compiled"] if compiled else []) + (["engine_torch"] if torch_backend else []) \
        + (["engine_cuda_graphs"] if cuda_graphs else [])
    runs = {impl: [] for impl in impls}
    warmup = None
    if device.type == "cuda":
        for impl in impls:
            work = copy.deepcopy(model)
            log(f"  {name} {workload} {impl} warm-up: {RUNNERS[impl](work, tok, cfg, stream)['seconds']:.1f}s")
            del work
    if compiled:
        work = copy.deepcopy(model)
        warmup = RUNNERS["engine_compiled"](work, tok, cfg, stream)["seconds"]
        del work
        log(f"  {name} {workload} engine_compiled warm-up (compiles): {warmup:.1f}s")
    for rep in range(reps):
        for impl in impls[rep % len(impls):] + impls[:rep % len(impls)]:
            work = copy.deepcopy(model)
            runs[impl].append(RUNNERS[impl](work, tok, cfg, stream))
            del work
            gc.collect()
            log(f"  {name} {workload} rep {rep} {impl}: {runs[impl][-1]['seconds']:.1f}s")
    tokens = rounds * cfg.chunk_tokens
    out = dict(model=name, workload=workload, conditions=dict(
        n=cfg.chunk_tokens, m=cfg.sync_tokens, rank=cfg.rank, steps_per_round=cfg.max_steps, rounds=rounds,
        probes=cfg.probes, probe_kinds=list(cfg.probe_kinds) if cfg.probes else [], probe_tokens=cfg.probe_tokens,
        hidden_norm=cfg.hidden_norm, kl_weight=cfg.kl_weight, ntp_weight=cfg.ntp_weight, lr=cfg.lr, reps=reps,
        engine_compute_dtype=_engine_dtype(cfg, device), device=str(device),
        loop_dtype=str(LOOP_DTYPE[device.type] or torch.float32).replace("torch.", ""), threads=torch.get_num_threads()))
    for impl, rs in runs.items():
        secs = summarize([r["seconds"] for r in rs])
        assert all(r["absorbed"] == tokens for r in rs), f"{impl} absorbed {[r['absorbed'] for r in rs]}, not {tokens}"
        probe = [r["probe_tokens"] / r["probe_seconds"] for r in rs if r["probe_tokens"]]
        out[impl] = dict(seconds=secs, tokens_per_s=tokens / secs["median"],
                         probe_tokens=rs[0]["probe_tokens"], probe_seconds=[r["probe_seconds"] for r in rs],
                         probe_tokens_per_s=sorted(probe)[len(probe) // 2] if probe else None,
                         first_loss=rs[0]["step_losses"][0][0], step_losses=rs[0]["step_losses"])
    out["throughput_ratio"] = out["loop"]["seconds"]["median"] / out["engine"]["seconds"]["median"]
    if compiled:
        out["engine_compiled"]["warmup_seconds"] = warmup
        out["compiled_ratio"] = out["loop"]["seconds"]["median"] / out["engine_compiled"]["seconds"]["median"]
        out["compile_speedup"] = out["engine"]["seconds"]["median"] / out["engine_compiled"]["seconds"]["median"]
    if lean_loop:
        out["lean_loop_ratio"] = out["loop_lean"]["seconds"]["median"] / out["engine"]["seconds"]["median"]
    if torch_backend:
        out["torch_backend_ratio"] = out["loop"]["seconds"]["median"] / out["engine_torch"]["seconds"]["median"]
    if cuda_graphs:
        out["cuda_graphs_ratio"] = out["loop"]["seconds"]["median"] / out["engine_cuda_graphs"]["seconds"]["median"]
    out["per_rep_ratio"] = [b["seconds"] / e["seconds"] for e, b in zip(runs["engine"], runs["loop"])]
    if out["loop"]["probe_tokens_per_s"]:
        out["probe_ratio"] = out["engine"]["probe_tokens_per_s"] / out["loop"]["probe_tokens_per_s"]
    e0, l0 = out["engine"]["first_loss"], out["loop"]["first_loss"]
    out["first_loss_gap_rel"] = abs(e0 - l0) / max(abs(l0), 1e-12)
    if memory:
        one = cfg.replace(max_steps=1)
        one_stream = stream[:cfg.chunk_tokens + cfg.sync_tokens]
        for impl in ("engine", "loop") + (("loop_lean",) if lean_loop else ()):
            work = copy.deepcopy(model)
            gc.collect()
            run_one = lambda: RUNNERS[impl](work, tok, one, one_stream)  # noqa: E731
            peak, _ = peak_cuda_bytes(run_one, device) if device.type == "cuda" else peak_tensor_bytes(run_one)
            out[impl]["peak_tensor_bytes"] = peak
            del work
            gc.collect()
        out["memory_ratio"] = out["engine"]["peak_tensor_bytes"] / max(out["loop"]["peak_tensor_bytes"], 1)
    return out


def _engine_dtype(cfg, device: torch.device = torch.device("cpu")) -> str:
    from absorber_engine.model import resolve_compute_dtype

    d = resolve_compute_dtype(cfg.compute_dtype, device, torch.float32)
    return "float32" if d is None else str(d).replace("torch.", "")


# ---------------------------------------------------------------------------------------- decode step

def decode_step(name: str, rows: int = 4, steps: int = 32, model_and_tok=None) -> dict:
    """One batched decode step of probe sampling as the engine runs it ("engine": the round's
    dtype, on the weights static_decode.decode_weights gives the steps: bf16 copies, reordered for
    oneDNN on a CPU), the same static-cache step in the model's own dtype on plain weights
    ("static": residual capture, the LM head; on a GPU replayed as a CUDA graph, which the engine
    does with cuda_graphs on), the same step over a growing DynamicCache (what the engine ran
    before), and the matmuls of each alone, back to back on tensors prepared beforehand: every
    linear at `rows` tokens (base weight, plus x·A·B on the targets where the step does not merge
    the delta into reordered weights), the attention over the cached context (torch's sdpa), and the LM head."""
    from absorber_engine.sampling import sample_next
    from absorber_engine.hf_cache import cache_tensors
    from absorber_engine.static_decode import StaticDecoder, decode_weights
    from absorber_kernels import packed_linear

    model, tok = model_and_tok or load_model(name)
    cfg, _ = engine_config(name, "probes4")
    engine = AbsorberEngine(copy.deepcopy(model), tokenizer=tok, config=cfg)
    runner = engine.runner
    dev = runner.device
    ctx = torch.tensor([engine.frame.context_open + token_stream(cfg.chunk_tokens, 2000, 3) + engine.frame.context_close],
                       device=dev)
    # The median of 32 steps after two of warm-up: of 8, it moved by 5-10% from one run to the next.
    median = lambda ts: sorted(ts[2:])[len(ts[2:]) // 2]          # noqa: E731
    out = dict(model=name, rows=rows, context=ctx.shape[1])
    with torch.no_grad():
        with runner.autocast():                                    # X is read as a round reads it
            runner.bind([engine.delta])
            final, cache = runner.forward(ctx, use_cache=True)
            kv = cache_tensors(cache)
        first = runner.logits(final[:, -1]).repeat(rows, 1)
        runner.bind([engine.delta], rows)
        fused = False                                              # did the engine's steps run decode_layers?
        for how in ("static", "growing", "engine"):
            gen = torch.Generator(device=dev).manual_seed(0)
            logits, times = first, []
            weights = contextlib.ExitStack()
            if how == "engine":
                weights.enter_context(runner.autocast())
                weights.enter_context(decode_weights(runner, rows))
            with weights, runner.sdpa_attention(how != "growing"):
                if how != "growing":
                    dec = StaticDecoder(runner, [(k.repeat(rows, 1, 1, 1), v.repeat(rows, 1, 1, 1)) for k, v in kv],
                                        steps + 2, None, torch.full((rows, 1), ctx.shape[1], device=dev),
                                        graphs=dev.type == "cuda")
                else:
                    grow = runner.make_cache(kv, repeat=rows)
                if how == "engine":
                    fused = dec.fused is not None
                for _ in range(steps + 2):
                    t0 = now(dev)
                    tok_ = sample_next(logits, 1.0, 1.0, gen)
                    if how != "growing":
                        logits = dec.step(tok_)
                    else:
                        with runner.capture():
                            final, grow = runner.forward(tok_[:, None], grow, use_cache=True)
                        logits = runner.logits(final[:, -1])
                    times.append(now(dev) - t0)
            out[f"{how}_ms"] = 1e3 * median(times)
    mm = _matmul_time(runner, engine.delta, rows, ctx.shape[1] + steps // 2, runner.dtype)
    with runner.autocast():
        decode_dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else runner.dtype
    pack = dev.type == "cpu" and packed_linear.supported(decode_dtype)
    span = ctx.shape[1] + steps // 2
    mm_engine = _matmul_time(runner, engine.delta, rows, span, decode_dtype, packed=pack, fused=fused)
    mm_apart = _matmul_time(runner, engine.delta, rows, span, decode_dtype, packed=pack) if fused else mm_engine
    engine.close()
    out.update(matmul_ms=1e3 * mm, ratio=out["static_ms"] / (1e3 * mm), growing_ratio=out["growing_ms"] / (1e3 * mm),
               engine_dtype=str(decode_dtype).removeprefix("torch."), engine_packed=pack, engine_fused=fused,
               engine_matmul_ms=1e3 * mm_engine, engine_ratio=out["engine_ms"] / (1e3 * mm_engine),
               engine_matmul_apart_ms=1e3 * mm_apart, engine_ratio_apart=out["engine_ms"] / (1e3 * mm_apart),
               graphs=dev.type == "cuda")
    return out


def _matmul_time(runner, delta, rows: int, context: int, dtype, reps: int = 20, packed: bool = False,
                 fused: bool = False) -> float:
    """The step's matmuls alone, back to back; with `packed`, the linears' products on weights
    reordered for oneDNN with the delta merged in (no x·A·B), as the engine's steps compute them
    on a CPU with one delta bound (static_decode.decode_weights); with `fused` moreover q·k·v and
    gate·up of a layer as one product each, as decode_layers computes them."""
    from absorber_kernels.packed_linear import Packed

    model = runner.model
    cfgm = model.config
    heads = cfgm.num_attention_heads
    head_dim = getattr(cfgm, "head_dim", None) or cfgm.hidden_size // heads
    work = []
    dev = runner.device
    randn = lambda *shape: torch.randn(*shape, dtype=dtype, device=dev)  # noqa: E731
    inside = {name + ".base" for name in runner.wrappers}         # a wrapper's frozen linear: counted with it
    groups: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if name in inside:
            continue
        lin = module.base if name in runner.wrappers else module
        if not isinstance(lin, torch.nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        if fused and leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            groups.setdefault(parent + (".qkv" if leaf[0] in "qkv" else ".gate_up"), []).append(lin.weight.detach())
            continue
        x = randn(rows, lin.weight.shape[1])
        if packed:
            work.append(functools.partial(Packed(lin.weight, dtype, rows), x, None))
        else:
            work.append(functools.partial(torch.matmul, x, lin.weight.detach().to(dtype).t()))
        if name in runner.wrappers and not packed:
            a, b = delta.A[name].detach().to(dtype), delta.B[name].detach().to(dtype)
            work.append(functools.partial(torch.matmul, randn(rows, a.shape[0]), a))
            work.append(functools.partial(torch.matmul, randn(rows, a.shape[1]), b))
    for weights in groups.values():
        work.append(functools.partial(Packed(torch.cat(weights), dtype, rows), randn(rows, weights[0].shape[1]), None))
    for _ in range(len(runner.layers)):
        # q·Kᵀ and p·V over the cache as torch's fused attention computes them, the faster floor
        # (two bf16 matmuls took 0.19 ms a layer where sdpa took 0.08, a second reader measured)
        q = randn(rows, heads, 1, head_dim)
        k, v = randn(rows, heads, context, head_dim), randn(rows, heads, context, head_dim)
        work.append(functools.partial(F.scaled_dot_product_attention, q, k, v))
    best = float("inf")
    with torch.no_grad():
        for _ in range(reps):
            t0 = now(dev)
            for product in work:
                product()
            best = min(best, now(dev) - t0)
    return best


# ---------------------------------------------------------------------------------------- profile

class PhaseTimer:
    """Exclusive wall time per phase: a phase nested in another is subtracted from its parent."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.stack: list[list] = []

    @contextlib.contextmanager
    def phase(self, label: str):
        self.stack.append([label, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            lab, start, inner = self.stack.pop()
            spent = time.perf_counter() - start
            self.total[lab] = self.total.get(lab, 0.0) + spent - inner
            self.calls[lab] = self.calls.get(lab, 0) + 1
            if self.stack:
                self.stack[-1][2] += spent

    def inside(self, label: str) -> bool:
        return any(f[0] == label for f in self.stack)


def profile_round(name: str = "smollm2-135m", workload: str = "recite", steps: int = 4, model_and_tok=None) -> dict:
    """One engine round (the model's config, `steps` steps) split into phases by wrapping the round's
    functions from outside: teacher over X·Y, probes (teacher reads X in the frame and writes or
    re-reads the probe), student forward / sync loss (hidden L1 + KL, whose gradient the CPU path
    computes in its forward) / backward, next-token loss forward / logits + CE / backward, AdamW,
    and what is left (the engine's own Python: binding, bookkeeping, checks)."""
    from absorber_engine import model as model_mod
    from absorber_engine import round as round_mod
    from absorber_engine import teacher as teacher_mod

    model, tok = model_and_tok or load_model(name)
    cfg, _ = engine_config(name, workload, max_steps=steps)
    stream = token_stream(cfg.chunk_tokens + cfg.sync_tokens, min(model.config.vocab_size, 32000), seed=1)
    timer = PhaseTimer()
    patches = []

    def wrap(owner, attr, label_fn):
        real = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            label = label_fn()
            if label is None:
                return real(*args, **kwargs)
            with timer.phase(label):
                return real(*args, **kwargs)

        patches.append((owner, attr, real))
        setattr(owner, attr, wrapped)

    def student_or_ntp(kind):
        # The teacher's forwards stay in their own phases.
        return lambda: (f"next-token loss: {kind}" if timer.inside("next-token loss: logits + CE")
                        else None if timer.inside("teacher: X·Y forward") or timer.inside("probes: teacher")
                        else f"student: {kind}")

    wrap(teacher_mod, "_y_and_futures", lambda: "teacher: X·Y forward")
    wrap(teacher_mod, "_self_study", lambda: "probes: teacher")
    wrap(teacher_mod, "_normalize_layers", lambda: "teacher: layer normalization")
    wrap(round_mod, "_sync_loss", lambda: "student: sync loss (L1 + KL + the recite probe's CE, grads included)")
    wrap(round_mod, "next_token_losses", lambda: "next-token loss: logits + CE")
    wrap(model_mod.ModelRunner, "forward", student_or_ntp("forward"))
    wrap(torch.Tensor, "backward", student_or_ntp("backward"))
    wrap(torch.optim.AdamW, "step", lambda: "AdamW step")
    engine = AbsorberEngine(copy.deepcopy(model), tokenizer=tok, config=cfg)
    real_batch = engine._run_batch

    def whole():
        with timer.phase("engine Python (binding, bookkeeping, checks)"):
            return real_batch()

    engine._run_batch = whole
    try:
        rep = engine.absorb(stream)
    finally:
        for owner, attr, real in reversed(patches):
            setattr(owner, attr, real)
    engine.close()
    total = sum(timer.total.values())
    rows = sorted(({"phase": k, "seconds": v, "share": v / total, "calls": timer.calls[k]}
                   for k, v in timer.total.items()), key=lambda r: -r["seconds"])
    return dict(model=name, workload=workload, steps=rep.steps, round_seconds=total, absorb_seconds=rep.seconds,
                compute_dtype=_engine_dtype(cfg), threads=torch.get_num_threads(), phases=rows)


# ---------------------------------------------------------------------------------------- report

def table(results: list[dict]) -> str:
    lines = ["| model | workload | engine tok/s | loop tok/s | ratio | engine probe tok/s | loop probe tok/s | "
             "peak MiB (engine / loop) | memory ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        e, lp = r["engine"], r["loop"]
        probe = lambda v: f"{v:.1f}" if v else "—"   # noqa: E731
        mem = (f"{e['peak_tensor_bytes'] / 2**20:.0f} / {lp['peak_tensor_bytes'] / 2**20:.0f}"
               if "peak_tensor_bytes" in e else "—")
        lines.append(f"| {r['model']} | {r['workload']} | {e['tokens_per_s']:.1f} | {lp['tokens_per_s']:.1f} | "
                     f"**{r['throughput_ratio']:.2f}×** | {probe(e['probe_tokens_per_s'])} | "
                     f"{probe(lp['probe_tokens_per_s'])} | {mem} | {r.get('memory_ratio', float('nan')):.2f} |")
    torch_b = [r for r in results if "engine_torch" in r]
    if torch_b:
        lines += ["", "| model | workload | engine (Triton) tok/s | engine, backend torch tok/s | loop tok/s | "
                  "ratio to the loop, backend torch |", "|---|---|---|---|---|---|"]
        for r in torch_b:
            lines.append(f"| {r['model']} | {r['workload']} | {r['engine']['tokens_per_s']:.1f} | "
                         f"{r['engine_torch']['tokens_per_s']:.1f} | {r['loop']['tokens_per_s']:.1f} | "
                         f"**{r['torch_backend_ratio']:.2f}×** |")
    graphed = [r for r in results if "engine_cuda_graphs" in r]
    if graphed:
        lines += ["", "| model | workload | engine tok/s | probe tok/s | cuda_graphs on: tok/s | probe tok/s | "
                  "loop tok/s | ratio to the loop, graphs on |", "|---|---|---|---|---|---|---|---|"]
        for r in graphed:
            e, o = r["engine"], r["engine_cuda_graphs"]
            probe = lambda v: f"{v:.1f}" if v else "—"   # noqa: E731
            lines.append(f"| {r['model']} | {r['workload']} | {e['tokens_per_s']:.1f} | {probe(e['probe_tokens_per_s'])} | "
                         f"{o['tokens_per_s']:.1f} | {probe(o['probe_tokens_per_s'])} | {r['loop']['tokens_per_s']:.1f} | "
                         f"**{r['cuda_graphs_ratio']:.2f}×** |")
    lean = [r for r in results if "loop_lean" in r]
    if lean:
        lines += ["", "The lean loop (the teacher's states once a round, the LM head only where a loss reads logits):", "",
                  "| model | workload | engine tok/s | lean loop tok/s | ratio to the lean loop | peak MiB (lean loop) | "
                  "memory ratio |", "|---|---|---|---|---|---|---|"]
        for r in lean:
            peak = r["loop_lean"].get("peak_tensor_bytes")
            mem = f"{mib(peak):.0f}" if peak else "—"
            ratio = f"{r['engine']['peak_tensor_bytes'] / peak:.2f}" if peak else "—"
            lines.append(f"| {r['model']} | {r['workload']} | {r['engine']['tokens_per_s']:.1f} | "
                         f"{r['loop_lean']['tokens_per_s']:.1f} | **{r['lean_loop_ratio']:.2f}×** | {mem} | {ratio} |")
    compiled = [r for r in results if "engine_compiled" in r]
    if compiled:
        lines += ["", "| model | workload | engine tok/s | engine, compile_layers tok/s | speed-up | loop tok/s | "
                  "ratio to the loop, compiled | compiling run s |", "|---|---|---|---|---|---|---|---|"]
        for r in compiled:
            c = r["engine_compiled"]
            lines.append(f"| {r['model']} | {r['workload']} | {r['engine']['tokens_per_s']:.1f} | "
                         f"{c['tokens_per_s']:.1f} | {r['compile_speedup']:.2f}× | {r['loop']['tokens_per_s']:.1f} | "
                         f"**{r['compiled_ratio']:.2f}×** | {c['warmup_seconds']:.1f} |")
    return "\n".join(lines)


def run(models: list[str], quick: bool, reps: int | None, out_dir: Path | None, memory: bool = True,
        profile: bool = True, log=print, workloads: list[str] | None = None, compiled: bool = False,
        steps: int | None = None, device: str = "cpu", torch_backend: bool = False, cuda_graphs: bool = False,
        lean_loop: bool = False) -> dict:
    started = time.strftime("%Y-%m-%d %H:%M")
    results, decodes, profiles = [], [], []
    for name in models:
        loaded = load_model(name, device)
        for workload in WORKLOADS if workloads is None else workloads:
            plan = (QUICK if quick else MODELS)[name]
            results.append(compare(name, workload, reps or plan["reps"], quick=quick, memory=memory,
                                   model_and_tok=loaded, log=log, compiled=compiled, steps=steps,
                                   torch_backend=torch_backend, cuda_graphs=cuda_graphs, lean_loop=lean_loop))
            if out_dir is not None:
                _write(out_dir, started, results, decodes, profiles)
        if profile and not quick:
            decodes.append(decode_step(name, model_and_tok=loaded))
            log(f"  {name} decode: {decodes[-1]}")
        if profile and not quick and name == "smollm2-135m" and device == "cpu":   # host timers: CPU only
            profiles.append(profile_round(name, model_and_tok=loaded))
        if out_dir is not None:
            _write(out_dir, started, results, decodes, profiles)
        del loaded
        gc.collect()
    return _write(out_dir, started, results, decodes, profiles) if out_dir is not None else \
        dict(results=results, decode=decodes, profiles=profiles)


def _write(out_dir: Path, started: str, results, decodes, profiles) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = dict(started=started, machine=machine(), versions=versions(), results=results, decode=decodes,
               profiles=profiles)
    (out_dir / "workload.json").write_text(json.dumps(doc, indent=1))
    (out_dir / "TABLE.md").write_text(table(results) + "\n")
    return doc


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama-4l,smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="the random Llama only, small rounds")
    ap.add_argument("--reps", type=int, help="repetitions per implementation (default: the model's plan)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"a subset of {', '.join(WORKLOADS)}; none: the decode step and the round's profile only")
    ap.add_argument("--no-profile", action="store_true", help="skip the decode step and the round's profile")
    ap.add_argument("--compile-layers", action="store_true",
                    help="also time the engine with compile_layers (after one untimed run that compiles)")
    ap.add_argument("--steps", type=int, help="AdamW steps per round (default: the model's plan, 4; the library's "
                    "and SmolLM2's recommended config take 32)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the loop then runs under bf16 autocast)")
    ap.add_argument("--torch-backend", action="store_true", help="also time the engine on backend 'torch'")
    ap.add_argument("--cuda-graphs", action="store_true", help="also time the engine with cuda_graphs on")
    ap.add_argument("--lean-loop", action="store_true", help="also time a lean loop: the teacher once a round, "
                    "the LM head only where a loss reads logits")
    ap.add_argument("--out", help="results folder (default benchmarks/results/workload; --quick: "
                    "runs/workload-quick, which git ignores)")
    args = ap.parse_args(argv)
    unknown = set(args.workloads.split(",")) - set(WORKLOADS) - {"none"}
    if unknown:
        ap.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    set_threads()
    models = ["llama-4l"] if args.quick else args.models.split(",")
    here = Path(__file__).parent
    out = Path(args.out) if args.out else here.parent / "runs" / "workload-quick" if args.quick else here / "results" / "workload"
    doc = run(models, args.quick, args.reps, out, memory=not args.no_memory, profile=not args.no_profile,
              log=lambda s: print(s, file=sys.stderr, flush=True),
              workloads=[] if args.workloads == "none" else args.workloads.split(","),
              compiled=args.compile_layers, steps=args.steps, device=args.device, torch_backend=args.torch_backend,
              cuda_graphs=args.cuda_graphs, lean_loop=args.lean_loop)
    print(table(doc["results"]))


if __name__ == "__main__":
    main()
