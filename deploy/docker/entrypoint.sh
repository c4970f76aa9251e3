#!/bin/sh
# Container start: write the model repository (hps_core.repo) for the mounted config, fill the
# shared tiers once, then run the command (tritonserver ...) through NVIDIA's entrypoint.
#
#   HPS_CONFIG       the hps.json to serve (mounted: compose volume or k8s ConfigMap)
#   HPS_DENSE_ONNX   the dense network (ONNX; any model with inputs DENSE and EMB)
#   HPS_REPOSITORY   where the model repository goes; tritonserver's --model-repository
#   HPS_MODEL_NAME   the ensemble's name; tritonserver's --load-model
#   HPS_INSTANCES    instances per model (Triton runs each in its own process)
#   HPS_WATCH_URL    the server's HTTP address for `hps watch` (empty: no watch)
#
# The repository is written at start, not at build, because its hps.json is the mounted one,
# and the models say preloaded=true: `hps load` fills the VDB (Redis Cluster, or shared
# memory) and this replica's RocksDB before any instance starts.
set -eu

: "${HPS_CONFIG:=/config/hps.json}"
: "${HPS_DENSE_ONNX:=/data/dlrm/dense.onnx}"
: "${HPS_REPOSITORY:=/models}"
: "${HPS_MODEL_NAME:=dlrm}"
: "${HPS_INSTANCES:=1}"
export HPS_CONFIG HPS_DENSE_ONNX HPS_REPOSITORY HPS_MODEL_NAME HPS_INSTANCES

if [ ! -f "$HPS_CONFIG" ]; then
    echo "hps entrypoint: HPS_CONFIG=$HPS_CONFIG: no such file" >&2
    exit 1
fi
python3 - <<'PY'
import os

from hps_core.repo import write_repository

e = os.environ
spec = write_repository(
    e["HPS_REPOSITORY"], config=e["HPS_CONFIG"], onnx=e["HPS_DENSE_ONNX"],
    name=e["HPS_MODEL_NAME"], instances=int(e["HPS_INSTANCES"]),
)
print(f"hps entrypoint: repository {spec.root}: {spec.ensemble} = {spec.embedding} + {spec.dense}")
PY
hps load "$HPS_REPOSITORY/hps_data/hps.json"

# Triton 2.51 leaves a dead model-instance process dead (and the model ready); `hps watch`
# reloads such a model. $$ is this shell, which becomes the server through exec below.
: "${HPS_WATCH_URL=127.0.0.1:8000}"
case "${1:-}" in
    tritonserver | */tritonserver)
        if [ -n "$HPS_WATCH_URL" ]; then
            hps watch --pid $$ --url "$HPS_WATCH_URL" &
        fi ;;
esac

if [ -x /opt/nvidia/nvidia_entrypoint.sh ]; then
    exec /opt/nvidia/nvidia_entrypoint.sh "$@"
fi
exec "$@"
