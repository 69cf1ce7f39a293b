"""Oracle-futures experiment: replace a round's sampled futures by correct questions about X's records."""
import sys, os, re, json, time, random, argparse
os.environ["OMP_NUM_THREADS"] = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", ".."))
import torch
torch.set_num_threads(1)
from absorber_engine import AbsorberEngine
import absorber_engine.teacher as T
from absorber_engine.targets import FutureGroup
from absorber_engine.hf_cache import cache_tensors
from evals.evaluate import engine_config, LIBRARY_OBJECTIVE, FUTURE_PROMPT
from evals.tasks import make_example, score, kv_question, kv_record

MODEL = os.path.join(HERE, "..", "..", "..", "..", "model", "absorber-tiny")
CTX = 512
REC = re.compile(r'^"([^"]+)": (\d+)$', re.M)

ORACLE = {"F": None}          # F: None = baseline (sampled futures); int or "all" = oracle rows
TEACH = []
LOG = []                      # per round: which keys got an oracle question
_orig = T._y_and_futures


def _oracle_y_and_futures(runner, batch, cfg, n_futures, need_final, per_stream):
    F = ORACLE["F"]
    if F is None or n_futures == 0:
        return _orig(runner, batch, cfg, n_futures, need_final, per_stream)
    tok = ORACLE["tok"]
    assert batch.streams == 1
    S, n, m = batch.streams, batch.x.shape[1], batch.y.shape[1]
    runner.bind(batch.deltas)
    P = len(runner.prefix)
    xy = runner.with_prefix(torch.cat([batch.x, batch.y], dim=1))
    with runner.capture(P + n) as cap:
        final, cache = runner.forward(xy, use_cache=True)
    if m > 0:
        per_stream[0].append(FutureGroup(batch.y[0:1], [h[0:1] for h in cap.states],
                                         final[0, P + n:] if need_final else None))
    # records whose line starts in X and ends within X·Y (the teacher reads them whole)
    x_text = tok.decode(batch.x[0].tolist())
    xy_text = tok.decode(torch.cat([batch.x[0], batch.y[0]]).tolist())
    recs = [(mt.group(1), mt.group(2)) for mt in REC.finditer(xy_text)
            if mt.start() < len(x_text) and mt.end() < len(xy_text)]
    rng = ORACLE["rng"]
    pick = recs if F == "all" else rng.sample(recs, min(F, len(recs)))
    LOG.append([k for k, _ in pick])
    after_y = cfg.futures_follow_y and m > 0
    keep = P + n + (m if after_y else 0)
    x_kv = cache_tensors(cache, keep=keep)
    del cache, cap, final
    nl = tok.encode("\n", add_special_tokens=False)
    for key, val in pick:
        row = nl + tok.encode(kv_question(key), add_special_tokens=False) + tok.encode(f" {val}\n", add_special_tokens=False)
        forced = torch.tensor([row], dtype=torch.long, device=runner.device)       # (S=1, k): forced whole
        g = T.sample_with_states(runner, batch, x_kv, None, 1, need_final, forced, forced.shape[1], 1.0, 1.0)
        per_stream[0].append(FutureGroup(g.ids, g.hidden, g.final if need_final else None,
                                         lead=batch.y[0:1] if after_y else None))
        if g.final is not None:   # diagnostic: does the teacher (model+delta reading X.Y) predict the value?
            a = len(row) - 7      # row ends ' ', 5 digits, '\n' (the value's 6 tokens + newline)
            pred = runner.logits(g.final[a - 1:a + 5]).argmax(-1).tolist()
            TEACH.append((len(LOG), key, pred == row[a:a + 6]))


T._y_and_futures = _oracle_y_and_futures

# --- "teacher without delta": every teacher forward of a round reads the base model ---------------
import dataclasses
import absorber_engine.round as R
from absorber_engine.routing import zero_delta
_orig_targets = R.teacher_targets
TEACHER = {"mode": "delta"}     # "delta": as shipped; "base": the teacher reads X with zero deltas
_ZEROS = {}


