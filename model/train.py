"""Trains the shipped model, model/absorber-tiny: a small Llama (grouped-query attention) trained
from scratch on CPU on the task generators of bench/tasks.py.

What it learns, and why this way:
- The data is almost all in-context recall (passkey, RULER-style needles, key-value records)
  plus documents that refer back to earlier facts (doc_lm): absorption is only worth
  measuring on a model that can recall from its context in the first place.
- Loss = mean CE on answer tokens + LM_WEIGHT * mean CE on every token. The answer tokens
  (" " + value + newline after each question, and the recalled values inside doc_lm
  targets) are ~5% of the tokens but carry the skill, so they get their own mean; the LM
  term keeps the model a model of the whole text (the engine samples futures from it and
  matches its hidden states on ordinary text).
- Each kv_recall / niah_multikey sequence asks up to 4 questions about its context, one per
  line after the context: 4x the answer tokens for ~15% more tokens.
- Length curriculum: prompts of up to 192 tokens at first, growing to the trained length
  (512) by 30% of the steps; then half the batches sit near 512.
- 15% of sequences start without <s>, so the model also works on windows that do not start
  a document (the engine's student sees a continuation without its history).
- bf16 autocast on CPU (about 2x fp32 here); weights stay fp32 and are saved in fp32.

Usage (the shipped model): python model/train.py --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

try:
    from absorber_bench.tasks import make_example
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.tasks import make_example

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build_tokenizer  # noqa: E402
import evaluate_recall  # noqa: E402

# Task -> (share of sequences, questions per sequence).
MIXTURE = {
    "kv_recall": (0.25, 4),
    "niah_multikey": (0.20, 4),
    "niah_single": (0.12, 1),
    "niah_multivalue": (0.12, 1),
    "passkey": (0.11, 1),
    "doc_lm": (0.20, 1),
}
TRAIN_SEED_BASE = 10**6  # evaluation uses seeds 0..N-1; training never does


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 3000  # at most; a loaded machine reaches the time budget first
    budget_minutes: float = 38.0  # training time budget (the schedule completes within it)
    batch: int = 16
    ctx: int = 512  # trained length of context + query
    start_ctx: int = 192
    ramp: float = 0.3  # fraction of steps over which the length grows to ctx
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.05
    lm_weight: float = 0.25
    no_bos_frac: float = 0.15
    threads: int = 2
    # the model
    layers: int = 4
    d_model: int = 256
    heads: int = 8
    kv_heads: int = 2
    ffn: int = 688
    vocab: int = 2048
    max_positions: int = 2048  # 4x the trained length; beyond ctx absorption is what extends it


def make_model(cfg: TrainConfig, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    mcfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(mcfg)


def make_sequence(task: str, n_tokens: int, tok, seed: int, rng: random.Random, n_queries: int, bos: bool):
    """Token ids of one training sequence and a 0/1 mask of its answer tokens."""
    ex = make_example(task, n_tokens, tok, seed, n_queries=n_queries)
    text, spans = ex.context, []
    if task == "doc_lm":
        start = len(text)
        text += ex.target
        for a in ex.answers:  # the recalled values inside the target, with their leading space
            m = re.search(rf" {re.escape(a)}(?!\w)", ex.target)
            if m:
                spans.append((start + m.start(), start + m.end()))
    else:
        for query, answers in [(ex.query, ex.answers)] + ex.more:
            text += query
            line = " " + ", ".join(answers) + "\n"
            spans.append((len(text), len(text) + len(line)))
            text += line
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"]) + [tok.eos_token_id]
    ans = [any(s < b and a < e for a, b in spans) for s, e in enc["offset_mapping"]] + [False]
    if bos:
        ids, ans = [tok.bos_token_id] + ids, [False] + ans
    return ids, ans


def batches(cfg: TrainConfig, tok, progress):
    """Batches (input_ids, answer_mask, attention_mask) until progress() reaches 1; the data
    depends only on cfg.seed and on the progress at each step (the length curriculum)."""
    rng = random.Random(f"absorber-tiny/train/{cfg.seed}")
    tasks = list(MIXTURE)
    shares = [MIXTURE[t][0] for t in tasks]
    counter = TRAIN_SEED_BASE + cfg.seed * 10**8
    while (p := progress()) < 1.0:
        grow = min(1.0, p / cfg.ramp)
        top = int(cfg.start_ctx + grow * (cfg.ctx - cfg.start_ctx))
        # Half the batches anywhere in [64, top], half near top (the length we evaluate at).
        n = rng.randint(64, top) if rng.random() < 0.5 else rng.randint(int(0.85 * top), top)
        seqs = []
        for _ in range(cfg.batch):
            task = rng.choices(tasks, shares)[0]
            counter += 1
            seqs.append(make_sequence(task, n, tok, counter, rng, MIXTURE[task][1], rng.random() >= cfg.no_bos_frac))
        width = max(len(s[0]) for s in seqs)
        ids = torch.full((cfg.batch, width), tok.pad_token_id, dtype=torch.long)
        ans = torch.zeros((cfg.batch, width), dtype=torch.bool)
        att = torch.zeros((cfg.batch, width), dtype=torch.long)
        for i, (s, a) in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            ans[i, : len(a)] = torch.tensor(a)
            att[i, : len(s)] = 1
        yield ids, ans, att


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over cfg.warmup steps, then cosine decay to min_lr_frac over progress."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = min(1.0, progress)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def train(cfg: TrainConfig, out: Path, eval_n: int) -> dict:
    t_start = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    # The tokenizer is part of the model: rebuilt from its own seed so the run is self-contained.
    build_tokenizer.save(build_tokenizer.build(cfg.vocab, cfg.seed), out, cfg.max_positions)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = make_model(cfg, tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters; {json.dumps(asdict(cfg))}", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    model.train()
    t0 = time.time()
    tokens, step = 0, 0
    ema: dict[str, float] = {}

    # Progress is the larger of the step fraction and the time fraction: on an idle machine the
    # run is step-bound (and so reproducible from the seed); on a loaded one the time budget
    # ends it, and the length curriculum and the LR schedule still run to completion.
    def progress() -> float:
        return max(step / cfg.steps, (time.time() - t0) / (60 * cfg.budget_minutes))

    bar = tqdm(batches(cfg, tok, progress), total=cfg.steps, mininterval=10, desc="train")
    for ids, ans, att in bar:
        lr = lr_at(cfg, step, progress())
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=att).logits  # (B, T, V)
        logits = logits[:, :-1].float()
        labels, valid, is_ans = ids[:, 1:], att[:, 1:].bool(), ans[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none").view_as(labels)
        ans_loss = ce[is_ans].mean()
        lm_loss = ce[valid].mean()
        loss = ans_loss + cfg.lm_weight * lm_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        tokens += int(att.sum())
        with torch.no_grad():
            ans_acc = (logits.argmax(-1)[is_ans] == labels[is_ans]).float().mean().item()
        for k, v in (("loss", loss.item()), ("ans", ans_loss.item()), ("lm", lm_loss.item()), ("acc", ans_acc)):
            ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
        bar.set_postfix(loss=f"{ema['loss']:.3f}", ans=f"{ema['ans']:.3f}", acc=f"{ema['acc']:.3f}", T=ids.shape[1])
        if step % 50 == 0:
            el = time.time() - t0
            tqdm.write(
                f"step {step:5d}  loss {ema['loss']:.4f}  answer CE {ema['ans']:.4f}  LM CE {ema['lm']:.4f}  "
                f"answer-token acc {ema['acc']:.4f}  len {ids.shape[1]}  lr {lr:.2e}  "
                f"{tokens / el:.0f} tok/s  {el / 60:.1f} min"
            )
        step += 1
    wall = time.time() - t0
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    summary = {
        "config": asdict(cfg), "parameters": n_params, "steps_done": step, "tokens_seen": tokens,
        "wall_minutes": round(wall / 60, 2), "final_loss_ema": {k: round(v, 4) for k, v in ema.items()},
        "torch": torch.__version__, "mixture": MIXTURE,
    }
    if eval_n:
        res = evaluate_recall.evaluate(model, tok, n=eval_n, n_tokens=cfg.ctx)
        summary["recall_at_ctx"] = {k: round(v, 4) for k, v in res.items()}
        print("recall:", summary["recall_at_ctx"], flush=True)
    summary["total_minutes_with_eval"] = round((time.time() - t_start) / 60, 2)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f, v in asdict(TrainConfig()).items():
        ap.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    ap.add_argument("--out", type=Path, default=HERE / "absorber-tiny")
    ap.add_argument("--eval-n", type=int, default=50, help="recall examples per task after training (0: skip)")
    args = vars(ap.parse_args())
    out, eval_n = args.pop("out"), args.pop("eval_n")
    train(TrainConfig(**args), out, eval_n)


if __name__ == "__main__":
    main()
