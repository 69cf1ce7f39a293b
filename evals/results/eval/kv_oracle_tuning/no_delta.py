"""In-window questions with no delta: the last 300 tokens of seed 13's 4x list held in the raw
window (nothing absorbed), every question about a record there asked through the engine."""
import os, re, sys
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", ".."))
import torch
torch.set_num_threads(1)
from absorber_engine import AbsorberEngine
from evals.evaluate import GATED_FUTURES, engine_config
from evals.tasks import make_example, score

eng = AbsorberEngine.from_pretrained(os.path.join(HERE, "..", "..", "..", "..", "model", "absorber-tiny"),
                                     config=engine_config(512, **GATED_FUTURES))
tok = eng.tokenizer
ex = make_example("kv_recall", 2048, tok, seed=13, n_queries=40)
eng.absorb(tok.encode(ex.context, add_special_tokens=False)[-300:], flush=False)
window = tok.decode(eng.window_tokens())
asked = right = 0
for q, ans in [(ex.query, ex.answers)] + list(ex.more):
    if f'"{re.search(chr(34) + "([^" + chr(34) + "]+)" + chr(34), q).group(1)}"' in window:
        asked += 1
        right += score(ex, tok.decode(eng.generate(tok.encode(q, add_special_tokens=False), max_new_tokens=8)), ans)
print(f"no delta, records in the window: {right:.0f}/{asked}")
