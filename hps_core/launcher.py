"""Start and stop a local Triton server (the pip-installed ``nvidia-pytriton`` build) with our backends.

Triton's Python-based backends live in ``<backend-directory>/<name>/model.py`` beside the
``python`` backend that runs them. We assemble such a directory per server (the pip build's
``python`` backend, the stub for this interpreter, and ``backend/hps`` and ``backend/onnx``
from the project), pick free loopback ports, wait for ``/v2/health/ready`` and stop the
server (SIGINT, then SIGKILL) when done. While it runs, a watchdog reloads a model whose stub
process died (``hps_core.watchdog``). Importing this module imports nothing of Triton.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path

from . import quiet_openmp
from .errors import HPSError
from .watchdog import StubWatchdog

log = logging.getLogger(__name__)

PROJECT_BACKENDS = Path(__file__).resolve().parent.parent / "backend"
"""backend/hps and backend/onnx of the project (each a Triton Python-based backend)."""


class ServerError(HPSError):
    """The Triton server could not be found, started or reached."""


def triton_home() -> Path:
    """The pip-installed Triton build (``pytriton/tritonserver``)."""
    try:
        import pytriton
    except ImportError as e:
        raise ServerError(
            "no Triton server: pip install nvidia-pytriton==0.7.0 (make installs it)"
        ) from e
    home = Path(pytriton.__file__).parent / "tritonserver"
    if not (home / "bin" / "tritonserver").is_file():
        raise ServerError(f"{home}/bin/tritonserver is missing: reinstall nvidia-pytriton")
    return home


def python_libdir() -> list[str]:
    """The directory of this interpreter's own shared libpython, if it has one.

    The stub links libpython3.X.so.1.0 dynamically; without this it may load another build of
    the same minor version (a system one) whose C API lacks symbols that this interpreter's
    extension modules (``_ssl``, say) need.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME")
    if libdir and soname and (Path(libdir) / soname).is_file():
        return [libdir]
    return []


