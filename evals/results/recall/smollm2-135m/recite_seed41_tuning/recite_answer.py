"""Recite-then-answer, the experiment before recital.py (seed 41 tuned it): the routed delta recites
its round (the recite probe it was trained on; cut at the first blank line, as round_cut cuts
rounds), then the base model answers reading the recital as a system message ("recite_base"),
against the answer from the delta directly ("direct"). "recite_delta" here is a copy of "direct"
(first12_uncut.json, made before the cut, also had the delta read its recital: 4/12).

    PYTHONPATH=. python recite_answer.py 41 MEMORY 40 OUT.json
"""
import json, sys, time, torch
from absorber_engine import AbsorberEngine
from absorber_engine.model_store import resolve, recommended_config
from evals.facts import make_document, score
from evals.recall_eval import chat_ids, absorbed_after
torch.set_num_threads(1)
seed, mem, limit, out = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
path = resolve("smollm2-135m")
eng = AbsorberEngine.from_pretrained(path, config=recommended_config(path))
tok = eng.tokenizer
texts = [make_document(seed, i, place=True) for i in range(24)]
eng.load_memory(mem)
cut, ends, e = absorbed_after(eng, texts, tok), [], 0
for d in texts:
    e += len(tok.encode(d.text + "\n", add_special_tokens=False)); ends.append(e)
asked = [(j, q, a) for j, d in enumerate(texts) if ends[j] <= cut for q, a in zip(d.questions, d.answers)]
asked = asked[::max(1, len(asked) // limit)][:limit]
frame = eng.frame
recite_ids = frame.student_open + frame.seeds["recite"]
real_routed = eng._routed
sess = eng.default
recitals = {}
rows = []
for i, (j, q, a) in enumerate(asked):
    ids = chat_ids(tok, [{"role": "user", "content": q}])
    with eng._resident([sess]), torch.no_grad():
        delta, win = real_routed(sess, ids)
    k = next((n for n, s in enumerate(sess.slots) if s is delta), -1)
    row = {"doc": j, "question": q, "answer": a, "slot": k}
    t = time.perf_counter()
    row["direct"] = tok.decode(eng.generate(ids, max_new_tokens=24, stop=["<|im_end|>"]))
    row["direct_s"] = time.perf_counter() - t
    if k >= 0:
        eng._routed = lambda s, p: (delta, win)
        t = time.perf_counter()
        if k not in recitals:
            got = []
            def on_tok(name, t):
                got.append(t)
                return "\n\n" not in tok.decode(got[-3:])
            from absorber_engine.session import DEFAULT_SESSION
            out_ids = eng.generate_batch({DEFAULT_SESSION: recite_ids}, max_new_tokens=300, stop=["<|im_end|>"], on_token=on_tok)[DEFAULT_SESSION]
            recitals[k] = tok.decode(out_ids).split("\n\n")[0]
        row["recite_s"] = time.perf_counter() - t
        rec = recitals[k]
        row["recital"] = rec
        p2 = chat_ids(tok, [{"role": "system", "content": rec}, {"role": "user", "content": q}])
        row["recite_delta"] = row["direct"]
        zero = eng._windows.zero(sess.key, sess.slots[-1])
        from absorber_engine.generate import _window_kv
        with eng._resident([sess]):
            zwin = _window_kv(eng.runner, zero, eng.runner.prefix)
        eng._routed = lambda s, p: (zero, zwin)
        row["recite_base"] = tok.decode(eng.generate(p2, max_new_tokens=24, stop=["<|im_end|>"]))
        eng._routed = real_routed
    else:
        row["recital"] = None; row["recite_delta"] = row["recite_base"] = row["direct"]
    for arm in ("direct", "recite_delta", "recite_base"):
        row[arm + "_ok"] = score(row[arm], a)
    rows.append(row)
    print(i, j, k, a, {arm: row[arm + "_ok"] for arm in ("direct", "recite_delta", "recite_base")}, repr(row["direct"][:40]), flush=True)
summ = {"n": len(rows)}
for arm in ("direct", "recite_delta", "recite_base"):
    summ[arm] = sum(r[arm + "_ok"] for r in rows)
print(json.dumps(summ))
json.dump({"summary": summ, "rows": rows, "docs": {j: texts[j].text for j in set(r["doc"] for r in rows)}}, open(out, "w"), indent=1)
