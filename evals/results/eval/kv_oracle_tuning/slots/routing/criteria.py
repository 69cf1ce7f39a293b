"""Alternative routing criteria over the saved per-token NLLs; counts with Wilson 95% intervals."""
import os as _os
HERE = _os.path.dirname(_os.path.abspath(__file__))
ROOT = _os.path.join(HERE, *[".."] * 6)
import json, math, sys
import numpy as np

def wilson(k, n, z=1.96):
    if n == 0: return (0, 0)
    p = k / n; d = 1 + z * z / n; c = (p + z * z / (2 * n)) / d; h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0, c - h), min(1, c + h)

WINDOW = -1
def pick_from(dscore, wscore):          # lower is better; window wins ties, as route() does
    best = int(np.argmin(dscore))
    return WINDOW if wscore is not None and wscore <= dscore[best] else best

def crit_sum(b, D, w, mask=None, ref=None, wref=None, window=True):
    ref = b if ref is None else ref; wref = ref if wref is None else wref
    m = np.ones_like(b) if mask is None else mask
    ds = (np.minimum(0, D - ref) * m).sum(1); ws = (np.minimum(0, w - wref) * m).sum()
    return pick_from(ds, ws if window else None)

def C(name):
    return name

CRITERIA = {
    "current (route)":              lambda b, D, w: crit_sum(b, D, w),
    "(d) current, no window":       lambda b, D, w: crit_sum(b, D, w, window=False),
    "(a) gain on base NLL>2":       lambda b, D, w: crit_sum(b, D, w, mask=(b > 2).astype(float)),
    "(a) gain on base NLL>4":       lambda b, D, w: crit_sum(b, D, w, mask=(b > 4).astype(float)),
    "(a) gain on base NLL>6":       lambda b, D, w: crit_sum(b, D, w, mask=(b > 6).astype(float)),
    "(b) largest 1-token gain":     lambda b, D, w: pick_from(np.minimum(0, D - b).min(1), min(0, (w - b).min())),
    "(c) gain / base NLL":          lambda b, D, w: pick_from((np.minimum(0, D - b) / np.maximum(b, 1e-3)).sum(1), (np.minimum(0, w - b) / np.maximum(b, 1e-3)).sum()),
    "(e1) vs median of deltas":     lambda b, D, w: crit_sum(b, D, w, ref=np.median(D, 0)),
    "(e1) vs median, no window":    lambda b, D, w: crit_sum(b, D, w, ref=np.median(D, 0), window=False),
    "(e2) vs median of all cands":  lambda b, D, w: crit_sum(b, D, w, ref=np.median(np.vstack([b[None], D, w[None]]), 0)),
    "(e3) vs min(base, median dl)": lambda b, D, w: crit_sum(b, D, w, ref=np.minimum(b, np.median(D, 0))),
    "(e4) vs mean of deltas":       lambda b, D, w: crit_sum(b, D, w, ref=D.mean(0)),
    "(e5) median deltas; window by (route) rule": None,    # filled below
}
def e5(b, D, w):
    k = crit_sum(b, D, w, ref=np.median(D, 0), window=False)
    g = np.minimum(0, D - b).sum(1); wg = np.minimum(0, w - b).sum()
    return WINDOW if wg <= g[k] else k
CRITERIA["(e5) median deltas; window by (route) rule"] = e5
def e6(b, D, w):   # median reference; window vs base-relative best-delta gain, each candidate judged against the others
    ref = np.median(D, 0)
    k = int(np.argmin(np.minimum(0, D - ref).sum(1)))
    wg = np.minimum(0, w - b).sum(); g = np.minimum(0, D - b).sum(1)
    return WINDOW if wg <= g.min() else k
CRITERIA["(e6) median deltas; window if beats every delta (base-rel)"] = e6

def first_out(fn):
    return lambda b, D, w: fn(b[1:], D[:, 1:], w[1:])
CRITERIA["(f) route, first scored token left out"] = first_out(lambda b, D, w: crit_sum(b, D, w))
CRITERIA["(f) no window, first token left out"] = first_out(lambda b, D, w: crit_sum(b, D, w, window=False))
CRITERIA["(g) sum(n - median deltas) unclamped, no window"] = lambda b, D, w: int(np.argmin((D - np.median(D, 0)).sum(1)))
CRITERIA["(g) sum(n - base) unclamped (mean NLL), +window"] = lambda b, D, w: pick_from((D - b).sum(1), (w - b).sum())
def vote(b, D, w, m=0.5):
    A = np.vstack([D, w[None]]); best = A.argmin(0); srt = np.sort(A, 0)
    v = np.bincount(best[(srt[1] - srt[0]) > m], minlength=len(A))
    k = int(np.argmax(v)); return WINDOW if k == len(D) else k
CRITERIA["(h) token votes (best by >0.5 nats)"] = vote

CONF = {}
def conf_crit(kind, L=8, window=True):
    def f(q):
        G = q["gen"] if window else q["gen"][:-1]
        if kind == "mean": sc = [-np.mean(g["lp"][:L]) for g in G]
        elif kind == "min": sc = [-np.min(g["lp"][:L]) for g in G]
        elif kind == "ent": sc = [np.mean(g["ent"][:L]) for g in G]
        k = int(np.argmin(sc)); return WINDOW if window and k == len(G) - 1 else k
    return f
