"""Offline: per-token NLL of every candidate (base, each delta alone, base after the window) on each saved question."""
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
from absorber_engine.routing import route, route_gains, zero_delta, WINDOW
from absorber_engine.generate import _window_kv
MODEL = _os.path.join(ROOT, "model", "absorber-tiny")

ap = argparse.ArgumentParser(); ap.add_argument("--seed", type=int, default=13); a = ap.parse_args()
s = a.seed; t0 = time.perf_counter()
B = json.load(open(f"{HERE}/bank_s{s}.json"))
mem = f"{HERE}/mem_s{s}.safetensors"
eng = AbsorberEngine.from_pretrained(MODEL, config=read_memory_config(mem))
eng.load_memory(mem)
sess = eng.session(); R = eng.runner
deltas = list(sess.slots); zero = zero_delta(deltas[-1])
assert eng.window_tokens() == B["window"], "window differs"
win = _window_kv(R, zero, R.prefix + eng.window_tokens())

@torch.no_grad()
def per_token(ids):
    seq = R.prefix + list(ids); start = max(len(R.prefix), 1)
    R.bind([zero] + deltas)
    x = torch.tensor([seq]).expand(len(deltas) + 1, -1)
    final, _ = R.forward(x)
    nll = torch.stack([F.cross_entropy(R.logits(final[k, start - 1:-1]).float(), x[0, start:], reduction="none") for k in range(len(deltas) + 1)])
    R.bind([zero])
    after, _ = R.forward(torch.tensor([ids]), R.make_cache(win.kv))
    st = torch.cat([win.last[None], after[0, :-1]])[start - len(R.prefix):]
    wn = F.cross_entropy(R.logits(st).float(), x[0, start:], reduction="none")
    return seq[start:], nll[0], nll[1:], wn

out = []
for q in B["questions"]:
    toks, base, dn, wn = per_token(q["asked"])
    pick = route(R, deltas, q["asked"], win, q["opening"])
    out.append(dict(q, toks=toks, base=base.tolist(), deltas=dn.tolist(), window=wn.tolist(), pick_offline=pick))
print(f"seed {s}: offline route == recorded route for {sum(o['pick_offline'] == o['route'] for o in out)}/{len(out)}; "
      f"prefix {R.prefix} frame {B['frame']} compute_dtype {R.compute_dtype}; {time.perf_counter() - t0:.1f}s")
json.dump(dict(seed=s, n_slots=len(deltas), questions=out), open(f"{HERE}/nll_s{s}.json", "w"))
