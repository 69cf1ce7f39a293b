"""`absorber demo`: a long document streamed into the shipped model, questions about its start.

The document opens with a list of records (key: value), then runs on for many times the model's
trained context with filler text that hides a pass key. It is absorbed piece by piece; the held
memory (delta + the raw window's KV) is printed as the stream grows, beside what a full KV cache
would need. Then the questions are asked twice: by the engine (memory + window) and by the window
baseline (the same model reading only the last tokens it can hold), side by side with the truth.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm import tqdm

from absorber_engine import AbsorberEngine
from absorber_engine.cli import default_model
from absorber_engine.model_store import NAMED_MODELS

from .evaluate import FUTURE_PROMPT, engine_config, trained_context
from .methods import WindowMethod, kv_bytes
from .tasks import make_example


def build_document(tok, ctx: int, multiple: int, seed: int):
    """Records first (about one trained context of them), then a pass-key haystack."""
    records = make_example("kv_recall", ctx, tok, seed=seed, n_queries=4)
    haystack = make_example("passkey", ctx * (multiple - 1), tok, seed=seed)
    questions = [(records.query, records.answers)] + list(records.more) + [(haystack.query, haystack.answers)]
    return records.context + haystack.context, questions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="absorber demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=default_model(), help="model directory (default: the shipped model)")
    ap.add_argument("--multiple", type=int, default=16, help="document length in trained contexts")
    ap.add_argument("--seed", type=int, default=1, help="seed of the generated document")
    ap.add_argument("--docs", type=int, default=8, help="chat models: documents streamed (about 120 tokens each)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if not args.model:
        ap.error("no model: pass --model DIR")
    torch.manual_seed(0)
    if args.model in NAMED_MODELS or str(args.model).endswith(".gguf"):
        return chat_demo(args.model, args.docs, args.seed, args.quiet)
    ctx = trained_context(args.model)
    cfg = engine_config(ctx, futures=4, future_prompt=FUTURE_PROMPT)
    eng = AbsorberEngine.from_pretrained(args.model, config=cfg)
    tok = eng.tokenizer
    text, questions = build_document(tok, ctx, args.multiple, args.seed)
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
            held = eng.delta.nbytes + kv_bytes(model_cfg, eng.held_tokens, dtype)
            marks.append((min(i + piece, len(ids)), held, kv_bytes(model_cfg, min(i + piece, len(ids)), dtype)))
    seconds = time.perf_counter() - start
    print(f"\nabsorbed {eng.absorbed_tokens:,} tokens in {seconds:.0f} s; {eng.held_tokens} raw tokens stay in the window")
    print(f"{'tokens streamed':>16} | {'held (delta + window KV)':>24} | {'a full KV cache':>15}")
    for n, held, full in marks:
        print(f"{n:>16,} | {held / 2**20:>20.2f} MiB | {full / 2**20:>11.2f} MiB")

    baseline = WindowMethod("window", eng.runner.model, tok, window=cfg.window_tokens)
    print(f"\nQuestions about the document (the window baseline keeps the last {cfg.window_tokens} tokens):")
    rows, right = [], {"absorber": 0, "window": 0}
    for query, answers in questions:
        q = tok.encode(query, add_special_tokens=False)
        n_new = len(tok.encode(" " + ", ".join(answers), add_special_tokens=False)) + 2
        ours = tok.decode(eng.generate(q, max_new_tokens=n_new)).strip().split("\n")[0]
        # The baseline reads the raw tail of the document with the model alone (memory detached).
        with eng.detached():
            theirs = baseline.run(ids, q, [], n_new).generated.strip().split("\n")[0]
        truth = ", ".join(answers)
        right["absorber"] += truth in ours
        right["window"] += truth in theirs
        rows.append((query.strip().split("\n")[-1][-48:], truth, ours, theirs))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"{'question':<{w[0]}} | {'truth':<{w[1]}} | {'absorber':<{w[2]}} | window baseline")
    for r in rows:
        print(f"{r[0]:<{w[0]}} | {r[1]:<{w[1]}} | {r[2]:<{w[2]}} | {r[3]}")
    print(f"\ncorrect: absorber {right['absorber']}/{len(rows)}, window baseline {right['window']}/{len(rows)}")
    return 0


def chat_demo(model: str, docs: int, seed: int, quiet: bool) -> int:
    """A chat model (smollm2-135m): `docs` documents of invented facts streamed through a window of
    about two of them; held memory printed as the stream grows; then the first documents' facts asked
    in the chat template, from memory (+ window) and by the window baseline (the bare model reading
    the same raw window)."""
    from absorber_engine.model_store import recommended_config
    from absorber_engine.model_store import resolve

    from .facts import make_document, score
    from .recall_eval import chat_ids

    path = resolve(model)
    # Replay off: on a windowed stream of such documents no method answers anything on this model
    # (README, 0/80 with the whole stream in the prompt), and replay would triple the time.
    cfg = recommended_config(path).replace(chunk_tokens=128, sync_tokens=128, replay_rounds=0)
    eng = AbsorberEngine.from_pretrained(path, config=cfg)
    tok, model_cfg, dtype = eng.tokenizer, eng.runner.model.config, eng.runner.dtype
    documents = [make_document(seed, i, place=True) for i in range(docs)]
    print(f"Streaming {docs} documents into {model} through a window of {cfg.window_tokens} tokens "
          f"(n={cfg.chunk_tokens}, m={cfg.sync_tokens}, rank {cfg.rank}).")
    print(f"{'tokens streamed':>16} | {'held (delta + window KV)':>24} | {'a full KV cache':>15}")
    stream: list[int] = []
    start = time.perf_counter()
    for d in tqdm(documents, desc="absorbing", unit="doc", disable=quiet, file=sys.stderr):
        ids = tok.encode(d.text + "\n", add_special_tokens=False)
        stream += ids
        eng.absorb(ids)
        held = eng.delta.nbytes + kv_bytes(model_cfg, eng.held_tokens, dtype)
        print(f"{len(stream):>16,} | {held / 2**20:>20.2f} MiB | {kv_bytes(model_cfg, len(stream), dtype) / 2**20:>11.2f} MiB")
    print(f"absorbed {eng.absorbed_tokens:,} tokens in {time.perf_counter() - start:.0f} s; "
          f"{eng.held_tokens} raw tokens stay in the window")
    window = stream[len(stream) - eng.held_tokens:]
    right = {"absorber": 0, "window": 0}
    asked = [(q, a) for d in documents[:2] for q, a in zip(d.questions, d.answers)]
    print("\nQuestions about the first two documents (long out of the window):")
    for q, a in asked:
        prompt = chat_ids(tok, [{"role": "user", "content": q}])
        ours = tok.decode(eng.generate(prompt, max_new_tokens=24, stop=["<|im_end|>"])).strip()
        with eng.detached() as bare:
            ids = torch.tensor([window + prompt])
            out = bare.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                                pad_token_id=tok.pad_token_id or 0)
            theirs = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        right["absorber"] += score(ours, a)
        right["window"] += score(theirs, a)
        print(f"Q: {q}\n   truth: {a}\n   memory: {ours[:90]!r}\n   window: {theirs[:90]!r}")
    print(f"\ncorrect: absorber {right['absorber']}/{len(asked)}, window baseline {right['window']}/{len(asked)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
