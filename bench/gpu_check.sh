#!/usr/bin/env bash
# The one GPU check of the sequential pipeline, for a machine with a CUDA GPU (none was lent to the
# sessions that wrote it, so the CUDA path has not run yet): the CUDA tests, then the sequential
# pipeline on smollm2-135m and on the 1.1B random LLaMA, with wall time, peak RSS and peak GPU memory.
#   bash bench/gpu_check.sh [OUT]        (default OUT: runs/bench/sequential-gpu)
set -euo pipefail
OUT=${1:-runs/bench/sequential-gpu}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -m pytest -q tests/test_sequential.py -k cuda -rs 2>&1 | tee "$OUT/tests.txt"
$PY bench/sequential.py gpu --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
