"""hps_core: a hierarchical embedding parameter server (L1 cache, VDB, PDB), HugeCTR HPS compatible."""

# ruff: noqa: E402 - the OpenMP environment is set before any module loads numba
import os
from collections.abc import MutableMapping

OMP_SPIN_COUNT = "300"


def quiet_openmp(env: MutableMapping[str, str]) -> None:
    """How numba's OpenMP workers wait between parallel calls, unless the user chose.

    libgomp's default spins for milliseconds after each parallel region: a lookup's pool and
    the background cache fill's pool then slow each other down many times over on a few cores.
    Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) costs a wake-up on the next call instead,
    ~15 us on the 2-core VM (a sixth of a 1K-key VDB fetch); ``GOMP_SPINCOUNT=300`` spins
    ~300 pauses (~10 us of one core) first, so back-to-back calls find the workers awake
    (launch ~3 us) and an idle server sleeps.
    """
    if "OMP_WAIT_POLICY" not in env:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        env.setdefault("GOMP_SPINCOUNT", OMP_SPIN_COUNT)


quiet_openmp(os.environ)  # before numba starts its pools

from .config import HPSConfig, ModelConfig, load_config
from .errors import (
    ConfigError,
    HPSError,
    InvalidInputError,
    ModelFileError,
    StorageError,
    UnknownModelError,
    UnknownTableError,
)
from .hps import HPS
from .server import ParameterServer
from .session import LookupSession, LookupStats

__version__ = "0.1.0"

__all__ = [
    "HPS",
    "ConfigError",
    "HPSConfig",
    "HPSError",
    "InvalidInputError",
    "LookupSession",
    "LookupStats",
    "ModelConfig",
    "ModelFileError",
    "ParameterServer",
    "StorageError",
    "UnknownModelError",
    "UnknownTableError",
    "load_config",
]
