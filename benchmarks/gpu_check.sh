#!/usr/bin/env bash
# What needs a CUDA GPU, in one run: build the scheduler, the kernels' parity and timings
# (benchmarks/gpu_kernels.py), the engine's Triton round against its torch round
# (tests/test_triton_backend.py), and the workload benchmark on the GPU (benchmarks/workload.py).
#
#   bash benchmarks/gpu_check.sh OUT_DIR [PARTS] [WHEEL_DIR]
#
# PARTS: a comma list of kernels, engine, workload-llama, workload-smollm2 (default: all). WHEEL_DIR:
# wheels to run with instead of the installed transformers/peft (installed beside, used if they import).
# KERNEL_ARGS and WORKLOAD_ARGS (WORKLOAD_ARGS_llama, WORKLOAD_ARGS_smollm2 for one model) pass more
# arguments to the two benchmarks; LIMIT_llama and LIMIT_smollm2 their time limits in seconds.
# The CUDA-graph decode (cuda_graphs, off by default until timed on a GPU) against the eager one:
#   WORKLOAD_ARGS="--workloads probes4 --cuda-graphs" LIMIT_smollm2=260 bash benchmarks/gpu_check.sh OUT engine,workload-llama,workload-smollm2
# SmolLM2's weights need not be there: the workload runs its architecture and tokenizer with random
# weights ("smollm2-135m-random"), which reads config and tokenizer from $ABSORBER_CACHE.
set -u
out=${1:?usage: gpu_check.sh OUT_DIR [PARTS] [WHEEL_DIR]}
parts=${2:-kernels,engine,workload-llama,workload-smollm2}
wheels=${3:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -n "$wheels" ] && [ -d "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
    && PYTHONPATH=/tmp/site python3 -c "import transformers, peft" && export PYTHONPATH=/tmp/site \
    || echo "the wheels in $wheels do not import; running with the installed packages"
fi
has() { [[ ",$parts," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
python3 -c "import sys, torch, triton, transformers, peft; print(sys.version.split()[0], torch.__version__, \
triton.__version__, transformers.__version__, peft.__version__)"
python3 setup.py -q build_ext --inplace > "$out/build.log" 2>&1 || { tail -20 "$out/build.log"; exit 1; }
rm "$out/build.log"
if has kernels; then
  timeout 150 python3 -m benchmarks.gpu_kernels --out "$out" ${KERNEL_ARGS:-} 2>&1 | tee "$out/kernels.log"
fi
if has engine; then
  timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/test_triton_backend.py tests/test_static_decode.py 2>&1 \
    | tail -15 | tee "$out/engine.log"
fi
for m in llama smollm2; do
  has "workload-$m" || continue
  name=$([ $m = llama ] && echo llama-4l || echo smollm2-135m-random)
  limit=$([ $m = llama ] && echo ${LIMIT_llama:-90} || echo ${LIMIT_smollm2:-170})
  eval "extra=\${WORKLOAD_ARGS_$m:-}"
  timeout $limit python3 -m benchmarks.workload --device cuda --models "$name" --out "$out/workload-$m" \
    ${WORKLOAD_ARGS:-} $extra 2>&1 | grep -v -e USDT -e Warning -e warn | tee "$out/workload-$m.log" | tail -14
  rm -f "$out/workload-$m/TABLE.md"       # the JSON holds it all (benchmarks.workload.table)
done
