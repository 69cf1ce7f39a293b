"""Key-value records on absorber-tiny: absorber+bank+recital with and without recite_exact, the same
streams, 40 questions a stream (records that left the window are scored), and truncation beside them.

    python paired.py --length 4 --seeds 204,205 --recite-exact 160 --out kv4x_seeds204_205.jsonl
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

from evals.evaluate import build_methods  # noqa: E402
from evals.recall_eval import wilson  # noqa: E402
from evals.tasks import answer_text, kv_record, make_example, score  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--length", type=int, default=4, help="multiple of the trained context (512)")
ap.add_argument("--seeds", default="204")
ap.add_argument("--questions", type=int, default=40)
ap.add_argument("--recite-exact", type=int, default=160)
ap.add_argument("--out", required=True)
a = ap.parse_args()
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
tok, (truncate, method) = build_methods(["truncate", "absorber+bank+recital"], os.path.join(ROOT, "model", "absorber-tiny"), 512)
eng = method.engine
rows = []
for seed in (int(s) for s in a.seeds.split(",")):
    ex = make_example("kv_recall", 512 * a.length, tok, seed=seed, n_queries=a.questions)
    context = tok.encode(ex.context, add_special_tokens=False)
    asked = [(ex.query, ex.answers)] + ex.more
    for extra in (0, a.recite_exact):
        eng.config.recite_exact = extra
        eng.config.validate()
        eng.reset()
        t0 = time.perf_counter()
        report = eng.absorb(context)
        absorb_s = time.perf_counter() - t0
        window = tok.decode(eng.window_tokens())
        ok = left = 0
        for query, answers in asked:
            ids = tok.encode(query, add_special_tokens=False)
            max_new = len(tok.encode(answer_text(answers), add_special_tokens=False)) + 2
            record = kv_record(query.split('"')[1], answers[0])
            row = {"seed": seed, "recite_exact": extra, "query": query, "answers": answers, "absorb_s": absorb_s,
                   "rounds": report.rounds, "steps": report.steps, "unrecited": report.unrecited,
                   "in_window": record.strip() in window}
            row["engine"] = tok.decode(eng.generate(ids, max_new_tokens=max_new, recite=True))
            row["engine_ok"] = bool(score(ex, row["engine"], answers))
            if extra == 0:
                row["truncate"] = truncate.run(context, ids, [], max_new).generated
                row["truncate_ok"] = bool(score(ex, row["truncate"], answers))
            rows.append(row)
            if not row["in_window"]:
                left += 1
                ok += row["engine_ok"]
        print(f"seed {seed} recite_exact {extra}: {report.rounds} rounds, {report.steps} steps, "
              f"{report.unrecited} unrecited, {absorb_s:.0f} s; left the window: {ok}/{left}", flush=True)
with open(a.out, "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
for extra in (0, a.recite_exact):
    sel = [r for r in rows if r["recite_exact"] == extra and not r["in_window"]]
    k = sum(r["engine_ok"] for r in sel)
    lo, hi = wilson(k, len(sel))
    print(f"left the window, recite_exact {extra}: {k}/{len(sel)} ({100 * lo:.1f}-{100 * hi:.1f}%)")
sel = [r for r in rows if r["recite_exact"] == 0 and not r["in_window"]]
print(f"left the window, truncate: {sum(r['truncate_ok'] for r in sel)}/{len(sel)}")
