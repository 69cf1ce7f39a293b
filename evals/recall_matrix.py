"""Recall matrix of a stream, one round per document: after each round, every document absorbed so
far is asked again, so what a round learns and what it erases of the rounds before show side by side.

    python -m evals.recall_matrix --docs 4 --seed 5 [--method absorber|ttt] [--config JSON] [--out FILE]

Row i of the matrix: correct answers (of 4) per document after round i. Writes JSON with every reply.
"""

from __future__ import annotations

import argparse
import sys
import time

from absorber_engine import AbsorberEngine
from absorber_engine.model_store import resolve

from .facts import make_document, score
from .jsonio import write_json
from .recall_eval import _configs, chat_ids, checked_args


def recall_matrix(model: str, docs: int, seed: int, method: str, overrides: dict) -> dict:
    path = resolve(model)
    eng = AbsorberEngine.from_pretrained(path, config=_configs(path, overrides)[method])
    tok = eng.tokenizer
    texts = [make_document(seed, i, place=True) for i in range(docs)]
    matrix, rows, start = [], [], time.perf_counter()
    for i, d in enumerate(texts):
        eng.absorb(tok.encode(d.text + "\n", add_special_tokens=False), flush=True)
        line = []
        for j in range(i + 1):
            hits = 0
            for q, a in zip(texts[j].questions, texts[j].answers):
                reply = tok.decode(eng.generate(chat_ids(tok, [{"role": "user", "content": q}]), max_new_tokens=24,
                                                stop=["<|im_end|>"]))
                hits += score(reply, a, texts[j].answers)
                rows.append({"after": i, "doc": j, "question": q, "answer": a, "reply": reply})
            line.append(hits)
        matrix.append(line)
        print(i, line, f"{time.perf_counter() - start:.0f} s", flush=True)
    eng.close()
    return {"model": model, "docs": docs, "seed": seed, "method": method, "config": overrides, "matrix": matrix,
            "all_rounds": sum(map(sum, matrix)), "last_round": sum(matrix[-1]), "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--method", default="absorber", choices=("absorber", "ttt"))
    ap.add_argument("--config", default="{}", help="JSON of AbsorberConfig fields overriding the model's own")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args(argv)
    result = recall_matrix(args.model, args.docs, args.seed, args.method, checked_args(ap, args))
    print(f"all rounds {result['all_rounds']} / {2 * args.docs * (args.docs + 1)}, "
          f"after the last round {result['last_round']} / {4 * args.docs}")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
