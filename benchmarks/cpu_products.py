"""The two CPU paths the engine takes in place of torch's defaults, each against that default in the
same process, variants alternating (best of `--repeats`):

- decode-step products: every linear of SmolLM2-135M (30 layers x 7, and the 49,152 x 576 head) at
  1 and 4 rows, F.linear against the same product on weights reordered for oneDNN
  (absorber_kernels/packed_linear.py), fp32 and bf16, at 1 and 2 threads; GB/s is the weights'
  bytes over the time;
- the student's attention at SmolLM2's heads (9 query, 3 key/value heads of 64), bf16 and fp32:
  torch's sdpa forward + backward against absorber_kernels/cpu_attention.py, at the row shapes a
  round trains on and a longer one (where fp32 keeps sdpa: cpu_attention.MAX_TOKENS);
- the sampler: a decode step's next tokens from bf16 logits at the random Llama's and SmolLM2's
  vocabularies, absorber_engine.sampling.sample_next against what generate() runs (softmax, then
  torch.multinomial), from generators seeded alike: the same ids, checked.

    python -m benchmarks.cpu_products [--repeats 5] [--out DIR]

Writes results.json and RESULTS.md to DIR (default benchmarks/results/cpu_products/).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from absorber_kernels import packed_linear
from absorber_kernels.cpu_attention import MAX_TOKENS, CausalAttention
from benchmarks.measure import machine, versions

OUT = Path(__file__).resolve().parent / "results" / "cpu_products"
D, FF, KV, V, LAYERS = 576, 1536, 192, 49152, 30                 # SmolLM2-135M
# Y (256), X's next-token pass (511), SmolLM2's recite probe (554), groups of probes, and a longer row
ATTENTION_SHAPES = [(1, 256), (1, 511), (1, 554), (4, 96), (4, 115), (4, 160), (2, 300), (1, 1024)]


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def linears(repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    shapes = [(D, D), (KV, D), (KV, D), (D, D), (FF, D), (FF, D), (D, FF)] * LAYERS + [(V, D)]
    weights = [torch.randn(s, generator=g) * 0.05 for s in shapes]
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        if not packed_linear.supported(dtype):
            continue
        ws = [w.to(dtype) for w in weights]
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        for rows in (1, 4):
            packs = [packed_linear.Packed(w, dtype, rows) for w in ws]
            xs = {k: torch.randn(rows, k, generator=g).to(dtype) for k in (D, FF)}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                with torch.no_grad():
                    plain = packed = float("inf")
                    for _ in range(repeats):                     # the two alternate: the same machine state
                        plain = min(plain, _seconds(lambda: [F.linear(xs[w.shape[1]], w) for w in ws]))
                        packed = min(packed, _seconds(lambda: [p(xs[w.shape[1]], None) for w, p in zip(ws, packs)]))
                    err = max(float((p(xs[w.shape[1]], None).double() - F.linear(xs[w.shape[1]].double(), w.double()))
                                    .abs().max()) for w, p in zip(ws[:7], packs[:7]))
                out.append(dict(dtype=str(dtype).removeprefix("torch."), rows=rows, threads=threads, matrices=len(ws),
                                f_linear_ms=1e3 * plain, packed_ms=1e3 * packed, f_linear_gb_s=nbytes / plain / 1e9,
                                packed_gb_s=nbytes / packed / 1e9, speedup=plain / packed, max_abs_err_vs_f64=err))
    return out


def attention(repeats: int) -> list[dict]:
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for b, t in ATTENTION_SHAPES:
                g = torch.Generator().manual_seed(t)
                q, k, v = (torch.randn(b, h, t, 64, generator=g).to(dtype).requires_grad_() for h in (9, 3, 3))
                dout = torch.randn(b, 9, t, 64, generator=g).to(dtype)
                # The kernel itself, past MAX_TOKENS too: the table shows where each dtype's limit comes from
                impls = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                         "cpu_attention": lambda q, k, v: CausalAttention.apply(q, k, v, 64 ** -0.5)}
                times = {name: [float("inf"), float("inf")] for name in impls}
                for _ in range(repeats):
                    for name, fn in impls.items():
                        for x in (q, k, v):
                            x.grad = None
                        start = time.perf_counter()
                        o = fn(q, k, v)
                        mid = time.perf_counter()
                        o.backward(dout)
                        end = time.perf_counter()
                        times[name] = [min(times[name][0], mid - start), min(times[name][1], end - mid)]
                out.append(dict(dtype=str(dtype).removeprefix("torch."), rows=b, tokens=t, threads=threads,
                                engine_takes=t <= MAX_TOKENS[dtype],
                                **{f"{n}_{part}_ms": 1e3 * times[n][i] for n in impls for i, part in enumerate(("fwd", "bwd"))},
                                speedup=sum(times["sdpa"]) / sum(times["cpu_attention"])))
    return out


def sampler(repeats: int, calls: int = 50) -> list[dict]:
    from absorber_engine.sampling import sample_next

    def generate_draw(logits, gen):
        return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=gen)[:, 0]

    out = []
    for vocab in (32000, V):
        for rows in (1, 4):
            logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab)) * 3).bfloat16()
            for threads in (1, 2):
                torch.set_num_threads(threads)
                impls = {"engine": lambda g: sample_next(logits, 1.0, 1.0, g), "generate": lambda g: generate_draw(logits, g)}
                best = {name: float("inf") for name in impls}
                ids = {}
                for _ in range(repeats):
                    for name, fn in impls.items():
                        gen = torch.Generator().manual_seed(1)
                        start = time.perf_counter()
                        ids[name] = torch.stack([fn(gen) for _ in range(calls)])
                        best[name] = min(best[name], (time.perf_counter() - start) / calls)
                out.append(dict(vocab=vocab, rows=rows, threads=threads, engine_ms=1e3 * best["engine"],
                                generate_ms=1e3 * best["generate"], speedup=best["generate"] / best["engine"],
                                same_ids=bool(torch.equal(ids["engine"], ids["generate"]))))
    return out


def report(lin: list[dict], att: list[dict], samp: list[dict]) -> str:
    lines = ["Decode-step products: SmolLM2-135M's 211 matrices, one product each", "",
             "| dtype | rows | threads | F.linear ms (GB/s) | packed ms (GB/s) | speed-up | max abs err vs float64 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['dtype']} | {r['rows']} | {r['threads']} | {r['f_linear_ms']:.1f} ({r['f_linear_gb_s']:.1f}) | "
              f"{r['packed_ms']:.1f} ({r['packed_gb_s']:.1f}) | **{r['speedup']:.2f}x** | {r['max_abs_err_vs_f64']:.2g} |"
              for r in lin]
    limits = ", ".join(f"{n} tokens in {str(d).removeprefix('torch.')}" for d, n in MAX_TOKENS.items())
    lines += ["", f"The student's attention, SmolLM2's heads, forward + backward (the engine takes rows up to {limits})", "",
              "| dtype | rows x tokens | threads | sdpa fwd + bwd ms | cpu_attention fwd + bwd ms | speed-up |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['dtype']} | {r['rows']} x {r['tokens']} | {r['threads']} | {r['sdpa_fwd_ms']:.2f} + {r['sdpa_bwd_ms']:.2f} | "
              f"{r['cpu_attention_fwd_ms']:.2f} + {r['cpu_attention_bwd_ms']:.2f} | **{r['speedup']:.2f}x**"
              f"{'' if r['engine_takes'] else ' (sdpa kept)'} |" for r in att]
    lines += ["", "The sampler: next tokens from bf16 logits, temperature 1 (ms a call)", "",
              "| vocabulary | rows | threads | softmax + torch.multinomial | sample_next | speed-up | same ids |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['vocab']:,} | {r['rows']} | {r['threads']} | {r['generate_ms']:.3f} | {r['engine_ms']:.3f} | "
              f"**{r['speedup']:.2f}x** | {'yes' if r['same_ids'] else 'NO'} |" for r in samp]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M")
    lin, att, samp = linears(args.repeats), attention(args.repeats), sampler(args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(started=started, machine=machine(), versions=versions(),
                                                           linears=lin, attention=att, sampler=samp), indent=1))
    (args.out / "RESULTS.md").write_text(report(lin, att, samp))
    print(report(lin, att, samp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