for L in (4, 8):
    CONF[f"(i) greedy-continuation mean NLL, {L} tok, +window"] = conf_crit("mean", L)
    CONF[f"(i) greedy-continuation mean NLL, {L} tok, no window"] = conf_crit("mean", L, False)
    CONF[f"(j) greedy-continuation worst-token NLL, {L} tok, +window"] = conf_crit("min", L)
    CONF[f"(k) greedy-continuation mean entropy, {L} tok, +window"] = conf_crit("ent", L)

def evaluate(files):
    Q = []
    for f in files:
        d = json.load(open(f))
        for q in d["questions"]:
            q["seed"] = d["seed"]; q["K"] = d["n_slots"]; Q.append(q)
    rows = []
    allc = dict(CRITERIA); allc.update({k: ("conf", v) for k, v in CONF.items()} if "gen" in Q[0] else {})
    for name, fn in allc.items():
        per = {}
        for q in Q:
            b, D, w = np.array(q["base"]), np.array(q["deltas"]), np.array(q["window"])
            p = fn[1](q) if isinstance(fn, tuple) else fn(b, D, w)
            st = per.setdefault(q["seed"], dict(own=0, left=0, ans=0, win=0, inw=0))
            if "gen" in q and not q["in_window"]: st["ans"] += q["gen"][p]["ok"]
            if "gen" in q and q["in_window"]: st["wans"] = st.get("wans", 0) + q["gen"][p]["ok"]
            if q["in_window"]:
                st["inw"] += 1; st["win"] += p == WINDOW
            else:
                st["left"] += 1; st["own"] += p == q["round"]
                if "gen" not in q: st["ans"] += p != WINDOW and q["forced"][p]
        rows.append((name, per))
    return rows

def main():
    files = sys.argv[1:]
    rows = evaluate(files); conf = "wans" in rows[0][1][sorted(rows[0][1])[0]]
    seeds = sorted(rows[0][1])
    f = lambda k, n: f"{k}/{n} [{wilson(k, n)[0]:.2f},{wilson(k, n)[1]:.2f}]"
    hdr = "| criterion | " + " | ".join(f"s{s} own delta | s{s} answered | s{s} in-window->WINDOW" + (" | in-win answered" if conf else "") for s in seeds) + " | all own | all in-win |"
    print(hdr); print("|" + "---|" * (hdr.count("|") - 1))
    for name, per in rows:
        cells = []
        for s in seeds:
            p = per[s]; cells += [f(p["own"], p["left"]), f(p["ans"], p["left"]), f(p["win"], p["inw"])] + ([f"{p['wans']}/{p['inw']}"] if "wans" in p else [])
        to = sum(per[s]["own"] for s in seeds); tl = sum(per[s]["left"] for s in seeds)
        tw = sum(per[s]["win"] for s in seeds); ti = sum(per[s]["inw"] for s in seeds)
        print(f"| {name} | " + " | ".join(cells) + f" | {f(to, tl)} | {f(tw, ti)} |")

def _cn(q, L=4): return np.array([-np.mean(g["lp"][:L]) for g in q["gen"]])
def hyb_m(q):      # window by route()'s rule, else the delta with the most confident continuation
    b, D, w = map(np.array, (q["base"], q["deltas"], q["window"]))
    if crit_sum(b, D, w) == WINDOW: return WINDOW
    return int(np.argmin(_cn(q)[:-1]))
def shortlist(S, window):
    def f(q):
        b, D, w = map(np.array, (q["base"], q["deltas"], q["window"]))
        g = np.minimum(0, D - b).sum(1); top = np.argsort(g)[:S]
        if window and np.minimum(0, w - b).sum() <= g.min(): return WINDOW
        c = _cn(q)[:-1]; return int(top[np.argmin(c[top])])
    return f
CONF["(m) window by route rule, else greedy-cont. mean NLL 4 tok"] = hyb_m
CONF["(n) top-4 by route gain, then greedy-cont. 4 tok, no window"] = shortlist(4, False)
CONF["(n) top-2 by route gain, then greedy-cont. 4 tok, no window"] = shortlist(2, False)
CONF["(n) top-4 by route gain (+window rule), then greedy-cont. 4 tok"] = shortlist(4, True)


def pmi(L, window=True, clamp=True, with_prompt=False):
    """each candidate's own greedy continuation: sum of min(0, its NLL - the base model's NLL) (route()'s score, on the answer)"""
    def f(q):
        G = q["gen"] if window else q["gen"][:-1]
        sc = []
        for g in G:
            dlt = -np.array(g["lp"][:L]) + np.array(g["base_lp"][:L])
            sc.append((np.minimum(0, dlt) if clamp else dlt).sum())
        sc = np.array(sc)
        if with_prompt:
            b, D, w = map(np.array, (q["base"], q["deltas"], q["window"]))
            pg = np.append(np.minimum(0, D - b).sum(1), np.minimum(0, w - b).sum())
            sc = sc + (pg if window else pg[:-1])
        k = int(np.argmin(sc)); return WINDOW if window and k == len(G) - 1 else k
    return f
for L in (4, 8):
    CONF[f"(p) own continuation vs base: sum min(0, NLL_c - NLL_base), {L} tok, +window"] = pmi(L)
    CONF[f"(p) same, {L} tok, no window"] = pmi(L, window=False)
    CONF[f"(p) same, {L} tok, unclamped, +window"] = pmi(L, clamp=False)
    CONF[f"(q) route gain on prompt + (p) on own continuation, {L} tok, +window"] = pmi(L, with_prompt=True)

if __name__ == "__main__":
    main()
