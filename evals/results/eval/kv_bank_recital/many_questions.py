"""Key-value records on absorber-tiny, absorber+bank+recital against truncation, 40 questions a
stream (the evaluation asks one an example): each stream absorbed once, then every question asked
with generate(recite=True), and of the truncation baseline.

    python many_questions.py --length 8 --seeds 401,402 --out kv8x_seeds401_402.jsonl
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 4)
sys.path.insert(0, ROOT)
import torch  # noqa: E402

from absorber_engine import recital  # noqa: E402
from evals.evaluate import build_methods  # noqa: E402
from evals.recall_eval import wilson  # noqa: E402
from evals.tasks import answer_text, kv_record, make_example, score  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--length", type=int, default=4, help="multiple of the trained context (512)")
ap.add_argument("--seeds", default="401")
ap.add_argument("--questions", type=int, default=40)
ap.add_argument("--recite-exact", type=int, default=0,
                help="the method's recite_exact (0: as this script measured it, before the check existed)")
ap.add_argument("--out", required=True)
a = ap.parse_args()
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
model_dir = os.path.join(ROOT, "model", "absorber-tiny")
tok, (truncate, method) = build_methods(["truncate", "absorber+bank+recital"], model_dir, 512)
eng = method.engine
eng.config.recite_exact = a.recite_exact
eng.config.validate()
rows = []
for seed in (int(s) for s in a.seeds.split(",")):
    ex = make_example("kv_recall", 512 * a.length, tok, seed=seed, n_queries=a.questions)
    context = tok.encode(ex.context, add_special_tokens=False)
    eng.reset()
    t0 = time.perf_counter()
    report = eng.absorb(context)
    absorb_s = time.perf_counter() - t0
    window = tok.decode(eng.window_tokens())
    for query, answers in [(ex.query, ex.answers)] + ex.more:
        ids = tok.encode(query, add_special_tokens=False)
        max_new = len(tok.encode(answer_text(answers), add_special_tokens=False)) + 2
        t = time.perf_counter()
        mine = tok.decode(eng.generate(ids, max_new_tokens=max_new, recite=True))
        texts = list(eng._windows.recitals.get(eng.default.key, {}).values())       # the bank's recitals (recital.py)
        picked = recital.pick(recital.asked(ids, None), texts + [eng.window_tokens()]) if texts else None
        row = {"seed": seed, "query": query, "answers": answers, "absorb_s": absorb_s, "rounds": report.rounds,
               "picked": picked, "holder": next((k for k, t in enumerate(texts)
                                                 if kv_record(query.split('"')[1], answers[0]) in tok.decode(t)), None),
               "in_window": kv_record(query.split('"')[1], answers[0]).strip() in window,
               "engine": mine, "engine_ok": bool(score(ex, mine, answers)), "engine_s": time.perf_counter() - t}
        row["truncate"] = truncate.run(context, ids, [], max_new).generated
        row["truncate_ok"] = bool(score(ex, row["truncate"], answers))
        rows.append(row)
    with open(a.out.replace(".jsonl", f"_recitals_{seed}.json"), "w") as f:
        json.dump([tok.decode(t) for t in list(eng._windows.recitals.get(eng.default.key, {}).values())], f, indent=1)
    left = [r for r in rows if r["seed"] == seed and not r["in_window"]]
    print(f"seed {seed}: {report.rounds} rounds, {absorb_s:.0f} s; left the window: engine "
          f"{sum(r['engine_ok'] for r in left)}/{len(left)}, truncate {sum(r['truncate_ok'] for r in left)}/{len(left)}",
          flush=True)
with open(a.out, "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
for part, pick in (("left the window", False), ("in the window", True)):
    sel = [r for r in rows if r["in_window"] == pick]
    for name in ("engine", "truncate"):
        k = sum(r[f"{name}_ok"] for r in sel)
        lo, hi = wilson(k, len(sel))
        print(f"{part}: {name} {k}/{len(sel)} ({100 * lo:.1f}-{100 * hi:.1f}%)")
