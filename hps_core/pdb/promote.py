"""Background promotion of rows found only in the PDB into the VDB (HPS ``cache_missed_embeddings``)."""

from __future__ import annotations

import logging
import queue
import threading

import numpy as np

log = logging.getLogger(__name__)


class Promoter:
    """One daemon thread upserting submitted rows into a VDB; never blocks the lookup that submits."""

    def __init__(self, vdb: object, max_pending: int = 64):
        self.vdb = vdb
        self.dropped = 0
        self.promoted = 0
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="hps-pdb-promote", daemon=True)
        self._thread.start()

    def submit(self, table: str, keys: np.ndarray, vectors: np.ndarray) -> bool:
        """Queue rows for the VDB; returns False (and counts a drop) when the queue is full."""
        try:
            self._queue.put_nowait((table, keys.copy(), vectors.copy()))
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                table, keys, vectors = item
                self.vdb.upsert(table, keys, vectors)
                self.promoted += len(keys)
            except Exception:  # a dropped table or a closed VDB must not kill the thread
                log.exception("promoting rows into the VDB failed")
            finally:
                self._queue.task_done()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued submission has been applied."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        done.wait(timeout)

    def close(self) -> None:
        """Apply what is queued, then stop the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
