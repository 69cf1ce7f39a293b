"""The questions the tiny model writes after a round of records: seed 13's first 384 tokens, then
"\\nWhat is", sampled at temperature 0.3 (the recommended config's futures), 12 samples; for each
key a sample names, whether the key is in what the model read, elsewhere in the list, or nowhere."""
import os, re, sys
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", ".."))
import torch
torch.set_num_threads(1)
from absorber_engine import AbsorberEngine
from evals.tasks import make_example

eng = AbsorberEngine.from_pretrained(os.path.join(HERE, "..", "..", "..", "..", "model", "absorber-tiny"))
tok = eng.tokenizer
ex = make_example("kv_recall", 2048, tok, seed=13, n_queries=40)
read = tok.encode(ex.context, add_special_tokens=False)[:384]
seen = tok.decode(read)
counts = {"in what it read": 0, "elsewhere in the list": 0, "nowhere": 0}
for i in range(12):
    text = tok.decode(eng.generate(read + tok.encode("\nWhat is", add_special_tokens=False), max_new_tokens=40,
                                   temperature=0.3, seed=100 + i))
    for key, _ in re.findall(r'"([a-z]+ [a-z]+)"[^0-9"]*?(\d+)', text)[:2]:
        where = ("in what it read" if f'"{key}":' in seen else
                 "elsewhere in the list" if f'"{key}":' in ex.context else "nowhere")
        counts[where] += 1
        print(f"{key!r}: {where}")
print(counts)
