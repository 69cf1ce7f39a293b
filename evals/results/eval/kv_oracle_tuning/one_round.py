"""One round only (X = tokens 0-255, Y = 256-383; the teacher is the plain model, which reads records
correctly), then ask about every record of X (now out of the window) and of Y (in the window)."""
import sys, os, re, json, time, random
os.environ["OMP_NUM_THREADS"] = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "..")); sys.path.insert(0, HERE)
import torch
torch.set_num_threads(1)
import oracle as O
from absorber_engine import AbsorberEngine
from evals.evaluate import engine_config, LIBRARY_OBJECTIVE, FUTURE_PROMPT
from evals.tasks import make_example, score, kv_question

cfg = engine_config(512, surprise_gate=1.3, max_steps=160, futures=4, future_prompt=FUTURE_PROMPT,
                    future_temperature=0.3, futures_follow_y=True, **LIBRARY_OBJECTIVE)
eng = AbsorberEngine.from_pretrained(O.MODEL, config=cfg)
tok = eng.tokenizer
variants = [None if v == "none" else ("all" if v == "all" else int(v)) for v in sys.argv[1].split(",")]
for seed in (13, 14, 15):
    ex = make_example("kv_recall", 2048, tok, seed=seed, n_queries=40)
    ids = tok.encode(ex.context, add_special_tokens=False)[:384]
    text = tok.decode(ids)
    recs = [(m.group(1), m.group(2)) for m in O.REC.finditer(text)]
    for F in variants:
        O.ORACLE.update(F=F, tok=tok, rng=random.Random(seed)); O.LOG.clear(); O.TEACH.clear()
        eng.reset(); t0 = time.perf_counter(); rep = eng.absorb(ids, flush=False); secs = time.perf_counter() - t0
        win = tok.decode(eng.window_tokens())
        trained = {k for r in O.LOG for k in r}
        rows = []
        for key, val in recs:
            gq = tok.decode(eng.generate(tok.encode(kv_question(key), add_special_tokens=False), max_new_tokens=8))
            gr = tok.decode(eng.generate(tok.encode(f'"{key}":', add_special_tokens=False), max_new_tokens=8))
            rows.append(dict(key=key, answer=val, in_window=f'"{key}": {val}' in win, oracle=key in trained,
                             q_gen=gq, q_ok=score(ex, gq, [val]), r_gen=gr, r_ok=score(ex, gr, [val])))
        d = dict(seed=seed, F=F, gate=1.3, seconds=secs, rounds=rep.rounds, steps=rep.steps, gated=rep.gated,
                 round_losses=rep.round_losses, oracle_rounds=O.LOG[:], teacher=O.TEACH[:], rows=rows, oneround=True)
        open(os.path.join(HERE, "one_round.jsonl"), "a").write(json.dumps(d) + "\n")
        L = [r for r in rows if not r["in_window"]]; W = [r for r in rows if r["in_window"]]
        print(f"seed {seed} F={F} {secs:.0f}s steps {rep.steps} loss {rep.round_losses} teacher {sum(t[2] for t in O.TEACH)}/{len(O.TEACH)} "
              f"left q {sum(r['q_ok'] for r in L):.0f}/{len(L)} (oracle-trained {sum(r['q_ok'] for r in L if r['oracle']):.0f}/{sum(r['oracle'] for r in L)}) "
              f"rec {sum(r['r_ok'] for r in L):.0f}/{len(L)}; window q {sum(r['q_ok'] for r in W):.0f}/{len(W)}", flush=True)
