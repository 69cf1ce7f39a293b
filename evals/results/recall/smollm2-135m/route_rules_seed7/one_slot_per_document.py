"""K memory slots (deltas), docs round-robin, questions routed to the slot whose delta finds the
question least surprising. Prints routed / oracle accuracy."""
import json, os, sys, time
import torch
from absorber_engine import AbsorberEngine
from absorber_engine.model_store import recommended_config, resolve
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 5))
from evals.facts import make_document, score
from evals.recall_eval import chat_ids

seed, docs, K = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
over = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
torch.manual_seed(0)
path = resolve("smollm2-135m")
cfg = recommended_config(path).replace(**over)
eng = AbsorberEngine.from_pretrained(path, config=cfg)
tok = eng.tokenizer
texts = [make_document(seed, i, place=True) for i in range(docs)]
t0 = time.time()
sess = [eng.session(f"s{k}") for k in range(K)]
for i, d in enumerate(texts):
    ids = tok.encode(d.text + "\n", add_special_tokens=False)
    sess[i % K].absorb(ids, flush=True)
    print(f"doc {i} -> slot {i % K} {time.time() - t0:.0f}s", flush=True)
base = eng.session("base")

def nll(s, ids, lo):
    with torch.no_grad():
        lg = s.logits(ids).float()
    lp = torch.log_softmax(lg[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return -lp[lo - 1:].mean().item()

rows = []
for j, d in enumerate(texts):
    for q, a in zip(d.questions, d.answers):
        ids = chat_ids(tok, [{"role": "user", "content": q}])
        pre = chat_ids(tok, [{"role": "user", "content": ""}])
        lo = next(i for i, (x, y) in enumerate(zip(ids, pre)) if x != y)   # first question token
        scores = [nll(s, ids, lo) for s in sess]
        b = nll(base, ids, lo)
        route = min(range(K), key=lambda k: scores[k])
        rep = tok.decode(sess[route].generate(ids, max_new_tokens=24, stop=["<|im_end|>"]))
        ok = score(rep, a)
        if route == j % K:
            ok_o = ok
        else:
            ok_o = score(tok.decode(sess[j % K].generate(ids, max_new_tokens=24, stop=["<|im_end|>"])), a)
        rows.append(dict(doc=j, slot=j % K, route=route, ok=ok, oracle=ok_o, nll=scores, base=b, q=q, a=a, reply=rep))
        print(j, j % K, route, ok, ok_o, rep[:60].replace("\n", " "), flush=True)
n = len(rows)
print(f"K={K} seed={seed} routed {sum(r['ok'] for r in rows)}/{n} oracle {sum(r['oracle'] for r in rows)}/{n} "
      f"route-acc {sum(r['route'] == r['slot'] for r in rows)}/{n} absorb {time.time() - t0:.0f}s")
json.dump(rows, open(os.path.dirname(os.path.abspath(__file__)) + f"/slots_s{seed}_K{K}_{'_'.join(f'{k}{v}' for k, v in over.items())}.json", "w"), indent=1)
