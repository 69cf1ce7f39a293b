"""What a replay buffer costs a round on a real model: the whole buffer read at every step
(replay_batch = 0) against a few replayed rounds a step (replay_batch), same buffer, same steps.

    python -m benchmarks.replay_cost [--model smollm2-135m] [--rounds 12] [--batch 4] [--steps 4]

Each configuration runs in a process of its own (peak RSS is per process): a session whose replay
buffer holds `rounds` earlier documents' recite probes absorbs one more document, flushed. Writes
benchmarks/results/replay/results.json and RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "replay"


def one(model: str, rounds: int, batch: int, steps: int) -> dict:
    from absorber_engine import AbsorberConfig, AbsorberEngine
    from absorber_engine.model_store import recommended_config, resolve
    from absorber_engine.replay import replay_probe
    from evals.facts import make_document

    torch.set_num_threads(1)
    path = resolve(model)
    # Replay trains the one delta: the recommended bank (memory_slots > 1) refuses it.
    cfg = (recommended_config(path) or AbsorberConfig()).replace(memory_slots=1, replay_rounds=rounds,
                                                                  replay_batch=batch, max_steps=steps)
    eng = AbsorberEngine.from_pretrained(path, config=cfg)
    docs = [eng.tokenizer.encode(make_document(11, i, place=True).text + "\n", add_special_tokens=False)
            for i in range(rounds + 1)]
    for d in docs[:rounds]:
        eng.default.replay.append(replay_probe(eng.frame, d))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    eng.absorb(docs[-1], flush=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux
    return {"replay_rounds": rounds, "replay_batch": batch, "steps": steps, "round_s": round(seconds, 1),
            "peak_rss_mib": round(peak / 1024), "rss_before_round_mib": round(before / 1024)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=12, help="earlier rounds in the buffer")
    ap.add_argument("--batch", type=int, default=4, help="replay_batch of the cheap configuration")
    ap.add_argument("--steps", type=int, default=4, help="AdamW steps of the round")
    ap.add_argument("--one", nargs=2, type=int, metavar=("ROUNDS", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.model, args.one[0], args.one[1], args.steps)))
        return 0
    rows = []
    for rounds, batch in [(args.rounds, 0), (args.rounds, args.batch), (args.batch, 0)]:
        out = subprocess.run([sys.executable, "-m", "benchmarks.replay_cost", "--model", args.model, "--steps",
                              str(args.steps), "--one", str(rounds), str(batch)], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[1])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    whole, cheap, short = rows
    result = {"model": args.model, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": 1, "rows": rows,
              "time_ratio_whole_over_batch": round(whole["round_s"] / cheap["round_s"], 2),
              "peak_saved_mib": whole["peak_rss_mib"] - cheap["peak_rss_mib"]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"One round of {args.model} ({args.steps} steps, 1 thread) with a replay buffer",
             "", "| replay_rounds | replay_batch | round s | peak RSS MiB |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['replay_rounds']} | {r['replay_batch']} | {r['round_s']} | {r['peak_rss_mib']} |" for r in rows]
    lines += ["", f"whole buffer / replay_batch: {result['time_ratio_whole_over_batch']}x the time, "
              f"{result['peak_saved_mib']} MiB more peak"]
    (OUT / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
