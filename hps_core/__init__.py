"""hps_core: a hierarchical embedding parameter server (L1 cache, VDB, PDB), HugeCTR HPS compatible."""

import os

# numba's OpenMP workers would otherwise spin while idle: a lookup's thread pool and the
# background cache fill's pool then slow each other down many times over on a few cores.
# Set before numba starts its pools; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import HPSConfig, ModelConfig, load_config  # noqa: E402
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
