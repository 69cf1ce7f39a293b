"""Offline: each candidate's greedy continuation (8 tokens) of each question: per-token logprob and entropy, and whether it answers."""
import os as _os
HERE = _os.path.dirname(_os.path.abspath(__file__))
ROOT = _os.path.join(HERE, *[".."] * 6)
import sys, os, json, time, argparse
os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, ROOT)
import torch, torch.nn.functional as F
torch.set_num_threads(1)
from absorber_engine import AbsorberEngine
from absorber_engine.memory_file import read_memory_config
from absorber_engine.routing import zero_delta
from absorber_engine.generate import _window_kv
from evals.tasks import make_example, score
MODEL = _os.path.join(ROOT, "model", "absorber-tiny")
ap = argparse.ArgumentParser(); ap.add_argument("--seed", type=int, default=13); ap.add_argument("--n", type=int, default=8); a = ap.parse_args()
s = a.seed; t0 = time.perf_counter()
mem = f"{HERE}/mem_s{s}.safetensors"
eng = AbsorberEngine.from_pretrained(MODEL, config=read_memory_config(mem)); eng.load_memory(mem)
R = eng.runner; tok = eng.tokenizer; deltas = list(eng.session().slots); zero = zero_delta(deltas[-1])
win = _window_kv(R, zero, R.prefix + eng.window_tokens())
ex = make_example("kv_recall", 2048, tok, seed=s, n_queries=40)
D = json.load(open(f"{HERE}/nll_s{s}.json"))

@torch.no_grad()
def greedy(delta, ids, window):
    seq = (list(ids) if window else R.prefix + list(ids)); new, lp, ent = [], [], []
    R.bind([delta])
    for _ in range(a.n):
        final, _ = R.forward(torch.tensor([seq + new]), R.make_cache(win.kv) if window else None)
        l = F.log_softmax(R.logits(final[0, -1]).float(), -1)
        t = int(l.argmax()); new.append(t); lp.append(float(l[t])); ent.append(float(-(l.exp() * l).sum()))
    return new, lp, ent

@torch.no_grad()
def base_nll(ids, new):      # the base model alone (no window, no delta) on a continuation
    R.bind([zero]); seq = R.prefix + list(ids) + new
    final, _ = R.forward(torch.tensor([seq]))
    l = F.log_softmax(R.logits(final[0, len(seq) - len(new) - 1:-1]).float(), -1)
    return [float(l[i, t]) for i, t in enumerate(new)]

for q in D["questions"]:
    q["gen"] = []
    for k, d in enumerate(deltas + [None]):
        new, lp, ent = greedy(zero if d is None else d, q["asked"], d is None)
        txt = tok.decode(new)
        q["gen"].append(dict(text=txt, ids=new, lp=lp, ent=ent, base_lp=base_nll(q["asked"], new), ok=bool(score(ex, txt, [q["answer"]]))))
json.dump(D, open(f"{HERE}/conf_s{s}.json", "w"))
print(f"seed {s}: {time.perf_counter() - t0:.1f}s")
