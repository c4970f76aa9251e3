#!/usr/bin/env bash
# One device run: GPU tests, compute-sanitizer on the cache kernels, the cache benchmark and
# the demo. Logs and results go to $OUT (default: benchmarks/results/gpu_check).
# Wheels the image lacks (rocksdict) are installed from .whl/ when present.
. "$(dirname "$0")/gpu_env.sh" gpu_check
step "gpu tests"
timeout ${T_TESTS:-200} python3 -m pytest -q -ra -p no:cacheprovider -n 4 --timeout 150 \
  tests/cache/test_gpu_cache.py tests/cache/test_conformance.py tests/test_hps_lookup.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
step "compute-sanitizer memcheck"
HPS_CUPY_NO_POOL=1 timeout ${T_SAN:-100} compute-sanitizer --tool memcheck --error-exitcode 9 \
  python3 -m pytest -q -p no:cacheprovider tests/cache/test_gpu_cache.py \
  -k "empty_and_single or one_set or static_table_fills or float16_output or find_missing or out_arguments or (random_ops and lru and float16 and 13 and 8) or (static_table_against and bfloat16 and 13)" \
  2>&1 | tee "$OUT/memcheck.log" | tail -15
echo "memcheck exit: ${PIPESTATUS[0]}"
step "cache benchmark"
timeout ${T_BENCH:-180} python3 -m hps_core.cli bench cache 2>&1 | tee "$OUT/bench.log" | tail -80
cp benchmarks/results/cache_gpu.json benchmarks/results/cache_gpu.png "$OUT"/ 2>/dev/null
step demo
timeout ${T_DEMO:-60} python3 -m hps_core.cli demo 2>&1 | tail -25
step done
