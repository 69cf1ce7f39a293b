import json, math, sys
from collections import Counter, defaultdict
def wilson(k, n, z=1.96):
    p = k / n; d = 1 + z*z/n; c = (p + z*z/(2*n)) / d; h = z*math.sqrt(p*(1-p)/n + z*z/(4*n*n)) / d
    return f"{k}/{n} [{max(0,c-h):.2f},{min(1,c+h):.2f}]"
for f in sys.argv[1:]:
    for d in map(json.loads, open(f)):
        left = [r for r in d["rows"] if not r["in_window"]]; win = [r for r in d["rows"] if r["in_window"]]
        tr = d["token_rounds"]
        print(f"{f} seed {d['seed']} F={d['F']} gate={d['gate']} follow_y={d.get('futures_follow_y', True)} prompt={d.get('prompt')!r} "
              f"gated={d['gated']} absorb_s={d['seconds']:.0f} total_s={d.get('total_seconds', 0):.0f}")
        print("   left-window, routed (engine):", wilson(int(sum(r['q_ok'] for r in left)), len(left)),
              " record-prompt:", wilson(int(sum(r['r_ok'] for r in left)), len(left)), " in-window:", wilson(int(sum(r['q_ok'] for r in win)), len(win)))
        rt = Counter(d.get("routes", [])[0::2]); print("   router picks on the questions (-1 = window):", dict(rt))
        if d.get("teacher"): print("   teacher right on oracle rows:", wilson(sum(t[2] for t in d["teacher"]), len(d["teacher"])))
        if left and "forced" in left[0]:
            print("   forced: any delta right", wilson(sum(any(r["forced"]) for r in left), len(left)),
                  " own round's delta right", wilson(sum(r["forced"][tr[r["key"]]] for r in left), len(left)))
            by = defaultdict(lambda: [0, 0])
            for r in left: k = tr[r["key"]]; by[k+1][0] += r["forced"][k]; by[k+1][1] += 1
            print("   own delta by round:", {k: f"{a}/{b}" for k, (a, b) in sorted(by.items())})
        if d.get("futures"):
            fl = [x for rr in d["futures"] for x in rr]
            print("   sampled futures: key where", dict(Counter(x["where"] for x in fl)), " right value", wilson(sum(x["right"] for x in fl), len(fl)))
