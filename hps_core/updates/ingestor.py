"""The ingestor: reads row updates from a Redis Stream with a consumer group and applies them.

Each store that must see every update reads with its own consumer group (as HPS did with
Kafka): one group per shared store (the Redis VDB), one per local store (a machine's RocksDB,
a process's L1 caches). Per round the ingestor

1. reads entries: first its own pending ones (delivered before a crash, never acknowledged),
   then entries other consumers of the group left pending longer than ``claim_idle_ms``
   (``XAUTOCLAIM``), then new ones (``XREADGROUP >``);
2. decodes them; a malformed entry (bad magic, wrong size, NaN rows, unknown table) goes to the
   dead-letter stream ``<stream>:dead`` with the reason and is acknowledged;
3. keeps each key's newest row, records the batch's row versions (stream entry IDs) and drops
   rows older than the recorded version, so a re-delivered entry never rolls a row back
   (versions no entry can undercut any more are pruned: ``STALE_BATCH_S``);
4. applies the rows to every sink (PDB, then VDB, then L1: ``assign`` where cached) and only
   then acknowledges the entries. A failing sink leaves them pending; they are retried after
   ``failure_backoff_ms``.

Publish-to-visible time per entry goes to the ``hps_update_freshness_seconds`` histogram.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import redis

from ..errors import HPSError
from ..metrics import REGISTRY, Registry
from . import codec
from .stream import DEFAULT_STREAM, dead_letter_stream
from .versions import SEQ_BITS, VersionStore, version_of

log = logging.getLogger(__name__)

# Every PRUNE_EVERY_S the ingestor prunes its group's row versions through the group's progress
# (``StoreProgress``) as it stood 2 * STALE_BATCH_S before. A batch read since holds entries
# newer than that, so no version pruned could have refused one of its rows, as long as it is
# applied within STALE_BATCH_S of its read. A batch held longer (a slow store, or a process
# paused in between: stopped, swapped out, a frozen VM) goes on only if its entries are still
# pending in the group (claimed again for this consumer, which starts the time anew); else
# another consumer claimed and applied them, maybe newer rows after them, and the batch is
# dropped (this consumer's pending entries are read again).
STALE_BATCH_S = 60.0
PRUNE_EVERY_S = 60.0
# Elapsed time for that: CLOCK_BOOTTIME counts a suspended machine's sleep, CLOCK_MONOTONIC not.
_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def _now() -> float:
    return time.clock_gettime(_CLOCK)


class _StaleBatch(Exception):
    """The batch at hand was read more than ``stale_batch_s`` ago and another consumer has
    acknowledged some of its entries since."""


FRESHNESS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class Sink:
    """Somewhere updates are applied: a tier (``upsert``) or the L1 caches (``assign``)."""

    name = "sink"
    takes_version = False  # apply(..., version=) gets the batch's newest entry version

    def apply(self, table: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        raise NotImplementedError

    def idle(self) -> None:
        """Called when a read found no entries (timed work that must not wait for rows)."""


# The PDB's memtables under online updates are flushed after this many bytes of rows or this
# many seconds, whichever comes first. Every serving process that follows RocksDB as a secondary
# replays the primary's log into memtables of its own and drops them only once the primary has
# flushed them: left to RocksDB (a flush at 32 MiB a table, 256 MiB in all) each of them would
# grow by up to that much, slowly, at a trickle of updates.
ONLINE_FLUSH_BYTES = 8 << 20
ONLINE_FLUSH_S = 10.0


class TierSink(Sink):
    """A VDB or PDB: rows are upserted into tables it holds (others are skipped).

    ``tables`` (store name -> (dim, dtype)), the config's tables: these are always written, and
    created first if the tier lost them (a Redis node restarted empty took a table's metadata
    with it); skipping them would leave the tier's old rows in place, silently stale.
    A PDB's written tables are flushed in the background after ``flush_bytes`` of rows or
    ``flush_seconds`` (checked as rows arrive, and when a read finds none).
    """

    def __init__(
        self,
        name: str,
        tier: object,
        tables: dict[str, tuple[int, str]] | None = None,
        flush_bytes: int = ONLINE_FLUSH_BYTES,
        flush_seconds: float = ONLINE_FLUSH_S,
    ):
        self.name = name
        self.tier = tier
        self.tables = tables or {}
        self._known: set[str] = set()
        self.flush_bytes = int(flush_bytes)
        self.flush_seconds = float(flush_seconds)
        self._unflushed: set[str] = set()
        self._unflushed_bytes = 0
        self._flushed_at = time.monotonic()

    def holds(self, table: str) -> bool:
        if table not in self._known and table in self.tier.tables():
            self._known.add(table)
        return table in self._known

    def dim(self, table: str) -> int | None:
        if table in self.tables:
            return self.tables[table][0]
        return self.tier.dim(table) if self.holds(table) else None

    def apply(self, table, keys, vectors):
        if (
            self._upsert(table, keys, vectors)
            and self.name == "pdb"
            and hasattr(self.tier, "flush")
        ):
            self._unflushed.add(table)
            self._unflushed_bytes += keys.nbytes + vectors.nbytes
            self._flush_due()

    def idle(self) -> None:
        if self._unflushed:  # the updates stopped: secondaries drop their copy of the rows
            self._flush_due()

    def _flush_due(self) -> None:
        now = time.monotonic()
        if self._unflushed_bytes < self.flush_bytes and now - self._flushed_at < self.flush_seconds:
            return
        tables, self._unflushed = sorted(self._unflushed), set()
        self._unflushed_bytes, self._flushed_at = 0, now
        for t in tables:
            try:
                self.tier.flush(t, wait=False)
            except HPSError as e:  # the rows are in the log; a table dropped since is no loss
                log.warning("cannot flush the PDB's table '%s' after updates: %s", t, e)

    def _upsert(self, table, keys, vectors) -> bool:
        """Write the rows where the tier holds (or must hold) the table; True if written."""
        if self.name == "pdb":  # the next load's VDB reads these rows from RocksDB, not from
            from ..server import updated_meta  # the model file. Read each time: a load of a

            # new file clears the mark meanwhile (a run-time reload in another thread)
            if (table in self.tables or self.holds(table)) and not self.tier.get_meta(
                updated_meta(table)
            ):
                self.tier.set_meta(updated_meta(table), "1")
        if table in self.tables:
            try:
                self.tier.upsert(table, keys, vectors)
                return True
            except KeyError:  # the tier lost the table: create it again, then write
                dim, dtype = self.tables[table]
                if self.name == "vdb":
                    self.tier.create_table(table, dim, dtype=dtype)
                else:
                    self.tier.create_table(table, dim)
                self._known.discard(table)
            self.tier.upsert(table, keys, vectors)
            return True
        if self.holds(table):
            self.tier.upsert(table, keys, vectors)
            return True
        return False


class CacheSink(Sink):
    """The L1 caches of a server's sessions: cached rows are overwritten, others left alone."""

    name = "l1"
    takes_version = True

    def __init__(self, server: object, progress: StoreProgress | None = None):
        self.server = server
        self.progress = progress  # how far the shared stores are (see RecentUpdates)

    def apply(self, table, keys, vectors, version=None):
        for s in list(self.server.sessions.values()):
            for t in s.tables:
                if t.store_name == table and t.cache is not None:
                    with t.cache_lock:
                        if self.progress is not None:
                            t.recent.progress = self.progress.through
                        t.cache.assign(keys, vectors)
                        # fills racing this update, or reading stores that lack it, must not
                        # cache old rows
                        t.recent.add(keys, version)

    def dim(self, table: str) -> int | None:
        for s in list(self.server.sessions.values()):
            for t in s.tables:
                if t.store_name == table:
                    return t.dim
        return None


