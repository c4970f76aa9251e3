"""The GPU cache's CUDA kernels compile for Hopper, and its module imports without CuPy.

Runs without a GPU: nvcc compiles each kernels/*.cu for sm_90 (through ptxas, so inline PTX
is checked too) with every template instance gpu.py launches, from the very text gpu.py hands
to NVRTC. nvcc is looked up in $NVCC, $PATH, $CUDA_HOME/bin, /usr/local/cuda/bin,
/usr/local/bin and in pip's layout (``pip install nvidia-cuda-nvcc``:
<site-packages>/nvidia/cu13/bin/nvcc).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from hps_core.cache.gpu import KERNEL_DIR, KERNELS, kernel_source
from hps_core.doctor import find_nvcc
from hps_core.errors import ConfigError

NVCC_MISSING = (
    "nvcc not found (looked in $NVCC, $PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, "
    "/usr/local/bin, <site-packages>/nvidia/cu13/bin): install the CUDA compiler, e.g. "
    "`pip install nvidia-cuda-nvcc` (CUDA 13; it brings nvidia-cuda-crt, nvidia-cuda-runtime "
    "and nvidia-nvvm) or a CUDA toolkit. Note nvidia-cuda-nvcc-cu12 ships ptxas only."
)


@pytest.fixture(scope="module")
def nvcc() -> str:
    path = find_nvcc()
    if path is None:
        pytest.fail(NVCC_MISSING)
    return path


def test_every_kernel_file_and_kernel_is_registered():
    files = sorted(p.name for p in KERNEL_DIR.glob("*.cu"))
    assert files == sorted(KERNELS), "add each kernels/*.cu to gpu.KERNELS"
    for file, (templates, plain) in KERNELS.items():
        defined = set(re.findall(r"__global__ void (\w+)\(", (KERNEL_DIR / file).read_text()))
        registered = {t.split("<")[0] for t in templates} | set(plain)
        assert defined == registered, file


@pytest.mark.parametrize("file", sorted(KERNELS))
def test_kernels_compile_for_sm90(nvcc, file, tmp_path):
    templates, plain = KERNELS[file]
    # Taking each kernel's address instantiates exactly the templates gpu.py names.
    refs = ",\n".join(f"  (void*)&{name}" for name in templates + plain)
    src = tmp_path / file
    src.write_text(f"{kernel_source(file)}\nvoid* hps_all_kernels[] = {{\n{refs}\n}};\n")
    cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-cubin", "-Werror", "all-warnings"]
    cmd += [str(src), "-o", str(tmp_path / "out.cubin")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
    cubin = (tmp_path / "out.cubin").read_bytes()
    for name in plain:
        assert name.encode() in cubin
    for name in {t.split("<")[0] for t in templates}:
        assert f"{len(name)}{name}I".encode() in cubin  # an Itanium-mangled instance


def test_kernel_files_compile_on_their_own(nvcc, tmp_path):
    for file in KERNELS:
        cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-c", f"-I{KERNEL_DIR}", str(KERNEL_DIR / file)]
        cmd += ["-o", str(tmp_path / f"{file}.o")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"


def test_module_imports_without_cupy_and_fails_on_construction():
    code = (
        "import sys; sys.modules['cupy'] = None\n"  # makes `import cupy` raise ImportError
        "import hps_core.cache.gpu as gpu\n"
        "try:\n"
        "    gpu.GPUCache(64, 8)\n"
        "except gpu.GPUUnavailableError as e:\n"
        "    assert isinstance(e, ImportError)\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('constructed without CuPy')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "GPUCache needs CuPy" in done.stdout and "cupy-cuda12x" in done.stdout


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"capacity": 0}, "capacity"),
        ({"dim": 0}, "dim"),
        ({"ways": 33}, "ways"),
        ({"policy": "fifo"}, "policy"),
        ({"dtype": "int8"}, "dtype"),
        ({"output_dtype": "bfloat16"}, "output_dtype"),
        ({"static": True, "capacity": 2**32}, "capacity"),
    ],
)
def test_bad_config_is_rejected_before_touching_a_device(kwargs, field):
    from hps_core.cache.gpu import GPUCache

    with pytest.raises(ConfigError, match=field):
        GPUCache(**{"capacity": 8, "dim": 2, **kwargs})


def test_kernel_source_pastes_the_shared_header():
    for file in KERNELS:
        text = kernel_source(file)
        assert '#include "slot.cuh"' not in text and "namespace hps {" in text
        # NVRTC gets no include path: the text must be self-contained
        assert not re.search(r"^\s*#\s*include", text, flags=re.M)
