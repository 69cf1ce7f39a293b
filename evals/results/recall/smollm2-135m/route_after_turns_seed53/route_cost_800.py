"""docs/recall.md, "Questions after earlier turns": routing an 800-token prompt (a system message of
eight documents of another seed, then a question) with the rough pass over the whole prompt and
over its last 64 tokens. Reads the memory route_after_turns.py saved (MEMORY); output in
route_cost_800.txt.

    PYTHONPATH=. python evals/results/recall/smollm2-135m/route_after_turns_seed53/route_cost_800.py MEMORY
"""
import sys
import time, torch
from absorber_engine import AbsorberEngine, routing
from absorber_engine.model_store import resolve, recommended_config
from evals.facts import make_document
from evals.recall_eval import chat_ids
path = resolve("smollm2-135m")
eng = AbsorberEngine.from_pretrained(path, config=recommended_config(path))
tok = eng.tokenizer
eng.load_memory(sys.argv[1])
filler = " ".join(make_document(7, i).text for i in range(8))           # other text, about 800 tokens
for j in (3, 12):
    d = make_document(53, j, place=True)
    ids = chat_ids(tok, [{"role": "system", "content": filler}, {"role": "user", "content": d.questions[0]}])
    for rough in (10**9, 64, 10**9, 64):
        routing.ROUGH_TOKENS = rough
        with eng._resident([eng.default]), torch.no_grad():
            t = time.perf_counter(); delta, _ = eng._routed(eng.default, ids); s = time.perf_counter() - t
        k = next((n for n, x in enumerate(eng.default.slots) if x is delta), -1)
        print(len(ids), "deltas", len(eng.default.slots), "rough", "whole" if rough > 64 else 64, f"{s:.1f}s", "slot", k, "doc", j, flush=True)
