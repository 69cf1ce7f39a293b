"""Two recall runs on the same documents and questions, compared question by question: how many
only one of them answered, and the exact McNemar p-value of that split (two-sided binomial test on
the discordant pairs), the test behind every "p = ..." of the recall tables (docs/recall.md).

    python -m evals.compare RUN_A RUN_B [--method absorber] [--method-b ttt] [--in-window]

RUN_A and RUN_B are result directories of `absorber eval --tasks facts` (their results.json). A
stream's questions still in its raw window are left out, as the accuracy tables leave them out,
unless --in-window. Runs are paired only if they asked the same questions with the same answers.
"""

from __future__ import annotations

import argparse
import json
import sys
from math import comb
from pathlib import Path

from .facts import score


def exact_mcnemar(only_a: int, only_b: int) -> float:
    """Two-sided exact p of only_a vs only_b discordant pairs under p = 1/2."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)


def verdicts(run: Path, method: str, in_window: bool = False) -> dict[tuple, tuple]:
    """(doc, question) -> (answer, correct) of `method`'s rows; with in_window, the questions about
    a stream's documents still in the raw window too."""
    doc = json.loads((run / "results.json").read_text())
    others: dict = {}                  # each document's answers: the rivals score() reads
    for r in doc["rows"]:
        others.setdefault(r.get("doc"), {})[r["answer"]] = None
    # scored again under the current rule, as the tables are (a stored verdict may predate it)
    out = {(r["doc"], r["question"]): (r.get("answer"), score(r["reply"], r["answer"], list(others[r.get("doc")])))
           for r in doc["rows"] if r["method"] == method and (in_window or not r.get("in_window"))}
    if not out:
        raise SystemExit(f"{run}: no rows of method {method!r}")
    return out


def compare(a: dict, b: dict) -> dict:
    if set(a) != set(b):
        raise SystemExit(f"the runs asked different questions ({len(set(a) ^ set(b))} differ): not paired")
    # The same question of other documents (another seed) has other answers: nothing to pair.
    differ = sum(a[k][0] != b[k][0] for k in a)
    if differ:
        raise SystemExit(f"the runs expect different answers to {differ} of their questions: not paired")
    only_a = sum(a[k][1] and not b[k][1] for k in a)
    only_b = sum(b[k][1] and not a[k][1] for k in a)
    return dict(asked=len(a), correct_a=sum(v[1] for v in a.values()), correct_b=sum(v[1] for v in b.values()),
                only_a=only_a, only_b=only_b, p=exact_mcnemar(only_a, only_b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--method", default="absorber", help="the method read from RUN_A (and RUN_B unless --method-b)")
    ap.add_argument("--method-b", help="the method read from RUN_B")
    ap.add_argument("--in-window", action="store_true",
                    help="pair a stream's questions still in the raw window too (the tables leave them out)")
    args = ap.parse_args(argv)
    r = compare(verdicts(args.run_a, args.method, args.in_window),
                verdicts(args.run_b, args.method_b or args.method, args.in_window))
    print(f"{r['correct_a']}/{r['asked']} against {r['correct_b']}/{r['asked']}: {r['only_a']} only in A, "
          f"{r['only_b']} only in B, exact McNemar p = {r['p']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
