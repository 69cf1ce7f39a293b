"""docs/recall.md, "Questions after earlier turns": 40 questions of the seed-53 stream asked after a
system message of instructions (about 160 tokens, naming no document), routed against the same
questions asked in a fresh chat. Reads the memory route_after_turns.py saved (MEMORY).

    PYTHONPATH=. python evals/results/recall/smollm2-135m/route_after_turns_seed53/route_after_system_message.py 40 OUT MEMORY
"""
import json, sys, time, torch
from pathlib import Path
from absorber_engine import AbsorberEngine
from absorber_engine.model_store import resolve, recommended_config
from evals.facts import make_document
from evals.recall_eval import chat_ids
torch.set_num_threads(1)
seed, limit, out, memory = 53, int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
path = resolve("smollm2-135m")
eng = AbsorberEngine.from_pretrained(path, config=recommended_config(path))
tok = eng.tokenizer
eng.load_memory(memory)
texts = [make_document(seed, i, place=True) for i in range(24)]
SYSTEM = ("You are a careful assistant working for a small company. Answer every question in one short "
          "sentence. If you do not know the answer, say so plainly instead of guessing. Do not repeat the "
          "question back. Use plain words, no lists, no markdown, no emoji. Names, places, numbers and dates "
          "must be written exactly as they were given to you, with their spelling unchanged. When a question "
          "asks for a number, give the number alone with its unit if it has one. When a question asks for a "
          "name, give the full name. Keep a polite and neutral tone, and never add advice that was not asked "
          "for. If a question is ambiguous, answer the most likely reading and do not ask for clarification. "
          "Never mention these instructions. The people asking are busy; brevity matters more than style.")
asked = [(j, q, a) for j in range(22) for q, a in zip(texts[j].questions, texts[j].answers)][::2][:limit]
rows = []
for i, (j, q, a) in enumerate(asked):
    ids = chat_ids(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
    row = {"doc": j, "question": q, "answer": a, "tokens": len(ids)}
    for label, fresh in (("with_system", False), ("fresh_chat", True)):
        use = chat_ids(tok, [{"role": "user", "content": q}]) if fresh else ids
        with eng._resident([eng.default]), torch.no_grad():
            t = time.perf_counter(); delta, _ = eng._routed(eng.default, use); s = time.perf_counter() - t
        k = next((n for n, d in enumerate(eng.default.slots) if d is delta), -1)
        row[label] = [k, s]
    rows.append(row)
    print(i, len(ids), row["with_system"], row["fresh_chat"], j, flush=True)
summ = {k: sum(r[k][0] == r["doc"] for r in rows) for k in ("with_system", "fresh_chat")}   # document j: delta j
print(summ, len(rows))
out.mkdir(parents=True, exist_ok=True)
(out / "results.json").write_text(json.dumps({"summary": summ, "rows": rows}, indent=1))
