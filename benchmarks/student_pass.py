"""What the student's two CPU savings are worth on a real model, each against the step without it,
measured in the same process, variants alternating:

- one pass: groups of about the same length (a round's recite probe and the replayed row it reads
  at a step) go through the student as one batch, instead of one forward and backward per group;
- kept KL: the teacher's next-token distributions are computed once a round and read at every
  step, instead of recomputed from its final states at every step (the PyTorch reference's path).

The round is the chat demo's (evals/demo.py): SmolLM2-135M-Instruct, its recommended config with a
128-token window (64 + 64), a section of about 64 tokens absorbed flushed, with a replay buffer of
three earlier sections read one a step (replay_batch=1).

    python -m benchmarks.student_pass [--steps 8] [--repeats 3]

Writes benchmarks/results/student_pass/results.json and RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "student_pass"
VARIANTS = {                       # name: (groups share a pass, KL distributions kept)
    "one pass per group, KL recomputed": (False, False),
    "one pass per group, KL kept": (False, True),
    "shared pass, KL recomputed": (True, False),
    "shared pass, KL kept (the engine)": (True, True),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=8, help="AdamW steps of the round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds per variant, variants alternating")
    args = ap.parse_args(argv)

    from absorber_engine import AbsorberEngine
    from absorber_engine import round as round_mod
    from absorber_engine import teacher as teacher_mod
    from absorber_engine.model_store import recommended_config, resolve
    from absorber_engine.replay import replay_probe
    from evals.facts import make_document

    torch.set_num_threads(1)
    path = resolve(args.model)
    cfg = recommended_config(path).replace(chunk_tokens=64, sync_tokens=64, replay_batch=1, max_steps=args.steps)
    eng = AbsorberEngine.from_pretrained(path, config=cfg)
    sections = [eng.tokenizer.encode(make_document(1, i, facts=0, filler_lines=5, place=True).text + "\n",
                                     add_special_tokens=False) for i in range(4)]
    for ids in sections[:3]:
        eng.default.replay.append(replay_probe(eng.frame, ids))
    start_delta = {k: v.clone() for k, v in eng.default.delta.state_dict().items()}
    start_replay = list(eng.default.replay)
    shared, budget = round_mod._passes, teacher_mod.KEPT_DISTRIBUTIONS_BYTES

    def one(share: bool, keep: bool) -> tuple[float, float]:
        round_mod._passes = shared if share else (lambda groups: [[i] for i in range(len(groups))])
        teacher_mod.KEPT_DISTRIBUTIONS_BYTES = budget if keep else 0
        eng.default.delta.load_state_dict(start_delta)
        eng.default.replay.clear()
        eng.default.replay.extend(start_replay)
        began = time.perf_counter()
        report = eng.absorb(sections[3], flush=True)
        return time.perf_counter() - began, report.final_loss

    times = {name: [] for name in VARIANTS}
    losses = {}
    try:
        one(True, True)                                                 # warm-up, not counted
        for _ in range(args.repeats):
            for name, (share, keep) in VARIANTS.items():
                seconds, loss = one(share, keep)
                times[name].append(round(seconds, 2))
                losses[name] = loss
                print(f"{name}: {seconds:.1f} s, final loss {loss:.5f}", flush=True)
    finally:
        round_mod._passes, teacher_mod.KEPT_DISTRIBUTIONS_BYTES = shared, budget
    base = min(times["one pass per group, KL recomputed"])
    rows = [{"variant": name, "round_s": t, "best_s": min(t), "speedup": round(base / min(t), 2),
             "final_loss": losses[name]} for name, t in times.items()]
    result = {"model": args.model, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": 1, "steps": args.steps, "section_tokens": len(sections[3]), "replayed_rounds": 3,
              "rows": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"One chat-demo round of {args.model} ({len(sections[3])} tokens, {args.steps} steps, replay of 3 "
             f"rounds read 1 a step, 1 thread); best of {args.repeats}, variants alternating",
             "", "| variant | round s (each run) | best s | speedup | final loss |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['variant']} | {', '.join(map(str, r['round_s']))} | {r['best_s']} | {r['speedup']}x | "
              f"{r['final_loss']:.5f} |" for r in rows]
    (OUT / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
