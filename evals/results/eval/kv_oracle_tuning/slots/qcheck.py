"""Do the model's sampled questions name keys of what it read? Seeds 13 and 14, four 256-token
windows each, 4 samples of 64 tokens after "\\nWhat is" at temperature 0.3: every question line's
first key (the one it asks about), where it is, and whether the value given is that record's."""
import os, re, sys
os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 5))
import torch
torch.set_num_threads(1)
from absorber_engine import AbsorberEngine
from evals.tasks import make_example
model = sys.argv[1]
eng = AbsorberEngine.from_pretrained(model)
tok = eng.tokenizer
counts = {"in what it read": 0, "elsewhere in the list": 0, "nowhere": 0}; right = same = 0; n = 0
for seed in (13, 14):
    ex = make_example("kv_recall", 2048, tok, seed=seed, n_queries=40)
    ids = tok.encode(ex.context, add_special_tokens=False)
    recs = dict(re.findall(r'"([a-z]+ [a-z]+)": (\d+)', ex.context))
    for start in (0, 256, 768, 1280):
        read = ids[start:start + 256]
        seen = tok.decode(read)
        for i in range(4):
            text = tok.decode(eng.generate(read + tok.encode("\nWhat is", add_special_tokens=False), max_new_tokens=64,
                                           temperature=0.3, seed=100 + i))
            # each question's first mention of a key (what it asks about), and the value it gives
            for line in text.split("\n"):
                keys = re.findall(r'"([^"\n]+)"', line)
                if not keys:
                    continue
                key, val = keys[0], (re.findall(r" is (\d+)", line) or [None])[0]
                where = ("in what it read" if f'"{key}":' in seen else
                         "elsewhere in the list" if f'"{key}":' in ex.context else "nowhere")
                counts[where] += 1; n += 1; same += keys[1:2] == [key]
                right += where == "in what it read" and recs.get(key) == val
            if i == 0 and start == 256: print(repr(text[:200]))
print(model, counts, f"value right {right}/{n}, the key named again the same {same}/{n}")
