#!/usr/bin/env bash
# One device run of the end-to-end benchmark, GPU variant (in process; no Triton on the device):
# a 10M-row Criteo-like model, baseline A (CPU hash map + onnxruntime CPU), ours with the GPU L1
# cache (1% and 10% of each table), and ours with every key in L1 against baseline B (the whole
# model as one CuPy array gathered by row index). Under 3 minutes: cells not begun after
# E2E_SECONDS are skipped and listed in the JSON. Results (JSON, PNG, log) go to $OUT.
# Wheels the image lacks (rocksdict) are installed from .whl/ when present.
set -u
OUT=${OUT:-benchmarks/results/gpu_e2e_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
step() { echo "=== $1 ($(date +%T))"; }
step env
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import sys, numpy, numba, cupy, onnxruntime; print(sys.version.split()[0], 'numpy', numpy.__version__, 'numba', numba.__version__, 'cupy', cupy.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
step "e2e benchmark (GPU)"
timeout ${T_E2E:-170} python3 -m hps_core.cli bench e2e --rows ${ROWS:-10000000} \
  --alphas 1.05 0 1.2 --max-seconds ${E2E_SECONDS:-130} --work /tmp/hps-e2e --out "$OUT" 2>&1 | tee "$OUT/e2e.log" | tail -70
echo "e2e exit: ${PIPESTATUS[0]}"
step done