CLUSTER_BUS_OFFSET = 10000
"""A Redis Cluster node also listens on its port + 10000 (the cluster bus)."""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, redis_cluster: bool = False) -> list[int]:
    """n distinct free TCP ports on the loopback interface.

    ``redis_cluster``: ports a Redis Cluster node can take, each with its bus port (port +
    10000) free too, so at most 55535; the kernel's ephemeral ports reach 60999.
    """
    if redis_cluster:
        rng = random.Random()
        out: list[int] = []
        for _ in range(10000):
            p = rng.randrange(20000, 65536 - CLUSTER_BUS_OFFSET)
            if p not in out and _port_free(p) and _port_free(p + CLUSTER_BUS_OFFSET):
                out.append(p)
                if len(out) == n:
                    return out
        raise ServerError(f"no {n} free loopback ports for a Redis Cluster (with bus ports)")
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def backend_directory(dest: Path, backends: Path = PROJECT_BACKENDS) -> Path:
    """Fill dest with the python backend, this interpreter's stub and our backends; returns dest."""
    home = triton_home()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the Triton build has no Python backend stub for Python {py}")
    shutil.copytree(home / "backends" / "python", dest / "python", dirs_exist_ok=True)
    shutil.copy2(stub, dest / "python" / "triton_python_backend_stub")
    for name in ("hps", "onnx"):
        (dest / name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(backends / name / "model.py", dest / name / "model.py")
    return dest


class TritonServer:
    """A tritonserver process on loopback ports; a context manager that always stops it.

    Args:
        repository: the model repository.
        models: models to load at start (EXPLICIT model control); None loads all of them.
        instances_env: extra environment for the server and its backend stubs.
        log_path: where the server's output goes (default: a file in its work directory).
        args: more tritonserver arguments.
        watchdog: seconds between the stub watchdog's scans (``hps_core.watchdog``: a model
            whose Python-backend process died is reloaded); None runs none.
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        *,
        models: list[str] | None = None,
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
        args: list[str] | None = None,
        ports: tuple[int, int, int] | None = None,
        watchdog: float | None = 1.0,
    ):
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise ServerError(f"model repository {self.repository} is not a directory")
        self.models = models
        self.env = env or {}
        self.extra_args = args or []
        self.http_port, self.grpc_port, self.metrics_port = ports or free_ports(3)
        # names of the Python backend's shared-memory regions (/dev/shm/<prefix><uuid>)
        self.shm_prefix = f"hps{os.getpid()}x{self.http_port}_"
        self._work = Path(tempfile.mkdtemp(prefix="hps-triton-"))
        self.log_path = Path(log_path) if log_path else self._work / "tritonserver.log"
        self.proc: subprocess.Popen | None = None
        self.watchdog_interval = watchdog
        self.watchdog: StubWatchdog | None = None
        self.starts = 0  # a restart appends to the log of the runs before

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        home = triton_home()
        backends = backend_directory(self._work / "backends")
        cmd = [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--cache-directory={home / 'caches'}",
            "--backend-config=python,shm-region-prefix-name=" + self.shm_prefix,
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--model-control-mode=explicit",
            "--exit-timeout-secs=10",
        ]
        for m in self.models if self.models is not None else ["*"]:
            cmd.append(f"--load-model={m}")
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        home = triton_home()
        libs = home.parent.parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (*python_libdir(), str(libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        # the stub finds this environment's packages through the interpreter first on PATH
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        # numba's OpenMP workers spin while idle, which starves the other processes (stubs,
        # the server) on a machine with few cores
        quiet_openmp(env)
        env.update(self.env)
        return env

    def start(self, timeout: float = 180.0) -> TritonServer:
        """Start the server and wait until it is ready (every requested model loaded)."""
        cmd = self.command()
        log.info("starting %s", " ".join(cmd))
        self._log = open(self.log_path, "ab" if self.starts else "wb")  # noqa: SIM115 - closed in stop()
        self.starts += 1
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.environment(),
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._cleanup()
                raise ServerError(
                    f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.ready():
                if self.watchdog_interval is not None:
                    self.watchdog = StubWatchdog(
                        self.proc.pid, self.http_url, self.watchdog_interval
                    ).start()
                return self
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def restart(self, timeout: float = 180.0) -> TritonServer:
        """Stop what is left of the server (stubs, shared memory) and start it again on the
        same ports, so clients reconnect to the same URLs."""
        self.stop()
        return self.start(timeout)

    def exit_description(self) -> str:
        """How the server process ended: 'signal 9 (Killed)' or 'status 1'."""
        rc = self.proc.returncode if self.proc is not None else None
        return f"signal {-rc} ({signal.strsignal(-rc)})" if rc and rc < 0 else f"status {rc}"

    def ready(self) -> bool:
        """Whether /v2/health/ready answers 200."""
        try:
            url = f"http://{self.http_url}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (SIGINT, then SIGKILL to its whole process group) and clean up."""
        if self.watchdog is not None:
            self.watchdog.stop()
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %.0f s: killing it", timeout)
        if p is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # stubs left behind, if any
            p.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        """After the server is gone: close the log, remove the work folder and the Python
        backend's shared-memory regions (a server that was killed, not stopped, leaves them in
        /dev/shm, 16 MiB or more each, until the machine reboots)."""
        for f in Path("/dev/shm").glob(self.shm_prefix + "*"):
            with contextlib.suppress(OSError):
                f.unlink()
        log_file = getattr(self, "_log", None)
        if log_file is not None and not log_file.closed:
            log_file.close()
        if self.log_path.parent != self._work:
            shutil.rmtree(self._work, ignore_errors=True)
        else:
            shutil.rmtree(self._work / "backends", ignore_errors=True)

    def __enter__(self) -> TritonServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stopped_by_signals():
    """SIGTERM (``kill``, ``docker stop``, systemd) and SIGHUP stop a command that runs a
    server as Ctrl-C does: KeyboardInterrupt in the main thread, so the server, its stubs
    and the shared memory are cleaned up. The server runs in a session of its own, so these
    signals never reach it directly; without this the command died and left it running.
    SIGINT is made to raise too: a shell starts a background job with it ignored."""
    previous = {s: signal.getsignal(s) for s in (*STOP_SIGNALS, signal.SIGINT)}
    stopping = []

    def stop(signum, frame):
        if stopping:  # a second signal (docker stop, Ctrl-C twice) must not cut the clean-up
            return
        stopping.append(signum)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    for s in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def supervise(
    server: TritonServer,
    restarts: int,
    say: Callable[[str], None],
    window_s: float = 600.0,
    start_timeout: float = 300.0,
) -> None:
    """Keep ``server`` running: when it dies, say how with the end of its log and start it
    again, at most ``restarts`` times within ``window_s`` seconds; one death more is a
    ServerError (a server that keeps dying has a cause a restart does not fix). Returns never;
    Ctrl-C (KeyboardInterrupt) ends it."""
    deaths: deque[float] = deque()
    while True:
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(1)
        how = server.exit_description()
        say(server.log_tail(3000))
        now = time.monotonic()
        while deaths and now - deaths[0] > window_s:
            deaths.popleft()
        if len(deaths) >= restarts:
            again = f" (restarted {len(deaths)} times in {window_s:.0f} s)" if restarts else ""
            raise ServerError(f"tritonserver exited with {how}{again}; above, the end of its log")
        deaths.append(now)
        say(f"tritonserver exited with {how}; restarting it ({len(deaths)} of {restarts} "
            f"restarts in {window_s:.0f} s)")  # fmt: skip
        server.restart(start_timeout)
        say(f"serving again: HTTP {server.http_url}, gRPC {server.grpc_url}")
