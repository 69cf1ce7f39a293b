"""Recall of absorbed facts on a chat model (e.g. smollm2-135m): documents of invented facts
(evals/facts.py) absorbed whole (flush), then asked back in other words through the chat template.

Methods, all on the same model and the same questions:
- none: the question alone.
- full: the document in the prompt (as a system message, the frame the engine's teacher reads X
  in), then the question.
- ttt: next-token training on the document (objective "ttt"), then the question alone.
- absorber: the engine's recommended config for the model, then the question alone.
Each question is one greedy reply of at most 24 tokens, correct when it holds the answer as a whole
word. Accuracy with a 95% Wilson interval; RESULTS.md and results.json under --out, and for
streams (--stream) recall_by_age.png and memory.png (evals/recall_plots.py).

    absorber eval --tasks facts --model smollm2-135m --docs 12 --seed 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from absorber_engine import AbsorberConfig, AbsorberEngine, _scheduler
from absorber_engine.model_store import recommended_config
from absorber_engine.model_store import resolve
from absorber_engine.round_cuts import kv_bytes

from .facts import FactDocument, make_document, score
from .jsonio import write_json

HERE = Path(__file__).resolve().parent
METHODS = ("none", "full", "ttt", "absorber")


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = hits / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, mid - half), min(1.0, mid + half))


def chat_ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)


def checked_args(ap: argparse.ArgumentParser, args) -> dict:
    """--config's JSON as AbsorberConfig fields, and --threads applied: bad values exit 2 with the
    flag named (they were tracebacks)."""
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            ap.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        overrides = json.loads(getattr(args, "config", "{}"))
    except (ValueError, RecursionError) as exc:
        ap.error(f"--config is not JSON: {exc}")
    fields = {f.name for f in dataclasses.fields(AbsorberConfig)}
    if not isinstance(overrides, dict) or set(overrides) - fields:
        ap.error(f"--config must be a JSON object of AbsorberConfig fields; unknown: "
                 f"{sorted(set(overrides) - fields) if isinstance(overrides, dict) else overrides!r}")
    return overrides


def _configs(path: str, overrides: dict) -> dict[str, AbsorberConfig]:
    """The absorber's config (the model's own, changed by `overrides`) and TTT's: the same budget
    (TTT trains no recite probe, so no recite_exact)."""
    base = (recommended_config(path) or AbsorberConfig()).replace(**overrides)
    return {"absorber": base, "ttt": base.replace(objective="ttt", recite_exact=0)}


def flushed_contexts(seed: int, docs: int, join: int = 1) -> list[FactDocument]:
    """The contexts the flushed evaluation absorbs, one at a time: each of the `docs` documents alone,
    or with `join` > 1 each run of `join` consecutive documents as one text with no blank line in it
    (so the scheduler's cuts cannot split it at document ends: a context longer than a round takes
    rounds of n tokens). Joined documents each name their place, as in streams, so a question says
    which of them it asks about."""
    if join < 1 or docs % join:
        raise ValueError(f"--join must divide --docs: {docs} documents in runs of {join}")
    if join == 1:
        return [make_document(seed, i) for i in range(docs)]
    runs = [[make_document(seed, i, place=True) for i in range(k, k + join)] for k in range(0, docs, join)]
    return [FactDocument("+".join(d.genre for d in run), "".join(d.text for d in run),
                         [q for d in run for q in d.questions], [a for d in run for a in d.answers])
            for run in runs]


def run(model: str, methods, docs: int, seed: int, overrides: dict, quiet: bool = False, join: int = 1) -> dict:
    path = resolve(model)
    contexts = flushed_contexts(seed, docs, join)
    configs = _configs(path, overrides)
    rows = []
    for name in methods:
        # One engine per method, closed after it: the model is loaded from the converted directory.
        eng = AbsorberEngine.from_pretrained(path, config=configs["ttt" if name == "ttt" else "absorber"])
        tok = eng.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            from absorber_engine.errors import UnsupportedModelError

            raise UnsupportedModelError(f"{model}: the facts evaluation needs a tokenizer with a chat template")
        for i, d in enumerate(contexts):
            doc = tok.encode(d.text, add_special_tokens=False)
            eng.reset()
            absorb_s = eng.absorb(doc, flush=True).seconds if name in ("ttt", "absorber") else 0.0
            rounds = eng.default.rounds
            for q, a in zip(d.questions, d.answers):
                messages = [{"role": "user", "content": q}]
                if name == "full":
                    messages.insert(0, {"role": "system", "content": d.text})
                start = time.perf_counter()
                reply = tok.decode(eng.generate(chat_ids(tok, messages), max_new_tokens=24, stop=["<|im_end|>"]))
                rows.append({"method": name, "doc": i, "genre": d.genre, "question": q, "answer": a,
                             "reply": reply, "correct": score(reply, a, d.answers), "absorb_seconds": absorb_s,
                             "seconds": time.perf_counter() - start, "tokens": len(doc), "rounds": rounds})
                absorb_s = 0.0
            if not quiet:
                done = [r for r in rows if r["method"] == name]
                print(f"{name}: context {i + 1}/{len(contexts)}, {sum(r['correct'] for r in done)}/{len(done)}",
                      flush=True)
        eng.close()
    return {"model": model, "docs": docs, "join": join, "seed": seed, "configs": {k: v.to_dict() for k, v in configs.items()},
            "summary": summarize(rows, methods, docs), "rows": rows,
            "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}}


def run_stream(model: str, methods, docs: int, seed: int, overrides: dict, quiet: bool = False,
               flush_each: bool = False, without_window: bool = False, recite: bool = False) -> dict:
    """A stream of `docs` documents fed one after another through the engine's window (n + m tokens,
    about two documents); then every fact of every document that has left the window entirely is
    asked, after the window, and scored by how many rounds ago its document was absorbed. The
    documents still in the window are asked too and counted apart (in_window): what the raw window
    answers, which a memory must not lose.
    window: the raw window alone (no memory); full: the whole stream in the prompt. flush_each: each
    document is flushed as it arrives (rounds cut at document ends, nothing kept raw), so every
    document is asked, from memory alone. without_window: the absorbing methods are asked the same
    questions again after the window is discarded (as "<method>-no-window"): how much the raw window's
    look-alike documents cost the memory's answers. recite: the absorber is asked again with
    generate(..., recite=True) (as "absorber-recite"; docs/recall.md, "Answers read from a recital")."""
    path = resolve(model)
    configs = _configs(path, overrides)
    rows, held_curve = [], {}
    for name in methods:
        eng = AbsorberEngine.from_pretrained(path, config=configs["ttt" if name == "ttt" else "absorber"])
        tok, absorbs, config = eng.tokenizer, name in ("ttt", "absorber"), eng.runner.model.config
        texts = [make_document(seed, i, place=True) for i in range(docs)]
        stream, ends, absorbed_at, curve = [], [], [], []
        start = time.perf_counter()
        for d in texts:
            ids = tok.encode(d.text + "\n", add_special_tokens=False)
            stream += ids
            ends.append(len(stream))
            absorbed_at.append(None)
            if absorbs:
                absorb_labelled(eng, ids, ends, absorbed_at, flush_each)
                curve.append(eng.held_bytes()["delta"] + kv_bytes(config, eng.held_tokens, eng.runner.dtype))
        seconds = time.perf_counter() - start
        # What the engine's scheduler absorbs after each document, replayed without a model.
        absorbed = ends if flush_each else absorbed_per_document(eng, texts, tok)
        if not absorbs:                  # the KV of what each baseline reads: all of it, or the raw window
            kept = ends if name == "full" else [e - a for e, a in zip(ends, absorbed)]
            curve = [kv_bytes(config, k, eng.runner.dtype) for k in kept]
        held_curve[name] = curve
        held = eng.held_bytes()["delta"] if absorbs else 0       # the memory that answers (no raw token kept)
        total_rounds = eng.default.rounds
        # What the engine keeps raw after the stream: every method is asked about the same documents,
        # those entirely out of that window.
        cut = absorbed[-1]
        if absorbs and eng.absorbed_tokens != cut:
            raise RuntimeError(f"the engine absorbed {eng.absorbed_tokens} tokens, its window replayed {cut}")
        window = len(stream) - cut
        labels = ([name] + ([f"{name}-recite"] if recite and name == "absorber" else [])
                  + ([f"{name}-no-window"] if without_window and absorbs else []))
        for label in labels:
            if label.endswith("-no-window"):
                eng.discard_window()
            for j, d in enumerate(texts):
                in_window = ends[j] > cut             # still (partly) raw: scored apart, not as memory
                if in_window and label != name:
                    continue
                ago = (total_rounds - absorbed_at[j]) if absorbed_at[j] is not None else None
                for q, a in zip(d.questions, d.answers):
                    msgs = [{"role": "user", "content": q}]
                    start = time.perf_counter()
                    if absorbs:
                        reply = eng.generate(chat_ids(tok, msgs), max_new_tokens=24, stop=["<|im_end|>"],
                                             recite=label.endswith("-recite"))
                    else:
                        kept = stream if name == "full" else stream[len(stream) - window:]
                        eng.reset()
                        reply = eng.generate(kept + chat_ids(tok, msgs), max_new_tokens=24, stop=["<|im_end|>"])
                    reply = tok.decode(reply)
                    rows.append({"method": label, "doc": j, "rounds_ago": ago, "question": q, "answer": a,
                                 "reply": reply, "correct": score(reply, a, d.answers), "in_window": in_window,
                                 "seconds": time.perf_counter() - start})
        got = [r for r in rows if r["method"] == name and not r["in_window"]]
        if got:
            got[0]["absorb_seconds"] = seconds      # the whole stream's absorption, counted once
            got[0]["held_bytes"] = held
        if not quiet:
            print(f"{name}: {sum(r['correct'] for r in got)}/{len(got)} ({seconds:.0f} s, {total_rounds} rounds)",
                  flush=True)
        eng.close()
    methods = list(methods) + [m for m in dict.fromkeys(r["method"] for r in rows) if m not in methods]
    return {"model": model, "docs": docs, "seed": seed, "stream": True,
            "configs": {k: v.to_dict() for k, v in configs.items()}, "summary": summarize(rows, methods, docs),
            "rows": rows, "held_curve": held_curve}


def absorb_labelled(eng, ids: list[int], ends: list[int], absorbed_at: list, flush: bool) -> None:
    """Absorbs one document of the stream; absorbed_at[j] becomes the number of the round that
    absorbed document j's last token (ends[j]). Read after every round, not after the call: one call
    can run several rounds, and a document the first of them finished is that round's."""
    def label(_tokens):
        for j, e in enumerate(ends):
            if absorbed_at[j] is None and eng.absorbed_tokens >= e:
                absorbed_at[j] = eng.default.rounds

    eng.absorb(ids, flush=flush, progress=label)


