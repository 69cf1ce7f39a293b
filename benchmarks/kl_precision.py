"""The full-vocabulary KL's CPU path (linear_kl_ref, forward and backward) with its two logit
matmuls in bf16, as it runs inside the engine's bf16 autocast, against the same op in fp32, in the
same process, variants alternating; with the teacher's distribution recomputed at every call and
kept for the round (teacher_side). Head shapes of SmolLM2-135M (V 49,152, D 576) and the random
Llama of the workload benchmark (V 32,000, D 512), 256 rows (a Y of 256 tokens).

    python -m benchmarks.kl_precision [--rows 256] [--repeats 3] [--out DIR]

Writes results.json and RESULTS.md to DIR (default benchmarks/results/kl_precision/).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from absorber_kernels.linear_kl import linear_kl_ref, teacher_side
from benchmarks.measure import machine, set_threads, versions

OUT = Path(__file__).resolve().parent / "results" / "kl_precision"
HEADS = {"smollm2-135m": (49152, 576), "llama-4l": (32000, 512)}


def one(w, hs, ht, bf16: bool, kept: bool) -> tuple[float, float]:
    """Seconds of one forward + backward, and the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        teacher_p = teacher_side(ht, w) if kept else None
        h = hs.clone().requires_grad_()
        start = time.perf_counter()
        loss = linear_kl_ref(h, ht, w, teacher_p=teacher_p)
        loss.backward()
        return time.perf_counter() - start, float(loss.detach())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    threads = set_threads()
    rows, lines = [], ["| head | teacher distribution | fp32 matmuls s | bf16 matmuls s | speed-up | loss fp32 / bf16 |",
                       "| --- | --- | --- | --- | --- | --- |"]
    for name, (V, D) in HEADS.items():
        g = torch.Generator().manual_seed(0)
        w = torch.randn(V, D, generator=g) * 0.05
        ht = torch.randn(args.rows, D, generator=g)
        hs = ht + 0.3 * torch.randn(args.rows, D, generator=g)
        for kept in (False, True):
            runs = {False: [], True: []}
            for _ in range(args.repeats):
                for bf16 in (False, True):
                    runs[bf16].append(one(w, hs, ht, bf16, kept))
            fp32, bf16 = min(t for t, _ in runs[False]), min(t for t, _ in runs[True])
            rows.append(dict(head=name, V=V, D=D, rows=args.rows, kept=kept, fp32_s=[t for t, _ in runs[False]],
                             bf16_s=[t for t, _ in runs[True]], speedup=fp32 / bf16,
                             loss_fp32=runs[False][0][1], loss_bf16=runs[True][0][1]))
            lines.append(f"| {name} (V {V}, D {D}) | {'kept' if kept else 'recomputed'} | {fp32:.3f} | {bf16:.3f} | "
                         f"**{fp32 / bf16:.2f}x** | {runs[False][0][1]:.5f} / {runs[True][0][1]:.5f} |")
            print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(when=time.strftime("%Y-%m-%d %H:%M"), threads=threads, repeats=args.repeats, machine=machine(),
                  versions=versions(), results=rows)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "RESULTS.md").write_text(f"`python -m benchmarks.kl_precision` ({result['when']}, {threads} thread(s), "
                                    f"best of {args.repeats}; {args.rows} rows, forward + backward)\n\n"
                                    + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
