"""For each question: the exact (fp32, whole prompt) pick over every delta and the window, and where
it ranks in the rough bf16 pass read (a) on the last 64 tokens (now), (b) without the template's opening."""
import json, sys, torch
from absorber_engine import AbsorberEngine, routing as R
from absorber_engine.model_store import resolve, recommended_config
from evals.facts import make_document
from evals.recall_eval import chat_ids, absorbed_after
torch.set_num_threads(1)
seed, mem, limit = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
docs = 24
path = resolve("smollm2-135m")
eng = AbsorberEngine.from_pretrained(path, config=recommended_config(path))
tok = eng.tokenizer
texts = [make_document(seed, i, place=True) for i in range(docs)]
eng.load_memory(mem)
cut, ends, e = absorbed_after(eng, texts, tok), [], 0
for d in texts:
    e += len(tok.encode(d.text + "\n", add_special_tokens=False)); ends.append(e)
asked = [(j, q) for j, d in enumerate(texts) if ends[j] <= cut for q in d.questions]
asked = asked[::max(1, len(asked) // limit)][:limit]
opening, _ = eng._question_frame
sess = eng.default
rows = []
with eng._resident([sess]), torch.no_grad():
    runner, deltas = eng.runner, list(sess.slots)
    newest, tokens = sess.slots[-1], runner.prefix + eng.window_tokens(sess)
    zero = eng._windows.zero(sess.key, newest)
    window = eng._windows.get(runner, sess.key, zero, tokens, reader="base")
    for i, (j, q) in enumerate(asked):
        ids = chat_ids(tok, [{"role": "user", "content": q}])
        gains, wg = R.route_gains(runner, deltas, ids, window)
        best = int(gains.argmin())
        pick = R.WINDOW if wg is not None and wg <= gains[best] else best
        row = {"doc": j, "pick_all_exact": pick, "delta_best": best}
        for lab, cut_ids in (("last64", ids[-R.ROUGH_TOKENS:]), ("no_opening", ids[len(opening):][-R.ROUGH_TOKENS:])):
            with runner.autocast():
                rough, _ = R.route_gains(runner, deltas, cut_ids)
            order = rough.argsort().tolist()
            row[lab + "_rank_of_best"] = order.index(best) + 1
        rows.append(row)
        print(i, row, flush=True)
summ = {"n": len(rows), "pick_is_window": sum(r["pick_all_exact"] == -1 for r in rows)}
for lab in ("last64", "no_opening"):
    summ[lab] = {k: sum(r[lab + "_rank_of_best"] <= k for r in rows) for k in (1, 2, 3, 4)}
print(json.dumps(summ))
json.dump({"summary": summ, "rows": rows}, open(f"/tmp/route/ranks_seed{seed}.json", "w"), indent=1)
