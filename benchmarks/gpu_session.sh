#!/usr/bin/env bash
# One short script for a session that is lent a GPU (the `device` tool): the CUDA tests, then the GPU
# benchmarks, results under $OUT (or benchmarks/results). About 8-10 minutes on an H100.
#   run:  bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python -m pip install -q -e ".[test]" 2>&1 | tail -2      # the machine's own CUDA torch stays
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_device.txt"
python -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_inference.py tests/test_ops.py \
    tests/test_pattern.py -k "cuda or semi or gpu" 2>&1 | tail -15 | tee "$out/gpu_tests.txt"
python benchmarks/bench_gpu.py --out "$out/bench_gpu.json" 2>&1 | tail -60 | tee "$out/bench_gpu.txt"
python benchmarks/bench_masked_linear.py --device cuda --out "$out/bench_masked_linear_cuda.json" 2>&1 \
    | tail -30 | tee "$out/bench_masked_linear_cuda.txt"
