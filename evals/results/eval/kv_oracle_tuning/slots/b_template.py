"""B: future_prompt = '\\nWhat is the value of "' (the eval question's opening), sampled futures (no oracle),
memory_slots as given, GATED_FUTURES otherwise. Logs every sampled future: the key it names (in X / in Y /
elsewhere in the context / nowhere) and whether the value it gives is the record's; then the 4x recall."""
import sys, os, re, json, time, argparse
os.environ["OMP_NUM_THREADS"] = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
ORA = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ORA, "..", "..", "..", "..")); sys.path.insert(0, ORA)
import torch
torch.set_num_threads(1)
import oracle as O                     # oracle patch stays off with F=None (O.run(F=None) -> original futures)
import absorber_engine.teacher as T
import absorber_engine.generate as G
from absorber_engine import AbsorberEngine
from evals.evaluate import engine_config, GATED_FUTURES

ROUTES = []
_route = G.route
def _logged_route(*a, **k):
    r = _route(*a, **k); ROUTES.append(r); return r
G.route = _logged_route

FUT = []   # per round: list of dicts
CTXT = {"context": "", "tok": None}
_inner = O._orig
def _logging_y_and_futures(runner, batch, cfg, n_futures, need_final, per_stream):
    before = len(per_stream[0])
    _inner(runner, batch, cfg, n_futures, need_final, per_stream)
    tok = CTXT["tok"]
    x_text = tok.decode(batch.x[0].tolist()); y_text = tok.decode(batch.y[0].tolist())
    xrec = dict(O.REC.findall(x_text)); yrec = dict(O.REC.findall(y_text))
    allrec = dict(O.REC.findall(CTXT["context"]))
    groups = per_stream[0][before:]
    rows = []
    for g in groups[1:] if batch.y.shape[1] > 0 else groups:   # first group is Y
        for r in range(g.ids.shape[0]):
            text = tok.decode(g.ids[r].tolist())
            m = re.search(r'"([^"\n]+)"', text) or re.search(r'^([^"\n]+)"', text)
            key = m.group(1) if m else None
            where = ("X" if key in xrec else "Y" if key in yrec else "elsewhere" if key in allrec else "nowhere") if key else "no key"
            val = None
            if key:
                mv = re.search(r'(?:is|:)\s*(\d+)', text[m.end():])
                val = mv.group(1) if mv else None
            rows.append(dict(round=len(FUT) + 1, text=text, key=key, where=where, value=val,
                             right=(val is not None and allrec.get(key) == val)))
    FUT.append(rows)
T._y_and_futures = _logging_y_and_futures

ap = argparse.ArgumentParser()
ap.add_argument("--seeds", default="13")
ap.add_argument("--gate", type=float, default=1.3)
ap.add_argument("--slots", type=int, default=8)
ap.add_argument("--prompt", default='\\nWhat is the value of "')
ap.add_argument("--out", default=os.path.join(HERE, "b_template.jsonl"))
a = ap.parse_args()
prompt = a.prompt.encode().decode("unicode_escape")
cfg = engine_config(512, **dict(GATED_FUTURES, surprise_gate=a.gate, memory_slots=a.slots, replay_rounds=0,
                                future_prompt=prompt))
print(repr(cfg.future_prompt), cfg.memory_slots, cfg.surprise_gate, flush=True)
eng = AbsorberEngine.from_pretrained(O.MODEL, config=cfg)
from evals.tasks import make_example
for s in [int(x) for x in a.seeds.split(",")]:
    ROUTES.clear(); FUT.clear()
    CTXT.update(tok=eng.tokenizer, context=make_example("kv_recall", 2048, eng.tokenizer, seed=s, n_queries=40).context)
    t0 = time.perf_counter()
    O.run(s, None, eng, a.out)
    tot = time.perf_counter() - t0
    lines = open(a.out).read().splitlines()
    d = json.loads(lines[-1]); d.update(routes=ROUTES[:], total_seconds=tot, slots=a.slots, prompt=prompt, futures=FUT[:])
    lines[-1] = json.dumps(d); open(a.out, "w").write("\n".join(lines) + "\n")
    flat = [r for rr in FUT for r in rr]
    from collections import Counter
    print("futures where:", Counter(r["where"] for r in flat), "right values:", sum(r["right"] for r in flat), "/", len(flat))
    for r in flat[:8]: print("   ", repr(r["text"][:90]), r["where"], r["value"], r["right"])
    print(f"seed {s} total {tot:.0f}s routes {ROUTES}", flush=True)
