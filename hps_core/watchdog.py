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
and, when one stays a zombie (``ZOMBIE_CONFIRM_S``), reloads that model through the load API
with the model's current configuration as an override, which Triton always treats as a new
version of the model: new instances start (seconds, for a model whose tables are in a
preloaded shared-memory VDB or in RocksDB) and replace the old ones, whose live instances keep
serving until then.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from .errors import HPSError

log = logging.getLogger(__name__)

SERVER = "tritonserver"
STUB = "triton_python_backend_stub"
INSTANCE_ARG = 8  # argv[8] of a 2.51 stub is its instance name (argv[1] its model.py)
# A stub that Triton stops (an unload, a reload, the server's shutdown) is a zombie for a moment
# too, until Triton reaps it; one that died on its own stays one. A death counts once the stub
# is still a zombie this long after it was first seen as one: a scan that caught the moment
# reloaded a model that was being unloaded, or one of a server that was stopping.
ZOMBIE_CONFIRM_S = 1.0
# A reload that failed while the server was going away (its endpoint closed) is no failure:
# the server is given this long to exit.
SHUTDOWN_WAIT_S = 10.0


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
        self._zombies: dict[int, float] = {}  # stub pid -> when it was first seen a zombie
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StubWatchdog:
        """Note the stubs running now, then scan every ``interval`` seconds in a thread."""
        self.scan()
        self._thread = threading.Thread(target=self.watch, name="hps-stub-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """End the watch (a reload under way goes on in the daemon thread past ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def watch(self) -> None:
        """Scan now and every ``interval`` seconds until the server exits or ``stop`` is called."""
        while True:
            try:
                self.scan()
            except psutil.NoSuchProcess:
                return  # the server is gone
            except Exception:  # a failed scan must not end the watch
                log.exception("stub watchdog: scan failed")
            if self._stop.wait(self.interval):
                return

    def scan(self) -> list[Reload]:
        """One pass: note new stubs, reload the model of each stub that died since the last."""
        dead: dict[str, tuple[str, int]] = {}  # model -> (instance, pid) of a dead stub
        server = psutil.Process(self.server_pid)
        if server.status() == psutil.STATUS_ZOMBIE:  # exited; its parent has not waited yet
            raise psutil.NoSuchProcess(self.server_pid)
        now = time.monotonic()
        for child in server.children():
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    if child.pid in self._stubs:
                        first = self._zombies.setdefault(child.pid, now)
                        if now - first >= ZOMBIE_CONFIRM_S:
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
        live = {p.pid for p in server.children()}
        for pid in [p for p in self._stubs if p not in live]:  # stopped and reaped by Triton
            del self._stubs[pid]
        for pid in [p for p in self._zombies if p not in self._stubs]:
            del self._zombies[pid]
        done = [self._reload(model, instance, pid) for model, (instance, pid) in dead.items()]
        done = [r for r in done if r is not None]
        self.reloads += done
        return done

    def _reload(self, model: str, instance: str, pid: int) -> Reload | None:
        """Reload ``model``; None when the server went away instead (a stopping server)."""
        log.error(
            "model %s: the process of instance %s (pid %d) died; Triton does not restart it, "
            "so the model is reloaded", model, instance, pid,
        )  # fmt: skip
        try:
            config = self._request(f"/v2/models/{model}/config")
            body = {"parameters": {"config": json.dumps(config)}}
            self._request(f"/v2/repository/models/{model}/load", body, timeout=600)
        except (OSError, ValueError) as e:
            if self._server_exits(SHUTDOWN_WAIT_S):
                log.warning("model %s: not reloaded: the server is stopping", model)
                return None
            log.error("model %s: reload after the death of %s failed: %s", model, instance, e)
            return Reload(model, instance, pid, False, str(e))
        log.warning("model %s: reloaded after the death of instance %s", model, instance)
        return Reload(model, instance, pid, True)

    def _server_exits(self, timeout: float) -> bool:
        """Whether the server exits within ``timeout`` seconds (or already has)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if psutil.Process(self.server_pid).status() == psutil.STATUS_ZOMBIE:
                    return True
            except psutil.NoSuchProcess:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def _request(self, path: str, body: dict | None = None, timeout: float = 30.0) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=data)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                text = r.read()
        except urllib.error.HTTPError as e:
            raise OSError(f"{path}: HTTP {e.code} {e.read().decode(errors='replace')}") from e
        return json.loads(text) if text else {}


def find_server(pid: int, poll: float = 1.0) -> psutil.Process | None:
    """The tritonserver process that ``pid`` is or starts: ``pid`` itself once it runs
    tritonserver (a container entrypoint that will ``exec`` it), else its first descendant that
    does; waits for either, and returns None if ``pid`` exits first."""
    while True:
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:  # exited, not yet waited for
                return None
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    if p.status() != psutil.STATUS_ZOMBIE and p.name() == SERVER:
                        return p
        except psutil.NoSuchProcess:
            return None
        time.sleep(poll)


def watch_server(pid: int, url: str, interval: float, say=print) -> list[Reload]:
    """``hps watch``: find the tritonserver of ``pid`` (``find_server``), then reload each model
    whose stub dies until the server exits."""
    server = find_server(pid)
    if server is None:
        raise HPSError(f"--pid {pid}: the process exited before it ran tritonserver")
    say(
        f"watching tritonserver (pid {server.pid}, HTTP {url}): a model whose stub dies is reloaded"
    )
    watchdog = StubWatchdog(server.pid, url, interval)
    with contextlib.suppress(KeyboardInterrupt):
        watchdog.watch()
    failed = sum(not r.ok for r in watchdog.reloads)
    say(f"tritonserver (pid {server.pid}) exited: {len(watchdog.reloads)} reloads, {failed} failed")
    return watchdog.reloads