def absorbed_after(eng, texts, tok) -> int:
    """Tokens the engine's scheduler absorbs from the stream fed one document at a time: its own
    window, cuts included, replayed without a model, so the window method sees what the memory lost."""
    return absorbed_per_document(eng, texts, tok)[-1]


def absorbed_per_document(eng, texts, tok) -> list[int]:
    """absorbed_after() after each document of the stream."""
    sch = eng.scheduler
    w = _scheduler.Window(sch.chunk_tokens, sch.sync_tokens, sch.vocab_size, sch.cut_after, sch.min_cut, sch.cut_pairs)
    out = []
    for d in texts:
        w.feed(tok.encode(d.text + "\n", add_special_tokens=False))
        while (r := w.plan()) is not None:
            w.commit(r.id)
        out.append(w.absorbed)
    return out


def document_answers(rows: list[dict]) -> dict:
    """Every answer the rows ask of each document (their "doc"): the `others` score() reads. Every
    method of a run asks about the same documents, and of each document it asks all or nothing."""
    out: dict = {}
    for r in rows:
        out.setdefault(r.get("doc"), {})[r["answer"]] = None
    return {doc: list(answers) for doc, answers in out.items()}


def summarize(rows: list[dict], methods, docs: int) -> dict:
    """Accuracy per method with its 95% interval, scored again from the stored replies (so a saved
    result can be re-read under the current scorer: --rescore). Streams add accuracy by how many
    rounds ago the document was absorbed. A label asked again of the same memory ("absorber-recite",
    "ttt-no-window") shows its method's absorption; seconds_per_question is the mean time of a
    question (routing, recital and answer), where the run recorded it. A method with nothing to
    count (n = 0) has accuracy and interval None."""
    summary, others = {}, document_answers(rows)
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        for r in mine:
            r["correct"] = score(r["reply"], r["answer"], others[r.get("doc")])
        got = [r for r in mine if not r.get("in_window")]
        hits = sum(r["correct"] for r in got)
        summary[name] = {"accuracy": hits / len(got) if got else None, "hits": hits, "n": len(got),
                         "ci95": list(wilson(hits, len(got))) if got else None,
                         "absorb_seconds_per_doc": sum(r.get("absorb_seconds", 0.0) for r in got) / max(docs, 1)}
        base = name.split("-")[0]
        if base != name and base in summary:
            summary[name]["absorb_seconds_per_doc"] = summary[base]["absorb_seconds_per_doc"]
        timed = [r["seconds"] for r in mine if "seconds" in r]
        if timed:
            summary[name]["seconds_per_question"] = sum(timed) / len(timed)
        raw = [r for r in mine if r.get("in_window")]
        if raw:
            summary[name]["in_window"] = [sum(r["correct"] for r in raw), len(raw)]
        held = [r["held_bytes"] for r in got if r.get("held_bytes")]
        if held:
            summary[name]["held_delta_mib"] = held[0] / 2**20
        ago = sorted({r["rounds_ago"] for r in got if r.get("rounds_ago") is not None})
        if ago:
            summary[name]["by_rounds_ago"] = {
                str(a): [sum(r["correct"] for r in got if r["rounds_ago"] == a),
                         sum(1 for r in got if r["rounds_ago"] == a)] for a in ago}
    return summary


