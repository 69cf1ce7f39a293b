"""The measurement behind docs/recall.md, "Stream-start attention sinks": the stream's first K tokens
held raw as attention sinks (StreamingLLM) in front of every sequence the engine reads (the
teacher's X, the student's, the window, each question), in place of being absorbed; K = 0 is the
engine as it ships. The engine's prefix is set per stream from outside, so this stays a script.

    PYTHONPATH=. python evals/results/recall/smollm2-135m/sinks4_NOT_KEPT/sinks_experiment.py \
        K {flush|stream} SEED OUT_DIR      # flush: 24 documents joined in threes; stream: 24 streamed
"""
import json, sys, torch
from pathlib import Path
from absorber_engine import engine as E
from evals import recall_eval as R

K = int(sys.argv[1]); mode = sys.argv[2]; seed = int(sys.argv[3]); out = Path(sys.argv[4])
torch.set_num_threads(1)
orig_absorb, orig_reset = E.AbsorberEngine.absorb, E.AbsorberEngine.reset

def absorb(self, text_or_ids, flush=False, progress=None, session=E.DEFAULT_SESSION):
    sess = self._get(session)
    if K and sess.absorbed_tokens == 0 and sess.held_tokens == 0:
        ids = self.to_ids(text_or_ids)
        self.runner.prefix = list(ids[:K]); text_or_ids = ids[K:]
    return orig_absorb(self, text_or_ids, flush=flush, progress=progress, session=session)

def reset(self, session=E.DEFAULT_SESSION):
    self.runner.prefix = []
    return orig_reset(self, session)

E.AbsorberEngine.absorb, E.AbsorberEngine.reset = absorb, reset
E.AbsorberEngine.absorbed_tokens = property(lambda self: self.default.absorbed_tokens + len(self.runner.prefix))
def absorbed_per_document(eng, texts, tok):
    # The scheduler replayed as the engine fed it: the first document without its K sinks.
    from absorber_engine import _scheduler
    sch = eng.scheduler
    w = _scheduler.Window(sch.chunk_tokens, sch.sync_tokens, sch.vocab_size, sch.cut_after, sch.min_cut)
    out = []
    for i, d in enumerate(texts):
        ids = tok.encode(d.text + "\n", add_special_tokens=False)
        w.feed(ids[K:] if i == 0 else ids)
        while (r := w.plan()) is not None:
            w.commit(r.id)
        out.append(w.absorbed + K)
    return out
R.absorbed_per_document = absorbed_per_document

if mode == "flush":
    res = R.run("smollm2-135m", ["absorber"], 24, seed, {}, join=3)
else:
    res = R.run_stream("smollm2-135m", ["absorber"], 24, seed, {})
out.mkdir(parents=True, exist_ok=True)
(out / "results.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res["summary"], indent=1))
