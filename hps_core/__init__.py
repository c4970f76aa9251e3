"""hps_core: a hierarchical embedding parameter server (L1 cache, VDB, PDB), HugeCTR HPS compatible."""

# ruff: noqa: E402 - the OpenMP environment is set before any module loads numba
import os
from collections.abc import MutableMapping

OMP_SPIN_COUNT = "2000"


def quiet_openmp(env: MutableMapping[str, str]) -> None:
    """How numba's OpenMP workers wait between parallel calls, unless the user chose.

    libgomp's default spins for milliseconds after each parallel region: a lookup's pool and
    the background cache fill's pool then slow each other down many times over on a few cores.
    Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) costs a wake-up on the next call instead.
    ``GOMP_SPINCOUNT=2000`` spins ~20 us first (measured on the 2-core VM), so calls that
    follow each other (a lookup's Python between two kernels takes 5-15 us) find the workers
    awake, and an idle server sleeps. A 2-key parallel fetch took 4-5 us after gaps of up to
    20 us, against 11-21 us with 300 spins, which slept within 2 us (1K-key dim-128 VDB
    fetches back to back: 81-89 us against 120 us in two of three interleaved runs).
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
