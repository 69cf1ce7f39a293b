"""Absorb the 24-document stream of SEED with the recommended config and save its memory."""
import sys, time, torch
from absorber_engine import AbsorberEngine
from absorber_engine.model_store import resolve, recommended_config
from evals.facts import make_document
torch.set_num_threads(1)
seed, out = int(sys.argv[1]), sys.argv[2]
path = resolve("smollm2-135m")
eng = AbsorberEngine.from_pretrained(path, config=recommended_config(path))
tok = eng.tokenizer
t0 = time.perf_counter()
for i in range(24):
    eng.absorb(tok.encode(make_document(seed, i, place=True).text + "\n", add_special_tokens=False))
print("absorbed", eng.default.rounds, "rounds", f"{time.perf_counter() - t0:.0f}s", flush=True)
eng.save_memory(out)
