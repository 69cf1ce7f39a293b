"""Route-by-recital on absorber-tiny, kv_recall at 4x (2048 tokens), memory_slots=8, gate off.

    python recital_route.py --seed 13
Writes res_s{seed}.json and bank_s{seed}.safetensors (the bank) here.
"""
import sys, os, re, json, time, argparse
os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 6))
import torch
torch.set_num_threads(1)
import absorber_engine.round as R
import absorber_engine.generate as G
from absorber_engine import AbsorberEngine
from absorber_engine.routing import zero_delta
from evals.evaluate import engine_config, GATED_FUTURES
from evals.tasks import make_example, score, kv_question

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 6), "model", "absorber-tiny")
REC = re.compile(r'^"([^"]+)": (\d+)$', re.M)

# --- log each round's X (read-only wrapper: no behaviour change) ---------------------------------
XS = []
_orig_targets = R.teacher_targets
def _logged_targets(runner, batch, cfg):
    XS.append(batch.x[0].tolist())
    return _orig_targets(runner, batch, cfg)
R.teacher_targets = _logged_targets


def lcr(a, b):
    """Longest common contiguous run of tokens of a and b."""
    best, prev = 0, [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                cur[j + 1] = prev[j] + 1
                if cur[j + 1] > best: best = cur[j + 1]
        prev = cur
    return best


def gen_rows(eng, deltas, prompts, max_new):
    runner = eng.runner
    stops = set([eng.tokenizer.eos_token_id]) if eng.tokenizer.eos_token_id is not None else set()
    wins = [G._window_kv(runner, d, runner.prefix) for d in deltas]
    gens = [torch.Generator(device=runner.device) for _ in deltas]
    with eng._resident([eng.session()]):
        return G.generate_rows(runner, deltas, wins, prompts, max_new, 0.0, 1.0, stops, gens)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    s = a.seed
    ch = dict(GATED_FUTURES, surprise_gate=0.0, memory_slots=8, replay_rounds=0)
    if a.steps: ch["max_steps"] = a.steps
    cfg = engine_config(512, **ch)
    print(cfg, flush=True)
    eng = AbsorberEngine.from_pretrained(MODEL, config=cfg)
    tok = eng.tokenizer
    enc = lambda t: tok.encode(t, add_special_tokens=False)
    ex = make_example("kv_recall", 2048, tok, seed=s, n_queries=40)
    ids = enc(ex.context)
    eng.reset(); XS.clear()
    t0 = time.perf_counter()
    rep = eng.absorb(ids, flush=False)
    absorb_s = time.perf_counter() - t0
    sess = eng.session()
    slots = list(sess.slots)
    print(f"seed {s}: absorbed in {absorb_s:.0f}s, rounds logged {len(XS)}, slots {len(slots)}, "
          f"stats {sess.stats()}, gated {rep.gated}", flush=True)
    try:
        eng.save_memory(os.path.join(HERE, f"bank_s{s}{a.tag}.safetensors"))
    except Exception as e:
        print("save_memory failed:", e)
    # slot k <-> round: a fresh delta every round, none gated, bank of 8 >= rounds
    assert len(XS) == len(slots), (len(XS), len(slots))
    window = tok.decode(eng.window_tokens())
    x_texts = [tok.decode(x) for x in XS]
    round_recs = [[(m.group(1), m.group(2)) for m in REC.finditer(t)] for t in x_texts]
    # map a key to the round whose X holds its whole line; else the round its line starts in
    all_recs = {m.group(1): m.group(2) for m in REC.finditer(ex.context)}
    key_round = {}
    for k, recs in enumerate(round_recs):
        for key, _ in recs:
            key_round.setdefault(key, k)
    split = {}
    cat, starts = "", []
    for t in x_texts:
        starts.append(len(cat)); cat += t
    for key, val in all_recs.items():
        if key in key_round: continue
        at = cat.find(f'"{key}": {val}')
        if at >= 0:                               # a line cut by a round boundary: the round its start is in
            key_round[key] = split[key] = max(k for k, st in enumerate(starts) if st <= at)

    # --- recitals: every slot alone, plain-text recite prompt, greedy, up to n + m --------------------
    frame = eng.frame
    prompt = list(frame.student_open) + list(frame.seeds["recite"])
    longest = cfg.chunk_tokens + cfg.sync_tokens
    t1 = time.perf_counter()
    rec_ids = gen_rows(eng, slots, [prompt] * len(slots), longest)
    recite_s = time.perf_counter() - t1
    rec_texts = [tok.decode(r) for r in rec_ids]
    fidelity = []
    for k, (recs, rt) in enumerate(zip(round_recs, rec_texts)):
        got = sum(f'"{key}": {val}' in rt for key, val in recs)
        # per-line verbatim: the line exactly as a line of the recital
        lines = set(rt.split("\n"))
        got_line = sum(f'"{key}": {val}' in lines for key, val in recs)
        keys_named = sum(f'"{key}"' in rt for key, _ in recs)
        n_rec_lines = len(REC.findall(rt))
        in_round = sum(1 for kk, vv in (m.groups() for m in REC.finditer(rt)) if (kk, vv) in set(recs))
        fidelity.append(dict(round=k, records=len(recs), verbatim=got, verbatim_line=got_line, keys_named=keys_named,
                             recital_tokens=len(rec_ids[k]), recital_record_lines=n_rec_lines,
                             recital_lines_from_round=in_round,
                             recital_prefix_match=next((i for i, (p, q) in enumerate(zip(rec_ids[k], XS[k])) if p != q),
                                                        min(len(rec_ids[k]), len(XS[k])))))
        print(f"round {k}: verbatim {got}/{len(recs)} (as whole lines {got_line}), keys named {keys_named}, "
              f"tokens {len(rec_ids[k])}, first mismatch at token {fidelity[-1]['recital_prefix_match']}", flush=True)
    print(f"recitals: {recite_s:.1f}s for {len(slots)} deltas", flush=True)

    # --- questions --------------------------------------------------------------------------------------
    zero = zero_delta(slots[-1])
    rows = []
    qs = [(ex.query, ex.answers)] + list(ex.more)
    for q, ans in qs:
        key = re.search(r'"([^"]+)"', q).group(1)
        qids = enc(q)
        r = dict(key=key, answer=ans[0], in_window=f'"{key}"' in window, round=key_round.get(key),
                 split=key in split)
        tq = time.perf_counter()
        g = tok.decode(eng.generate(qids, max_new_tokens=8))
        r["engine_gen"], r["engine_ok"] = g, bool(score(ex, g, ans))
        r["engine_s"] = time.perf_counter() - tq
        if r["in_window"]:
            rows.append(r); continue
        tq = time.perf_counter()
        runs = [lcr(qids, ri) for ri in rec_ids]
        best = max(runs)
        r["lcr"] = runs; r["lcr_pick"] = runs.index(best); r["lcr_ties"] = runs.count(best)
        has = [k for k, t in enumerate(rec_texts) if f'"{key}"' in t]
        r["key_hits"] = has
        r["key_pick"] = has[0] if has else r["lcr_pick"]
        r["route_s"] = time.perf_counter() - tq
        picks = dict(lcr=r["lcr_pick"], key=r["key_pick"], oracle=r["round"])
        todo = {}
        for rule, k in picks.items():
            if k is None: continue
            todo.setdefault(("rec", k), []).append(rule)
        if r["round"] is not None:
            todo[("x", r["round"])] = ["true_x"]
        order = list(todo)
        prompts = []
        for kind, k in order:
            text = (rec_texts[k] if kind == "rec" else x_texts[k]).rstrip("\n")
            prompts.append(enc(text + "\n" + q))
        ta = time.perf_counter()
        outs = gen_rows(eng, [zero] * len(prompts), prompts, 8)
        r["answer_s_per_prompt"] = (time.perf_counter() - ta) / len(prompts)
        for (kind, k), o, p in zip(order, outs, prompts):
            text = tok.decode(o)
            for rule in todo[(kind, k)]:
                r[rule + "_gen"], r[rule + "_ok"], r[rule + "_prompt_tokens"] = text, bool(score(ex, text, ans)), len(p)
        rows.append(r)
        print(f"  {key!r} r{r['round']} lcr->{r['lcr_pick']}({r['lcr_ties']} ties) key->{has} "
              f"ok: lcr {r.get('lcr_ok')} key {r.get('key_ok')} oracle {r.get('oracle_ok')} trueX {r.get('true_x_ok')} "
              f"eng {r['engine_ok']} | {r.get('lcr_gen')!r}", flush=True)

    left = [r for r in rows if not r["in_window"]]
    summ = {rule: f"{sum(bool(r.get(rule + '_ok')) for r in left)}/{len(left)}"
            for rule in ("lcr", "key", "oracle", "true_x", "engine")}
    summ["lcr_route_right"] = f"{sum(r['lcr_pick'] == r['round'] for r in left)}/{len(left)}"
    summ["key_route_right"] = f"{sum(r['key_pick'] == r['round'] for r in left)}/{len(left)}"
    summ["key_found_in_some_recital"] = f"{sum(bool(r['key_hits']) for r in left)}/{len(left)}"
    win = [r for r in rows if r["in_window"]]
    summ["engine_in_window"] = f"{sum(r['engine_ok'] for r in win)}/{len(win)}"
    summ["fidelity_total"] = f"{sum(f['verbatim'] for f in fidelity)}/{sum(f['records'] for f in fidelity)}"
    print("SUMMARY", s, json.dumps(summ), flush=True)
    res = dict(seed=s, absorb_s=absorb_s, recite_s=recite_s, rounds=len(XS), stats=sess.stats(), gated=rep.gated,
               fidelity=fidelity, recitals=rec_texts, x_texts=x_texts, split=split, rows=rows, summary=summ,
               window_tokens=len(eng.window_tokens()))
    json.dump(res, open(os.path.join(HERE, f"res_s{s}{a.tag}.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
