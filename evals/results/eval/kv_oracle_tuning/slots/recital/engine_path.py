"""The engine's own recite path (generate(recite=True)) on the bank recital_route.py saved:
    python engine_path.py 13     # seed 13: left window 31/34, in window 6/6, 4.2 s for 40 questions
The bank was saved before memory files kept each delta's round length: set here to n = 256."""
import sys, os, time, json
os.environ["OMP_NUM_THREADS"]="1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 6))
import torch; torch.set_num_threads(1)
from absorber_engine import AbsorberEngine
from evals.evaluate import engine_config, GATED_FUTURES
from evals.tasks import make_example, score, kv_question
s=int(sys.argv[1])
cfg=engine_config(512, **dict(GATED_FUTURES, surprise_gate=0.0, memory_slots=8, replay_rounds=0))
eng=AbsorberEngine.from_pretrained(os.path.join(os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 6), "model", "absorber-tiny"), config=cfg)
tok=eng.tokenizer
ex=make_example("kv_recall", 2048, tok, seed=s, n_queries=40)
eng.load_memory(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"bank_s{s}.safetensors"))
for d in eng.default.slots: d.round_tokens = 256
r=json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"res_s{s}.json")))
t=time.time(); ok={True:[0,0],False:[0,0]}
for row in r["rows"]:
    g=tok.decode(eng.generate(tok.encode(kv_question(row["key"]), add_special_tokens=False), max_new_tokens=8, recite=True))
    good=bool(score(ex, g, [row["answer"]])); w=row["in_window"]
    ok[w][0]+=good; ok[w][1]+=1
print(f"seed {s}: left window {ok[False][0]}/{ok[False][1]}, in window {ok[True][0]}/{ok[True][1]}, {time.time()-t:.1f}s")
