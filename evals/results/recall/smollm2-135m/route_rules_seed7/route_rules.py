"""Routing rules over a bank of one-document slots: which slot each question's prompt picks."""
import os, sys, torch
import torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 5))
from absorber_engine import AbsorberEngine
from absorber_engine.model_store import recommended_config, resolve
from evals.facts import make_document
from evals.recall_eval import chat_ids

seed, docs = int(sys.argv[1]), int(sys.argv[2])
path = resolve("smollm2-135m")
cfg = recommended_config(path).replace(rank=4, lr=4e-3, memory_slots=16, replay_rounds=0)
eng = AbsorberEngine.from_pretrained(path, config=cfg)
tok = eng.tokenizer
texts = [make_document(seed, i, place=True) for i in range(docs)]
bank = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"bank_s{seed}.safetensors")   # not committed
if os.path.exists(bank):
    eng.load_memory(bank)
else:
    for d in texts:
        eng.absorb(tok.encode(d.text + "\n", add_special_tokens=False), flush=True)
    eng.save_memory(bank)
slots = list(eng.default.slots)
r = eng.runner
pre = chat_ids(tok, [{"role": "user", "content": ""}])

def tok_nll(deltas, ids):
    r.bind(deltas)
    x = torch.tensor([ids]).expand(len(deltas), -1)
    with torch.no_grad():
        final, _ = r.forward(x)
        return torch.stack([F.cross_entropy(r.logits(final[s, :-1]), x[0, 1:], reduction="none") for s in range(len(deltas))])

rules = {}
def vote(name, j, score):
    rules.setdefault(name, []).append(int(score.argmin()) == j)
for j, d in enumerate(texts):
    for q in d.questions:
        ids = chat_ids(tok, [{"role": "user", "content": q}])
        lo = next(i for i, (a, b) in enumerate(zip(ids, pre)) if a != b)
        nll = tok_nll(slots, ids)                  # (K, T-1): token t+1
        with eng.detached():
            pass
        base = tok_nll([eng.default.new_delta()], ids)[0]
        vote("mean_all", j, nll.mean(1))
        vote("question_only", j, nll[:, lo - 1:].mean(1))
        vote("vs_median", j, (nll - nll.median(0).values).clamp(max=0).sum(1))
        vote("surprising_to_base", j, (nll * (base > 2)).sum(1))
        vote("reduction_vs_base", j, (nll - base).clamp(max=0).sum(1))
for k, v in rules.items():
    print(f"{k:>20}: {sum(v)}/{len(v)}")
