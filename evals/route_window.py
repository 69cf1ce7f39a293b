"""Where a stream's questions should read: the raw window, or a delta of the bank alone. A stream of
documents is absorbed as plain text (the recommended config: rounds cut at blank lines, a delta a
round), then every question of every document is answered three ways (the routed delta with the
window, the routed delta alone, the newest delta with the window) beside the two gains route()
compares (generate.WINDOW_MARGIN was chosen from these).

    python -m evals.route_window --docs 24 --seed 17 --memory mem17.safetensors --out DIR

--memory: a memory file of that stream, absorbed and written there first when it does not exist.
Writes rows.json (per question: gains, the three replies, each scored) and RESULTS.md (the three
ways, and route()'s choice at several margins).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from absorber_engine import AbsorberEngine, inputs
from absorber_engine.generate import _window_kv, generate_rows, route_gains
from absorber_engine.model_store import recommended_config, resolve

from .facts import make_document, score
from .recall_eval import chat_ids

MARGINS = (1.0, 1.25, 1.4, 1.5, 2.0)


def stream_engine(model: str, docs: int, seed: int, memory: str) -> tuple[AbsorberEngine, list[int]]:
    """The engine holding the stream (from `memory`, or absorbed and saved there), and each document's end."""
    path = resolve(model)
    eng = AbsorberEngine.from_pretrained(path, config=recommended_config(path))
    ids = [eng.tokenizer.encode(make_document(seed, i, place=True).text + "\n", add_special_tokens=False)
           for i in range(docs)]
    if os.path.exists(memory):
        eng.load_memory(memory)
    else:
        for d in ids:
            eng.absorb(d)
        eng.save_memory(memory)
    ends = torch.tensor([len(d) for d in ids]).cumsum(0).tolist()
    return eng, ends


@torch.no_grad()
def answer_three_ways(eng: AbsorberEngine, docs: int, seed: int, ends: list[int]) -> list[dict]:
    r, tok = eng.runner, eng.tokenizer
    slots, window = list(eng.default.slots), r.prefix + eng.window_tokens()
    newest_window = _window_kv(r, slots[-1], window)
    stops = inputs.stop_ids(["<|im_end|>"], tok, r.vocab_size)
    rows = []
    for j in range(docs):
        d = make_document(seed, j, place=True)
        for q, a in zip(d.questions, d.answers):
            ids = chat_ids(tok, [{"role": "user", "content": q}])
            gains, window_gain = route_gains(r, slots, ids, newest_window)
            k = int(gains.argmin())

            def reply(delta, win):
                out = generate_rows(r, [delta], [win], [ids], 24, 0.0, 1.0, stops, [torch.Generator()])[0]
                return tok.decode(out)

            replies = {"delta_and_window": reply(slots[k], _window_kv(r, slots[k], window)),
                       "delta_alone": reply(slots[k], _window_kv(r, slots[k], r.prefix)),
                       "newest_and_window": reply(slots[-1], newest_window)}
            rows.append({"doc": j, "in_window": ends[j] > eng.absorbed_tokens, "question": q, "answer": a,
                         "routed": k, "gain_best_delta": float(gains[k]), "gain_window": window_gain,
                         "replies": replies, "correct": {w: score(t, a) for w, t in replies.items()}})
    return rows


def render(rows: list[dict], seed: int) -> str:
    out = [r for r in rows if not r["in_window"]]
    raw = [r for r in rows if r["in_window"]]
    lines = [f"Seed {seed}: {len(out)} questions about absorbed documents, {len(raw)} about those in the window",
             "", "| read | absorbed: correct | in the window: correct |", "| --- | --- | --- |"]
    for way in rows[0]["replies"]:
        lines.append(f"| {way} | {sum(r['correct'][way] for r in out)} | {sum(r['correct'][way] for r in raw)} |")
    lines += ["", "| WINDOW_MARGIN | absorbed: to the window (wrong) | in the window: to the window (right) "
              "| absorbed: correct |", "| --- | --- | --- | --- |"]
    for m in MARGINS:
        to_window = [r["gain_window"] <= m * r["gain_best_delta"] for r in rows]
        got = sum(r["correct"]["newest_and_window" if w else "delta_alone"]
                  for r, w in zip(rows, to_window) if not r["in_window"])
        lines.append(f"| {m} | {sum(w for r, w in zip(rows, to_window) if not r['in_window'])} | "
                     f"{sum(w for r, w in zip(rows, to_window) if r['in_window'])} | {got} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.route_window", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--memory", required=True, help="memory file of the stream (written when missing)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    eng, ends = stream_engine(args.model, args.docs, args.seed, args.memory)
    rows = answer_three_ways(eng, args.docs, args.seed, ends)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "RESULTS.md").write_text(render(rows, args.seed))
    print(render(rows, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
