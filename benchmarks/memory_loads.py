"""What checking memory files against the model costs when many are loaded at once (a server
opening its saved sessions): every load reading every weight for the checksum, against one reading
for all of them inside model_identity.weights_read_once. Same files, same engine, runs alternating.

    python -m benchmarks.memory_loads [--model smollm2-135m] [--files 20] [--reps 2]

Writes benchmarks/results/memory_loads/results.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from .measure import machine, set_threads, versions

OUT = Path(__file__).resolve().parent / "results" / "memory_loads"


def run(model: str, files: int, reps: int) -> dict:
    from absorber_engine import AbsorberConfig, AbsorberEngine
    from absorber_engine.model_identity import weights_read_once

    eng = AbsorberEngine.from_pretrained(model, config=AbsorberConfig(chunk_tokens=32, sync_tokens=16, rank=4,
                                                                      max_steps=1, probes=0, futures=0))
    eng.absorb("The pass key is 48213. Remember it. " * 8)
    sessions = [eng.session(f"s{i}") for i in range(files)]
    out = dict(model=model, files=files, each_s=[], once_s=[])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory.absorber"
        eng.save_memory(path)
        for _ in range(reps):
            start = time.perf_counter()
            for s in sessions:
                s.load_memory(path)
            out["each_s"].append(time.perf_counter() - start)
            start = time.perf_counter()
            with weights_read_once(eng.runner):
                for s in sessions:
                    s.load_memory(path)
            out["once_s"].append(time.perf_counter() - start)
    out["ratio"] = min(out["each_s"]) / min(out["once_s"])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    threads = set_threads()
    result = dict(run(args.model, args.files, args.reps), threads=threads, machine=machine(), versions=versions())
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(result, indent=1))
    print(f"{args.files} loads of {args.model}: a reading each {min(result['each_s']):.2f} s, "
          f"one reading {min(result['once_s']):.2f} s ({result['ratio']:.1f}x)")


if __name__ == "__main__":
    main()
