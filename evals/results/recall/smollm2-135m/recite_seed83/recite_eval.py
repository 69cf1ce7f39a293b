"""Answers read from a recital, against answers from the delta, on a streamed bank: every question
about a document absorbed (left the window), asked alone and after TURNS earlier exchanges about
other documents; generate(..., recite=False / True). PART/PARTS split the questions over processes;
FORMS (alone,after_turns by default) picks the forms asked.

    PYTHONPATH=. python recite_eval.py SEED MEMORY OUT.json [PART PARTS [FORMS]]
"""
import json, sys, time, torch
from absorber_engine import AbsorberEngine
from absorber_engine.model_store import resolve, recommended_config
from evals.facts import make_document, score
from evals.recall_eval import chat_ids, absorbed_after
torch.set_num_threads(1)
seed, mem, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
part, parts = (int(sys.argv[4]), int(sys.argv[5])) if len(sys.argv) > 5 else (0, 1)
forms = sys.argv[6].split(",") if len(sys.argv) > 6 else ["alone", "after_turns"]
docs, turns = 24, 3
path = resolve("smollm2-135m")
eng = AbsorberEngine.from_pretrained(path, config=recommended_config(path))
tok = eng.tokenizer
texts = [make_document(seed, i, place=True) for i in range(docs)]
eng.load_memory(mem)
cut, ends, e = absorbed_after(eng, texts, tok), [], 0
for d in texts:
    e += len(tok.encode(d.text + "\n", add_special_tokens=False)); ends.append(e)
asked = [(j, q, a) for j, d in enumerate(texts) if ends[j] <= cut for q, a in zip(d.questions, d.answers)]
rows = []
for i, (j, q, a) in enumerate(asked):
    if i % parts != part:
        continue
    earlier = []
    for k in range(1, turns + 1):
        o = texts[(j + 5 * k) % docs]
        earlier += [{"role": "user", "content": o.questions[k % 4]}, {"role": "assistant", "content": f"It is {o.answers[k % 4]}."}]
    row = {"i": i, "doc": j, "question": q, "answer": a}
    for form, msgs in [(f, m) for f, m in (("alone", []), ("after_turns", earlier)) if f in forms]:
        ids = chat_ids(tok, msgs + [{"role": "user", "content": q}])
        for recite in (False, True):
            t = time.perf_counter()
            reply = tok.decode(eng.generate(ids, max_new_tokens=24, stop=["<|im_end|>"], recite=recite))
            row[f"{form}_{'recite' if recite else 'direct'}"] = {"reply": reply, "correct": score(reply, a),
                                                               "seconds": time.perf_counter() - t}
    rows.append(row)
    print(i, j, a, {k: v["correct"] for k, v in row.items() if isinstance(v, dict)}, flush=True)
arms = [k for k in rows[0] if isinstance(rows[0][k], dict)]
summary = {"seed": seed, "questions": len(rows), **{k: {"correct": sum(r[k]["correct"] for r in rows),
           "seconds": sum(r[k]["seconds"] for r in rows) / len(rows)} for k in arms}}
print(json.dumps(summary))
json.dump({"summary": summary, "rows": rows}, open(out, "w"), indent=1)
