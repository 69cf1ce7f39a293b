"""The Triton kernels on a real GPU: parity with the float64 reference, then time against the
engine's torch path and the plain PyTorch formulation, at the sizes of ROOFLINE.md (a 7B-like
layer) and at SmolLM2-135M's.

Parity: fresh random inputs per case, the kernel's forward and every gradient compared with the
float64 reference run on the same inputs, as ‖got − ref‖ / ‖ref‖; NaN fails. Thresholds: fp32
operands (3xTF32 dots) 1e-4, bf16 2e-2.
Time: triton.testing.do_bench, median, after its warm-up; forward + backward where the engine
trains through the op, forward only for the teacher's attention. Achieved TFLOP/s from the same
operation counts ROOFLINE.md derives.

    python -m benchmarks.gpu_kernels [--smoke] [--ops linear_kl,...] [--sizes smollm2,7b]
                                     [--dtypes float32,bfloat16] [--no-timing] [--out DIR]

--smoke runs tiny shapes and no timing, so the script can be checked on CPU under
TRITON_INTERPRET=1. No assertions on speed anywhere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F


LIMIT = {torch.float32: 1e-4, torch.bfloat16: 2e-2}

SIZES = {
    # ROOFLINE.md's 7B-like step: D 4096, V 32000, N 2048, rank 64, 32/8 heads of 128, prefix 1024
    "7b": dict(kl=dict(N=2048, D=4096, V=32000), l1=dict(L=33, N=2048, D=4096),
               lora=dict(T=2048, IN=4096, OUT=11008, R=64), batched=dict(S=8, T=256, IN=4096, OUT=11008, R=64),
               attn=dict(H=32, KV=8, T=2048, P=1024, Dh=128)),
    # SmolLM2-135M: D 576, V 49152, 31 states, MLP 1536, rank 4, 9/3 heads of 64; n = 512, one probe of ~600
    "smollm2": dict(kl=dict(N=600, D=576, V=49152), l1=dict(L=31, N=600, D=576),
                    lora=dict(T=600, IN=576, OUT=1536, R=4), batched=dict(S=8, T=64, IN=576, OUT=1536, R=4),
                    attn=dict(H=9, KV=3, T=600, P=512, Dh=64)),
    "smoke": dict(kl=dict(N=40, D=48, V=300), l1=dict(L=3, N=20, D=40), lora=dict(T=33, IN=40, OUT=70, R=8),
                  batched=dict(S=3, T=9, IN=40, OUT=70, R=8), attn=dict(H=4, KV=2, T=24, P=16, Dh=32)),
}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    if not torch.isfinite(got).all():
        return float("nan")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


class Case:
    """One op at one size: `make(dtype)` draws fresh inputs; `run(ops, inputs, impl)` runs the op
    (impl "engine": the op table's entry; "plain": the user's formulation) and returns its outputs
    and gradients; `flops` counts its matrix work."""

    def __init__(self, name, make, run, flops):
        self.name, self.make, self.run, self.flops = name, make, run, flops


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().clone().requires_grad_(grad)


def cases(sz: dict, device) -> list[Case]:
    g = torch.Generator(device=device)

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device) * scale

    out = []
    kl = sz["kl"]

    def mk_kl(dtype):
        N, D, V = kl["N"], kl["D"], kl["V"]
        hs = rn(N, D)
        return dict(hs=hs.to(dtype), ht=(hs + rn(N, D, scale=0.3)).to(dtype), w=rn(V, D, scale=D ** -0.5).to(dtype))

    def run_kl(ops, t, impl):
        hs = _leaf(t["hs"], True)
        if impl == "plain":
            zs, zt = hs.float() @ t["w"].float().t(), t["ht"].float() @ t["w"].float().t()
            loss = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction="sum") / hs.shape[0]
        else:
            loss = ops.linear_kl(hs, t["ht"], t["w"])
        loss.backward()
        return [loss, hs.grad]

    out.append(Case("linear_kl", mk_kl, run_kl, 10 * kl["N"] * kl["V"] * kl["D"]))

    l1 = sz["l1"]

    def mk_l1(dtype):
        s = [rn(1, l1["N"], l1["D"]).to(dtype) for _ in range(l1["L"])]
        return dict(s=s, t=[(x.float() + rn(1, l1["N"], l1["D"], scale=0.1)).to(dtype) for x in s])

    def run_l1(ops, t, impl):
        s = [_leaf(x, True) for x in t["s"]]
        if impl == "plain":
            loss = (torch.stack(s).float() - torch.stack(t["t"]).float()).abs().mean()
        else:
            loss = ops.hidden_l1(s, t["t"])
        loss.backward()
        return [loss] + [x.grad for x in s]

    out.append(Case("hidden_l1", mk_l1, run_l1, 3 * l1["L"] * l1["N"] * l1["D"]))

    lo = sz["lora"]

    def mk_lora(dtype):
        return dict(x=rn(1, lo["T"], lo["IN"]).to(dtype), w=rn(lo["OUT"], lo["IN"], scale=lo["IN"] ** -0.5).to(dtype),
                    a=rn(lo["IN"], lo["R"], scale=lo["IN"] ** -0.5), b=rn(lo["R"], lo["OUT"], scale=0.1))

    def run_lora(ops, t, impl):
        x, a, b = _leaf(t["x"], True), _leaf(t["a"], True), _leaf(t["b"], True)
        if impl == "plain":   # what a LoRA layer does: base GEMM, then x·A·B added
            y = x @ t["w"].t() + (x @ a.to(x.dtype)) @ b.to(x.dtype)
        else:
            y = ops.lowrank_linear(x, t["w"], None, a, b, 1.0)
        y.float().square().mean().backward()
        return [y, x.grad, a.grad, b.grad]

    out.append(Case("lowrank_linear", mk_lora, run_lora, 6 * lo["T"] * lo["OUT"] * lo["IN"]))

    bt = sz["batched"]

    def mk_batched(dtype):
        S = bt["S"]
        return dict(x=rn(S, bt["T"], bt["IN"]).to(dtype), w=rn(bt["OUT"], bt["IN"], scale=bt["IN"] ** -0.5).to(dtype),
                    a=rn(S, bt["IN"], bt["R"], scale=bt["IN"] ** -0.5), b=rn(S, bt["R"], bt["OUT"], scale=0.1),
                    index=torch.arange(S, device=device))

    def run_batched(ops, t, impl):
        x, a, b = _leaf(t["x"], True), _leaf(t["a"], True), _leaf(t["b"], True)
        if impl == "plain":   # one LoRA per row, as a loop over streams
            y = x @ t["w"].t() + torch.bmm(torch.bmm(x, a.to(x.dtype)), b.to(x.dtype))
        else:
            y = ops.lowrank_linear_batched(x, t["w"], None, a, b, t["index"], 1.0)
        y.float().square().mean().backward()
        return [y, x.grad, a.grad, b.grad]

    out.append(Case("lowrank_batched", mk_batched, run_batched, 6 * bt["S"] * bt["T"] * bt["OUT"] * bt["IN"]))

    at = sz["attn"]
    for prefix in (False, True):
        def mk_attn(dtype, prefix=prefix):
            S = at["T"] + (at["P"] if prefix else 0)
            return dict(q=rn(1, at["H"], S, at["Dh"]).to(dtype), k=rn(1, at["KV"], S, at["Dh"]).to(dtype),
                        v=rn(1, at["KV"], S, at["Dh"]).to(dtype))

        def run_attn(ops, t, impl, prefix=prefix):
            q, k, v = (_leaf(t[n], not prefix) for n in "qkv")
            with torch.set_grad_enabled(not prefix):
                if impl == "plain":
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                else:
                    o = ops.attention(q, k, v)
                if prefix:
                    return [o]
                o.float().square().mean().backward()
            return [o, q.grad, k.grad, v.grad]

        S = at["T"] + (at["P"] if prefix else 0)
        causal_pairs = S * (S + 1) / 2
        fl = 4 * at["H"] * causal_pairs * at["Dh"] * (1 if prefix else 3.5)   # fwd 2 GEMMs; bwd 5 more
        out.append(Case("attention_teacher" if prefix else "attention_student", mk_attn, run_attn, fl))
    return out


def parity(case: Case, dtype, triton_ops, torch_ops) -> dict:
    """Triton (and the torch path) against the float64 reference run on the same inputs."""
    t = case.make(dtype)
    t64 = {k: ([x.double() for x in v] if isinstance(v, list) else (v.double() if v.is_floating_point() else v))
           for k, v in t.items()}
    ref = case.run(torch_ops, t64, "engine")
    got = case.run(triton_ops, t, "engine")
    eng = case.run(torch_ops, t, "engine")
    errs = [rel_err(a, b) for a, b in zip(got, ref)]
    torch_errs = [rel_err(a, b) for a, b in zip(eng, ref)]
    worst = max(errs)
    return dict(op=case.name, dtype=str(dtype).replace("torch.", ""), rel_err=errs, torch_rel_err=torch_errs,
                worst=worst, ok=bool(worst <= LIMIT[dtype]))           # NaN compares False: fails


def timing(case: Case, dtype, triton_ops, torch_ops) -> dict:
    from triton.testing import do_bench

    t = case.make(dtype)
    res = dict(op=case.name, dtype=str(dtype).replace("torch.", ""), gflop=case.flops / 1e9)
    for impl, ops in (("triton", triton_ops), ("torch", torch_ops), ("plain", torch_ops)):
        try:
            ms = do_bench(lambda: case.run(ops, t, impl if impl == "plain" else "engine"), warmup=50, rep=200,
                          return_mode="median")
        except torch.OutOfMemoryError:
            ms = None
        res[f"{impl}_ms"] = ms
        res[f"{impl}_tflops"] = None if ms is None else case.flops / ms / 1e9
    torch.cuda.empty_cache()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, no timing (CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--ops", help="a comma list of ops (default: all)")
    ap.add_argument("--sizes", default="smollm2,7b", help="a comma list of smollm2, 7b")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the JSON's name")
    ap.add_argument("--out", default="benchmarks/results/gpu")
    args = ap.parse_args(argv)
    from absorber_kernels.ops import get_ops

    triton_ops, torch_ops = get_ops("triton"), get_ops("torch")
    device = torch.device("cpu" if args.smoke else "cuda")
    dtypes = [torch.float32] if args.smoke else [getattr(torch, d) for d in args.dtypes.split(",")]
    sizes = ["smoke"] if args.smoke else args.sizes.split(",")
    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
                  torch=torch.__version__, triton=__import__("triton").__version__, parity=[], timing=[])
    for size in sizes:
        for case in cases(SIZES[size], device):
            if args.ops and case.name not in args.ops.split(","):
                continue
            for dtype in dtypes:
                try:
                    p = dict(size=size, **parity(case, dtype, triton_ops, torch_ops))
                except Exception as e:          # one op's failure must not hide the others' results
                    p = dict(size=size, op=case.name, dtype=str(dtype), ok=False, worst=float("nan"),
                             torch_rel_err=[float("nan")], error=f"{type(e).__name__}: {e}"[:500])
                report["parity"].append(p)
                print(f"parity {size:8s} {case.name:18s} {p['dtype']:8s} worst {p['worst']:.2e} "
                      f"(torch path {max(p['torch_rel_err']):.2e}) {'ok' if p['ok'] else 'FAIL'} {p.get('error', '')}",
                      flush=True)
                if not (args.smoke or args.no_timing) and dtype == torch.bfloat16 and "error" not in p:
                    r = dict(size=size, **timing(case, dtype, triton_ops, torch_ops))
                    report["timing"].append(r)
                    print(f"time   {size:8s} {case.name:18s} " + "  ".join(
                        f"{k} {r[k + '_ms']:.3f} ms ({r[k + '_tflops']:.1f} TF/s)" if r[k + "_ms"] else f"{k} OOM"
                        for k in ("triton", "torch", "plain")), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kernels{args.tag}.json").write_text(json.dumps(report, indent=1))
    bad = [p for p in report["parity"] if not p["ok"]]
    print(f"{len(report['parity']) - len(bad)}/{len(report['parity'])} parity checks within limits")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
