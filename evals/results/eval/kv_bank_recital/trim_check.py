"""Replays the engine's answers from a many_questions.py run's recitals, as read and with a half line at
a recital's end trimmed (recital._half_line's rule): python trim_check.py kv8x_seed401_rerun.jsonl kv8x_seed401_rerun_recitals.json"""
import sys, os, json
os.environ["OMP_NUM_THREADS"]="1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 4))
import torch; torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer
from evals.tasks import make_example, score
M=os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 4, "model", "absorber-tiny")
tok=AutoTokenizer.from_pretrained(M); model=AutoModelForCausalLM.from_pretrained(M, dtype=torch.float32).eval()
rows=[json.loads(l) for l in open(sys.argv[1])]; rec=json.load(open(sys.argv[2]))
ex=make_example("kv_recall", 4096, tok, seed=rows[0]["seed"], n_queries=40)
def ans(text, q):
    ids=[0]+tok.encode(text, add_special_tokens=False)+tok.encode("\n", add_special_tokens=False)+tok.encode(q, add_special_tokens=False)
    out=[]
    with torch.no_grad():
        for _ in range(7):
            out.append(int(model(torch.tensor([ids+out])).logits[0,-1].argmax()))
    return tok.decode(out)
def _half(t):
    lines = t.split("\n")
    return len(lines) > 1 and len(lines[-1]) <= max(map(len, lines[:-1]))
for name, f in (("as is", lambda t: t), ("trimmed", lambda t: t[:t.rindex("\n")] if _half(t) else t)):
    ok=n=0
    for r in rows:
        if r["in_window"] or r["picked"] is None or r["picked"] >= len(rec): continue
        g=ans(f(rec[r["picked"]]), r["query"]); ok+=bool(score(ex, g, r["answers"])); n+=1
    print(name, f"{ok}/{n}", flush=True)
