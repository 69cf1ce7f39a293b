import json, math, sys
from collections import defaultdict
def wilson(k, n, z=1.96):
    if n == 0: return (float("nan"),) * 2
    p = k / n; d = 1 + z * z / n; c = (p + z * z / (2 * n)) / d; h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0, c - h), min(1, c + h)
runs = [json.loads(l) for f in sys.argv[1:] for l in open(f)]
agg = defaultdict(lambda: defaultdict(list))
for d in runs:
    v = f"teacher={d.get('teacher_mode', 'delta')} F={d['F']} gate={d.get('gate', 1.3)}"
    A = agg[v]
    A["secs"].append(d["seconds"]); A["seeds"].append(d["seed"]); A["gated"].append(d["gated"])
    tr = d.get("token_rounds", {})
    if d.get("teacher"): A["teach"] += [t[2] for t in d["teacher"]]
    for r in d["rows"]:
        if r["in_window"]: A["win_q"].append(r["q_ok"]); A["win_r"].append(r["r_ok"]); continue
        A["left_q"].append(r["q_ok"]); A["left_r"].append(r["r_ok"])
        if d["F"] is not None: A["left_q_oracle" if r["oracle"] else "left_q_nooracle"].append(r["q_ok"])
        if tr: A["left_q_trained_rounds" if tr.get(r["key"], 9) < 2 else "left_q_later_rounds"].append(r["q_ok"])
def fmt(xs):
    k, n = int(sum(xs)), len(xs); lo, hi = wilson(k, n)
    return f"{k}/{n} [{lo:.2f},{hi:.2f}]" if n else "-"
for v, A in agg.items():
    print(v, "seeds", A["seeds"], "gated rounds", A["gated"], f"absorb s mean {sum(A['secs'])/len(A['secs']):.0f}")
    for k in ("left_q", "left_r", "win_q", "win_r", "left_q_oracle", "left_q_nooracle", "left_q_trained_rounds", "left_q_later_rounds", "teach"):
        if A[k]: print(f"   {k:24s} {fmt(A[k])}")
