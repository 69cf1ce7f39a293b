"""A: memory_slots=8 + oracle questions (F=all) on the shipped GATED_FUTURES config, 4x stream."""
import sys, os, json, time, argparse
os.environ["OMP_NUM_THREADS"] = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
ORA = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ORA, "..", "..", "..", "..")); sys.path.insert(0, ORA)
import torch
torch.set_num_threads(1)
import oracle as O                     # installs the oracle monkeypatch (and the teacher patch, mode "delta")
import absorber_engine.generate as G
from absorber_engine import AbsorberEngine
from evals.evaluate import engine_config, GATED_FUTURES

ROUTES = []
_route = G.route
FORCE = {"k": None}
def _logged_route(*a, **k):
    if FORCE["k"] is not None: return FORCE["k"]
    r = _route(*a, **k); ROUTES.append(r); return r
G.route = _logged_route

ap = argparse.ArgumentParser()
ap.add_argument("--seeds", default="13")
ap.add_argument("--gate", type=float, default=1.3)
ap.add_argument("--slots", type=int, default=8)
ap.add_argument("--F", default="all")
ap.add_argument("--prompt", default=None)
ap.add_argument("--no-follow", action="store_true")
ap.add_argument("--out", default=os.path.join(HERE, "a_slots.jsonl"))
a = ap.parse_args()
F = None if a.F == "none" else ("all" if a.F == "all" else int(a.F))
ch = dict(GATED_FUTURES, surprise_gate=a.gate, memory_slots=a.slots, replay_rounds=0)
if a.no_follow: ch["futures_follow_y"] = False
if a.prompt is not None: ch["future_prompt"] = a.prompt.encode().decode("unicode_escape")
cfg = engine_config(512, **ch)
print(cfg, flush=True)
eng = AbsorberEngine.from_pretrained(O.MODEL, config=cfg)
for s in [int(x) for x in a.seeds.split(",")]:
    ROUTES.clear()
    t0 = time.perf_counter()
    O.run(s, F, eng, a.out)
    tot = time.perf_counter() - t0
    sess = eng._session() if hasattr(eng, "_session") else None
    # append routing picks (2 generates per question: q then record prompt) to the last line
    lines = open(a.out).read().splitlines()
    d = json.loads(lines[-1])
    # forced routing: every left-window question read by each delta of the bank alone
    import re as _re
    from evals.tasks import make_example, score, kv_question
    tok = eng.tokenizer; nsl = len(eng.session().slots)
    ex = make_example("kv_recall", 2048, tok, seed=s, n_queries=40)
    t1 = time.perf_counter()
    for r in d["rows"]:
        if r["in_window"]: continue
        r["forced"] = []
        for k in range(nsl):
            FORCE["k"] = k
            g = tok.decode(eng.generate(tok.encode(kv_question(r["key"]), add_special_tokens=False), max_new_tokens=8))
            r["forced"].append(bool(score(ex, g, [r["answer"]])))
        FORCE["k"] = None
    d["n_slots"] = nsl; d["forced_seconds"] = time.perf_counter() - t1
    left = [r for r in d["rows"] if not r["in_window"]]
    own = [r["forced"][d["token_rounds"][r["key"]]] for r in left if d["token_rounds"][r["key"]] < nsl] if nsl >= 7 else []
    print(f"forced routing: any delta right {sum(any(r['forced']) for r in left)}/{len(left)}; own-round delta right {sum(own)}/{len(own)}; slots {nsl}", flush=True)
    d["routes"] = ROUTES[:]; d["total_seconds"] = tot; d["slots"] = a.slots
    d["prompt"] = cfg.future_prompt; d["futures_follow_y"] = cfg.futures_follow_y
    lines[-1] = json.dumps(d); open(a.out, "w").write("\n".join(lines) + "\n")
    print(f"seed {s} total {tot:.0f}s routes {ROUTES}", flush=True)
