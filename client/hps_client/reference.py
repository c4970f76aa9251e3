"""The in-process reference a client can check answers against: the same tiers, opened here."""

from __future__ import annotations

import os

import numpy as np

from hps_core.dense import dense_forward, load_dense_weights
from hps_core.repo import read_spec
from hps_core.serving import EmbeddingService, serving_config


class Reference:
    """Embeddings from an in-process lookup of the repository's tiers, then the numpy dense net."""

    def __init__(self, repository: str | os.PathLike):
        self.spec = spec = read_spec(repository)
        cfg, model = serving_config(spec.config, spec.model, preloaded=True)
        for m in cfg.models:
            m.gpucache = False  # the answer must come from the tiers, not a second cache
        self.service = EmbeddingService(cfg, model, io="slots", max_keys=1 << 62)
        onnx = spec.root / spec.dense / "1" / "model.onnx"
        self.weights = load_dense_weights(onnx)

    def embed(self, cat: np.ndarray) -> np.ndarray:
        return self.service.run_slots([np.asarray(cat, np.int64)])[0]

    def predict(self, dense: np.ndarray, cat: np.ndarray) -> np.ndarray:
        return dense_forward(self.weights, np.asarray(dense, np.float32), self.embed(cat))

    def lookup(self, keys: np.ndarray, num_keys: np.ndarray) -> np.ndarray:
        return self.service.session.lookup_concatenated(keys, num_keys)[0]

    def close(self) -> None:
        self.service.close()
