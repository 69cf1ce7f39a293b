"""The measurement behind docs/recall.md, "Questions after earlier turns": the stream of 24
documents of seed SEED (53 unless given) absorbed with the recommended config, then 40 of its
questions each asked after TURNS earlier exchanges about other documents, routed on the whole
prompt ("whole", as before 2026-12-05) and on the last user turn asked alone ("alone",
routing.asked_alone). Each arm generates its reply from the whole prompt. A route is right when it
picks a delta of a round that held part of the question's document (on seed 53 document j went to
delta j). The absorbed memory is saved in OUT and read back by a second run.

    PYTHONPATH=. python evals/results/recall/smollm2-135m/route_after_turns_seed53/route_after_turns.py 3 40 OUT [SEED]
"""
import json, sys, time, torch
from pathlib import Path
from absorber_engine import AbsorberEngine, _scheduler, generate as G
from absorber_engine.model_store import resolve, recommended_config
from evals.facts import make_document, score
from evals.recall_eval import chat_ids, absorbed_after
torch.set_num_threads(1)
turns, limit, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
seed, docs = (int(sys.argv[4]) if len(sys.argv) > 4 else 53), 24
mem = out / f"memory_seed{seed}.safetensors"
out.mkdir(parents=True, exist_ok=True)
path = resolve("smollm2-135m")
eng = AbsorberEngine.from_pretrained(path, config=recommended_config(path))
tok = eng.tokenizer
texts = [make_document(seed, i, place=True) for i in range(docs)]
if mem.exists():
    eng.load_memory(mem)
else:
    t0 = time.perf_counter()
    for d in texts:
        eng.absorb(tok.encode(d.text + "\n", add_special_tokens=False))
    print("absorbed", eng.default.rounds, "rounds", f"{time.perf_counter() - t0:.0f}s", flush=True)
    eng.save_memory(mem)
cut, ends, e = absorbed_after(eng, texts, tok), [], 0
for d in texts:
    e += len(tok.encode(d.text + "\n", add_special_tokens=False)); ends.append(e)
asked = [(j, q, a) for j, d in enumerate(texts) if ends[j] <= cut for q, a in zip(d.questions, d.answers)]
asked = asked[::max(1, len(asked) // limit)][:limit]
sch = eng.scheduler                 # the rounds the scheduler cut, replayed: which deltas hold document j
w = _scheduler.Window(sch.chunk_tokens, sch.sync_tokens, sch.vocab_size, sch.cut_after, sch.min_cut)
bounds = [0]
for d in texts:
    w.feed(tok.encode(d.text + "\n", add_special_tokens=False))
    while (r := w.plan()) is not None:
        w.commit(r.id); bounds.append(w.absorbed)
starts = [0] + ends[:-1]
slots = {str(j): [k for k in range(len(bounds) - 1) if bounds[k] < ends[j] and bounds[k + 1] > starts[j]]
         for j in range(docs)}
alone = G.asked_alone
rows = []
for i, (j, q, a) in enumerate(asked):
    msgs = []
    for k in range(1, turns + 1):
        o = texts[(j + 5 * k) % docs]
        msgs += [{"role": "user", "content": o.questions[k % 4]}, {"role": "assistant", "content": f"It is {o.answers[k % 4]}."}]
    msgs.append({"role": "user", "content": q})
    ids = chat_ids(tok, msgs)
    row = {"doc": j, "question": q, "answer": a, "tokens": len(ids), "right_slots": slots[str(j)]}
    for label, fn in (("whole", lambda ids, opener: ids), ("alone", alone)):
        G.asked_alone = fn
        with eng._resident([eng.default]), torch.no_grad():
            t = time.perf_counter()
            delta, _ = eng._routed(eng.default, ids)
            route_s = time.perf_counter() - t
        k = next((n for n, s in enumerate(eng.default.slots) if s is delta), -1)
        reply = tok.decode(eng.generate(ids, max_new_tokens=24, stop=["<|im_end|>"]))
        row[label] = {"slot": k, "route_seconds": route_s, "reply": reply, "correct": score(reply, a)}
    rows.append(row)
    print(i, len(ids), {k: (row[k]["slot"], row[k]["correct"]) for k in ("whole", "alone")}, row["right_slots"], flush=True)
summary = {"turns": turns, "questions": len(rows)}
for k in ("whole", "alone"):
    summary[k] = {"right_slot": sum(r[k]["slot"] in r["right_slots"] for r in rows), "window": sum(r[k]["slot"] == -1 for r in rows),
                  "correct": sum(r[k]["correct"] for r in rows), "route_seconds": sum(r[k]["route_seconds"] for r in rows) / len(rows)}
print(json.dumps(summary))
out.mkdir(parents=True, exist_ok=True)
(out / "results.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
