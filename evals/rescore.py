"""Stored fact-recall results scored again under the current rule (facts.score: a reply whose first
sentence also names another answer of its document is wrong), from the replies they hold, without
running a model; the files are left as they are. Per file and method: hits before -> after, over
the questions the tables count (a stream's questions still in its raw window are left out).

    python -m evals.rescore evals/results/recall          # every JSON file under it
    python -m evals.rescore RUN/results.json ROWS.json ...

It reads what evals/ writes: recall_eval's results.json, recall_matrix's JSON (every round's
replies together) and route_window's rows.json (per way of reading), and the row shapes of the
one-off runs stored beside them (row_replies); a file with no reply in it is listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .facts import score
from .recall_eval import document_answers


def sections(data) -> list[tuple[str, list]]:
    """The lists of rows a file holds, each with the prefix of its labels: the file's rows, or those
    of each entry of its "results" (a one-off run that tried several settings)."""
    if isinstance(data, list):
        return [("", data)]
    if not isinstance(data, dict):
        return []
    if isinstance(data.get("rows"), list):
        return [("", data["rows"])]
    results = data.get("results")
    return [(f"{k} ", v["rows"]) for k, v in results.items()
            if isinstance(v, dict) and isinstance(v.get("rows"), list)] if isinstance(results, dict) else []


def row_replies(row: dict, method: str) -> dict[str, str]:
    """The replies a row holds, by the label of what answered: recall_eval's "reply" under its
    "method" (`method` where the row names none), route_window's "replies" by way of reading, and
    the one-off runs' shapes: a field holding {"reply": ...}, or a reply beside its "<field>_ok"."""
    out = {row.get("method", method): row["reply"]} if isinstance(row.get("reply"), str) else {}
    out.update(row.get("replies", {}))
    for key, value in row.items():
        if isinstance(value, dict) and isinstance(value.get("reply"), str):
            out[key] = value["reply"]
        elif isinstance(value, str) and f"{key}_ok" in row:
            out[key] = value
    return out


def rescore(data) -> dict[str, tuple[int, int, int]]:
    """Per method: (hits before, hits after, questions counted); empty for a file of no replies."""
    method = f"{data.get('method', 'absorber')} (every round)" if isinstance(data, dict) and "matrix" in data \
        else "reply"                                        # recall_matrix: every round's replies together
    out: dict[str, list[int]] = {}
    for prefix, rows in sections(data):
        rows = [dict(r, answer=r.get("answer", r.get("a"))) for r in rows if isinstance(r, dict)]
        rows = [r for r in rows if isinstance(r["answer"], str)]
        others = document_answers(rows)
        for r in rows:
            if r.get("in_window"):                          # the tables leave these out
                continue
            for label, reply in row_replies(r, method).items():
                hits = out.setdefault(prefix + label, [0, 0, 0])
                hits[0] += score(reply, r["answer"])
                hits[1] += score(reply, r["answer"], others[r.get("doc")])
                hits[2] += 1
    return {label: tuple(hits) for label, hits in out.items()}


def json_files(paths: list[Path]) -> list[Path]:
    return [f for p in paths for f in (sorted(p.rglob("*.json")) if p.is_dir() else [p])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.rescore", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="result files, or directories searched for *.json")
    args = ap.parse_args(argv)
    changed = 0
    for path in json_files(args.paths):
        try:
            result = rescore(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            ap.error(f"cannot read {path}: {exc}")
        if not result:
            print(f"{path}: skipped (no fact replies in it)")
            continue
        print(f"{path}:")
        for method, (before, after, n) in result.items():
            changed += before != after
            print(f"  {method}: {before}/{n} -> {after}/{n}{'' if before == after else '  (changed)'}")
    print(f"{changed} method(s) changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
