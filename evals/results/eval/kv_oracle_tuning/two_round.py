"""(a) overwrite vs (b) longer window. One session per seed, oracle F=all, teacher base, gate 0.
Checkpoints, each asking every record of tokens 0-639 whose line left the window:
 A: after round 1 (fed 384 tokens: X=0-255, Y=256-383), window = Y (128 tokens)      [one_round]
 B: then feed 255 more tokens (384-638): no round runs (held 383 < 384), window = 383 tokens
 C: then feed token 639: round 2 runs (X=256-511, Y=512-639), window = 128 tokens
Round membership of a key = the first round whose oracle futures asked it (O.LOG)."""
import sys, os, re, json, time, random
os.environ["OMP_NUM_THREADS"] = "1"
ORA = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ORA, "..", "..", "..", "..")); sys.path.insert(0, ORA)
import torch
torch.set_num_threads(1)
import oracle as O
from absorber_engine import AbsorberEngine
from evals.evaluate import engine_config, LIBRARY_OBJECTIVE, FUTURE_PROMPT
from evals.tasks import make_example, score, kv_question

# --then-longer (run D, seed 13): after round 2, 255 more tokens in the window and ask again
LONGER = "--then-longer" in sys.argv
OUT = os.path.join(ORA, "two_round_D.jsonl" if LONGER else "two_round.jsonl")
cfg = engine_config(512, surprise_gate=0.0, max_steps=160, futures=4, future_prompt=FUTURE_PROMPT,
                    future_temperature=0.3, futures_follow_y=True, **LIBRARY_OBJECTIVE)
eng = AbsorberEngine.from_pretrained(O.MODEL, config=cfg)
tok = eng.tokenizer
args = [a for a in sys.argv[1:] if not a.startswith("--")]
seeds = [int(s) for s in (args[0] if args else "13,14").split(",")]

def ask(ex, recs, label, seed, extra):
    win = tok.decode(eng.window_tokens())
    rnd = {}
    for i, keys in enumerate(O.LOG):
        for k in keys: rnd.setdefault(k, i + 1)
    rows = []
    for key, val in recs:
        inw = f'"{key}": {val}' in win
        if inw: continue
        gq = tok.decode(eng.generate(tok.encode(kv_question(key), add_special_tokens=False), max_new_tokens=8))
        rows.append(dict(key=key, answer=val, round=rnd.get(key), q_gen=gq, q_ok=score(ex, gq, [val])))
    d = dict(seed=seed, checkpoint=label, window_len=len(eng.window_tokens()), rows=rows, **extra)
    open(OUT, "a").write(json.dumps(d) + "\n")
    by = {}
    for r in rows:
        a = by.setdefault(r["round"], [0, 0]); a[0] += r["q_ok"]; a[1] += 1
    print(f"seed {seed} {label} window {d['window_len']} by round {by}", flush=True)

for seed in seeds:
    O.TEACHER["mode"] = "base"
    ex = make_example("kv_recall", 2048, tok, seed=seed, n_queries=40)
    ids = tok.encode(ex.context, add_special_tokens=False)
    recs = [(m.group(1), m.group(2)) for m in O.REC.finditer(tok.decode(ids[:640]))]
    O.ORACLE.update(F="all", tok=tok, rng=random.Random(seed)); O.LOG.clear(); O.TEACH.clear()
    eng.reset()
    t0 = time.perf_counter(); r1 = eng.absorb(ids[:384], flush=False); s1 = time.perf_counter() - t0
    ex1 = dict(rounds=r1.rounds, steps=r1.steps, gated=r1.gated, round_losses=r1.round_losses, seconds=s1,
               oracle_rounds=O.LOG[:], teacher=O.TEACH[:])
    print(f"seed {seed} round1: rounds {r1.rounds} steps {r1.steps} {s1:.0f}s teacher {sum(t[2] for t in O.TEACH)}/{len(O.TEACH)}", flush=True)
    ask(ex, recs, "A_after_r1_win128", seed, ex1)
    r2 = eng.absorb(ids[384:639], flush=False)
    ask(ex, recs, "B_after_r1_win383", seed, dict(rounds=r2.rounds, held=r2.held_tokens))
    t0 = time.perf_counter(); r3 = eng.absorb(ids[639:640], flush=False); s3 = time.perf_counter() - t0
    ex3 = dict(rounds=r3.rounds, steps=r3.steps, gated=r3.gated, round_losses=r3.round_losses, seconds=s3,
               oracle_rounds=O.LOG[:], teacher=O.TEACH[:], absorbed=eng.absorbed_tokens() if callable(getattr(eng, "absorbed_tokens", None)) else None)
    print(f"seed {seed} round2: rounds {r3.rounds} steps {r3.steps} gated {r3.gated} {s3:.0f}s teacher {sum(t[2] for t in O.TEACH)}/{len(O.TEACH)}", flush=True)
    ask(ex, recs, "C_after_r2_win128", seed, ex3)
    if LONGER:
        r4 = eng.absorb(ids[640:895], flush=False)
        ask(ex, recs, "D_after_r2_win383", seed, dict(rounds=r4.rounds, held=r4.held_tokens))
