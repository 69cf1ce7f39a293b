"""Each delta's least lead of X's token over every other on its recite probe (teacher-forced, the bank's
bf16 delta, the round's autocast), beside where its greedy recital departs from X: absorber-tiny,
key-value records, the first rounds of a stream, recite_exact off.

    python margins.py 402 3 160 > margins_seed402.txt
"""
import os, sys
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 4)
sys.path.insert(0, ROOT)
import torch
torch.set_num_threads(1)
from evals.evaluate import build_methods
from evals.tasks import make_example
seed = int(sys.argv[1]); rounds = int(sys.argv[2]); steps = int(sys.argv[3])
tok, (method,) = build_methods(["absorber+bank+recital"], os.path.join(ROOT, "model", "absorber-tiny"), 512)
eng = method.engine
eng.config.recite_exact = 0                 # measured before the check existed
eng.config.max_steps = steps
ex = make_example("kv_recall", 512 * 8, tok, seed=seed, n_queries=4)
ctx = tok.encode(ex.context, add_special_tokens=False)
eng.absorb(ctx[:256 * rounds + 384])
eng.generate(tok.encode(ex.query, add_special_tokens=False), max_new_tokens=2, recite=True)
recs = list(eng._windows.recitals[eng.default.key].values())
R, f = eng.runner, eng.frame
off = 0
for k, d in enumerate(eng.default.slots):
    x = ctx[off:off + d.round_tokens]; off += d.round_tokens
    lead = f.student_open + f.seeds["recite"]
    ids = torch.tensor([R.prefix + lead + x])
    s0 = len(R.prefix) + len(lead) - 1
    R.bind([d]); R.set_rows(1)
    with torch.no_grad(), R.autocast():
        h, _ = R.forward(ids)
        logits = (h[0, s0:s0 + len(x)].float() @ R.head.weight.float().T)
    tgt = torch.tensor(x)
    t = logits.gather(1, tgt[:, None])[:, 0]
    other = logits.clone(); other[torch.arange(len(x)), tgt] = -1e9
    mb = t - other.max(1).values
    rec = recs[k]
    dep = next((i for i, (a, b) in enumerate(zip(rec, x)) if a != b), None)
    print(f"delta {k}: min margin {mb.min():.3f} at {int(mb.argmin())}, below 0.5: {int((mb < 0.5).sum())}, below 1: {int((mb < 1).sum())}, "
          f"below 2: {int((mb < 2).sum())}; recital {len(rec)} departs at {dep}" + (f" (margin there {mb[dep]:.3f})" if dep is not None else ""), flush=True)
