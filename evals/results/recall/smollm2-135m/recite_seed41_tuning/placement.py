"""Multi-turn prompts (3 earlier exchanges about other documents): the recital as the first system
message (recital.answer_prompt as built) against a system message right before the last user turn.
PART/PARTS split the questions.   PYTHONPATH=. python placement.py SEED MEMORY OUT.json PART PARTS"""
import json, sys, torch
from absorber_engine import AbsorberEngine, recital as R
from absorber_engine.model_store import resolve, recommended_config
from evals.facts import make_document, score
from evals.recall_eval import chat_ids, absorbed_after
torch.set_num_threads(1)
seed, mem, out, part, parts = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
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
asked = asked[::max(1, len(asked) // 40)][:40]
real = R.answer_prompt
real_recite, memo = R.recite_rows, {}

def recite_once(runner, frame, deltas, windows, *args):        # a delta's recital is the same every time
    key = tuple(id(d) for d in deltas)
    if key not in memo:
        memo[key] = real_recite(runner, frame, deltas, windows, *args)
    return memo[key]

R.recite_rows = recite_once
_, turn = eng._question_frame

def before_last(frame, opening, recital, ids):
    n = len(turn)
    last = max(i for i in range(len(ids) - n + 1) if ids[i:i + n] == turn)
    return ids[:last] + frame.context_end + frame.context_open + recital + ids[last:]

rows = []
for i, (j, q, a) in enumerate(asked):
    if i % parts != part:
        continue
    earlier = []
    for k in range(1, turns + 1):
        o = texts[(j + 5 * k) % docs]
        earlier += [{"role": "user", "content": o.questions[k % 4]}, {"role": "assistant", "content": f"It is {o.answers[k % 4]}."}]
    ids = chat_ids(tok, earlier + [{"role": "user", "content": q}])
    row = {"i": i, "doc": j, "question": q, "answer": a}
    for label, fn in (("top", real), ("before_last", before_last)):
        R.answer_prompt = fn
        reply = tok.decode(eng.generate(ids, max_new_tokens=24, stop=["<|im_end|>"], recite=True))
        row[label] = {"reply": reply, "correct": score(reply, a)}
    R.answer_prompt = real
    rows.append(row)
    print(i, j, a, {k: row[k]["correct"] for k in ("top", "before_last")}, repr(row["before_last"]["reply"][:50]), flush=True)
summary = {"seed": seed, "questions": len(rows), **{k: sum(r[k]["correct"] for r in rows) for k in ("top", "before_last")}}
print(json.dumps(summary))
json.dump({"summary": summary, "rows": rows}, open(out, "w"), indent=1)
