#!/usr/bin/env bash
# On a GPU machine (torch/triton/transformers preinstalled):
#   bash benchmarks/run_gpu.sh OUT_DIR            one device call: benchmarks/gpu_check.py (make gpu-check), every
#                                                 GPU number and check by value in at most 9 minutes
#   bash benchmarks/run_gpu.sh OUT_DIR STEPS      the long form: a space-separated subset of
#                                                 "tests bench train varlen host hf hf-large cuda"
# Each long-form step has its own time limit so one slow step cannot starve the others; logs and CSVs land in
# OUT_DIR.  All of them take longer than one device call (10 min): run them as "tests bench train varlen host",
# "hf hf-large" and "cuda".
set -u
out=${1:?usage: run_gpu.sh OUT_DIR [STEPS]}
if [ $# -lt 2 ]; then
  exec "$(command -v python || command -v python3)" -m benchmarks.gpu_check --out "$out"
fi
steps=$2
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log="$out/gpu.log"
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  date -u
} >"$log" 2>&1
for step in $steps; do
  echo "=== $step" >>"$log"
  case $step in
    tests) xdist=$(python -c "import xdist" 2>/dev/null && echo "-n 8")     # one process without pytest-xdist
           timeout 150 python -m pytest -q -m cuda $xdist -p no:cacheprovider tests -k "not cuda-ext" >>"$log" 2>&1 ;;
    bench) timeout 110 python -m benchmarks --preset fwd-target --out "$out" --no-plot --quiet \
             --methods fused_triton,eager,sdpa_mask,sdpa_nomask,flex >>"$log" 2>&1 ;;
    train) timeout 160 python -m benchmarks --preset train-target --out "$out" --no-plot --quiet \
             --methods fused_triton,eager,sdpa_mask,sdpa_nomask,flex >>"$log" 2>&1 ;;
    # (explicit methods: the preset's "fused" / "varlen" would probe the cuda engine, which JIT-builds the
    # extension, minutes, and a build killed by the time limit leaves its lock for the cuda step to wait on)
    varlen) timeout 120 python -m benchmarks --preset varlen --out "$out" --no-plot --quiet \
             --methods fused_triton,varlen_triton,sdpa_mask,sdpa_loop,flex,flex_doc >>"$log" 2>&1 ;;
    host)  timeout 60 python -m benchmarks.host_cost --device cuda >>"$log" 2>&1 ;;
    hf)    timeout 130 python benchmarks/bench_hf.py --out "$out/bench_hf.csv" --iters 20 >>"$log" 2>&1 ;;
    hf-large) timeout 200 python benchmarks/bench_hf.py --models bert-large --out "$out/bench_hf_large.csv" \
             --iters 10 >>"$log" 2>&1 ;;
    cuda)  # the C++/CUDA fallback: JIT build (a few minutes), its tests, then fwd-target against Triton;
           # nothing after a failed build (a build killed by its limit leaves a lock that every later load waits on)
           timeout 300 python -c "from fused_attn import _build; print('extension:', _build.load())" >>"$log" 2>&1 && {
             timeout 150 python -m pytest -q -m cuda -p no:cacheprovider tests -k "cuda-ext" >>"$log" 2>&1
             timeout 120 python -m benchmarks --preset fwd-target --out "$out/cuda" --no-plot --quiet \
               --methods fused_triton,fused_cuda,sdpa_mask,sdpa_nomask >>"$log" 2>&1; } ;;
  esac
  echo "=== $step exit $?" >>"$log"
done
tail -c 6000 "$log"
