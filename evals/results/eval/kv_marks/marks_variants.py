"""Key-value records on absorber-tiny, absorber+bank+recital without recite_exact: each stream absorbed
once, then its 40 questions asked three ways in the same process, the bank's recitals written anew
for each: "none" (the deltas keep no marks: recitals as written), "first" (a recital cut before the
first run of 8 tokens that does not match its round's marks) and "lines" (the recital's lines whose
every run matches, the engine's rule).

    python marks_variants.py --length 8 --seeds 405 --out kv8x_seed405_variants.jsonl
    python marks_variants.py --length 8 --seeds 405 --variants lines --out kv8x_seed405_lines_end.jsonl
"""
import argparse
import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 4)
sys.path.insert(0, ROOT)
import torch  # noqa: E402

from absorber_engine import recital  # noqa: E402
from evals.evaluate import build_methods  # noqa: E402
from evals.recall_eval import wilson  # noqa: E402
from evals.tasks import answer_text, kv_record, make_example, score  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--length", type=int, default=4, help="multiple of the trained context (512)")
ap.add_argument("--seeds", default="204")
ap.add_argument("--questions", type=int, default=40)
ap.add_argument("--variants", default="none,first,lines")
ap.add_argument("--out", required=True)
a = ap.parse_args()
VARIANTS = a.variants.split(",")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
tok, (method,) = build_methods(["absorber+bank+recital"], os.path.join(ROOT, "model", "absorber-tiny"), 512)
eng = method.engine
eng.config.recite_exact = 0                     # the method before the check: recitals that can depart
eng.config.validate()
lines = recital.true_lines


def first_only(tokenizer, ids, ok):
    """The recital up to the first token no mark vouches for."""
    return ids[:ok.index(False)]


rows = []
for seed in (int(s) for s in a.seeds.split(",")):
    ex = make_example("kv_recall", 512 * a.length, tok, seed=seed, n_queries=a.questions)
    eng.reset()
    eng.absorb(tok.encode(ex.context, add_special_tokens=False))
    window = tok.decode(eng.window_tokens())
    kept = [d.marks for d in eng.default.slots]
    for variant in VARIANTS:
        for d, m in zip(eng.default.slots, kept):
            d.marks = None if variant == "none" else m
        recital.true_lines = first_only if variant == "first" else lines
        eng._windows.drop(eng.default.key)          # the recitals written anew under this rule
        for query, answers in [(ex.query, ex.answers)] + ex.more:
            ids = tok.encode(query, add_special_tokens=False)
            max_new = len(tok.encode(answer_text(answers), add_special_tokens=False)) + 2
            got = tok.decode(eng.generate(ids, max_new_tokens=max_new, recite=True))
            rows.append({"seed": seed, "variant": variant, "query": query, "answers": answers,
                         "in_window": kv_record(query.split('"')[1], answers[0]).strip() in window, "engine": got,
                         "ok": bool(score(ex, got, answers))})
        texts = [tok.decode(t) for t in eng._windows.recitals[eng.default.key].values()]
        with open(a.out.replace(".jsonl", f"_recitals_{seed}_{variant}.json"), "w") as f:
            json.dump(texts, f, indent=1)
        left = [r for r in rows if r["seed"] == seed and r["variant"] == variant and not r["in_window"]]
        print(f"seed {seed} {variant}: left the window {sum(r['ok'] for r in left)}/{len(left)}; recital chars "
              f"{[len(t) for t in texts]}", flush=True)
with open(a.out, "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
for variant in VARIANTS:
    sel = [r for r in rows if r["variant"] == variant and not r["in_window"]]
    k = sum(r["ok"] for r in sel)
    lo, hi = wilson(k, len(sel))
    print(f"left the window, {variant}: {k}/{len(sel)} ({100 * lo:.1f}-{100 * hi:.1f}%)")
