"""Client of the hps Triton models over HTTP or gRPC (tritonclient), sync and async."""

from .client import AsyncHPSClient, HPSClient
from .criteo import parse_criteo_lines

__all__ = ["AsyncHPSClient", "HPSClient", "parse_criteo_lines"]
