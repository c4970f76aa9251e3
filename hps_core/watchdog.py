"""Reload a served model whose Python-backend process died.

Triton runs each instance of a Python-based model (ours: ``hps``, ``onnx``) in a stub process.
When one dies (a request whose byte size wraps past 2^64 kills it inside the stub, before any
model code runs; the kernel's OOM killer; a crash in native code), Triton 2.51 neither restarts
it nor marks the model unavailable: the model stays ready, and every request its dead instance
is given fails with ``Stub process '<instance>' is not healthy`` until the server stops. A
plain load of the model is a no-op (it has not changed), so the dead instance stays.

The watchdog finds such deaths from the server's side: Triton does not wait for a stub that
exits on its own, so a dead stub stays a zombie child of the server (a stub Triton stops on
unload or reload is reaped). It remembers which model and instance each live stub runs (from
the stub's command line: ``<stub> <repo>/<model>/<version>/model.py ... <instance> <runtime>``)
and, when one turns zombie, reloads that model through the load API with the model's current
configuration as an override, which Triton always treats as a new version of the model: new
instances start (seconds, for a model whose tables are in a preloaded shared-memory VDB or in
RocksDB) and replace the old ones, whose live instances keep serving until then.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

STUB = "triton_python_backend_stub"
INSTANCE_ARG = 8  # argv[8] of a 2.51 stub is its instance name (argv[1] its model.py)


@dataclass(frozen=True)
class Reload:
    """A model the watchdog reloaded: the dead stub's pid and instance, and the outcome."""

    model: str
    instance: str
    pid: int
    ok: bool
    error: str = ""


class StubWatchdog:
    """Watches the stubs of one tritonserver process and reloads a model whose stub died.

    Args:
        server_pid: the tritonserver process.
        http_url: its HTTP endpoint (``host:port``) for the model configuration and load API.
        interval: seconds between scans of the server's children.
    """

    def __init__(self, server_pid: int, http_url: str, interval: float = 1.0):
        self.server_pid = server_pid
        self.http_url = http_url
        self.interval = interval
        self.reloads: list[Reload] = []
        self._stubs: dict[int, tuple[str, str]] = {}  # live stub pid -> (model, instance)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StubWatchdog:
        """Note the stubs running now, then scan every ``interval`` seconds in a thread."""
        self.scan()
        self._thread = threading.Thread(target=self._run, name="hps-stub-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.scan()
            except psutil.NoSuchProcess:
                return  # the server is gone
            except Exception:  # a failed scan must not end the watch
                log.exception("stub watchdog: scan failed")

    def scan(self) -> list[Reload]:
        """One pass: note new stubs, reload the model of each stub that died since the last."""
        dead: dict[str, tuple[str, int]] = {}  # model -> (instance, pid) of a dead stub
        for child in psutil.Process(self.server_pid).children():
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    if child.pid in self._stubs:
                        model, instance = self._stubs.pop(child.pid)
                        dead.setdefault(model, (instance, child.pid))
                    continue
                if child.pid not in self._stubs:
                    argv = child.cmdline()
                    if argv and Path(argv[0]).name == STUB and len(argv) > INSTANCE_ARG:
                        model = Path(argv[1]).parent.parent.name
                        self._stubs[child.pid] = (model, argv[INSTANCE_ARG])
            except psutil.NoSuchProcess:  # reaped between the listing and the look
                self._stubs.pop(child.pid, None)
        live = {p.pid for p in psutil.Process(self.server_pid).children()}
        for pid in [p for p in self._stubs if p not in live]:  # stopped and reaped by Triton
            del self._stubs[pid]
        done = [self._reload(model, instance, pid) for model, (instance, pid) in dead.items()]
        self.reloads += done
        return done

    def _reload(self, model: str, instance: str, pid: int) -> Reload:
        log.error(
            "model %s: the process of instance %s (pid %d) died; Triton does not restart it, "
            "so the model is reloaded", model, instance, pid,
        )  # fmt: skip
        try:
            config = self._request(f"/v2/models/{model}/config")
            body = {"parameters": {"config": json.dumps(config)}}
            self._request(f"/v2/repository/models/{model}/load", body, timeout=600)
        except (OSError, ValueError) as e:
            log.error("model %s: reload after the death of %s failed: %s", model, instance, e)
            return Reload(model, instance, pid, False, str(e))
        log.warning("model %s: reloaded after the death of instance %s", model, instance)
        return Reload(model, instance, pid, True)

    def _request(self, path: str, body: dict | None = None, timeout: float = 30.0) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=data)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                text = r.read()
        except urllib.error.HTTPError as e:
            raise OSError(f"{path}: HTTP {e.code} {e.read().decode(errors='replace')}") from e
        return json.loads(text) if text else {}
