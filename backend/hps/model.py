"""Triton Python-based backend ``hps``: embedding lookups served by ``hps_core``.

A model config says ``backend: "hps"`` and passes string parameters:

``config``     our config or HugeCTR's hps.json (relative to the model directory); without it,
               the server's ``--backend-config=hps,ps=<path>`` (HugeCTR's flag), else env
               HPS_CONFIG
``model``      the model of that config to serve (default: its only model)
``io``         ``hps``: KEYS INT64 + NUMKEYS INT32 -> OUTPUT0 FP32 (HugeCTR's HPS backend I/O);
               ``slots``: CAT INT64 [B, slots] -> EMB FP32 [B, sum of dims] (for an ensemble)
``preloaded``  ``true`` when ``hps load`` filled the tiers before the server started: every
               instance then attaches the shared-memory VDB and opens RocksDB read-only
``max_keys``   most keys one request may carry
``output_on_device``  ``true``: where the model's L1 caches are on a GPU, outputs stay there
               (CuPy arrays handed over by DLPack) for the next model of an ensemble; Triton
               copies them to the host for a model or client that wants them there

The request handling lives in ``hps_core.serving`` (tested without a server); this file only
converts tensors and errors and exports metrics.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from hps_core.errors import HPSError
from hps_core.metrics import REGISTRY
from hps_core.serving import LEVELS, EmbeddingService

log = logging.getLogger("hps.backend")

# Triton 2.51's stub reads and writes numpy 2 arrays wrongly through as_numpy()/Tensor(); DLPack
# is correct with numpy 2 (and the plain path with numpy 1, where Tensor.from_dlpack is not).
_NUMPY2 = int(np.__version__.split(".", 1)[0]) >= 2
LATENCY_BUCKETS = [1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0]


def to_numpy(tensor) -> np.ndarray:
    return np.from_dlpack(tensor) if _NUMPY2 else tensor.as_numpy()


def to_tensor(name: str, array: np.ndarray):
    if not isinstance(array, np.ndarray):  # rows on the GPU (CuPy): DLPack keeps them there
        return pb_utils.Tensor.from_dlpack(name, array)
    array = np.ascontiguousarray(array)
    return pb_utils.Tensor.from_dlpack(name, array) if _NUMPY2 else pb_utils.Tensor(name, array)


def error_response(e: Exception):
    code = pb_utils.TritonError.INVALID_ARG if isinstance(e, HPSError) else None
    msg = str(e) if isinstance(e, HPSError) else f"internal error: {type(e).__name__}: {e}"
    err = pb_utils.TritonError(msg, code) if code is not None else pb_utils.TritonError(msg)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)


class Metrics:
    """Triton custom metrics per model, table and level, fed from the session's statistics.

    Every metric call is a message to the server process, so a background thread publishes
    the changes every ``interval`` seconds instead of each ``execute`` (hundreds of calls per
    request would cost milliseconds).
    """

    def __init__(self, model: str, service: EmbeddingService, interval: float = 0.5):
        fam = pb_utils.MetricFamily
        self.service = service
        keys = fam("hps_keys_total", "unique keys per level (l1, vdb, pdb, default)", fam.COUNTER)
        secs = fam("hps_lookup_seconds_total", "seconds spent per level", fam.COUNTER)
        rate = fam("hps_hit_rate", "fraction of unique keys served per level", fam.GAUGE)
        reqs = fam("hps_requests_total", "lookup requests (per table)", fam.COUNTER)
        self.families = [keys, secs, rate, reqs]
        self.keys, self.secs, self.rate, self.reqs = {}, {}, {}, {}
        for table in service.table_stats():
            base = {"model": model, "table": table}
            self.reqs[table] = reqs.Metric(labels=base)
            for level in LEVELS:
                labels = {**base, "level": level}
                self.keys[table, level] = keys.Metric(labels=labels)
                self.secs[table, level] = secs.Metric(labels=labels)
                self.rate[table, level] = rate.Metric(labels=labels)
            # a fused lookup (all tables in one call, CPU) times its L1 and VDB work together
            self.secs[table, "fused"] = secs.Metric(labels={**base, "level": "fused"})
        self.latency = None
        try:
            hist = fam("hps_request_seconds", "request latency in the backend", fam.HISTOGRAM)
            self.families.append(hist)
            self.latency = hist.Metric(labels={"model": model}, buckets=LATENCY_BUCKETS)
        except Exception as e:  # a server build without histogram metrics
            log.warning("no request latency histogram: %s", e)
        self.last = {
            t: (0, {lv: 0 for lv in LEVELS}, {lv: 0.0 for lv in (*LEVELS, "fused")})
            for t in self.reqs
        }
        # online updates reaching this instance's L1 (publish -> applied), from hps_core.metrics
        fresh = fam(
            "hps_update_freshness_seconds_q",
            "publish-to-L1 time of online updates in this model's instances (quantiles)",
            fam.GAUGE,
        )
        self.families.append(fresh)
        self.fresh = {
            q: fresh.Metric(labels={"model": model, "quantile": q}) for q in ("0.5", "0.99")
        }
        self.fresh_count = 0
        self.pending: list[float] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self.thread.start()

    def observe(self, seconds: float) -> None:
        with self.lock:
            self.pending.append(seconds)

    def _run(self, interval: float) -> None:
        while not self.stop.wait(interval):
            try:
                self.publish()
            except Exception as e:  # metrics must never take the model down
                log.warning("metrics not published: %s", e)

    def publish(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        hist = REGISTRY.get("hps_update_freshness_seconds")
        if hist is not None and hist.count(group="hps:proc") != self.fresh_count:
            self.fresh_count = hist.count(group="hps:proc")
            for q, metric in self.fresh.items():
                metric.set(hist.quantile(float(q), group="hps:proc"))
        if self.latency is not None:
            for s in pending:
                self.latency.observe(s)
        for table, st in self.service.table_stats().items():
            requests, hits, secs = self.last[table]
            if st.requests == requests:
                continue
            self.reqs[table].increment(st.requests - requests)
            for level in LEVELS:
                if st.hits[level] != hits[level]:
                    self.keys[table, level].increment(st.hits[level] - hits[level])
                    self.secs[table, level].increment(st.seconds[level] - secs[level])
                self.rate[table, level].set(st.hit_rate(level))
            if st.seconds["fused"] != secs["fused"]:
                self.secs[table, "fused"].increment(st.seconds["fused"] - secs["fused"])
            self.last[table] = (st.requests, dict(st.hits), dict(st.seconds))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model_dir = f"{args['model_repository']}"
        self.service = EmbeddingService.from_parameters(params, model_dir=model_dir)
        self.outputs = [o["name"] for o in config["output"]]
        self.inputs = [i["name"] for i in config["input"]]
        self.metrics = Metrics(args["model_name"], self.service)
        log.info(
            "%s: serving model %s (%s I/O, %d tables)",
            args["model_instance_name"], self.service.model, self.service.io, len(self.service.dims),
        )  # fmt: skip

    def execute(self, requests):
        t0 = time.perf_counter()
        if self.service.io == "hps":
            responses = [self._hps(r) for r in requests]
        else:
            responses = self._slots(requests)
        self.metrics.observe(time.perf_counter() - t0)
        return responses

    def _hps(self, request):
        try:
            keys = to_numpy(pb_utils.get_input_tensor_by_name(request, "KEYS"))
            num_keys = to_numpy(pb_utils.get_input_tensor_by_name(request, "NUMKEYS"))
            out = self.service.run_hps(keys, num_keys)  # flat: OUTPUT0 is [1, n x dim]
            return pb_utils.InferenceResponse([to_tensor(self.outputs[0], out.reshape(1, -1))])
        except Exception as e:
            return error_response(e)

    def _slots(self, requests):
        cats: list = []
        for r in requests:
            try:
                cats.append(to_numpy(pb_utils.get_input_tensor_by_name(r, self.inputs[0])))
            except Exception as e:
                cats.append(e)
        arrays = [c for c in cats if not isinstance(c, Exception)]
        try:
            answers = iter(self.service.run_slots(arrays))
        except Exception as e:  # a failure of the lookup itself: every request gets it
            return [error_response(e) for _ in requests]
        responses = []
        for c in cats:
            result = c if isinstance(c, Exception) else next(answers)
            if isinstance(result, Exception):
                responses.append(error_response(result))
            else:
                responses.append(pb_utils.InferenceResponse([to_tensor(self.outputs[0], result)]))
        return responses

    def finalize(self):
        self.metrics.close()
        self.metrics = None
        self.service.close()
