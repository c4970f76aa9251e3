#!/usr/bin/env bash
# A short device run (typically under 3 minutes, at most about 4.5, on an H100 or H200): the
# GPU cache tests, the cache benchmark restricted to the find figures that matter (fp32,
# d16/64/128, uniform and Zipf 1.05 keys, 64K-1M keys per batch, then the latency section), a
# summary against the targets and the committed H200 run, and a short compute-sanitizer
# memcheck of the find paths. Logs and results go to $OUT (default:
# benchmarks/results/gpu_quick_check). T_TESTS, T_BENCH, T_SAN: time limits in seconds
# (T_SAN=0 skips the memcheck). Wheels the image lacks (rocksdict) come from .whl/ if present.
. "$(dirname "$0")/gpu_env.sh" gpu_quick_check
git log -1 --format='commit %h %s' 2>/dev/null
step "gpu tests"
timeout ${T_TESTS:-100} python3 -m pytest -q -ra -p no:cacheprovider -n 4 \
  tests/cache/test_gpu_cache.py tests/cache/test_conformance.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -30
echo "tests exit: ${PIPESTATUS[0]}"
step "cache benchmark"
timeout ${T_BENCH:-120} python3 -m hps_core.cli bench cache --dims 16,64,128 --dtypes float32 \
  --dists uniform,zipf_1.05 --batches 65536,262144,1048576 --no-hit-rate --out "$OUT" 2>&1 \
  | tee "$OUT/bench.log" | tail -45
echo "bench exit: ${PIPESTATUS[0]}"
step "find vs targets (H100 targets; all hits, batch >= 64K)"
python3 - "$OUT/cache_gpu.json" benchmarks/results/cache_gpu.json <<'PY' || true
import json, sys
d = json.load(open(sys.argv[1]))
try:  # the committed full run: its synchronised figures are comparable with ours
    old = json.load(open(sys.argv[2]))
    before = {
        (r["dim"], r["dtype"], r["keys"], r["batch"]): r.get("find_keys_s_sync", r["find_keys_s"])
        for r in old["throughput"]
    }
    print("before: synchronised find of", sys.argv[2], "on", old["machine"].get("gpu"))
    lat = {(r["dim"], r["batch"]): r for r in old["latency"]}
except (OSError, KeyError, ValueError):
    before, lat = {}, {}
print("gpu:", d["machine"].get("gpu"), " copy GB/s:", round(d.get("copy_bytes_s", 0) / 1e9))
target = {16: 5.0, 64: 3.5, 128: 2.0}
for r in d["throughput"]:
    t = target.get(r["dim"]) if r["dtype"] == "float32" else None
    b = before.get((r["dim"], r["dtype"], r["keys"], r["batch"]))
    print(
        f"find d{r['dim']:<4}{r['dtype']:<8} {r['keys']:<10}{r['batch']:>8}: "
        f"{r['find_keys_s'] / 1e9:5.2f} G keys/s pipelined, "
        f"{r.get('find_keys_s_sync', 0) / 1e9:5.2f} synchronised"
        + (f" (before {b / 1e9:.2f})" if b else "")
        + (f"  target {t} G" if t else "")
    )
for r in d["latency"]:
    t = 50 if r["batch"] <= 1024 else 150
    print(
        f"latency d{r['dim']} {r['batch']:>6} keys: p50 {r['p50_us']:.1f} us, "
        f"p99 {r['p99_us']:.1f} us  (target p99 <= {t})"
    )
    if (r["dim"], r["batch"]) in lat:
        b = lat[r["dim"], r["batch"]]
        print(f"  before: p50 {b['p50_us']:.1f} us, p99 {b['p99_us']:.1f} us")
PY
if [ "${T_SAN:-40}" != 0 ]; then
  step "compute-sanitizer memcheck (find paths)"
  HPS_CUPY_NO_POOL=1 timeout ${T_SAN:-40} compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest -q -p no:cacheprovider tests/cache/test_gpu_cache.py \
    -k "empty_and_single or one_set or float16_output or out_arguments or find_missing or (rounding and float32) or (random_ops and lfu and bfloat16 and 128)" \
    2>&1 | tee "$OUT/memcheck.log" | tail -8
  echo "memcheck exit: ${PIPESTATUS[0]}"
fi
step done
