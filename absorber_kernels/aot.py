"""Ahead-of-time compilation of every kernel for a named GPU, without a GPU: the GPU-readiness check.

For each kernel, `specs()` gives the arguments a real launch at representative sizes would pass
(Llama-7B-like: D = 4096, V = 32000, 2048 tokens, r = 64, 32 query / 8 key-value heads of 128) and
the launcher's own tile configuration for the GPU. Integer arguments are specialised the way
Triton's JIT does at launch: a 1 becomes a compile-time constant, a multiple of 16 gets a
divisibility hint, and pointers are 16-byte aligned. `compile_kernel` runs `triton.compile` for
`GPUTarget("cuda", arch, 32)`, keeps PTX and cubin, and reads registers, spill (STACK / LOCAL) and
static shared memory from `cuobjdump --dump-resource-usage` (shipped in Triton's wheel);
dynamic shared memory is the compiler's `metadata.shared`.

Must run with the interpreter off (TRITON_INTERPRET unset): under the interpreter the kernels are
not compilable objects. `python -m absorber_kernels.aot` prints the report as JSON; the tests run it
in a subprocess for that reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from . import attention as _attn
from . import hidden_sync as _hid
from . import linear_kl as _kl
from . import lowrank_batched as _blora
from . import lowrank_linear as _lora
from ._common import HAS_TRITON, dot_precision, next_pow2

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}   # max dynamic shared memory per block (A100, H100)
ARCHS = (80, 90)
DTYPES = ("bf16", "fp16")
_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# representative sizes
N_TOK, D_MODEL, VOCAB, RANK, D_FF = 2048, 4096, 32000, 64, 11008
HQ, HKV, HEAD_DIM = 32, 8, 128
BATCH_STREAMS = 8      # the batched low-rank delta: streams sharing the N_TOK tokens


@dataclass
class AotResult:
    kernel: str
    arch: int
    dtype: str
    has_dot: bool
    registers: int
    stack: int
    local: int
    shared: int          # dynamic (metadata.shared) + static (cuobjdump SHARED), bytes
    mma: int             # mma.sync instructions in the PTX
    wgmma: int           # wgmma.mma_async instructions in the PTX
    cubin_bytes: int
    ptx_bytes: int
    num_warps: int
    num_stages: int

    @property
    def spills(self) -> int:
        return self.stack + self.local


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _spec(fn, args: dict, constexprs: dict):
    """signature, constexprs and attrs for ASTSource, specialised as the JIT does at launch.
    `args`: name → "*bf16"-style pointer type, float (an fp32 scalar) or int (its value)."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        val = args[name]
        if isinstance(val, str):
            sig[name] = val
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(val, float):
            sig[name] = "fp32"
        elif val == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if val % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def specs(dtype: str, arch: int = 90):
    """(name, jit function, args, constexprs, num_warps, num_stages) for every kernel at one dtype,
    with the tile configuration the launchers pick on compute capability `arch`."""
    p = f"*{dtype}"
    prec = dot_precision(_TORCH[dtype])
    out = []

    # --- fused linear KL: pass 1 (plain and fused top-32), pass 2 ---
    n, d, v = N_TOK, D_MODEL, VOCAB
    gcfg = _kl.kl_configs(0, arch)[1]
    kl_args = dict(hs_ptr=p, ht_ptr=p, w_ptr=p, b_ptr=p, tau_ptr="*fp32", stats_ptr="*fp32", topk_ptr="*i64",
                   N=n, V=v, D=d, stride_hs_n=d, stride_hs_d=1, stride_ht_n=d, stride_ht_d=1, stride_wv=d,
                   stride_wd=1, tiles_per_split=63, n_splits=4, c2=1.4427)
    for name, k_pad in (("linear_kl.fwd", 0), ("linear_kl.fwd top-32", 32)):
        c = _kl.kl_configs(k_pad, arch)[0]
        out.append((name, _kl._kl_fwd_kernel, kl_args,
                    dict(HAS_BIAS=False, USE_TAU=False, TOPK=k_pad, BLOCK_N=c["BLOCK_N"], BLOCK_V=c["BLOCK_V"],
                         BLOCK_D=c["BLOCK_D"], PREC=prec), c["num_warps"], c["num_stages"]))
    out.append(("linear_kl.grad", _kl._kl_grad_kernel,
                dict(hs_ptr=p, ht_ptr=p, w_ptr=p, b_ptr=p, lse_s_ptr="*fp32", lse_t_ptr="*fp32", tau_ptr="*fp32",
                     out_ptr=p, row0=256, N=n, V=v, D=d, stride_hs_n=d, stride_hs_d=1, stride_ht_n=d,
                     stride_ht_d=1, stride_wv=d, stride_wd=1, stride_out=v, c2=1.4427),
                dict(HAS_BIAS=False, WRITE_TEACHER=False, BLOCK_N=gcfg["BLOCK_N"], BLOCK_V=gcfg["BLOCK_V"],
                     BLOCK_D=gcfg["BLOCK_D"], PREC=prec), gcfg["num_warps"], gcfg["num_stages"]))

    # --- hidden-state L1: 33 layers of (8, 2048, 4096) ---
    c = _hid.HIDDEN_CONFIG_GPU
    out.append(("hidden_l1", _hid._hidden_l1_kernel,
                dict(s_tab="*i64", t_tab="*i64", s_strides="*i64", t_strides="*i64", s0_ptr=p, t0_ptr=p, g_ptr=p,
                     partial_ptr="*fp32", R=8 * n, T=n, D=d, norm=1e-9, n_row_blocks=8 * n // c["BLOCK_R"]),
                dict(WRITE_GRAD=True, ALIGNED=True, BLOCK_R=c["BLOCK_R"], BLOCK_D=c["BLOCK_D"]),
                c["num_warps"], c["num_stages"]))

    # --- low-rank linear, an nn.Linear 4096 → 11008 (Llama MLP up projection) ---
    m, k_in, n_out, r = N_TOK, D_MODEL, D_FF, RANK
    sc, mc = _lora.LORA_CONFIG_GPU["shrink"], _lora.LORA_CONFIG_GPU["main"]
    br = _lora._block_r(r)
    shrink_c = dict(BLOCK_M=sc["BLOCK_M"], BLOCK_K=sc["BLOCK_K"], BLOCK_R=br, AUX_P=sc["AUX_P"],
                    AUX_Q=sc["AUX_Q"], AUX_M=sc["AUX_M"], PREC=prec)
    no_aux = dict(n_aux=0, ax_ptr=p, ay_ptr=p, ac_ptr=p, AP=1, AQ=1, s_axm=0, s_axp=0, s_aym=0, s_ayq=0, s_acp=0, s_acq=0)
    out.append(("lowrank.shrink (fwd)", _lora._lora_shrink_kernel,
                dict(x_ptr=p, a_ptr="*fp32", u_ptr=p, M=m, K=k_in, R=r, s_xm=k_in, s_xk=1, s_ak=r, s_ar=1,
                     s_um=r, s_ur=1, scale=2.0, **no_aux), shrink_c, sc["num_warps"], sc["num_stages"]))
    out.append(("lowrank.shrink+dB (bwd)", _lora._lora_shrink_kernel,
                dict(x_ptr=p, a_ptr="*fp32", u_ptr=p, M=m, K=n_out, R=r, s_xm=n_out, s_xk=1, s_ak=1, s_ar=n_out,
                     s_um=r, s_ur=1, scale=2.0, n_aux=172, ax_ptr=p, ay_ptr=p, ac_ptr="*fp32", AP=r, AQ=n_out,
                     s_axm=r, s_axp=1, s_aym=n_out, s_ayq=1, s_acp=n_out, s_acq=1),
                shrink_c, sc["num_warps"], sc["num_stages"]))
    main_c = dict(HAS_BIAS=False, BLOCK_M=mc["BLOCK_M"], BLOCK_N=mc["BLOCK_N"], BLOCK_K=mc["BLOCK_K"],
                  BLOCK_R=_lora._block_r(r, 32), GROUP_M=mc["GROUP_M"], AUX_P=mc["AUX_P"], AUX_Q=mc["AUX_Q"],
                  AUX_M=mc["AUX_M"], PREC=prec)
    out.append(("lowrank.main (fwd)", _lora._lora_main_kernel,
                dict(x_ptr=p, w_ptr=p, u_ptr=p, b_ptr="*fp32", bias_ptr=p, y_ptr=p, M=m, N=n_out, K=k_in, R=r,
                     s_xm=k_in, s_xk=1, s_wk=1, s_wn=k_in, s_um=r, s_ur=1, s_br=n_out, s_bn=1, s_ym=n_out, s_yn=1,
                     **no_aux), main_c, mc["num_warps"], mc["num_stages"]))
    out.append(("lowrank.main+dA (bwd)", _lora._lora_main_kernel,
                dict(x_ptr=p, w_ptr=p, u_ptr=p, b_ptr="*fp32", bias_ptr=p, y_ptr=p, M=m, N=k_in, K=n_out, R=r,
                     s_xm=n_out, s_xk=1, s_wk=k_in, s_wn=1, s_um=r, s_ur=1, s_br=1, s_bn=r, s_ym=k_in, s_yn=1,
                     n_aux=32, ax_ptr=p, ay_ptr=p, ac_ptr="*fp32", AP=k_in, AQ=r, s_axm=k_in, s_axp=1,
                     s_aym=r, s_ayq=1, s_acp=r, s_acq=1), main_c, mc["num_warps"], mc["num_stages"]))

    # --- batched low-rank linear: the same layer, the 2048 tokens as 8 streams × 1 row × 256 tokens ---
    n_s, t_row = BATCH_STREAMS, N_TOK // BATCH_STREAMS
    sc, mc = _blora.BLORA_CONFIG_GPU["shrink"], _blora.BLORA_CONFIG_GPU["main"]
    shrink_c = dict(BLOCK_M=sc["BLOCK_M"], BLOCK_K=sc["BLOCK_K"], BLOCK_R=br, AUX_P=sc["AUX_P"],
                    AUX_Q=sc["AUX_Q"], AUX_M=sc["AUX_M"], PREC=prec)
    seg_aux = dict(n_aux=0, aux_per_stream=1, ax_ptr=p, ay_ptr=p, ac_ptr=p, AP=1, AQ=1, s_axm=0, s_axp=0,
                   s_aym=0, s_ayq=0, s_acs=0, s_acp=0, s_acq=0)
    out.append(("lowrank_batched.shrink (fwd)", _blora._blora_shrink_kernel,
                dict(x_ptr=p, a_ptr="*fp32", u_ptr=p, tiles_ptr="*i32", seg_ptr="*i32", K=k_in, R=r, s_xm=k_in,
                     s_xk=1, s_as=k_in * r, s_ak=r, s_ar=1, s_um=r, s_ur=1, scale=2.0, **seg_aux),
                shrink_c, sc["num_warps"], sc["num_stages"]))
    per_db = _cdiv(r, sc["AUX_P"]) * _cdiv(n_out, sc["AUX_Q"])
    out.append(("lowrank_batched.shrink+dB (bwd)", _blora._blora_shrink_kernel,
                dict(x_ptr=p, a_ptr="*fp32", u_ptr=p, tiles_ptr="*i32", seg_ptr="*i32", K=n_out, R=r, s_xm=n_out,
                     s_xk=1, s_as=r * n_out, s_ak=1, s_ar=n_out, s_um=r, s_ur=1, scale=2.0,
                     n_aux=n_s * per_db, aux_per_stream=per_db, ax_ptr=p, ay_ptr=p, ac_ptr="*fp32", AP=r, AQ=n_out,
                     s_axm=r, s_axp=1, s_aym=n_out, s_ayq=1, s_acs=r * n_out, s_acp=n_out, s_acq=1),
                shrink_c, sc["num_warps"], sc["num_stages"]))
    main_c = dict(HAS_BIAS=False, BLOCK_M=mc["BLOCK_M"], BLOCK_N=mc["BLOCK_N"], BLOCK_K=mc["BLOCK_K"],
                  BLOCK_R=_lora._block_r(r, 32), GROUP_M=mc["GROUP_M"], AUX_P=mc["AUX_P"], AUX_Q=mc["AUX_Q"],
                  AUX_M=mc["AUX_M"], PREC=prec)
    out.append(("lowrank_batched.main (fwd)", _blora._blora_main_kernel,
                dict(x_ptr=p, w_ptr=p, u_ptr=p, b_ptr="*fp32", bias_ptr=p, y_ptr=p, stream_ptr="*i32", T=t_row, M=m,
                     N=n_out, K=k_in, R=r, s_xm=k_in, s_xk=1, s_wk=1, s_wn=k_in, s_um=r, s_ur=1, s_bs=r * n_out,
                     s_br=n_out, s_bn=1, s_ym=n_out, s_yn=1, seg_ptr="*i32", **seg_aux),
                main_c, mc["num_warps"], mc["num_stages"]))
    per_da = _cdiv(k_in, mc["AUX_P"]) * _cdiv(r, mc["AUX_Q"])
    out.append(("lowrank_batched.main+dA (bwd)", _blora._blora_main_kernel,
                dict(x_ptr=p, w_ptr=p, u_ptr=p, b_ptr="*fp32", bias_ptr=p, y_ptr=p, stream_ptr="*i32", T=t_row, M=m,
                     N=k_in, K=n_out, R=r, s_xm=n_out, s_xk=1, s_wk=k_in, s_wn=1, s_um=r, s_ur=1, s_bs=k_in * r,
                     s_br=1, s_bn=r, s_ym=k_in, s_yn=1, n_aux=n_s * per_da, aux_per_stream=per_da, seg_ptr="*i32",
                     ax_ptr=p, ay_ptr=p, ac_ptr="*fp32", AP=k_in, AQ=r, s_axm=k_in, s_axp=1, s_aym=r, s_ayq=1,
                     s_acs=k_in * r, s_acp=r, s_acq=1), main_c, mc["num_warps"], mc["num_stages"]))

    # --- attention: 32 query heads, 8 KV heads, head dim 128; the (B, T, H, D) layout of HF's projections ---
    t, s, hd = N_TOK, N_TOK + 1024, HEAD_DIM
    q_str = dict(s_qb=t * HQ * hd, s_qh=hd, s_qt=HQ * hd, s_qd=1)
    k_str = dict(s_kb=s * HKV * hd, s_kh=s * hd, s_ks=hd, s_kd=1)
    v_str = dict(s_vb=s * HKV * hd, s_vh=s * hd, s_vs=hd, s_vd=1)
    f, bw, pre = (_attn.gpu_config(_TORCH[dtype])[x] for x in ("fwd", "bwd", "pre"))
    out.append(("attention.fwd", _attn._attn_fwd_kernel,
                dict(Q=p, K=p, V=p, O=p, LSE="*fp32", qk_scale=0.1275, **q_str, **k_str, **v_str,
                     s_ob=t * HQ * hd, s_oh=hd, s_ot=HQ * hd, s_od=1, H=HQ, G=HQ // HKV, T=t, S=s),
                dict(CAUSAL=True, HEAD_DIM=hd, BLOCK_D=next_pow2(hd), BLOCK_M=f["BLOCK_M"], BLOCK_N=f["BLOCK_N"],
                     PREC=prec), f["num_warps"], f["num_stages"]))
    out.append(("attention.bwd_pre", _attn._attn_bwd_pre_kernel,
                dict(O=p, DO=p, Delta="*fp32", s_ob=t * HQ * hd, s_oh=hd, s_ot=HQ * hd, s_od=1,
                     s_db=t * HQ * hd, s_dh=hd, s_dt=HQ * hd, s_dd=1, H=HQ, T=t),
                dict(HEAD_DIM=hd, BLOCK_D=next_pow2(hd), BLOCK_M=pre["BLOCK_M"]), pre["num_warps"], 3))
    out.append(("attention.bwd", _attn._attn_bwd_kernel,
                dict(Q=p, K=p, V=p, DO=p, DQ=p, DK=p, DV=p, LSE="*fp32", Delta="*fp32", sm_scale=0.088,
                     qk_scale=0.1275, **q_str, **k_str, **v_str,
                     s_db=t * HQ * hd, s_dh=hd, s_dt=HQ * hd, s_dd=1,
                     s_dqb=t * HQ * hd, s_dqh=hd, s_dqt=HQ * hd, s_dqd=1,
                     s_dkb=s * HKV * hd, s_dkh=s * hd, s_dks=hd, s_dkd=1,
                     s_dvb=s * HKV * hd, s_dvh=s * hd, s_dvs=hd, s_dvd=1,
                     H=HQ, HKV=HKV, G=HQ // HKV, T=t, S=s, n_kv_programs=400),
                dict(CAUSAL=True, HEAD_DIM=hd, BLOCK_D=next_pow2(hd), BLOCK_M1=bw["BLOCK_M1"], BLOCK_N1=bw["BLOCK_N1"],
                     BLOCK_M2=bw["BLOCK_M2"], BLOCK_N2=bw["BLOCK_N2"], PREC=prec), bw["num_warps"], bw["num_stages"]))
    return out


_DOT_KERNELS = ("linear_kl", "lowrank", "attention.fwd", "attention.bwd")


def _has_dot(name: str) -> bool:
    return name.startswith(_DOT_KERNELS) and name != "attention.bwd_pre"


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_kernel(name, fn, args, constexprs, num_warps, num_stages, arch, dtype) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = _spec(fn, args, constexprs)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(cubin)
        path = fh.name
    try:
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
    finally:
        os.unlink(path)
    field = lambda key: int(re.search(rf"\b{key}:(\d+)", usage).group(1))  # noqa: E731
    return AotResult(
        kernel=name, arch=arch, dtype=dtype, has_dot=_has_dot(name), registers=field("REG"),
        stack=field("STACK"), local=field("LOCAL"), shared=int(compiled.metadata.shared) + field("SHARED"),
        mma=len(re.findall(r"\bmma\.sync\.aligned", ptx)), wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        cubin_bytes=len(cubin), ptx_bytes=len(ptx), num_warps=num_warps, num_stages=num_stages)


def compile_all(archs=ARCHS, dtypes=DTYPES, workers: int | None = None, prefix: str = "") -> list[AotResult]:
    if not HAS_TRITON:
        raise ImportError("AOT compilation needs triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (run `python -m absorber_kernels.aot`)")
    jobs = [(spec, arch, dt) for dt in dtypes for arch in archs for spec in specs(dt, arch) if spec[0].startswith(prefix)]
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda j: compile_kernel(*j[0], j[1], j[2]), jobs))


def markdown_table(results: list[AotResult]) -> str:
    order = {name: i for i, name in enumerate(dict.fromkeys(r.kernel for r in results))}
    results = sorted(results, key=lambda r: (order[r.kernel], r.arch, r.dtype))
    lines = ["| kernel | arch | dtype | registers | spills (stack+local B) | shared (B) | mma.sync | wgmma | warps |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.kernel} | sm_{r.arch} | {r.dtype} | {r.registers} | {r.spills} | {r.shared} | "
                     f"{r.mma} | {r.wgmma} | {r.num_warps} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="compile every kernel for sm_80 and sm_90; JSON on stdout")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="a comma list of bf16, fp16, fp32")
    ap.add_argument("--kernels", default="", help="only the kernels whose name starts with this")
    args = ap.parse_args(argv)
    results = compile_all(dtypes=tuple(args.dtypes.split(",")), prefix=args.kernels)
    json.dump([asdict(r) for r in results], sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