@dataclass
class _Batch:
    keys: list = field(default_factory=list)
    vectors: list = field(default_factory=list)
    versions: list = field(default_factory=list)


class Ingestor:
    """Applies a stream's updates to ``sinks`` as consumer ``consumer`` of group ``group``."""

    def __init__(
        self,
        client: redis.Redis,
        sinks: list[Sink],
        versions: VersionStore | None,
        *,
        stream: str = DEFAULT_STREAM,
        group: str = "hps",
        consumer: str | None = None,
        start_id: str = "0",
        batch_entries: int = 16,
        block_ms: int = 500,
        claim_idle_ms: int = 30_000,
        failure_backoff_ms: int = 50,
        registry: Registry = REGISTRY,
        label: str | None = None,
        dead_letters: bool = True,
        transient: bool = False,
        stale_batch_s: float = STALE_BATCH_S,
        prune_every_s: float = PRUNE_EVERY_S,
    ):
        """``versions`` None: apply in stream order without a version check (one consumer that
        only overwrites L1 rows). ``label``: the metrics' group label (default ``group``).
        ``dead_letters`` False: malformed entries are only skipped (another group reports them).
        ``transient``: the group is this process's own and is deleted by ``stop()``.
        ``stale_batch_s``, ``prune_every_s``: see ``STALE_BATCH_S``."""
        self.client = client
        self.sinks = sinks
        self.versions = versions
        self.stream = stream
        self.dead = dead_letter_stream(stream)
        self.group = group
        self.label = label or group
        self.write_dead_letters = dead_letters
        self.transient = transient
        self.consumer = consumer or f"{socket.gethostname()}-{id(self):x}"
        self.batch_entries = int(batch_entries)
        self.block_ms = int(block_ms)
        self.claim_idle_ms = int(claim_idle_ms)
        self.backoff_s = failure_backoff_ms / 1e3
        self._own_pending = True  # read our own un-acknowledged entries first
        self.stale_batch_s = float(stale_batch_s)
        self.prune_every_s = float(prune_every_s)
        self._read_at = _now()
        self._batch_ids: list = []  # the entry IDs of the batch being applied
        self._next_prune = 0.0
        self._progress: deque[tuple[float, int]] = deque()  # (when, the group's progress)
        self._next_claim = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._dims: dict[str, int] = {}
        self.owned: list[object] = []  # closed with the ingestor (a VDB made for versions)
        labels = ("group",)
        self.freshness = registry.histogram(
            "hps_update_freshness_seconds",
            "Time from publish to visible in the stores, per update entry",
            labels,
            FRESHNESS_BUCKETS,
        )
        self.rows_applied = registry.counter(
            "hps_update_rows_total", "Rows applied from the update stream", labels
        )
        self.rows_skipped = registry.counter(
            "hps_update_rows_stale_total", "Rows skipped as older than the stored version", labels
        )
        self.entries = registry.counter(
            "hps_update_entries_total", "Update stream entries acknowledged", labels
        )
        self.dead_letters = registry.counter(
            "hps_update_dead_letters_total", "Malformed update entries sent to dead letters", labels
        )
        self.failures = registry.counter(
            "hps_update_failures_total", "Rounds that could not apply updates", labels
        )
        try:
            client.xgroup_create(stream, group, id=start_id, mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # -- one round ----------------------------------------------------------------------------
    def step(self, block_ms: int | None = None) -> int:
        """Read, apply and acknowledge one batch; returns the number of entries handled."""
        self._prune_versions()
        try:
            self._read_at = _now()  # before the read: its entries are newer than progress now
            entries = self._read(self.block_ms if block_ms is None else block_ms)
            if not entries:
                for s in self.sinks:
                    s.idle()
                return 0
            self._handle(entries)
        except _StaleBatch as e:
            log.warning("ingestor %s: a batch read %.1f s ago was applied by another consumer "
                        "meanwhile: dropped", self.group, e.args[0])  # fmt: skip
            self._own_pending = True
            return 0
        except Exception as e:  # noqa: BLE001 - a round that fails must not end the updates
            self.failures.inc(group=self.label)
            if not self._failing:
                expected = isinstance(e, (HPSError, redis.RedisError, OSError))
                log.warning("ingestor %s: cannot apply updates, retrying: %s", self.group, e,
                            exc_info=not expected)  # fmt: skip
                self._failing = True
            self._own_pending = True  # what we read is pending for us: read it again
            time.sleep(self.backoff_s)
            return 0
        if self._failing:
            log.warning("ingestor %s: applying updates again", self.group)
            self._failing = False
        return len(entries)

    def _read(self, block_ms: int) -> list:
        n = self.batch_entries
        if self._own_pending:
            got = self.client.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=n)
            entries = _entries(got)
            if entries:
                return entries
            self._own_pending = False
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self.claim_idle_ms / 1e3 / 2
            r = self.client.xautoclaim(
                self.stream, self.group, self.consumer, self.claim_idle_ms, "0-0", count=n
            )
            claimed = [e for e in r[1] if e[1]] if r else []
            if claimed:
                log.info("ingestor %s: claimed %d stalled entries", self.group, len(claimed))
                return claimed
        got = self.client.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=n, block=block_ms or None
        )
        return _entries(got)

    def _dim(self, table: str) -> int | None:
        d = self._dims.get(table)
        if d is None:
            for s in self.sinks:
                d = s.dim(table)
                if d is not None:
                    self._dims[table] = d
                    break
        return d

    def _handle(self, entries: list) -> None:
        self._batch_ids = [eid for eid, _ in entries]
        batches: dict[str, _Batch] = {}
        stamps, dead = [], []
        for eid, f in entries:
            raw_table = f.get(b"table", b"")
            table = raw_table.decode("utf-8", "replace") if isinstance(raw_table, bytes) else ""
            payload = f.get(b"payload")
            # Everything read from the entry is checked here: an exception past this point
            # would fail the round, and the entry, pending again, would hold up every later one.
            try:
                table, version, stamp = _text(raw_table), _version(eid), _stamp(f.get(b"ts_ns"))
                if payload is None:
                    raise codec.MalformedMessage("entry has no 'payload' field")
                dim = self._dim(table) if table else None
                if dim is None:
                    raise codec.MalformedMessage(f"unknown table '{table}'")
                rows = codec.decode(payload, dim, _text(f.get(b"dtype", b"float32")))
            except (codec.MalformedMessage, UnicodeDecodeError) as e:
                reason = (
                    e.reason
                    if isinstance(e, codec.MalformedMessage)
                    else f"a field of the entry is not UTF-8 text ({e})"
                )
                dead.append((eid, table, reason, payload or b""))
                continue
            if len(rows.keys):
                b = batches.setdefault(table, _Batch())
                b.keys.append(rows.keys)
                b.vectors.append(rows.vectors)
                b.versions.append(np.full(len(rows.keys), version, np.int64))
            if stamp is not None:
                stamps.append(stamp)
        for table, b in batches.items():
            self._apply(table, b)
        now = time.time_ns()
        if stamps:
            self.freshness.observe_many([(now - t) / 1e9 for t in stamps], group=self.label)
        for eid, table, reason, payload in dead:
            if not self.write_dead_letters:
                log.debug("update %s skipped: %s", _text(eid), reason)
                continue
            self.client.xadd(
                self.dead,
                {
                    "id": eid,
                    "table": table,
                    "reason": reason,
                    "group": self.group,
                    "payload": payload,
                },
            )
            log.warning("update %s (table '%s') to dead letters: %s", _text(eid), table, reason)
        self.dead_letters.inc(len(dead), group=self.label)
        self.client.xack(self.stream, self.group, *[eid for eid, _ in entries])
        self.entries.inc(len(entries), group=self.label)

    def _apply(self, table: str, b: _Batch) -> None:
        keys = np.concatenate(b.keys)
        vecs = np.concatenate(b.vectors)
        vers = np.concatenate(b.versions)
        pick = np.arange(len(keys))
        if (np.diff(vers) < 0).any():  # pending or claimed entries came out of order
            pick = np.lexsort((pick, vers))  # by version, then arrival
        last = len(pick) - 1 - np.unique(keys[pick][::-1], return_index=True)[1]
        pick = pick[last]  # each key's newest row
        keys, vecs, vers = keys[pick], vecs[pick], vers[pick]
        if self.versions is not None:
            self._check_held()
            fresh = vers >= self.versions.get(table, keys, since=int(vers.min()))
            if not fresh.all():
                self.rows_skipped.inc(int((~fresh).sum()), group=self.label)
                keys, vecs, vers = keys[fresh], vecs[fresh], vers[fresh]
            if not len(keys):
                return
            self.versions.put(table, keys, vers)  # first: a re-delivered older row is refused
        for s in self.sinks:
            if s.takes_version:
                s.apply(table, keys, vecs, version=int(vers.max()))
            else:
                s.apply(table, keys, vecs)
        self.rows_applied.inc(len(keys), group=self.label)

    def _check_held(self) -> None:
        """A batch held past ``stale_batch_s`` goes on only while its entries are still
        pending in the group: claimed again for this consumer, held from now (``STALE_BATCH_S``)."""
        now = _now()
        held = now - self._read_at
        if held <= self.stale_batch_s:
            return
        ids = self._batch_ids
        got = self.client.xclaim(self.stream, self.group, self.consumer, 0, ids, justid=True)
        if {_text(i) for i in got} != {_text(i) for i in ids}:
            raise _StaleBatch(held)
        self._read_at = now

    def _prune_versions(self) -> None:
        """Every ``prune_every_s``: note the group's progress, and prune the row versions
        through where it stood ``2 * stale_batch_s`` ago (``STALE_BATCH_S``)."""
        now = _now()
        if self.versions is None or now < self._next_prune:
            return
        self._next_prune = now + self.prune_every_s
        try:
            through = StoreProgress(self.client, self.stream, [self.group]).refresh()
            if through is not None:
                self._progress.append((now, through))
            cut = now - 2 * self.stale_batch_s
            while len(self._progress) > 1 and self._progress[1][0] <= cut:
                self._progress.popleft()  # the newest reading from before the cut stays first
            if self._progress and self._progress[0][0] <= cut:
                gone = self.versions.prune(self._progress[0][1])
                if gone:
                    log.info("ingestor %s: %d epochs of row versions pruned", self.group, gone)
        except (HPSError, redis.RedisError, OSError) as e:
            log.warning("ingestor %s: cannot prune row versions: %s", self.group, e)

    # -- lifecycle ----------------------------------------------------------------------------
    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Apply updates until ``stop()`` (or ``until()`` returns True)."""
        while not self._stop.is_set() and not (until and until()):
            self.step()

    def start(self) -> Ingestor:
        """Run in a daemon thread (inside a server process)."""
        self._thread = threading.Thread(target=self.run, name=f"hps-ingest-{self.group}")
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current round."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.transient:
            try:
                self.client.xgroup_destroy(self.stream, self.group)
            except (redis.RedisError, OSError) as e:
                log.warning("ingestor %s: cannot delete its group: %s", self.group, e)
            self.transient = False
        for r in self.owned:
            r.close()
        self.owned.clear()

    def lag(self) -> int:
        """Entries of the stream this group has not acknowledged yet (pending + unread)."""
        info = [g for g in self.client.xinfo_groups(self.stream) if _text(g["name"]) == self.group]
        if not info:
            return 0
        pending = int(info[0].get("pending", 0))
        lag = info[0].get("lag")
        if lag is None:  # Redis could not tell (entries deleted...): count what is unread
            last = _text(info[0]["last-delivered-id"])
            lag = len(self.client.xrange(self.stream, f"({last}", "+", count=100_000))
        return pending + int(lag)


class StoreProgress:
    """Through which update the consumer groups that write the shared stores have applied the
    stream: the lowest over the groups present of (the oldest pending entry - 1, else the last
    delivered one), as an entry version; None while no such group exists.

    ``through`` never waits on Redis: it answers the last value read. One thread of its own
    reads the groups every ``interval`` seconds while ``through`` was asked lately (it is
    asked under the L1 caches' locks, on the lookup path) and rests otherwise.
    """

    def __init__(self, client: redis.Redis, stream: str, groups: list[str], interval: float = 0.5):
        self.client, self.stream, self.groups, self.interval = client, stream, groups, interval
        self._value: int | None = None
        self._asked = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def through(self) -> int | None:
        self._asked = time.monotonic()
        if self._thread is None and not self._stop.is_set():
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="hps-store-progress", daemon=True
                    )
                    self._thread.start()
        return self._value

    def _run(self) -> None:
        self.refresh()
        while not self._stop.wait(self.interval):
            if time.monotonic() - self._asked < 20 * self.interval:
                self.refresh()

    def refresh(self) -> int | None:
        """Read the groups now. A failure keeps the last value (held keys only wait longer)
        and never ends the thread: a value that stopped moving held every later update's keys
        for an hour (memory, and L1 fills skipped for them)."""
        try:
            info = {_text(g["name"]): g for g in self.client.xinfo_groups(self.stream)}
            done = []
            for name in self.groups:
                g = info.get(name)
                if g is None:
                    continue
                last = version_of(_text(g["last-delivered-id"]))
                if int(g.get("pending", 0)):
                    # None when the entries were acknowledged since XINFO counted them
                    oldest = self.client.xpending(self.stream, name)["min"]
                    if oldest is not None:
                        last = min(last, version_of(_text(oldest)) - 1)
                done.append(last)
            self._value = min(done) if done else None
        except (redis.RedisError, OSError) as e:
            log.debug("reading the stores' progress on %s failed: %s", self.stream, e)
        except Exception:  # noqa: BLE001 - the thread must go on; say what it could not read
            log.warning("reading the stores' progress on %s failed", self.stream, exc_info=True)
        return self._value

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def default_group(scope: str) -> str:
    """The consumer group of a scope's store ingestor when the config names none."""
    return f"hps:{scope}"


def store_groups(update_source: object) -> list[str]:
    """The consumer groups that write the shared stores: the configured one, else the default
    group of each scope that writes a store (``ingestor_for``)."""
    if update_source.group:
        return [update_source.group]
    return [default_group(s) for s in ("all", "shared", "local")]


def _entries(got: object) -> list:
    if not got:
        return []
    if isinstance(got, dict):  # RESP3
        return [e for v in got.values() for e in (v[0] if v and isinstance(v[0], list) else v)]
    return [e for _, es in got for e in es if e[1] is not None]


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _version(entry_id: object) -> int:
    """The entry's row version; an ID whose milliseconds do not fit one (from 2248, or set by
    hand) is malformed: its int64 version would wrap negative and its rows be dropped."""
    try:
        version = version_of(entry_id)  # a Python int: past int64 it grows instead of wrapping
    except ValueError:
        version = 1 << 63  # not <ms>-<seq> (Redis never makes one)
    if version >= 1 << 63:
        raise codec.MalformedMessage(
            f"entry ID {_text(entry_id)!r}: milliseconds past {(1 << (63 - SEQ_BITS)) - 1}"
        )
    return version


def _stamp(ts: object) -> int | None:
    """The publisher's ``ts_ns`` (for the freshness metric), None when absent."""
    if not ts:
        return None
    try:
        return int(ts)
    except ValueError:
        raise codec.MalformedMessage(f"ts_ns {_text(ts)!r} is not an integer") from None


SCOPES = ("all", "shared", "local", "cache")


def server_ingestors(server: object) -> list[Ingestor]:
    """The ingestors a server runs for ``update_source: redis_stream``, not started.

    Stores shared between processes (Redis or shared-memory VDB, writable PDB) are written by
    one ingestor in the shared group (``update_source.group``); the consumers of other
    processes in that group split the entries. What only this process holds (its L1 caches, an
    in-process hash-map VDB) must see every entry, so a second ingestor reads in a group of its
    own (``hps:proc:<host>:<pid>``, entries from a minute before its start, deleted at close).
    ``update_source.scope`` limits both: ``shared`` skips the process's and the PDB's part,
    ``local`` the shared VDB.
    """
    import os

    from ..errors import ConfigError
    from ..vdb.hashmap import HashMapVDB

    cfg = server.config
    u = cfg.update_source
    vdb = server.vdb
    own_vdb = isinstance(vdb, HashMapVDB) and not vdb.shm_name
    out = []
    try:
        out.append(ingestor_for(cfg, vdb=vdb, pdb=server.pdb, scope=u.scope))
    except ConfigError:
        log.info("update stream: no shared store to update in scope '%s'", u.scope)
    if u.scope == "shared":
        return out
    from .stream import connect

    client = connect(u.brokers, u.user_name, u.password)
    sinks: list[Sink] = [TierSink("vdb", vdb)] if own_vdb else []
    progress = None
    if any(t.cache is not None for s in server.sessions.values() for t in s.tables):
        progress = StoreProgress(client, u.stream, store_groups(u))
        sinks.append(CacheSink(server, progress))
    if sinks:
        out.append(
            Ingestor(
                client,
                sinks,
                None,
                stream=u.stream,
                group=f"hps:proc:{socket.gethostname()}:{os.getpid()}",
                # the last minute too: updates the shared stores may not have applied yet are
                # then known to this process's L1 (see RecentUpdates)
                start_id=f"{int(time.time() * 1000) - 60_000}-0",
                batch_entries=min(u.max_batch_size, 16),
                block_ms=u.poll_timeout_ms,
                claim_idle_ms=2**31 - 1,  # nobody else reads this group
                failure_backoff_ms=u.failure_backoff_ms,
                label="hps:proc",
                dead_letters=False,
                transient=True,
            )
        )
        if progress is not None:
            out[-1].owned.append(progress)  # stopped with the ingestor
    else:
        client.close()
    return out


def ingestor_for(
    config: object,
    *,
    vdb: object | None = None,
    pdb: object | None = None,
    scope: str = "all",
    group: str | None = None,
    consumer: str | None = None,
    start_id: str = "0",
) -> Ingestor:
    """An ingestor for the shared stores of a config: ``shared`` applies to the VDB, ``local``
    to the (writable) PDB, ``all`` to both. An in-process hash-map VDB is skipped: only its own
    process can update it (``server_ingestors``). ``cache`` has no shared store: a Triton
    instance whose shared tiers another process updates only keeps its L1 caches fresh.

    The group defaults to ``update_source.group`` or ``hps:<scope>``; each store that must see
    every update needs its own group.
    """
    from ..errors import ConfigError
    from ..vdb.hashmap import HashMapVDB
    from ..vdb.redis import RedisVDB
    from .stream import connect

    if scope not in SCOPES:
        raise ConfigError("scope", scope, f"one of {SCOPES}")
    u = config.update_source
    if isinstance(vdb, HashMapVDB) and not vdb.shm_name:
        vdb = None
    sinks: list[Sink] = []
    from ..config import store_table_name

    vdb_dtype = config.volatile_db.storage_dtype
    dims = {
        store_table_name(m.model, name): m.embedding_vecsize_per_table[t]
        for m in config.models
        for t, name in enumerate(m.embedding_table_names)
    }
    if scope in ("all", "local") and pdb is not None and not getattr(pdb, "read_only", False):
        sinks.append(TierSink("pdb", pdb, {k: (d, "float32") for k, d in dims.items()}))
    if scope in ("all", "shared") and vdb is not None:
        sinks.append(TierSink("vdb", vdb, {k: (d, vdb_dtype) for k, d in dims.items()}))
    if not sinks:
        raise ConfigError("scope", scope, "a scope with at least one store enabled")
    client = connect(u.brokers, u.user_name, u.password)
    vs_redis = vdb if isinstance(vdb, RedisVDB) and vdb.addresses == _addr(u.brokers) else None
    owned = []
    if vs_redis is None:
        vs_redis = RedisVDB(u.brokers, user_name=u.user_name, password=u.password)
        owned.append(vs_redis)
    g = group or u.group or default_group(scope)
    ing = Ingestor(
        client,
        sinks,
        VersionStore(vs_redis, g),
        stream=u.stream,
        group=g,
        consumer=consumer,
        start_id=start_id,
        batch_entries=min(u.max_batch_size, 16),
        block_ms=u.poll_timeout_ms,
        claim_idle_ms=u.claim_idle_ms,
        failure_backoff_ms=u.failure_backoff_ms,
    )
    ing.owned = owned
    return ing


def _addr(brokers: str) -> list[tuple[str, int]]:
    from ..config import split_address

    return [hp for a in brokers.split(",") if (hp := split_address(a)) is not None]


class StoreIngestor:
    """An ingestor together with the VDB and PDB it writes, opened from a config and closed with
    it (``hps ingest``, and the launcher of ``hps serve``). ``ingestor`` is not started."""

    def __init__(self, config: object, scope: str = "all", **kw):
        from ..server import build_pdb, build_vdb

        self.vdb, self.pdb = build_vdb(config), build_pdb(config)
        try:
            self.ingestor = ingestor_for(config, vdb=self.vdb, pdb=self.pdb, scope=scope, **kw)
        except BaseException:
            self._close_tiers()
            raise

    def _close_tiers(self) -> None:
        for tier in (self.vdb, self.pdb):
            if tier is not None:
                tier.close()

    def close(self) -> None:
        """Stop the ingestor, then close the tiers."""
        self.ingestor.stop()
        self._close_tiers()
