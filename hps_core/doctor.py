"""``hps doctor``: checks the environment (and optionally a config) and says what to fix.

Each check gives one verdict: OK, WARN (works, with less: CPU mode, no load tests) or FAIL
(something ``hps`` or ``make demo`` needs is missing), and for WARN/FAIL a command that fixes
it. Nothing is loaded into the tiers: a config's memory comes from ``hps estimate``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

OK, WARN, FAIL = "OK", "WARN", "FAIL"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
MIN_PYTHON = (3, 10)


@dataclass
class Check:
    """One verdict: what was checked, what was found, and the command that fixes it."""

    name: str
    status: str
    detail: str
    fix: str = ""
    data: dict = field(default_factory=dict)  # the measured values, for --json


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


# -- Python packages -------------------------------------------------------------------------


def check_python() -> Check:
    """Python 3.10 or newer."""
    v = ".".join(map(str, sys.version_info[:3]))
    if tuple(sys.version_info[:2]) >= MIN_PYTHON:
        return Check("python", OK, f"{v} ({sys.executable})")
    return Check(
        "python", FAIL, f"{v}: hps needs 3.10+", "install Python 3.10+, then make clean install"
    )


def check_numpy() -> Check:
    """numpy < 2: Triton 2.51's Python stub converts tensors with the numpy 1 C API."""
    try:
        import numpy
    except ImportError:
        return Check("numpy", FAIL, "not importable", "pip install 'numpy<2'")
    v = numpy.__version__
    if int(v.split(".")[0]) < 2:
        return Check(
            "numpy", OK, f"{v} (< 2, as the Triton 2.51 Python stub expects)", data={"version": v}
        )
    return Check(
        "numpy",
        WARN,
        f"{v}: Triton 2.51's Python stub is built against numpy 1 and mishandles numpy 2 arrays "
        "in as_numpy()/Tensor(); our backends fall back to DLPack, other backends may break",
        "pip install 'numpy<2'",
        data={"version": v},
    )


def _parallel_layer() -> str:
    import numba
    import numpy as np

    @numba.njit(parallel=True)
    def total(a):
        s = 0.0
        for i in numba.prange(a.shape[0]):
            s += a[i]
        return s

    total(np.ones(4))
    return numba.threading_layer()


def check_numba() -> Check:
    """numba importable, and a threading layer (omp/tbb) that allows kernels from many threads."""
    try:
        import numba
    except ImportError:
        return Check("numba", FAIL, "not importable", "pip install numba")
    try:
        layer = _parallel_layer()
    except Exception as e:  # noqa: BLE001 - any failure to run a parallel kernel is the finding
        return Check("numba", FAIL, f"{numba.__version__}: parallel kernel failed ({e})",
                     "pip install --force-reinstall numba")  # fmt: skip
    if layer in ("omp", "tbb"):
        return Check(
            "numba", OK, f"{numba.__version__}, threading layer {layer}", data={"layer": layer}
        )
    return Check(
        "numba",
        WARN,
        f"{numba.__version__}, threading layer {layer}: the VDB runs kernels from several "
        "threads at once, which workqueue does not allow (numba aborts)",
        "pip install tbb  (or apt-get install libgomp1 for omp)",
        data={"layer": layer},
    )


def check_rocksdict() -> Check:
    """rocksdict importable and able to write and read a database."""
    try:
        from rocksdict import Rdict
    except ImportError:
        return Check(
            "rocksdict", FAIL, "not importable (the PDB needs it)", "pip install rocksdict"
        )
    with tempfile.TemporaryDirectory(prefix="hps-doctor-") as d:
        db = Rdict(os.path.join(d, "db"))
        try:
            db[b"k"] = b"v"
            ok = db[b"k"] == b"v"
        finally:
            db.close()
    if not ok:
        return Check("rocksdict", FAIL, "a written value read back differently",
                     "pip install --force-reinstall rocksdict")  # fmt: skip
    return Check("rocksdict", OK, f"{_version('rocksdict')}, write/read round trip")


def check_onnx(gpu_visible: bool) -> list[Check]:
    """onnx and onnxruntime importable; onnxruntime's execution providers."""
    out = []
    try:
        import onnx

        out.append(Check("onnx", OK, onnx.__version__))
    except ImportError:
        out.append(Check("onnx", FAIL, "not importable (hps dense needs it)", "pip install onnx"))
    try:
        import onnxruntime as ort
    except ImportError:
        out.append(Check("onnxruntime", FAIL, "not importable (the onnx backend needs it)",
                         "pip install onnxruntime"))  # fmt: skip
        return out
    providers = ort.get_available_providers()
    detail = f"{ort.__version__}, providers {', '.join(providers)}"
    if "CUDAExecutionProvider" in providers:
        out.append(Check("onnxruntime", OK, detail + " (dense model on the GPU)"))
    elif gpu_visible:
        out.append(Check("onnxruntime", WARN, detail + ": a GPU is visible but the dense model "
                         "runs on the CPU", "pip uninstall -y onnxruntime && pip install "
                         "onnxruntime-gpu"))  # fmt: skip
    else:
        out.append(Check("onnxruntime", OK, detail + " (no GPU: CPU provider)"))
    out[-1].data = {"providers": providers}
    return out


