"""Before recite_exact: per round, the tokens of X the recite probe's greedy pick misses at each step
(teacher-forced, no margin); at the end each delta's recital against its round's X.

    python steps_to_exact.py 401 8 > steps_to_exact_seed401.txt   (and 402)
"""
import os, sys, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 4)
sys.path.insert(0, ROOT)
import torch
torch.set_num_threads(1)
from absorber_engine import round as R
from evals.evaluate import build_methods
from evals.tasks import make_example

seed, length = int(sys.argv[1]), int(sys.argv[2])
log = {"rounds": []}
cur = {}
orig_sync = R._sync_loss
def sync(runner, states, final, grp, tgt, cfg):
    if grp.x_span is not None:
        start, n = grp.x_span
        with torch.no_grad():
            logits = final[:, start - 1:start - 1 + n].float() @ runner.head_weight().float().T
            miss = int((logits.argmax(-1) != grp.ids[:, start:start + n]).sum())
        cur.setdefault("m", []).append(miss)
    return orig_sync(runner, states, final, grp, tgt, cfg)
R._sync_loss = sync
orig_train = R.train_deltas
def train(*args, **kw):
    cur.clear()
    res = orig_train(*args, **kw)
    m = cur.get("m", [])
    log["rounds"].append({"misses": m, "loss_first": res[0].losses[0], "loss_last": res[0].losses[-1]})
    first0 = next((i for i, v in enumerate(m) if v == 0), None)
    print(f"round {len(log['rounds'])}: misses first {m[:1]} last {m[-3:]} first exact at {first0}, loss {res[0].losses[0]:.3f}->{res[0].losses[-1]:.3f}", flush=True)
    return res
R.train_deltas = train

tok, (method,) = build_methods(["absorber+bank+recital"], os.path.join(ROOT, "model", "absorber-tiny"), 512)
eng = method.engine
eng.config.recite_exact = 0                 # measured before the check existed
ex = make_example("kv_recall", 512 * length, tok, seed=seed, n_queries=40)
context = tok.encode(ex.context, add_special_tokens=False)
t0 = time.perf_counter()
eng.absorb(context)
print("absorb", time.perf_counter() - t0, flush=True)
eng.generate(tok.encode(ex.query, add_special_tokens=False), max_new_tokens=4, recite=True)
recs = list(eng._windows.recitals[eng.default.key].values())
offs = 0
for k, d in enumerate(eng.default.slots):
    x = context[offs:offs + d.round_tokens]; offs += d.round_tokens
    r = recs[k]
    same = sum(a == b for a, b in zip(r, x))
    pref = next((i for i, (a, b) in enumerate(zip(r, x)) if a != b), min(len(r), len(x)))
    log["rounds"][k]["recital_prefix"] = pref
    log["rounds"][k]["x_len"] = len(x)
    print(f"delta {k}: x {len(x)} recital {len(r)} common prefix {pref}, final misses {log['rounds'][k]['misses'][-1]}")
