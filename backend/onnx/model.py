"""Triton Python-based backend ``onnx``: runs an ONNX model with onnxruntime.

The model file is ``<version>/model.onnx`` (or the ``model_file`` parameter); inputs and outputs
are the graph's, by name, so a config only lists them for Triton. onnxruntime's CUDA provider is
used when it is available, the CPU provider otherwise. Where the NGC onnxruntime backend exists
the same model directory can say ``platform: "onnxruntime_onnx"`` instead.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

log = logging.getLogger("hps.onnx")

_NUMPY2 = int(np.__version__.split(".", 1)[0]) >= 2  # see backend/hps/model.py


def to_numpy(tensor) -> np.ndarray:
    return np.from_dlpack(tensor) if _NUMPY2 else tensor.as_numpy()


def to_tensor(name: str, array: np.ndarray):
    array = np.ascontiguousarray(array)
    return pb_utils.Tensor.from_dlpack(name, array) if _NUMPY2 else pb_utils.Tensor(name, array)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = os.path.join(
            args["model_repository"], args["model_version"], params.get("model_file", "model.onnx")
        )
        options = ort.SessionOptions()
        threads = int(params.get("intra_op_threads", "0") or 0)
        if threads:
            options.intra_op_num_threads = threads
        # idle threads sleep: instances and the embedding model share the machine's cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        providers = [p for p in wanted if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.inputs = [(i.name, i.type) for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        log.info("%s: %s on %s", args["model_instance_name"], path, self.session.get_providers())

    def execute(self, requests):
        """Requests the dynamic batcher groups are run as one batch, then split again."""
        feeds, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                feeds.append((i, self._feed(request)))
            except Exception as e:
                responses[i] = _error(e)
        if feeds:
            try:
                batch = {
                    name: np.concatenate([f[name] for _, f in feeds])
                    if len(feeds) > 1
                    else feeds[0][1][name]
                    for name, _ in self.inputs
                }
                results = self.session.run(self.outputs, batch)
                start = 0
                for i, f in feeds:
                    n = len(f[self.inputs[0][0]])
                    parts = [r[start : start + n] for r in results]
                    start += n
                    bad = [o for o, r in zip(self.outputs, parts, strict=True) if not _finite(r)]
                    if bad:  # finite inputs the network overflows on: no silent NaN
                        responses[i] = _error(
                            ValueError(f"output {bad[0]} is NaN or infinite for these inputs")
                        )
                        continue
                    tensors = [to_tensor(o, r) for o, r in zip(self.outputs, parts, strict=True)]
                    responses[i] = pb_utils.InferenceResponse(tensors)
            except Exception as e:
                for i, _ in feeds:
                    responses[i] = _error(e)
        return responses

    def _feed(self, request) -> dict[str, np.ndarray]:
        feed = {}
        for name, kind in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"input {name} is missing")
            a = to_numpy(tensor)
            if kind == "tensor(float)":
                a = a.astype(np.float32, copy=False)
                if not _finite(a):
                    rows = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))
                    raise ValueError(
                        f"input {name}: NaN or infinite values in rows {rows[:8].tolist()}"
                        + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")
                    )
            feed[name] = a
        lengths = {len(a) for a in feed.values()}
        if len(lengths) > 1:
            raise ValueError(f"inputs have different batch sizes {sorted(lengths)}")
        return feed


def _finite(a: np.ndarray) -> bool:
    return a.dtype.kind != "f" or bool(np.isfinite(a).all())


def _error(e: Exception):
    err = pb_utils.TritonError(f"{type(e).__name__}: {e}", pb_utils.TritonError.INVALID_ARG)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)