def check_cupy() -> Check:
    """CuPy and its CUDA devices (absent: CPU mode, L1 in host memory)."""
    try:
        import cupy
    except ImportError:
        return Check("cupy", WARN, "not importable: CPU mode (L1 cache in host memory)",
                     "pip install cupy-cuda12x")  # fmt: skip
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        devs = []
        for i in range(n):
            p = cupy.cuda.runtime.getDeviceProperties(i)
            name = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
            devs.append(f"{i}: {name} {p['totalGlobalMem'] / 2**30:.1f} GiB")
    except Exception as e:  # noqa: BLE001 - no driver / no device: the finding itself
        return Check("cupy", WARN, f"{cupy.__version__}, no CUDA device ({e}): CPU mode",
                     "install the NVIDIA driver, check nvidia-smi and CUDA_VISIBLE_DEVICES")  # fmt: skip
    if n == 0:
        return Check("cupy", WARN, f"{cupy.__version__}, no CUDA device: CPU mode",
                     "check nvidia-smi and CUDA_VISIBLE_DEVICES")  # fmt: skip
    path = (
        "lookups per table (HPS_DEVICE_LOOKUP=0)"
        if os.environ.get("HPS_DEVICE_LOOKUP", "1") == "0"
        else "device-resident lookups"
    )
    return Check(
        "cupy", OK, f"{cupy.__version__}, {n} GPU(s): " + "; ".join(devs) + f"; GPU L1: {path}",
        data={"devices": n},
    )  # fmt: skip


def find_nvcc() -> str | None:
    """Path of nvcc: $NVCC, $PATH, $CUDA_HOME/bin, /usr/local/cuda/bin or pip's nvidia/*/bin."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    candidates += [f"{home}/bin/nvcc"] if home else []
    candidates += ["/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"]
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        candidates += [f"{site}/nvidia/{d}/bin/nvcc" for d in ("cu13", "cu12", "cuda_nvcc")]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def check_nvcc() -> Check:
    """nvcc, for the CUDA kernels' compile checks (tests/cache/test_gpu_kernels_compile.py)."""
    path = find_nvcc()
    if path is None:
        return Check("nvcc", WARN, "not found: the kernel compile checks cannot run",
                     "pip install nvidia-cuda-nvcc")  # fmt: skip
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
        release = next((ln.strip() for ln in out.stdout.splitlines() if "release" in ln), "")
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("nvcc", WARN, f"{path} does not run ({e})", "pip install nvidia-cuda-nvcc")
    return Check("nvcc", OK, f"{path} ({release})")


# -- Triton ------------------------------------------------------------------------------------


def check_triton() -> list[Check]:
    """The pip Triton server, this Python's backend stub, libpython, our backends, tritonclient."""
    from .launcher import PROJECT_BACKENDS, ServerError, triton_home

    out = []
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    try:
        home = triton_home()
        binary = home / "bin" / "tritonserver"
        out.append(Check("triton server", OK, f"{binary} (nvidia-pytriton "
                         f"{_version('nvidia-pytriton')})", data={"path": str(binary)}))  # fmt: skip
        stub = home / "python_backend_stubs" / py / "triton_python_backend_stub"
        if stub.is_file():
            out.append(Check("python stub", OK, str(stub), data={"path": str(stub)}))
        else:
            have = sorted(p.name for p in (home / "python_backend_stubs").glob("*"))
            out.append(Check("python stub", FAIL, f"none for Python {py} (has {', '.join(have)})",
                             f"use Python {' or '.join(have)}: make clean && make install "
                             f"PYTHON=python{have[-1] if have else '3.12'}"))  # fmt: skip
    except ServerError as e:
        out.append(Check("triton server", FAIL, str(e), "pip install nvidia-pytriton==0.7.0"))
    lib = f"libpython{py}.so.1.0"
    try:
        ctypes.CDLL(lib)
        out.append(Check("libpython", OK, f"{_loaded_path(lib) or lib} loads"))
    except OSError as e:
        out.append(Check("libpython", FAIL, f"{lib} does not load ({e}): the stub needs it",
                         f"sudo apt-get install -y libpython{py}"))  # fmt: skip
    missing = [str(PROJECT_BACKENDS / n / "model.py") for n in ("hps", "onnx")]
    missing = [m for m in missing if not os.path.isfile(m)]
    if missing:
        out.append(Check("project backends", FAIL, "missing " + ", ".join(missing),
                         "git checkout -- backend/"))  # fmt: skip
    else:
        out.append(Check("project backends", OK, f"{PROJECT_BACKENDS}/{{hps,onnx}}/model.py"))
    try:
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401

        out.append(Check("tritonclient", OK, f"{_version('tritonclient')} (http, grpc)"))
    except ImportError as e:
        out.append(Check("tritonclient", FAIL, f"not importable ({e})",
                         "pip install 'tritonclient[http,grpc]'"))  # fmt: skip
    return out