def _seconds(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def render(result: dict) -> str:
    s = result["summary"]
    lines = [f"Facts recall on {result['model']}: {result['docs']} documents x 4 questions, seed {result['seed']}",
             "", "| method | accuracy | 95% CI | correct / asked | absorb s/doc | s/question |",
             "| --- | --- | --- | --- | --- | --- |"]
    if result.get("join", 1) > 1:
        absorbed = [r for r in result["rows"] if r.get("rounds")]
        lines[1:1] = ["", f"Each context: {result['join']} documents as one text without blank lines, flushed "
                          f"({min(r['tokens'] for r in result['rows'])}-{max(r['tokens'] for r in result['rows'])} tokens"
                          + (f", {min(r['rounds'] for r in absorbed)}-{max(r['rounds'] for r in absorbed)} rounds)"
                             if absorbed else ")")]
    for name, v in s.items():
        accuracy, ci = "n/a", "n/a"                 # nothing asked: no accuracy, rather than 0%
        if v["accuracy"] is not None:
            accuracy, ci = f"{v['accuracy']:.1%}", "{:.1%} - {:.1%}".format(*v["ci95"])
        lines.append(f"| {name} | {accuracy} | {ci} | {v['hits']} / {v['n']} | "
                     f"{v['absorb_seconds_per_doc']:.1f} | {_seconds(v.get('seconds_per_question'))} |")
    for name, v in s.items():
        if "by_rounds_ago" in v:
            cells = ", ".join(f"{a} ago {h}/{n}" for a, (h, n) in v["by_rounds_ago"].items())
            lines.append(f"\n{name} by rounds since absorbed: {cells}")
        if "in_window" in v:
            lines.append(f"\n{name} on the documents still in the window (not in the accuracy): "
                         f"{v['in_window'][0]}/{v['in_window'][1]}")
        if "held_delta_mib" in v:
            lines.append(f"\n{name} memory held after the stream: {v['held_delta_mib']:.2f} MiB of deltas")
    if "full" in s and "absorber" in s and s["full"]["accuracy"] and s["absorber"]["accuracy"] is not None:
        lines += ["", f"absorber / full: {s['absorber']['accuracy'] / s['full']['accuracy']:.2f}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="absorber eval --tasks facts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="facts")
    ap.add_argument("--model", default="smollm2-135m", help="a chat model: directory, .gguf or named model")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    ap.add_argument("--docs", type=int, default=12, help="documents (4 questions each)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the documents (the defaults were tuned on 0)")
    ap.add_argument("--config", default="{}", help="JSON of AbsorberConfig fields overriding the model's own")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="output directory (default: evals/results/recall/MODEL)")
    ap.add_argument("--stream", action="store_true",
                    help="stream the documents through the window instead of flushing each one "
                         "(methods: window, full, ttt, absorber)")
    ap.add_argument("--flush-each", action="store_true",
                    help="with --stream: flush at every document's end (one round per document, nothing raw)")
    ap.add_argument("--recite", action="store_true",
                    help="with --stream: ask the absorber again with generate(..., recite=True), as absorber-recite")
    ap.add_argument("--without-window", action="store_true",
                    help="with --stream: ask the absorbing methods again with the window discarded")
    ap.add_argument("--join", type=int, default=1,
                    help="flushed: absorb each run of this many documents as one text without blank lines")
    ap.add_argument("--rescore", metavar="RESULTS.json", help="score a saved run again (no model is run)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    if args.docs < 1:                                      # 0 or fewer wrote empty results over the stored ones
        ap.error(f"--docs must be at least 1, got {args.docs}")
    if args.join < 1 or args.docs % args.join:
        ap.error(f"--join must be a positive divisor of --docs ({args.docs}), got {args.join}")
    if any(m not in METHODS + ("window",) for m in methods):
        ap.error(f"unknown methods in {methods}; expected some of {METHODS}")
    overrides = checked_args(ap, args)
    if args.rescore:
        try:
            result = json.loads(Path(args.rescore).read_text())
        except (OSError, ValueError, RecursionError) as exc:
            ap.error(f"--rescore: cannot read {args.rescore} as a saved run: {exc}")
        if not isinstance(result, dict) or not all(k in result for k in ("rows", "summary", "docs")):
            ap.error(f"--rescore: {args.rescore} is not a saved run (it needs rows, summary and docs)")
        result["summary"] = summarize(result["rows"], list(result["summary"]), result["docs"])
        args.out = args.out or str(Path(args.rescore).parent)
    elif args.stream:
        methods = [{"none": "window"}.get(m, m) for m in methods]
        result = run_stream(args.model, methods, args.docs, args.seed, overrides, quiet=args.quiet,
                            flush_each=args.flush_each, without_window=args.without_window, recite=args.recite)
    else:
        result = run(args.model, methods, args.docs, args.seed, overrides, quiet=args.quiet,
                     join=args.join)
    out = Path(args.out) if args.out else HERE / "results" / "recall" / Path(str(args.model)).name
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    (out / "RESULTS.md").write_text(render(result))
    print(render(result))
    from .recall_plots import plot_stream

    plots = plot_stream(result, out) if result.get("stream") else []
    print(f"written to {out}/ ({', '.join(['RESULTS.md', 'results.json'] + plots)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
