import os as _os
HERE = _os.path.dirname(_os.path.abspath(__file__))
ROOT = _os.path.join(HERE, *[".."] * 6)
import json, sys, numpy as np
sys.path.insert(0, ROOT)
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(_os.path.join(ROOT, "model", "absorber-tiny"))
d = json.load(open(sys.argv[1])); idx = [int(x) for x in sys.argv[2].split(",")]
for i in idx:
    q = d["questions"][i]
    b, D, w = map(np.array, (q["base"], q["deltas"], q["window"]))
    print(f"\nQ{i} key={q['key']} round={q['round']} in_window={q['in_window']} route={q['route']} forced={q.get('forced')}")
    print(f"{'tok':>12} {'base':>5} | " + " ".join(f"d{k}-b".rjust(6) for k in range(len(D))) + " |  win-b")
    for t in range(len(b)):
        s = repr(tok.decode([q['toks'][t]]))[1:-1][:12]
        print(f"{s:>12} {b[t]:5.2f} | " + " ".join(f"{D[k,t]-b[t]:6.2f}" for k in range(len(D))) + f" | {w[t]-b[t]:6.2f}")
    g = np.minimum(0, D - b).sum(1); wg = np.minimum(0, w - b).sum()
    print(f"{'score':>12} {'':5} | " + " ".join(f"{x:6.2f}" for x in g) + f" | {wg:6.2f}")
