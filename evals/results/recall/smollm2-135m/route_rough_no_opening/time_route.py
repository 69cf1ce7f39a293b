"""route() with and without the opening left out of its rough pass, alternating: picks and seconds."""
import json, sys, time, torch
from absorber_engine import AbsorberEngine, routing as R
from absorber_engine.model_store import resolve, recommended_config
from evals.facts import make_document
from evals.recall_eval import chat_ids, absorbed_after
torch.set_num_threads(1)
seed, mem, limit = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
path = resolve("smollm2-135m")
eng = AbsorberEngine.from_pretrained(path, config=recommended_config(path))
tok = eng.tokenizer
texts = [make_document(seed, i, place=True) for i in range(24)]
eng.load_memory(mem)
cut, ends, e = absorbed_after(eng, texts, tok), [], 0
for d in texts:
    e += len(tok.encode(d.text + "\n", add_special_tokens=False)); ends.append(e)
asked = [(j, q) for j, d in enumerate(texts) if ends[j] <= cut for q in d.questions]
asked = asked[::max(1, len(asked) // limit)][:limit]
opening = len(eng._question_frame[0])
sess, rows = eng.default, []
with eng._resident([sess]), torch.no_grad():
    runner, deltas = eng.runner, list(sess.slots)
    zero = eng._windows.zero(sess.key, deltas[-1])
    window = eng._windows.get(runner, sess.key, zero, runner.prefix + eng.window_tokens(sess), reader="base")
    for i, (j, q) in enumerate(asked):
        ids = chat_ids(tok, [{"role": "user", "content": q}])
        row = {"doc": j}
        for lab, k in (("whole", 0), ("no_opening", opening))[::1 if i % 2 == 0 else -1]:
            t = time.perf_counter()
            row[lab] = (R.route(runner, deltas, ids, window, k), time.perf_counter() - t)
        rows.append(row)
        print(i, row, flush=True)
summ = {"n": len(rows), "same": sum(r["whole"][0] == r["no_opening"][0] for r in rows)}
for lab in ("whole", "no_opening"):
    summ[lab + "_s"] = sum(r[lab][1] for r in rows) / len(rows)
    summ[lab + "_right_doc"] = sum(r[lab][0] == r["doc"] for r in rows)
print(json.dumps(summ))
json.dump({"summary": summ, "rows": rows}, open(f"/tmp/route/time_seed{seed}.json", "w"), indent=1)
