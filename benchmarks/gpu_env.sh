# Shared set-up of the GPU device scripts (sourced): $OUT (default: benchmarks/results/$1),
# the project on PYTHONPATH, wheels the device image lacks installed from .whl/ when present,
# a `step` heading function, and what the machine has.
set -u
OUT=${OUT:-benchmarks/results/$1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
# float32 GEMMs stay float32: the dense model's tests compare with a float64 reference at 1e-5
unset CUPY_TF32
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
step() { echo "=== $1 ($(date +%T))"; }
step env
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import sys, numpy, numba, cupy, onnxruntime as o; print(sys.version.split()[0], 'numpy', numpy.__version__, 'numba', numba.__version__, 'cupy', cupy.__version__, 'onnxruntime', o.__version__, o.get_available_providers())"
