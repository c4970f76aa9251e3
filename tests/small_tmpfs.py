"""Run a command with HPS_SHM_DIR on a small tmpfs of its own, to fill it up for real.

The tmpfs is mounted in a private mount namespace (``unshare -rm``): no privilege is needed
where user namespaces are allowed, and nothing outside the command sees it. Inside, the command
may grow it (``mount -o remount,size=...``), as an operator who frees room would.
"""

from __future__ import annotations

import os
import subprocess

import pytest


def in_small_tmpfs(cmd: str, mib: int = 8, timeout: float = 300,
                   over: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
    """``cmd`` with HPS_SHM_DIR on a new tmpfs of ``mib`` MiB; with ``over`` (e.g. /dev/shm, as
    a Docker container has it) the tmpfs is mounted over that directory instead, for every
    process of the command, and HPS_SHM_DIR is left as it was."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace for a small tmpfs: {probe.stderr.strip()}")
    if over:
        script = f"mount -t tmpfs -o size={mib}m tmpfs {over} && {cmd}"
    else:
        script = (f'd=$(mktemp -d) && mount -t tmpfs -o size={mib}m tmpfs "$d" && '
                  f'export HPS_SHM_DIR="$d" && {cmd}')  # fmt: skip
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))  # fmt: skip


def grow(directory: str, mib: int) -> None:
    """Give the tmpfs at ``directory`` more room (inside the command)."""
    subprocess.run(["mount", "-o", f"remount,size={mib}m", directory], check=True)
