"""Rough pass of route() on the prompt without the template's fixed opening vs as now."""
import json, sys, time, torch
from absorber_engine import AbsorberEngine, routing as R
from absorber_engine.model_store import resolve, recommended_config
from evals.facts import make_document
from evals.recall_eval import chat_ids, absorbed_after
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
seed, docs, limit = 53, 24, int(sys.argv[1])
path = resolve("smollm2-135m")
eng = AbsorberEngine.from_pretrained(path, config=recommended_config(path))
tok = eng.tokenizer
texts = [make_document(seed, i, place=True) for i in range(docs)]
eng.load_memory("/tmp/exp/memory_seed53.safetensors")
cut, ends, e = absorbed_after(eng, texts, tok), [], 0
for d in texts:
    e += len(tok.encode(d.text + "\n", add_special_tokens=False)); ends.append(e)
asked = [(j, q, a) for j, d in enumerate(texts) if ends[j] <= cut for q, a in zip(d.questions, d.answers)]
asked = asked[::max(1, len(asked) // limit)][:limit]
opening, _ = eng._question_frame
real_gains = R.route_gains
state = {}
def rough_variant(runner, deltas, ids, window=None):
    # the rough call is the one with window=None and ids cut to ROUGH_TOKENS
    if window is None and state.get("skip") and len(deltas) > R.SHORTLIST:
        ids = state["ids"][len(opening):][-R.ROUGH_TOKENS:]
    return real_gains(runner, deltas, ids, window)
R.route_gains = rough_variant
rows = []
for i, (j, q, a) in enumerate(asked):
    ids = chat_ids(tok, [{"role": "user", "content": q}])
    assert ids[:len(opening)] == opening
    row = {"doc": j, "tokens": len(ids)}
    for label, skip in (("now", False), ("skip_opening", True))[::(1 if i % 2 == 0 else -1)]:
        state.update(skip=skip, ids=ids)
        with eng._resident([eng.default]), torch.no_grad():
            t = time.perf_counter()
            delta, _ = eng._routed(eng.default, ids)
            s = time.perf_counter() - t
        k = next((n for n, sl in enumerate(eng.default.slots) if sl is delta), -1)
        row[label] = {"slot": k, "seconds": s}
    rows.append(row)
    print(i, row, flush=True)
summ = {}
for lab in ("now", "skip_opening"):
    summ[lab] = {"mean_s": sum(r[lab]["seconds"] for r in rows) / len(rows), "slot_is_doc": sum(r[lab]["slot"] == r["doc"] for r in rows)}
summ["same_pick"] = sum(r["now"]["slot"] == r["skip_opening"]["slot"] for r in rows)
summ["n"] = len(rows); summ["opening_tokens"] = len(opening); summ["mean_tokens"] = sum(r["tokens"] for r in rows) / len(rows)
print(json.dumps(summ))
json.dump({"summary": summ, "rows": rows}, open(f"/tmp/route/rough_skip_{limit}.json", "w"), indent=1)
