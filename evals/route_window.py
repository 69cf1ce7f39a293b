"""Where a stream's questions should read: the raw window, or a delta of the bank alone. A stream of
documents is absorbed as plain text (the recommended config: rounds cut at blank lines, a delta a
round), then every question of every document is answered four ways (the routed delta with the
window, the routed delta alone, the newest delta with the window, the base model with the window)
beside the gains route() compares: the best delta's, and the window's read by either reader (the
newest delta, as first tried, or the base model, as route() does).

    python -m evals.route_window --docs 24 --seed 17 --memory mem17.safetensors --out DIR

--memory: a memory file of that stream, absorbed and written there first when it does not exist,
with `<memory>.stream.json` beside it naming the stream (seed, documents, a hash of its tokens); a
memory whose record is missing or names another stream is refused.
Writes rows.json (per question: gains, the four replies, each scored) and RESULTS.md (the four
ways, and the choice at several margins of the window's gain over the best delta's, per reader).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from absorber_engine import AbsorberEngine, stops as stopping
from absorber_engine.generate import _window_kv, generate_rows
from absorber_engine.routing import route_gains, zero_delta
from absorber_engine.model_store import recommended_config, resolve

from .facts import make_document, score
from .jsonio import write_json
from .recall_eval import chat_ids, checked_args

MARGINS = (1.0, 1.25, 1.4, 1.5, 2.0)


class StreamMismatch(Exception):
    """A memory file that cannot be shown to hold the stream asked about."""


def stream_record(seed: int, docs: int, ids: list[list[int]]) -> dict:
    """What names a stream: its seed, documents and tokens (the tokenizer's ids, hashed)."""
    tokens = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    return {"seed": seed, "docs": docs, "tokens_sha256": tokens}


def check_memory(memory: str, record: dict) -> None:
    """Refuses a memory whose record beside it is missing or names another stream: its questions
    would be asked of documents it never absorbed, and in_window read from the wrong stream."""
    try:
        with open(f"{memory}.stream.json") as f:
            found = json.load(f)
    except (OSError, ValueError) as exc:
        raise StreamMismatch(f"--memory {memory}: no readable record of its stream ({exc}); "
                             "remove the memory to absorb the stream again") from None
    if found != record:
        raise StreamMismatch(f"--memory {memory} holds the stream {found}, not the one asked for {record}")


def stream_engine(model: str, docs: int, seed: int, memory: str) -> tuple[AbsorberEngine, list[int]]:
    """The engine holding the stream (from `memory`, or absorbed and saved there with the record of
    its stream beside it), and each document's end."""
    path = resolve(model)
    eng = AbsorberEngine.from_pretrained(path, config=recommended_config(path))
    ids = [eng.tokenizer.encode(make_document(seed, i, place=True).text + "\n", add_special_tokens=False)
           for i in range(docs)]
    record = stream_record(seed, docs, ids)
    if os.path.exists(memory):
        check_memory(memory, record)
        eng.load_memory(memory)
    else:
        for d in ids:
            eng.absorb(d)
        eng.save_memory(memory)
        write_json(f"{memory}.stream.json", record)
    ends = torch.tensor([len(d) for d in ids]).cumsum(0).tolist()
    return eng, ends


@torch.no_grad()
def answer_four_ways(eng: AbsorberEngine, docs: int, seed: int, ends: list[int]) -> list[dict]:
    r, tok = eng.runner, eng.tokenizer
    slots, window = list(eng.default.slots), r.prefix + eng.window_tokens()
    zero = zero_delta(slots[-1])
    readers = {"newest": (slots[-1], _window_kv(r, slots[-1], window)), "base": (zero, _window_kv(r, zero, window))}
    stops = set(stopping.parse(["<|im_end|>"], tok, r.vocab_size).ids)
    rows = []
    for j in range(docs):
        d = make_document(seed, j, place=True)
        for q, a in zip(d.questions, d.answers):
            ids = chat_ids(tok, [{"role": "user", "content": q}])
            scores = {name: route_gains(r, slots, ids, win) for name, (_, win) in readers.items()}
            gains = scores["base"][0]
            k = int(gains.argmin())

            def reply(delta, win):
                out = generate_rows(r, [delta], [win], [ids], 24, 0.0, 1.0, stops, [torch.Generator()])[0]
                return tok.decode(out)

            replies = {"delta_and_window": reply(slots[k], _window_kv(r, slots[k], window)),
                       "delta_alone": reply(slots[k], _window_kv(r, slots[k], r.prefix))}
            replies.update({f"{name}_and_window": reply(*pair) for name, pair in readers.items()})
            rows.append({"doc": j, "in_window": ends[j] > eng.absorbed_tokens, "question": q, "answer": a,
                         "routed": k, "gain_best_delta": float(gains[k]),
                         "gain_window": {name: g for name, (_, g) in scores.items()},
                         "replies": replies, "correct": {w: score(t, a, d.answers) for w, t in replies.items()}})
    return rows


def render(rows: list[dict], seed: int) -> str:
    out = [r for r in rows if not r["in_window"]]
    raw = [r for r in rows if r["in_window"]]
    lines = [f"Seed {seed}: {len(out)} questions about absorbed documents, {len(raw)} about those in the window",
             "", "| read | absorbed: correct | in the window: correct |", "| --- | --- | --- |"]
    for way in rows[0]["replies"]:
        lines.append(f"| {way} | {sum(r['correct'][way] for r in out)} | {sum(r['correct'][way] for r in raw)} |")
    lines += ["", "| window read by | margin | absorbed: to the window (wrong) | in the window: to the window (right) "
              "| absorbed: correct | in the window: correct |", "| --- | --- | --- | --- | --- | --- |"]
    for reader in rows[0]["gain_window"]:
        for m in MARGINS:
            # None: no raw token to read (a flushed memory), so the window is no candidate
            to_window = [r["gain_window"][reader] is not None and r["gain_window"][reader] <= m * r["gain_best_delta"]
                         for r in rows]
            got = [r["correct"][f"{reader}_and_window" if w else "delta_alone"] for r, w in zip(rows, to_window)]
            lines.append(f"| {reader} | {m} | {sum(w for r, w in zip(rows, to_window) if not r['in_window'])} | "
                         f"{sum(w for r, w in zip(rows, to_window) if r['in_window'])} | "
                         f"{sum(g for r, g in zip(rows, got) if not r['in_window'])} | "
                         f"{sum(g for r, g in zip(rows, got) if r['in_window'])} |")
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
    checked_args(ap, args)
    try:
        eng, ends = stream_engine(args.model, args.docs, args.seed, args.memory)
    except StreamMismatch as exc:
        ap.error(str(exc))
    rows = answer_four_ways(eng, args.docs, args.seed, ends)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "rows.json", rows)
    (out / "RESULTS.md").write_text(render(rows, args.seed))
    print(render(rows, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
