"""SmolLM2 seed-17 24-doc bank: recite=True now (every delta recites, the longest shared run picks)
against the previous recite (route() picks the delta, its recital is read), same recitals."""
import os, sys, json, time
os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 6))
import torch
torch.set_num_threads(1)
from absorber_engine import stops as stopping, recital
from absorber_engine.generate import _window_kv, generate_rows
from evals.route_window import stream_engine
from evals.facts import make_document, score
from evals.recall_eval import chat_ids
seed = int(sys.argv[1]) if len(sys.argv) > 1 else 17
eng, ends = stream_engine("smollm2-135m", 24, seed, os.environ.get("MEMORY", f"mem{seed}.safetensors"))
r, tok, sess = eng.runner, eng.tokenizer, eng.default
slots = list(sess.slots)
stops = set(stopping.parse(["<|im_end|>"], tok, r.vocab_size).ids)
rows = []; t0 = time.time()
for j in range(24):
    d = make_document(seed, j, place=True)
    for q, a in zip(d.questions, d.answers):
        ids = chat_ids(tok, [{"role": "user", "content": q}])
        t = time.time()
        new = tok.decode(eng.generate(ids, max_new_tokens=24, stop=["<|im_end|>"], recite=True))
        tn = time.time() - t
        texts = list(eng._windows.recitals[sess.key].values())
        knew = recital.pick(recital.asked(ids, eng._question_frame), texts + [eng.window_tokens()])
        with eng._resident([sess]), torch.no_grad():
            delta, window, banked = eng._routed(sess, ids)
            kold = next((i for i, s in enumerate(slots) if s is delta), None) if banked else None
            if kold is None or not texts[kold]:
                old = tok.decode(generate_rows(r, [delta], [window], [ids], 24, 0.0, 1.0, stops, [torch.Generator()])[0])
            else:
                prompt = recital.answer_prompt(eng.frame, eng._question_frame, texts[kold], ids)
                zero = eng._windows.zero(sess.key, slots[-1])
                old = tok.decode(generate_rows(r, [zero], [_window_kv(r, zero, r.prefix)], [prompt], 24, 0.0, 1.0, stops,
                                               [torch.Generator()])[0])
        row = {"doc": j, "in_window": ends[j] > eng.absorbed_tokens, "new_pick": knew, "old_pick": kold,
               "new_ok": bool(score(new, a, d.answers)), "old_ok": bool(score(old, a, d.answers)), "new_s": tn,
               "new": new, "old": old, "q": q, "a": a}
        rows.append(row)
    print(j, f"{time.time()-t0:.0f}s", sum(x["new_ok"] for x in rows), sum(x["old_ok"] for x in rows), len(rows), flush=True)
out = [x for x in rows if not x["in_window"]]; win = [x for x in rows if x["in_window"]]
nw = sum(x["new_ok"] and not x["old_ok"] for x in out); ol = sum(x["old_ok"] and not x["new_ok"] for x in out)
print(f"seed {seed}: left window {len(out)}: new {sum(x['new_ok'] for x in out)}, old {sum(x['old_ok'] for x in out)} "
      f"(only new {nw}, only old {ol}); in window {len(win)}: new {sum(x['new_ok'] for x in win)}, old {sum(x['old_ok'] for x in win)}")
json.dump(rows, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"smollm2_s{seed}.json"), "w"), indent=1)
