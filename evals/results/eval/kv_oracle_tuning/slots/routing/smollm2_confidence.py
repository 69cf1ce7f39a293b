"""python smollm2_confidence.py K SEED (MEMORY=path of the stream's memory file, written by
`python -m evals.route_window --docs 24 --seed SEED --memory PATH` or by this script when missing).

SmolLM2 stream bank (seed 17, 24 docs): route() as it ships against 'confidence' routing (each
delta alone writes K greedy tokens; the delta with the lowest mean NLL of its own tokens wins;
the window by route()'s rule first), every question answered by the pick, read alone."""
import os, sys, json, time
os.environ["OMP_NUM_THREADS"] = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, *[".."] * 6))
import torch, torch.nn.functional as F
torch.set_num_threads(1)
from absorber_engine import stops as stopping
from absorber_engine.generate import _window_kv, generate_rows
from absorber_engine.routing import route, route_gains, zero_delta, WINDOW
from evals.route_window import stream_engine
from evals.facts import make_document, score
from evals.recall_eval import chat_ids
K = int(sys.argv[1]) if len(sys.argv) > 1 else 4
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 17
eng, ends = stream_engine("smollm2-135m", 24, seed, os.environ.get("MEMORY", f"mem{seed}.safetensors"))
r, tok = eng.runner, eng.tokenizer
slots = list(eng.default.slots); window = r.prefix + eng.window_tokens()
zero = zero_delta(slots[-1]); base_win = _window_kv(r, zero, window)
alone = {id(d): _window_kv(r, d, r.prefix) for d in slots}
stops = set(stopping.parse(["<|im_end|>"], tok, r.vocab_size).ids)

@torch.no_grad()
def confidence(ids):
    gens = generate_rows(r, slots, [alone[id(d)] for d in slots], [ids] * len(slots), K, 0.0, 1.0, stops,
                         [torch.Generator() for _ in slots])
    out = []
    r.bind(slots)
    L = max(len(g) for g in gens)
    seq = torch.tensor([r.prefix + ids + g + [0] * (L - len(g)) for g in gens])
    final, _ = r.forward(seq)
    P = len(r.prefix) + len(ids)
    for j, g in enumerate(gens):
        if not g: out.append(float("inf")); continue
        lg = r.logits(final[j, P - 1:P - 1 + len(g)]).float()
        out.append(float(F.cross_entropy(lg, torch.tensor(g), reduction="mean")))
    return torch.tensor(out)

def reply(k, ids):
    d, w = (zero, base_win) if k == WINDOW else (slots[k], alone[id(slots[k])])
    return tok.decode(generate_rows(r, [d], [w], [ids], 24, 0.0, 1.0, stops, [torch.Generator()])[0])

rows = []; t0 = time.time()
for j in range(24):
    d = make_document(seed, j, place=True)
    for q, a in zip(d.questions, d.answers):
        ids = chat_ids(tok, [{"role": "user", "content": q}])
        cur = route(r, slots, ids, base_win)
        gains, wg = route_gains(r, slots, ids, base_win)
        conf = confidence(ids)
        kc = int(conf.argmin())
        pick = WINDOW if (wg is not None and wg <= float(gains.min())) else kc
        row = {"doc": j, "in_window": ends[j] > eng.absorbed_tokens, "cur": cur, "conf": pick, "conf_delta": kc}
        row["cur_ok"] = bool(score(reply(cur, ids), a, d.answers))
        row["conf_ok"] = row["cur_ok"] if pick == cur else bool(score(reply(pick, ids), a, d.answers))
        rows.append(row)
    print(j, f"{time.time()-t0:.0f}s", sum(x["cur_ok"] for x in rows), sum(x["conf_ok"] for x in rows), len(rows), flush=True)
out = [x for x in rows if not x["in_window"]]; win = [x for x in rows if x["in_window"]]
print(f"K={K} seed {seed}: absorbed {len(out)}: route {sum(x['cur_ok'] for x in out)}, confidence {sum(x['conf_ok'] for x in out)}; "
      f"in window {len(win)}: route {sum(x['cur_ok'] for x in win)}, confidence {sum(x['conf_ok'] for x in win)}; "
      f"same pick {sum(x['cur']==x['conf'] for x in rows)}/{len(rows)}")
json.dump(rows, open(os.path.join(HERE, f"conf_route_s{seed}_k{K}.json"), "w"))
