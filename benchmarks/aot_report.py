"""GPU-readiness report, without a GPU: every Triton kernel compiled ahead of time for sm_80 and
sm_90 in bf16 and fp16, as a markdown table (registers, spills, shared memory, tensor-core
instructions). docs/kernels.md includes its bf16 rows; benchmarks/results/aot.md, the whole table.

    python benchmarks/aot_report.py [--out FILE]

Conditions: Triton's own ptxas and cuobjdump (from its wheel), GPUTarget("cuda", arch, 32), the
launchers' GPU tile configurations, arguments specialised as the JIT would at Llama-7B-like sizes
(absorber_kernels/aot.py). Spills are the STACK + LOCAL bytes cuobjdump reports; shared memory is dynamic
(the compiler's metadata) + static, against 163 KB (sm_80) and 227 KB (sm_90) per block.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        # kernels built for the interpreter cannot be compiled: run again without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], env)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown to this file")
    args = parser.parse_args(argv)

    import triton

    from absorber_kernels import aot

    results = aot.compile_all()
    ok = all(r.spills == 0 and r.shared <= aot.SHARED_LIMIT[r.arch]
             and (not r.has_dot or (r.mma if r.arch == 80 else r.wgmma)) for r in results)
    text = "\n".join([
        f"AOT compile of {len({r.kernel for r in results})} kernels for sm_80 and sm_90 (bf16, fp16), "
        f"triton {triton.__version__}, no GPU needed. Sizes: {aot.N_TOK} tokens, D={aot.D_MODEL}, "
        f"V={aot.VOCAB}, r={aot.RANK}, MLP {aot.D_FF}, {aot.HQ} query / {aot.HKV} KV heads of {aot.HEAD_DIM}.",
        "",
        aot.markdown_table(results),
        "",
        f"All checks pass (cubin, tensor cores where there is a tl.dot, no spills, shared memory within limit): "
        f"{'yes' if ok else 'NO'}",
    ])
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
