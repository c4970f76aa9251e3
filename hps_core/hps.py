"""HugeCTR-compatible Python API: ``from hps_core import HPS`` replaces ``hugectr.inference.HPS``."""

from __future__ import annotations

import os

import numpy as np

from .config import HPSConfig
from .server import ParameterServer


class HPS:
    """The parameter server behind HugeCTR's ``HPS`` Python API.

    ``HPS("hps.json").lookup(keys, "model", table_id)`` returns float32 ``[len(keys), dim]``,
    as ``hugectr.inference.HPS`` did, so migrating is a one-line import change.
    """

    def __init__(self, config: str | os.PathLike | dict | HPSConfig, *, progress: bool = False):
        self.server = ParameterServer(config, progress=progress)

    def lookup(
        self, keys: object, model_name: str, table_id: int, device_id: int = 0
    ) -> np.ndarray:
        """Embedding vectors float32 [len(keys), dim] of one table; unknown keys get the table's default."""
        del device_id  # one L1 replica per process; kept for signature compatibility
        return self.server.lookup(keys, model_name, table_id)

    def close(self) -> None:
        """Release the storage tiers."""
        self.server.close()

    def __enter__(self) -> HPS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
