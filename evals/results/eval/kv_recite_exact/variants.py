"""Key-value records on absorber-tiny: absorber+bank+recital with config changes, each variant over the
same streams, 40 questions a stream (the records that left the window are scored).

    python variants.py --length 4 --seeds 202,203 \
        --variants '[{"recite_exact": 160}, {"recite_exact": 160, "round_cut": "\n", "round_cut_min": 240}]' \
        --out cut4x_seeds202_203.jsonl
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

from absorber_engine import AbsorberConfig  # noqa: E402
from evals.evaluate import build_methods  # noqa: E402
from evals.methods import EngineMethod  # noqa: E402
from evals.recall_eval import wilson  # noqa: E402
from evals.tasks import answer_text, kv_record, make_example, score  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--length", type=int, default=4, help="multiple of the trained context (512)")
ap.add_argument("--seeds", default="202")
ap.add_argument("--questions", type=int, default=40)
ap.add_argument("--variants", required=True, help="a JSON list of config changes")
ap.add_argument("--out", required=True)
a = ap.parse_args()
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
model_dir = os.path.join(ROOT, "model", "absorber-tiny")
tok, (base,) = build_methods(["absorber+bank+recital"], model_dir, 512)
variants = json.loads(a.variants)
rows = []
for v, changes in enumerate(variants):
    eng = EngineMethod(f"variant {v}", model_dir, AbsorberConfig(**{**base.engine.config.to_dict(), **changes}),
                       recite=True).engine
    for seed in (int(s) for s in a.seeds.split(",")):
        ex = make_example("kv_recall", 512 * a.length, tok, seed=seed, n_queries=a.questions)
        context = tok.encode(ex.context, add_special_tokens=False)
        eng.reset()
        t0 = time.perf_counter()
        report = eng.absorb(context)
        absorb_s = time.perf_counter() - t0
        window = tok.decode(eng.window_tokens())
        ok = left = 0
        for query, answers in [(ex.query, ex.answers)] + ex.more:
            ids = tok.encode(query, add_special_tokens=False)
            max_new = len(tok.encode(answer_text(answers), add_special_tokens=False)) + 2
            row = {"seed": seed, "variant": v, "changes": changes, "query": query, "answers": answers,
                   "absorb_s": absorb_s, "rounds": report.rounds, "steps": report.steps,
                   "unrecited": report.unrecited,
                   "in_window": kv_record(query.split('"')[1], answers[0]).strip() in window}
            row["engine"] = tok.decode(eng.generate(ids, max_new_tokens=max_new, recite=True))
            row["engine_ok"] = bool(score(ex, row["engine"], answers))
            rows.append(row)
            if not row["in_window"]:
                left, ok = left + 1, ok + row["engine_ok"]
        print(f"seed {seed} variant {v} {changes}: {report.rounds} rounds, {report.steps} steps, "
              f"{report.unrecited} unrecited, {absorb_s:.0f} s; left the window: {ok}/{left}", flush=True)
with open(a.out, "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
for v, changes in enumerate(variants):
    sel = [r for r in rows if r["variant"] == v and not r["in_window"]]
    k = sum(r["engine_ok"] for r in sel)
    lo, hi = wilson(k, len(sel))
    print(f"left the window, variant {v} {changes}: {k}/{len(sel)} ({100 * lo:.1f}-{100 * hi:.1f}%)")
