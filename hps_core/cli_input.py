"""What the ``hps`` subcommands check in their arguments before they act: keys, files, ranges."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import HPSError, ModelFileError
from .model_io import read_key_text

INT64_MAX = 2**63 - 1
log = logging.getLogger(__name__)


def run_reporting_errors(run: Callable[[], int], also: tuple[type[BaseException], ...] = ()) -> int:
    """``run()``'s status, or 2 after one ``error:`` line on stderr (stdout is the command's
    output: tables, JSON) for what a user can fix: an HPSError, a path they gave (OSError), a
    file that is not text, and the exception types in ``also``. No traceback (``-v`` logs it)."""
    try:
        return run()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM where the command turned it into one
        print("interrupted", file=sys.stderr)
        return 130
    except HPSError as e:
        message = str(e)
    except MemoryError as e:  # sizes past this machine (numpy says how much it wanted)
        log.info("the MemoryError's traceback", exc_info=True)
        message = f"not enough memory: {e or 'an allocation failed'}"
    except OSError as e:  # a path the user gave: missing, a directory, not permitted...
        log.info("the OSError's traceback", exc_info=True)
        message = os_error(e)
    except UnicodeDecodeError as e:  # a file the user gave is not text
        log.info("the UnicodeDecodeError's traceback", exc_info=True)
        message = f"a file is not UTF-8 text ({e})"
    except also as e:
        log.info("the traceback", exc_info=True)
        message = str(e)
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(
        f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True, emoji=False
    )
    return 2


def check_limits(args: argparse.Namespace) -> None:
    """The numeric options lie in the ranges their subcommand declared (``limits``)."""
    for dest, (least, most) in getattr(args, "limits", {}).items():
        value = getattr(args, dest)
        if value is None:  # not given, no default
            continue
        if not least <= value <= (most if most is not None else value):  # NaN fails too
            kind = "a number" if isinstance(value, float) else "an integer"
            bounds = f">= {least}" if most is None else f"in [{least}, {most}]"
            raise HPSError(f"--{dest.replace('_', '-')} {value}: expected {kind} {bounds}")


def model_name(text: str) -> str:
    """argparse type of a model name: it names a directory (a Triton model, a table's files)
    and a part of the stored table names, so letters, digits, '_' and '-' only."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected letters, digits, '_' and '-' (a directory and model name)"
        )
    return text


MAX_DIM = 1 << 20
"""The widest row the commands that make tables accept (HugeCTR's largest are a few thousand)."""


def limits(**ranges: int | tuple[int, int]) -> dict[str, tuple[int, int | None]]:
    """``limits`` of a subcommand: dest=least or dest=(least, most)."""
    return {d: r if isinstance(r, tuple) else (r, None) for d, r in ranges.items()}


def read_keys_file(path: str) -> list[int]:
    """The keys of a text file, one per line (blank lines and ``#`` comments skipped)."""
    if not Path(path).exists():
        raise HPSError(f"--keys-file {path}: no such file")
    if not Path(path).is_file() and not Path(path).is_dir():  # a FIFO or a device: it would hang
        raise HPSError(f"--keys-file {path}: not a regular file")
    try:
        return read_key_text(path).tolist()
    except ModelFileError as e:
        raise HPSError(f"--keys-file {e}") from None


def read_npz_rows(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrays 'keys' (integers in int64) and 'vectors' [len(keys), dim] of an .npz file."""
    p = Path(path)
    if not p.is_file():
        raise HPSError(f"--npz {path}: {'is a directory' if p.is_dir() else 'no such file'}")
    try:
        data = np.load(p, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise HPSError(f"--npz {path}: a single .npy array, expected an .npz archive")
        with data:
            missing = [a for a in ("keys", "vectors") if a not in data.files]
            if missing:
                raise HPSError(
                    f"--npz {path}: no array {', '.join(map(repr, missing))}; it holds "
                    f"{data.files}, expected 'keys' and 'vectors'"
                )
            keys, vectors = data["keys"], data["vectors"]
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise HPSError(f"--npz {path}: not a readable .npz archive ({e})") from None
    if keys.ndim != 1 or keys.dtype.kind not in "iu":
        raise HPSError(
            f"--npz {path}: 'keys' is {keys.dtype} {list(keys.shape)}: expected 1-D int64"
        )
    if len(keys) == 0:
        raise HPSError(f"--npz {path}: 'keys' is empty: expected at least one row")
    if keys.dtype.kind == "u" and int(keys.max()) > INT64_MAX:
        raise HPSError(f"--npz {path}: 'keys' holds {int(keys.max())}: expected int64 keys")
    if vectors.dtype.kind not in "fiu" or vectors.ndim != 2 or vectors.shape[1] < 1:
        raise HPSError(
            f"--npz {path}: 'vectors' is {vectors.dtype} {list(vectors.shape)}: expected a "
            "float [n, dim] array"
        )
    if len(vectors) != len(keys):
        raise HPSError(
            f"--npz {path}: {len(keys)} keys and {len(vectors)} vectors: expected one vector per key"
        )
    return keys.astype(np.int64), vectors


def os_error(e: OSError) -> str:
    """An OSError as 'path: reason', the way a shell says it."""
    where = f"{e.filename}: " if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}: "
    return f"{where}{e.strerror or e}"


def writable_dir(path: str, what: str) -> None:
    """Fail early when ``path`` exists but is not a directory (``what`` says which one)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise HPSError(f"{path}: exists and is not a directory; expected {what}")


def check_dense_onnx(path: str, slots: int | None = None, dim: int | None = None) -> None:
    """``--onnx`` must be an ONNX model with the dense inputs the ensemble feeds, and, given
    the config's tables (``slots`` of ``dim``), an EMB input as wide and a PROB output."""
    from .dense import DENSE_INPUT, EMB_INPUT, check_ensemble_io, describe_onnx
    from .errors import ModelFileError

    try:
        io = describe_onnx(path)
    except ModelFileError as e:
        raise HPSError(f"--onnx {e}") from None
    names = [i.name for i in io.inputs]
    missing = [n for n in (DENSE_INPUT, EMB_INPUT) if n not in names]
    if missing:
        raise HPSError(
            f"--onnx {path}: no input {', '.join(map(repr, missing))}; its inputs are {names}, "
            f"expected {DENSE_INPUT!r} [B, 13] and {EMB_INPUT!r} [B, slots * dim] (`hps dense`)"
        )
    if slots is not None and dim is not None:
        try:
            check_ensemble_io(io, path, slots, dim)
        except ModelFileError as e:
            raise HPSError(f"--onnx {e}") from None
