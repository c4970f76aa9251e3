"""Per-row versions of one consumer group: the stream entry ID that last wrote each row.

The ingestor records a batch's versions before applying it and applies a row only when its
version is at least the recorded one, so a re-delivered older entry (after a crash, or from a
claimed consumer) never rolls a row back. Versions live in Redis hashes
``hps_rowver{<group>/<table>/p<N>}:<epoch>`` (field: 8-byte key, value: 8-byte version),
partitioned like the VDB, one per ``epoch_ms`` of entry time, written with the VDB's
numpy-encoded pipelines; the set ``hps_rowver_epochs{<group>/<table>}`` names a table's epochs
and ``hps_rowver_tables{<group>}`` the group's tables.

A version only matters while an older entry may still be applied. ``prune(through)`` deletes
the epochs whose versions are all at most ``through``, which the ingestor takes from the
group's progress as it stood a while ago (see ``Ingestor``): memory holds the keys updated in
the last minutes, not every key ever updated.
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
# Versions are kept in one hash per partition and EPOCH_MS of entry time, so those no longer
# needed go a whole hash at a time.
EPOCH_MS = 600_000


def version_of(entry_id: str | bytes) -> int:
    """A stream entry ID as one ordered int64."""
    s = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = s.partition("-")
    return (int(ms) << SEQ_BITS) | min(int(seq or 0), (1 << SEQ_BITS) - 1)


class VersionStore:
    """Row versions of one consumer group, on the stream's Redis."""

    def __init__(self, redis_vdb: RedisVDB, group: str, epoch_ms: int = EPOCH_MS):
        self.r = redis_vdb
        self.group = group
        self.epoch_ms = int(epoch_ms)
        self._old_dropped: set[str] = set()

    def _hkey(self, table: str, p: int, epoch: int) -> str:
        return f"{HASH_PREFIX}{{{self.group}/{table}/p{p}}}:{epoch}"

    def _epochs_key(self, table: str) -> str:
        return f"{HASH_PREFIX}_epochs{{{self.group}/{table}}}"

    def _tables_key(self) -> str:
        return f"{HASH_PREFIX}_tables{{{self.group}}}"

    def epoch(self, version: int) -> int:
        """The epoch of a version: its milliseconds // ``epoch_ms``."""
        return (int(version) >> SEQ_BITS) // self.epoch_ms

    def _run(self, cmds: list[Cmd]) -> list[object]:
        out = self.r.nodes.run(cmds)
        for r in out:
            if isinstance(r, Exception):
                raise r
        return out

    def _drop_old(self, table: str) -> None:
        """Delete the table's hashes of the earlier encoding (``OLD_HASH_PREFIX``), once."""
        if table in self._old_dropped:
            return
        hks = [f"{OLD_HASH_PREFIX}{{{self.group}/{table}/p{p}}}" for p in range(PARTITIONS)]
        self._run([Cmd(hk, R.command("UNLINK", hk)) for hk in hks])
        self._old_dropped.add(table)

    def epochs(self, table: str) -> list[int]:
        """The table's epochs that hold versions, oldest first."""
        ek = self._epochs_key(table)
        (got,) = self._run([Cmd(ek, R.command("SMEMBERS", ek))])
        return sorted(int(e) for e in got)

    def _parts(self, keys: np.ndarray):
        parts = (splitmix64(keys) % np.uint64(PARTITIONS)).astype(np.int64)
        for p in range(PARTITIONS):
            sel = np.flatnonzero(parts == p)
            if len(sel):
                yield p, sel

    def get(self, table: str, keys: np.ndarray, since: int = 0) -> np.ndarray:
        """Recorded versions of keys (int64 [n]; 0 where none). ``since``: only versions of
        its epoch or later are read (a version below it is older than the row at hand)."""
        self._drop_old(table)
        out = np.zeros(len(keys), np.int64)
        first = self.epoch(since)
        epochs = [e for e in self.epochs(table) if e >= first]
        if not epochs or not len(keys):
            return out
        kb = R.key_bytes(keys)
        groups = [(e, p, sel) for e in epochs for p, sel in self._parts(keys)]
        cmds = []
        for e, p, sel in groups:
            hk = self._hkey(table, p, e)
            cmds.append(Cmd(hk, R.head(2 + len(sel), "HMGET", hk) + R.fields(kb[sel])))
        for (_, _, sel), r in zip(groups, self._run(cmds), strict=True):
            hit = np.fromiter((v is not None for v in r), bool, len(sel))
            if hit.any():
                buf = b"".join([v for v in r if v is not None])
                np.maximum.at(out, sel[hit], np.frombuffer(buf, "<i8"))
        return out

    def put(self, table: str, keys: np.ndarray, versions: np.ndarray) -> None:
        """Record versions of keys (keys unique), each in the hash of its version's epoch."""
        if not len(keys):
            return
        versions = np.ascontiguousarray(versions, "<i8")
        ep = (versions >> SEQ_BITS) // self.epoch_ms
        epochs = [int(e) for e in np.unique(ep)]
        ek, tk = self._epochs_key(table), self._tables_key()
        # listed with every write (a restarted Redis may have lost the lists)
        cmds = [Cmd(ek, R.command("SADD", ek, *epochs)), Cmd(tk, R.command("SADD", tk, table))]
        kb = R.key_bytes(keys)
        vb = versions.view(np.uint8).reshape(-1, 8)
        parts = list(self._parts(keys))
        for e in epochs:
            in_e = ep == e
            for p, sel in parts:
                sel = sel[in_e[sel]]
                if len(sel):
                    hk = self._hkey(table, p, e)
                    cmds.append(
                        Cmd(hk, R.head(2 + 2 * len(sel), "HSET", hk) + R.pairs(kb[sel], vb[sel]))
                    )
        self._run(cmds)

    def prune(self, through: int) -> int:
        """Delete the epochs (of every table of the group) whose versions are all at most
        ``through``; returns how many epochs went."""
        tk = self._tables_key()
        (tables,) = self._run([Cmd(tk, R.command("SMEMBERS", tk))])
        last = (int(through) + 1) >> SEQ_BITS  # the epochs that end by this millisecond
        gone = 0
        for table in sorted(t.decode() for t in tables):
            old = [e for e in self.epochs(table) if (e + 1) * self.epoch_ms <= last]
            if not old:
                continue
            hks = [self._hkey(table, p, e) for e in old for p in range(PARTITIONS)]
            ek = self._epochs_key(table)
            # the hashes first: an epoch still listed is read, never one listed and gone
            self._run([Cmd(hk, R.command("UNLINK", hk)) for hk in hks])
            self._run([Cmd(ek, R.command("SREM", ek, *old))])
            gone += len(old)
        return gone
