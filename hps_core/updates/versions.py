"""Per-row versions of one consumer group: the stream entry ID that last wrote each row.

The ingestor records a batch's versions before applying it and applies a row only when its
version is at least the recorded one, so a re-delivered older entry (after a crash, or from a
claimed consumer) never rolls a row back. Versions live in Redis hashes
``hps_rowver{<group>/<table>/p<N>}`` (field: 8-byte key, value: 8-byte version), partitioned
like the VDB, written with the VDB's numpy-encoded pipelines.
"""

from __future__ import annotations

import numpy as np

from ..hashing import splitmix64
from ..vdb import _resp as R
from ..vdb._redis_nodes import Cmd
from ..vdb.redis import RedisVDB

PARTITIONS = 16
# Entry IDs are <ms>-<seq>; a version is ms << SEQ_BITS | seq, an int64 up to ms 2**43 - 1
# (the year 2248). Redis counts seq up within one millisecond, and past it only while the
# clock stands behind the last ID (then an hour at 290 entries/s still stays under 2**20);
# a larger seq is clamped, giving entries of that millisecond one version.
SEQ_BITS = 20
# Hashes of versions in the earlier encoding (ms << 22, which ran out of int64 in 2039) were
# named hps_ver{...}: their values would outrank every new version, so they are deleted once
# per table and group, at the first read of its versions.
HASH_PREFIX = "hps_rowver"
OLD_HASH_PREFIX = "hps_ver"


def version_of(entry_id: str | bytes) -> int:
    """A stream entry ID as one ordered int64."""
    s = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = s.partition("-")
    return (int(ms) << SEQ_BITS) | min(int(seq or 0), (1 << SEQ_BITS) - 1)


class VersionStore:
    """Row versions of one consumer group, on the stream's Redis."""

    def __init__(self, redis_vdb: RedisVDB, group: str):
        self.r = redis_vdb
        self.group = group
        self._old_dropped: set[str] = set()

    def _hkey(self, table: str, p: int, prefix: str = HASH_PREFIX) -> str:
        return f"{prefix}{{{self.group}/{table}/p{p}}}"

    def _drop_old(self, table: str) -> None:
        """Delete the table's hashes of the earlier encoding (``OLD_HASH_PREFIX``), once."""
        if table in self._old_dropped:
            return
        hks = [self._hkey(table, p, OLD_HASH_PREFIX) for p in range(PARTITIONS)]
        for r in self.r.nodes.run([Cmd(hk, R.command("DEL", hk)) for hk in hks]):
            if isinstance(r, Exception):
                raise r
        self._old_dropped.add(table)

    def _parts(self, keys: np.ndarray):
        parts = (splitmix64(keys) % np.uint64(PARTITIONS)).astype(np.int64)
        for p in range(PARTITIONS):
            sel = np.flatnonzero(parts == p)
            if len(sel):
                yield p, sel

    def get(self, table: str, keys: np.ndarray) -> np.ndarray:
        """Recorded versions of keys (int64 [n]; 0 where none)."""
        self._drop_old(table)
        out = np.zeros(len(keys), np.int64)
        kb = R.key_bytes(keys)
        groups = list(self._parts(keys))
        cmds = []
        for p, sel in groups:
            hk = self._hkey(table, p)
            cmds.append(Cmd(hk, R.head(2 + len(sel), "HMGET", hk) + R.fields(kb[sel])))
        for (_, sel), r in zip(groups, self.r.nodes.run(cmds), strict=True):
            if isinstance(r, Exception):
                raise r
            hit = np.fromiter((v is not None for v in r), bool, len(sel))
            if hit.any():
                buf = b"".join([v for v in r if v is not None])
                out[sel[hit]] = np.frombuffer(buf, "<i8")
        return out

    def put(self, table: str, keys: np.ndarray, versions: np.ndarray) -> None:
        """Record versions of keys (keys unique)."""
        kb = R.key_bytes(keys)
        vb = np.ascontiguousarray(versions, "<i8").view(np.uint8).reshape(-1, 8)
        cmds = []
        for p, sel in self._parts(keys):
            hk = self._hkey(table, p)
            cmds.append(Cmd(hk, R.head(2 + 2 * len(sel), "HSET", hk) + R.pairs(kb[sel], vb[sel])))
        for r in self.r.nodes.run(cmds):
            if isinstance(r, Exception):
                raise r