def _base_teacher_targets(runner, batch, cfg):
    if TEACHER["mode"] != "base":
        return _orig_targets(runner, batch, cfg)
    zeros = []
    for d in batch.deltas:
        z = _ZEROS.get(id(d))
        if z is None:
            z = _ZEROS[id(d)] = zero_delta(d)
        assert z.is_zero() and z.shapes == d.shapes and z.rank == d.rank
        zeros.append(z)
    # teacher_targets, _y_and_futures, _self_study, sample_with_states and replay_groups read their
    # deltas from batch.deltas only: a copy of the batch with zero deltas binds Δ = 0 everywhere.
    return _orig_targets(runner, dataclasses.replace(batch, deltas=zeros), cfg)


R.teacher_targets = _base_teacher_targets


def token_rounds(ex, tok):
    """key -> index of the 256-token chunk its record's line starts in (round index if absorbed)."""
    out = {}
    for mt in REC.finditer(ex.context):
        out[mt.group(1)] = len(tok.encode(ex.context[:mt.start()], add_special_tokens=False)) // 256
    return out


def run(seed, F, eng, out, teacher="delta"):
    TEACHER["mode"] = teacher
    tok = eng.tokenizer
    ORACLE.update(F=F, tok=tok, rng=random.Random(seed))
    LOG.clear(); TEACH.clear()
    ex = make_example("kv_recall", 4 * CTX, tok, seed=seed, n_queries=40)
    ids = tok.encode(ex.context, add_special_tokens=False)
    eng.reset()
    t0 = time.perf_counter()
    rep = eng.absorb(ids, flush=False)
    secs = time.perf_counter() - t0
    window = tok.decode(eng.window_tokens())
    trained = {k for r in LOG for k in r}
    rows = []
    for q, ans in [(ex.query, ex.answers)] + list(ex.more):
        key = re.search(r'"([^"]+)"', q).group(1)
        gq = tok.decode(eng.generate(tok.encode(q, add_special_tokens=False), max_new_tokens=8))
        gr = tok.decode(eng.generate(tok.encode(f'"{key}":', add_special_tokens=False), max_new_tokens=8))
        rows.append(dict(key=key, answer=ans[0], in_window=f'"{key}"' in window, oracle=key in trained,
                         q_gen=gq, q_ok=score(ex, gq, ans), r_gen=gr, r_ok=score(ex, gr, ans)))
    res = dict(seed=seed, F=F, seconds=secs, rounds=getattr(rep, "rounds", None), steps=getattr(rep, "steps", None),
               gated=rep.gated, round_losses=rep.round_losses, oracle_rounds=LOG[:], teacher=TEACH[:], gate=eng.config.surprise_gate, teacher_mode=teacher, token_rounds=token_rounds(ex, tok), rows=rows)
    with open(out, "a") as f:
        f.write(json.dumps(res) + "\n")
    left = [r for r in rows if not r["in_window"]]
    per = {}
    for i, _, ok in TEACH:
        a = per.setdefault(i, [0, 0]); a[0] += ok; a[1] += 1
    print("  teacher right per oracle round:", {k: f"{a}/{b}" for k, (a, b) in per.items()}, "gated", rep.gated, flush=True)
    print(f"seed {seed} teacher={teacher} F={F} gate={eng.config.surprise_gate} teacher {sum(t[2] for t in TEACH)}/{len(TEACH)} {secs:.0f}s left: q {sum(r['q_ok'] for r in left):.0f}/{len(left)} "
          f"rec {sum(r['r_ok'] for r in left):.0f}/{len(left)}; window: q {sum(r['q_ok'] for r in rows if r['in_window']):.0f}/"
          f"{sum(r['in_window'] for r in rows)}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="13,14,15")
    ap.add_argument("--F", default="none")
    ap.add_argument("--gate", type=float, default=1.3)
    ap.add_argument("--out", default=os.path.join(HERE, "full_stream.jsonl"))
    ap.add_argument("--teacher", default="delta", choices=["base", "delta"],
                    help="delta: the teacher reads X with the accumulated delta (the engine); base: with none")
    a = ap.parse_args()
    F = None if a.F == "none" else ("all" if a.F == "all" else int(a.F))
    cfg = engine_config(CTX, surprise_gate=a.gate, max_steps=160, futures=4, future_prompt=FUTURE_PROMPT,
                        future_temperature=0.3, futures_follow_y=True, **LIBRARY_OBJECTIVE)
    eng = AbsorberEngine.from_pretrained(MODEL, config=cfg)
    for s in [int(x) for x in a.seeds.split(",")]:
        run(s, F, eng, a.out, a.teacher)
