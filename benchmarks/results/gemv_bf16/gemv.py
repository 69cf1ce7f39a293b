"""A prototype, not used by the engine: a bf16 GEMV with AVX512-BF16 dot products (each row of W read
once, every row of x against it) against torch's F.linear, over SmolLM2's 211 matrices, each read once a
pass. Needs a CPU with avx512_bf16 and a C++ compiler (torch builds it inline). python gemv.py"""
import time, sys, torch
from torch.utils.cpp_extension import load_inline
src = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
// y (M, N) = x (M, K) · W(N, K)^T, bf16 in, fp32 out; M <= 4, K % 32 == 0.
torch::Tensor gemv(torch::Tensor x, torch::Tensor w) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  const uint16_t* X = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const uint16_t* wr = W + n * K;
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t k = 0; k < K; k += 32) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k);
        for (int64_t m = 0; m < M; ++m)
          acc[m] = _mm512_dpbf16_ps(acc[m], wv, (__m512bh)_mm512_loadu_si512(X + m * K + k));
      }
      for (int64_t m = 0; m < M; ++m) Y[m * N + n] = _mm512_reduce_add_ps(acc[m]);
    }
  });
  return y;
}
"""
ext = load_inline("gemv_bf16", cpp_sources=src, functions=["gemv"], extra_cflags=["-O3", "-mavx512f", "-mavx512bf16", "-fopenmp"],
                  extra_ldflags=["-fopenmp"], verbose=False)
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from absorber_engine.model_store import load_pretrained
model, _, _ = load_pretrained("smollm2-135m", dtype=torch.float32)
ws = [m.weight.detach().to(torch.bfloat16).contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear)]
by = sum(w.numel() * 2 for w in ws)
for threads in (1, 2):
    torch.set_num_threads(threads)
    for M in (1, 4):
        xs = {k: torch.randn(M, k).to(torch.bfloat16) for k in {w.shape[1] for w in ws}}
        err = max(float((ext.gemv(xs[w.shape[1]], w) - torch.nn.functional.linear(xs[w.shape[1]].float(), w.float())).abs().max()) for w in ws[:8])
        res = {}
        for name, f in (("torch", lambda x, w: torch.nn.functional.linear(x, w)), ("dpbf16", ext.gemv)):
            best = 1e9
            for _ in range(5):
                t = time.perf_counter()
                for w in ws:
                    f(xs[w.shape[1]], w)
                best = min(best, time.perf_counter() - t)
            res[name] = best
        print(f"threads {threads} rows {M}: torch {res['torch']*1e3:.1f} ms ({by/res['torch']/1e9:.1f} GB/s), "
              f"dpbf16 {res['dpbf16']*1e3:.1f} ms ({by/res['dpbf16']/1e9:.1f} GB/s), max |diff| vs fp32 {err:.2e}", flush=True)
