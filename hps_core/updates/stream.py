"""Redis Streams plumbing for online updates: the connection and the producer.

A stream entry is one HCTR message (see ``codec``) with three fields:
``table`` (the VDB/PDB table name, HPS's Kafka topic), ``payload`` and ``ts_ns`` (the
producer's wall clock at publish time, for the publish-to-visible freshness metric).
All tables share one stream (default ``hps_updates``), so entry IDs order every update.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import redis
from redis.cluster import ClusterNode, RedisCluster

from ..config import split_address
from ..errors import ConfigError, StorageError
from . import codec

log = logging.getLogger(__name__)

DEFAULT_STREAM = "hps_updates"


def dead_letter_stream(stream: str) -> str:
    """Where malformed entries of ``stream`` go, with the reason."""
    return f"{stream}:dead"


def connect(
    address: str | list[str],
    user_name: str = "",
    password: str = "",
    cluster: bool | None = None,
    timeout_s: float = 5.0,
) -> redis.Redis | RedisCluster:
    """A client of the stream's Redis: standalone, or cluster when several addresses are given
    or the one server is cluster-enabled."""
    addrs = [a.strip() for a in address.split(",")] if isinstance(address, str) else address
    addrs = [a for a in addrs if a]
    hosts = []
    for a in addrs:
        hp = split_address(a)
        if hp is None:
            raise ConfigError("update_source.brokers", a, "'host:port' entries (port 1-65535)")
        hosts.append(hp)
    if not hosts:
        raise ConfigError("update_source.brokers", address, "one or more 'host:port'")
    kw = dict(
        username=user_name or None,
        password=password or None,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    try:
        if cluster is None:
            cluster = len(hosts) > 1 or bool(
                redis.Redis(host=hosts[0][0], port=hosts[0][1], **kw)
                .info("cluster")
                .get("cluster_enabled")
            )
        if cluster:
            return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in hosts], **kw)
        c = redis.Redis(host=hosts[0][0], port=hosts[0][1], **kw)
        c.ping()
        return c
    except (redis.RedisError, OSError) as e:
        raise StorageError(f"update stream Redis at {address}: cannot connect ({e})") from None


class Publisher:
    """Writes row updates of tables to a Redis Stream as HCTR messages."""

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        stream: str = DEFAULT_STREAM,
        *,
        max_message_bytes: int = codec.DEFAULT_MAX_BYTES,
        maxlen: int | None = None,
    ):
        self.client = client
        self.stream = stream
        self.max_message_bytes = int(max_message_bytes)
        self.maxlen = maxlen  # approximate trim; None keeps everything (no group misses a row)

    def publish(
        self, table: str, keys: np.ndarray, vectors: np.ndarray, dtype: str = "float32"
    ) -> list[str]:
        """Append updates ``keys -> vectors`` of ``table``; returns the stream entry IDs."""
        if not table:
            raise ValueError("table: expected a non-empty table name")
        payloads = codec.encode(keys, vectors, dtype, self.max_message_bytes)
        pipe = self.client.pipeline(transaction=False)
        ts = str(time.time_ns())
        fields = {"table": table, "ts_ns": ts}
        if dtype == "float16":  # the payload alone cannot tell fp16 rows from fp32 rows of half
            fields["dtype"] = "float16"  # the width: the entry says it
        for p in payloads:
            pipe.xadd(
                self.stream,
                {**fields, "payload": p},
                maxlen=self.maxlen,
                approximate=True,
            )
        ids = pipe.execute()
        return [i.decode() if isinstance(i, bytes) else i for i in ids]

    def publish_raw(self, table: str, payload: bytes, **extra: str) -> str:
        """Append one payload as it is (tools and tests of malformed messages); ``extra``
        fields go into the entry as well (``dtype="float16"``)."""
        fields = {"table": table, "payload": payload, "ts_ns": str(time.time_ns()), **extra}
        i = self.client.xadd(self.stream, fields)
        return i.decode() if isinstance(i, bytes) else i
