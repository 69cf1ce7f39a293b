"""Reproduce the a_slots bank (memory_slots=8, gate 0, no-follow, oracle futures) and save it with every question's prompt."""
import os as _os
HERE = _os.path.dirname(_os.path.abspath(__file__))
ROOT = _os.path.join(HERE, *[".."] * 6)
import sys, os, json, time, re, argparse
os.environ["OMP_NUM_THREADS"] = "1"
ORA = _os.path.join(HERE, "..", "..")
sys.path.insert(0, ROOT); sys.path.insert(0, ORA)
import torch
torch.set_num_threads(1)
import oracle as O
import absorber_engine.generate as G
from absorber_engine import AbsorberEngine
from absorber_engine.routing import asked_alone
from evals.evaluate import engine_config, GATED_FUTURES
from evals.tasks import make_example, score, kv_question

ROUTES = []; _route = G.route; FORCE = {"k": None}
def _logged_route(*a, **k):
    if FORCE["k"] is not None: return FORCE["k"]
    r = _route(*a, **k); ROUTES.append(r); return r
G.route = _logged_route

ap = argparse.ArgumentParser(); ap.add_argument("--seed", type=int, default=13); a = ap.parse_args()
ch = dict(GATED_FUTURES, surprise_gate=0.0, memory_slots=8, replay_rounds=0, futures_follow_y=False)
cfg = engine_config(512, **ch)
eng = AbsorberEngine.from_pretrained(O.MODEL, config=cfg)
s = a.seed; out = f"{HERE}/run_s{s}.jsonl"
if os.path.exists(out): os.remove(out)
t0 = time.perf_counter()
O.run(s, "all", eng, out)
tot = time.perf_counter() - t0
d = json.loads(open(out).read().splitlines()[-1])
eng.save_memory(f"{HERE}/mem_s{s}.safetensors")
tok = eng.tokenizer; sess = eng.session(); nsl = len(sess.slots)
ex = make_example("kv_recall", 2048, tok, seed=s, n_queries=40)
frame = eng._question_frame
qs = []
for i, r in enumerate(d["rows"]):
    ids = tok.encode(kv_question(r["key"]), add_special_tokens=False)
    asked = asked_alone(ids, frame)
    opening = len(frame[0]) if frame and asked[:len(frame[0])] == frame[0] else 0
    q = dict(key=r["key"], answer=r["answer"], in_window=r["in_window"], round=d["token_rounds"][r["key"]],
             ids=ids, asked=asked, opening=opening, route=ROUTES[2 * i], q_ok=r["q_ok"])
    if not r["in_window"]:
        q["forced"] = []
        for k in range(nsl):
            FORCE["k"] = k
            g = tok.decode(eng.generate(ids, max_new_tokens=8))
            q["forced"].append(bool(score(ex, g, [r["answer"]])))
        FORCE["k"] = None
    qs.append(q)
json.dump(dict(seed=s, n_slots=nsl, window=eng.window_tokens(), prefix=eng.runner.prefix, frame=frame,
               compute_dtype=str(eng.runner.compute_dtype), absorb_seconds=d["seconds"], total_seconds=time.perf_counter() - t0,
               questions=qs), open(f"{HERE}/bank_s{s}.json", "w"))
left = [q for q in qs if not q["in_window"]]
print(f"seed {s}: slots {nsl}, absorb {d['seconds']:.0f}s total {time.perf_counter()-t0:.0f}s; routed right {sum(q['q_ok'] for q in left)}/{len(left)};"
      f" own forced {sum(q['forced'][q['round']] for q in left if q['round'] < nsl)}/{len(left)}; routes {[q['route'] for q in qs]}", flush=True)
