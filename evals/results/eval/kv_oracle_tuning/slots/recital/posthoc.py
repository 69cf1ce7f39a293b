"""Post-hoc on the saved banks: recitals capped at n + m = 384 (as run) and at n = 256 (a stream round's X),
routing by longest common token run (lcr) and by key string, base model answers [recital + "\n" + question]."""
import sys, os, re, json, time
os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 6)); sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
torch.set_num_threads(1)
from recital_route import gen_rows, lcr, MODEL, HERE
from absorber_engine import AbsorberEngine
from absorber_engine.routing import zero_delta
from evals.evaluate import engine_config, GATED_FUTURES
from evals.tasks import make_example, score

s = int(sys.argv[1])
cfg = engine_config(512, **dict(GATED_FUTURES, surprise_gate=0.0, memory_slots=8, replay_rounds=0))
eng = AbsorberEngine.from_pretrained(MODEL, config=cfg)
tok = eng.tokenizer; enc = lambda t: tok.encode(t, add_special_tokens=False)
eng.load_memory(os.path.join(HERE, f"bank_s{s}.safetensors"))
slots = list(eng.session().slots)
d = json.load(open(os.path.join(HERE, f"res_s{s}.json")))
ex = make_example("kv_recall", 2048, tok, seed=s, n_queries=40)
prompt = list(eng.frame.student_open) + list(eng.frame.seeds["recite"])
t = time.perf_counter()
full = gen_rows(eng, slots, [prompt] * len(slots), 384)
rec_s = time.perf_counter() - t
same = [tok.decode(r) == x for r, x in zip(full, d["recitals"])]
exact256 = [tok.decode(r[:256]) == x for r, x in zip(full, d["x_texts"])]
print(f"seed {s}: {len(slots)} slots, recitals {rec_s:.1f}s, same as run {sum(same)}/{len(same)}, "
      f"first 256 tokens == round X exactly {sum(exact256)}/{len(exact256)}", flush=True)
zero = zero_delta(slots[-1])
left = [r for r in d["rows"] if not r["in_window"]]
qs = {re.search(r'"([^"]+)"', q).group(1): (q, a) for q, a in [(ex.query, ex.answers)] + list(ex.more)}
out = {}
for cap in (384, 256):
    rec_ids = [r[:cap] for r in full]; rec_texts = [tok.decode(r) for r in rec_ids]
    res = {k: 0 for k in ("lcr_route", "key_route", "lcr_ok", "key_ok", "oracle_ok", "key_multi", "key_none", "lcr_tied")}
    per_q = []
    for r in left:
        q, ans = qs[r["key"]]; qids = enc(q)
        runs = [lcr(qids, ri) for ri in rec_ids]; best = max(runs)
        lp = runs.index(best)
        hits = [k for k, tx in enumerate(rec_texts) if f'"{r["key"]}"' in tx]
        kp = hits[0] if hits else lp
        picks = {"lcr": lp, "key": kp, "oracle": r["round"]}
        uniq = sorted({k for k in picks.values() if k is not None})
        t = time.perf_counter()
        gens = gen_rows(eng, [zero] * len(uniq), [enc(rec_texts[k].rstrip("\n") + "\n" + q) for k in uniq], 8)
        ans_s = (time.perf_counter() - t) / len(uniq)
        g = {k: tok.decode(o) for k, o in zip(uniq, gens)}
        ok = {rule: (k is not None and bool(score(ex, g[k], ans))) for rule, k in picks.items()}
        res["lcr_route"] += lp == r["round"]; res["key_route"] += kp == r["round"]
        res["lcr_tied"] += runs.count(best) > 1; res["key_multi"] += len(hits) > 1; res["key_none"] += not hits
        for rule in ok: res[rule + "_ok"] += ok[rule]
        per_q.append(dict(key=r["key"], round=r["round"], lcr=runs, hits=hits, ok=ok, gens={str(k): v for k, v in g.items()},
                          answer=ans[0], answer_s=ans_s))
    summ = {k: f"{v}/{len(left)}" for k, v in res.items()}
    print(f"cap {cap}:", json.dumps(summ), flush=True)
    out[cap] = dict(summary=summ, rows=per_q)
json.dump(dict(seed=s, recite_s=rec_s, same_as_run=same, exact256=exact256, caps=out),
          open(os.path.join(HERE, f"posthoc_s{s}.json"), "w"), indent=1)
