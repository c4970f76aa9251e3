"""hps_core: a hierarchical embedding parameter server (L1 cache, VDB, PDB), HugeCTR HPS compatible."""

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
