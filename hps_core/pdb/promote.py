"""Background promotion of rows found only in the PDB into the VDB (HPS ``cache_missed_embeddings``)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from functools import partial

import numpy as np

from ..errors import InvalidInputError, StorageError

log = logging.getLogger(__name__)

_STOP = object()


class Promoter:
    """One daemon thread inserting submitted rows into a VDB; never blocks the lookup that submits.

    Rows go in with the VDB's ``insert_missing``, which checks them against ``pdb``: a key the
    VDB holds by then keeps its row, and a row the PDB no longer holds as read is dropped. A
    lookup read the row from the PDB; an online update of that key written since (into the
    PDB, then the VDB) is newer, and a promotion that replaced it (or put the old row back
    after the VDB evicted the new one) would serve the old row from the VDB for good.

    ``vdb``: anything with ``insert_missing(table, keys, vectors, source)``; ``pdb``: anything
    with ``fetch(table, keys) -> (vectors, found)``, or None (no check against it).
    ``max_pending``: submissions the queue holds; beyond it a submission is dropped and counted
    (the rows stay in the PDB, so a drop only costs a later PDB read). Counters: ``promoted``
    (rows inserted), ``dropped`` (submissions dropped), ``dropped_rows``, ``failed``
    (submissions whose insert raised).
    """

    def __init__(self, vdb: object, pdb: object = None, max_pending: int = 64):
        if max_pending < 1:
            raise InvalidInputError("max_pending", max_pending, "a positive integer")
        self.vdb = vdb
        self.pdb = pdb
        self.promoted = 0
        self.dropped = 0
        self.dropped_rows = 0
        self.failed = 0
        self._closed = False
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="hps-pdb-promote", daemon=True)
        self._thread.start()

    def submit(self, table: str, keys: np.ndarray, vectors: np.ndarray, copy: bool = True) -> bool:
        """Queue rows for the VDB; False (a counted drop) when the queue is full or closed.

        ``copy=False`` hands over arrays the caller will not touch again.
        """
        if copy:
            keys, vectors = np.array(keys, copy=True), np.array(vectors, copy=True)
        if not self._closed:
            try:
                self._queue.put_nowait((table, keys, vectors))
                return True
            except queue.Full:
                pass
        self.dropped += 1  # only the submitting thread(s) write it; a rare lost count is harmless
        self.dropped_rows += len(keys)
        return False

    def _run(self) -> None:
        failing = False  # a VDB outage is logged once, not per batch
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                table, keys, vectors = item
                source = None if self.pdb is None else partial(self.pdb.fetch, table)
                self.promoted += int(self.vdb.insert_missing(table, keys, vectors, source))
                if failing:
                    log.warning("promoting rows into the VDB works again")
                    failing = False
            except StorageError as e:  # the VDB is (partly) down: rows stay in the PDB
                self.failed += 1
                if not failing:
                    log.warning(
                        "promoting rows into the VDB failed, skipping until it works: %s", e
                    )
                    failing = True
            except Exception:  # a dropped table or a closed VDB must not kill the thread
                self.failed += 1
                log.exception("promoting %d rows into the VDB failed", len(item[1]))
            finally:
                self._queue.task_done()

    @property
    def pending(self) -> int:
        """Submissions queued or being applied."""
        return self._queue.unfinished_tasks

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued submission has been applied; False on timeout."""
        q = self._queue
        deadline = None if timeout is None else time.monotonic() + timeout
        with q.all_tasks_done:
            while q.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                q.all_tasks_done.wait(left)
        return True

    def close(self, timeout: float | None = None) -> None:
        """Apply what is queued, then stop the thread; later submissions are dropped."""
        if self._closed:
            return
        self._closed = True
        if not self._thread.is_alive():
            return
        try:  # waits only while the queue is full, i.e. until the worker makes room
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.warning("VDB promotion thread did not drain within %ss; leaving it", timeout)
            return
        self._thread.join(timeout)

    def __enter__(self) -> Promoter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
