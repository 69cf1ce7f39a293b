"""docs/recall.md, "Questions after earlier turns": 22 questions of the seed-53 stream asked after a
system message holding three documents of another seed (about 300 tokens), routed as generate()
routes them, against the same questions in a fresh chat. Reads the memory route_after_turns.py
saved (MEMORY). Measured 2026-12-05: with the system turn kept (asked_alone as first built)
8/22 routed right, fresh chat 22/22; since asked_alone drops it, 22/22 and 22/22.

    PYTHONPATH=. python evals/results/recall/smollm2-135m/route_after_turns_seed53/route_after_document_system_message.py MEMORY
"""
import sys
import time
import torch
from absorber_engine import AbsorberEngine
from absorber_engine.model_store import resolve, recommended_config
from evals.facts import make_document
from evals.recall_eval import chat_ids
path = resolve("smollm2-135m")
eng = AbsorberEngine.from_pretrained(path, config=recommended_config(path))
tok = eng.tokenizer
eng.load_memory(sys.argv[1])
filler = " ".join(make_document(7, i).text for i in range(3))           # other documents' text, ~300 tokens
texts = [make_document(53, i, place=True) for i in range(24)]
asked = [(j, q) for j in range(22) for q in texts[j].questions][::4][:22]
hits = {"system": 0, "fresh": 0}
for i, (j, q) in enumerate(asked):
    row = {}
    for label, msgs in (("system", [{"role": "system", "content": filler}, {"role": "user", "content": q}]),
                        ("fresh", [{"role": "user", "content": q}])):
        with eng._resident([eng.default]), torch.no_grad():
            t = time.perf_counter(); delta, _ = eng._routed(eng.default, chat_ids(tok, msgs)); s = time.perf_counter() - t
        k = next((n for n, x in enumerate(eng.default.slots) if x is delta), -1)
        hits[label] += k == j
        row[label] = (k, round(s, 1))
    print(i, j, row, flush=True)
print(hits, len(asked))
