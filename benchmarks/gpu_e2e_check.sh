#!/usr/bin/env bash
# One device run of the end-to-end benchmark, GPU variant (in process; no Triton on the device):
# first the device-resident path's tests, then a 10M-row Criteo-like model: baseline A (CPU hash
# map + onnxruntime CPU), ours with the GPU L1 cache (1% and 10% of each table; rows left on the
# device, the dense model on the GPU), and ours with every key in L1 against baseline B (the
# whole model as one CuPy array gathered by row index). The tests take up to 3 minutes on a
# fresh machine (numba and NVRTC compile everything), the benchmark under 3 more: cells not
# begun after E2E_SECONDS are skipped and listed in the JSON. Results (JSON, PNG, log) go to $OUT.
# Wheels the image lacks (rocksdict) are installed from .whl/ when present.
. "$(dirname "$0")/gpu_env.sh" gpu_e2e_check
git log -1 --format='commit %h %s' 2>/dev/null
step "device-resident path tests (GPU L1 session, CuPy dense)"
timeout ${T_TESTS:-180} python3 -m pytest -q -ra -p no:cacheprovider \
  tests/cache/test_gpu_session.py tests/test_device_lookup.py tests/test_bench_e2e.py 2>&1 \
  | tee "$OUT/device_tests.log" | tail -20
echo "tests exit: ${PIPESTATUS[0]}"
step "e2e benchmark (GPU)"
timeout ${T_E2E:-170} python3 -m hps_core.cli bench e2e --rows ${ROWS:-10000000} \
  --alphas 1.05 0 1.2 --max-seconds ${E2E_SECONDS:-130} --work /tmp/hps-e2e --out "$OUT" 2>&1 | tee "$OUT/e2e.log" | tail -70
echo "e2e exit: ${PIPESTATUS[0]}"
step done
