"""Tuning check of recite_exact on seed 402 (8x): per round, its steps and its checks past max_steps;
then each delta's recital against its round's X (the first token where it departs).

    python tuning_check.py 402 8 160 > tuning_seed402_8x.txt
"""
import os, sys, json, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 4)
sys.path.insert(0, ROOT)
import torch
torch.set_num_threads(1)
from absorber_engine import round as R
from evals.evaluate import build_methods
from evals.tasks import make_example
seed, length, extra = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
orig = R.train_deltas
def train(*a, **k):
    res = orig(*a, **k)
    print(f"round: steps {res[0].steps} checks {res[0].misses[:3]}..{res[0].misses[-3:]} loss {res[0].losses[-1]:.3f}", flush=True)
    return res
R.train_deltas = train
tok, (method,) = build_methods(["absorber+bank+recital"], os.path.join(ROOT, "model", "absorber-tiny"), 512)
eng = method.engine
eng.config.recite_exact = extra
ex = make_example("kv_recall", 512 * length, tok, seed=seed, n_queries=40)
context = tok.encode(ex.context, add_special_tokens=False)
t0 = time.perf_counter()
rep = eng.absorb(context)
print("absorb", time.perf_counter() - t0, "steps", rep.steps, "unrecited", rep.unrecited, flush=True)
eng.generate(tok.encode(ex.query, add_special_tokens=False), max_new_tokens=4, recite=True)
recs = list(eng._windows.recitals[eng.default.key].values())
offs = 0
for k, d in enumerate(eng.default.slots):
    x = context[offs:offs + d.round_tokens]; offs += d.round_tokens
    r = recs[k]
    pref = next((i for i, (a, b) in enumerate(zip(r, x)) if a != b), None)
    print(f"delta {k}: recital {len(r)} departs at {pref}")