def _loaded_path(lib: str) -> str | None:
    """Where the dynamic linker found an already loaded library (from /proc/self/maps)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            if line.rstrip().endswith(lib) or f"/{lib}" in line:
                return line.split()[-1]
    return None


def find_perf_analyzer() -> str | None:
    """perf_analyzer: $PERF_ANALYZER, a .venv-perf beside the project or this venv, or $PATH."""
    candidates = [os.environ.get("PERF_ANALYZER")]
    for root in (Path.cwd(), PROJECT_ROOT, Path(sys.prefix).parent):
        candidates.append(str(root / ".venv-perf" / "bin" / "perf_analyzer"))
    candidates.append(shutil.which("perf_analyzer"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def check_perf() -> list[Check]:
    """perf_analyzer (tritonclient 2.50.0's wheel) and the libb64 it links."""
    path = find_perf_analyzer()
    out = [
        Check("perf_analyzer", OK, path)
        if path
        else Check(
            "perf_analyzer",
            WARN,
            "not found: `make perf` (load tests) cannot run",
            "make perf  (installs tritonclient==2.50.0 into .venv-perf)",
        )  # fmt: skip
    ]
    try:
        ctypes.CDLL("libb64.so.0d")
        out.append(Check("libb64", OK, f"{_loaded_path('libb64.so.0d') or 'libb64.so.0d'} loads"))
    except OSError:
        out.append(Check("libb64", WARN, "libb64.so.0d missing: perf_analyzer will not start",
                         "sudo apt-get install -y libb64-0d"))  # fmt: skip
    return out


def check_redis_server() -> Check:
    """redis-server on PATH (the Redis tests and local Redis VDB use it)."""
    path = shutil.which("redis-server")
    if path is None:
        return Check("redis-server", WARN, "not on PATH: Redis tests skip",
                     "sudo apt-get install -y redis-server")  # fmt: skip
    return Check("redis-server", OK, path)


# -- all of it ---------------------------------------------------------------------------------


def run_checks(config: str | None = None) -> list[Check]:
    """Every environment check, then the config's (when given)."""
    checks = [check_python(), check_numpy(), check_numba(), check_rocksdict()]
    cupy = check_cupy()
    checks += check_onnx(gpu_visible=cupy.status == OK)
    checks += [cupy, check_nvcc()]
    checks += check_triton()
    checks += check_perf()
    checks.append(check_redis_server())
    if config:
        from .doctor_config import check_config

        checks += check_config(config)
    else:
        from .doctor_config import size
        from .vdb.shm import shm_dir

        shm = shm_dir()
        st = os.statvfs(shm) if shm.is_dir() else None
        free = st.f_bavail * st.f_frsize if st else 0
        checks.append(Check(str(shm), OK if st else WARN, f"{size(free)} free" if st else
                            "missing: multi_process_hash_map cannot run", "" if st else
                            "sudo mount -t tmpfs -o size=8G tmpfs /dev/shm"))  # fmt: skip
    from .doctor_config import check_shm_pages

    checks.append(check_shm_pages())
    return checks


def report(checks: list[Check], print_line: Callable[[str], None]) -> None:
    """One line per check (and its fix), then the counts."""
    colour = {OK: "green", WARN: "yellow", FAIL: "red"}
    width = max(len(c.name) for c in checks)
    for c in checks:
        line = f"[{colour[c.status]}]{c.status:<4}[/] {c.name:<{width}}  {c.detail}"
        if c.fix:
            line += f"\n     {'':<{width}}  [dim]fix:[/] {c.fix}"
        print_line(line)
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    print_line(", ".join(f"{n} {s}" for s, n in counts.items()))


def as_json(checks: list[Check]) -> dict:
    """The checks as a JSON-able dict, with ``ok`` false when any check failed."""
    return {"ok": all(c.status != FAIL for c in checks), "checks": [asdict(c) for c in checks]}
