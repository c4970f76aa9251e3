"""What the Triton ``hps`` backend does, without Triton: model parameters -> a parameter server,
request tensors -> output tensors or an error that names the field.

Two kinds of I/O (the model parameter ``io``):

``hps``
    HugeCTR's HPS backend: ``KEYS`` INT64 (every table's keys concatenated) and ``NUMKEYS``
    INT32 (one count per table) -> ``OUTPUT0`` FP32, the vectors flattened in key order.
``slots``
    for an ensemble: categorical features ``[B, slots]`` INT64 (slot j is looked up in table j)
    -> embeddings ``[B, sum of the tables' dims]`` FP32, ready for the dense model. Requests
    that Triton's dynamic batcher hands over together are answered with one lookup for all
    (``LookupSession.lookup_columns``).

The backend's ``execute`` is a loop over requests calling :meth:`EmbeddingService.run`; bad
requests come back as :class:`~hps_core.errors.InvalidInputError` (Triton: ``INVALID_ARG``)
and never disturb the other requests of the batch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from .config import HPSConfig, load_config
from .errors import ConfigError, HPSError, InvalidInputError
from .server import ParameterServer
from .session import LEVELS, LookupSession, LookupStats

log = logging.getLogger(__name__)

IO_KINDS = ("hps", "slots")


def _flag(params: dict[str, str], name: str, default: bool) -> bool:
    value = params.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"parameters.{name}", value, "true or false")


def backend_config(argv: list[str], backend: str = "hps") -> dict[str, str]:
    """The settings tritonserver's command line ``argv`` gives a backend:
    ``--backend-config=<backend>,<setting>=<value>`` (or the flag and its value as two
    arguments), and settings without a backend name, which apply to every backend. HugeCTR's
    HPS backend took its hps.json as ``--backend-config=hps,ps=<path>``."""
    out: dict[str, str] = {}
    for i, a in enumerate(argv):
        if a.startswith("--backend-config="):
            spec = a.split("=", 1)[1]
        elif a == "--backend-config" and i + 1 < len(argv):
            spec = argv[i + 1]
        else:
            continue
        head, sep, rest = spec.partition(",")
        if sep and "=" not in head:  # <backend>,<setting>=<value>
            if head != backend:
                continue
            spec = rest
        name, eq, value = spec.partition("=")
        if eq:
            out[name] = value
    return out


def server_backend_config(backend: str = "hps", pid: int | None = None) -> dict[str, str]:
    """``backend_config`` of the tritonserver that started this process (a Python backend stub
    is its child), with a relative ``ps`` path made absolute against the server's working
    directory; empty when that command line cannot be read (not under Triton, not Linux)."""
    pid = os.getppid() if pid is None else pid
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return {}
    cfg = backend_config(argv, backend)
    if cfg.get("ps") and not os.path.isabs(cfg["ps"]):
        cfg["ps"] = os.path.join(cwd, cfg["ps"])
    return cfg


def serving_config(
    path: str | os.PathLike, model: str | None, *, preloaded: bool, model_dir: Path | None = None
) -> tuple[HPSConfig, str]:
    """The config a backend instance serves, and the model name in it.

    Only the selected model is loaded. ``preloaded``: ``hps load`` already filled the tiers, so
    this process opens RocksDB read-only (several instances can) and does not copy rows into
    the VDB again (a shared-memory VDB is attached as it is).
    """
    p = Path(path)
    if not p.is_absolute() and model_dir is not None:
        p = model_dir / p
    cfg = load_config(p)
    names = [m.model for m in cfg.models]
    if model is None:
        if len(names) != 1:
            raise ConfigError("parameters.model", None, f"one of {names} (the config has several)")
        model = names[0]
    if model not in names:
        raise ConfigError("parameters.model", model, f"a model of {p}: one of {names}")
    cfg.models = [m for m in cfg.models if m.model == model]
    if preloaded:
        cfg.persistent_db = dataclasses.replace(cfg.persistent_db, read_only=True)
        cfg.volatile_db = dataclasses.replace(cfg.volatile_db, initialize_after_startup=False)
        if cfg.update_source.type == "redis_stream":
            # Another process (`hps ingest`, or the launcher) applies updates to the shared VDB
            # and RocksDB; this one follows RocksDB as a secondary and keeps its own L1 caches
            # fresh (scope "cache": a consumer group of its own, see server_ingestors).
            if cfg.persistent_db.type == "rocks_db" and not cfg.persistent_db.secondary_path:
                secondary = tempfile.mkdtemp(prefix="hps-rocksdb-secondary-")
                cfg.persistent_db = dataclasses.replace(cfg.persistent_db, secondary_path=secondary)
            cfg.update_source = dataclasses.replace(cfg.update_source, scope="cache")
    return cfg, model


class EmbeddingService:
    """One Triton model instance's parameter server and request handling.

    Args:
        config: our config or HugeCTR's hps.json (path), or a loaded config.
        model: the model of the config to serve (default: its only model).
        io: ``"hps"`` (KEYS/NUMKEYS -> OUTPUT0) or ``"slots"`` ([B, slots] -> [B, dims]).
        max_keys: most keys one request may carry (default: the config's
            ``max_batch_size * sum(maxnum_catfeature_query_per_table_per_sample)``).
        output_on_device: answer with rows left on the GPU (CuPy arrays, handed to Triton by
            DLPack) where the model's L1 caches are on one (``LookupSession.device``); host
            arrays otherwise, or when False.
        warm_up: compile the host kernels of every request and update path now, on scratch
            copies of the model's parts (``hps_core.warmup``), instead of in the first
            requests that take each path. A failure is logged; the kernels then compile on
            first use.
    """

    def __init__(
        self,
        config: HPSConfig,
        model: str,
        io: str = "hps",
        max_keys: int | None = None,
        output_on_device: bool = False,
        warm_up: bool = True,
    ):
        if io not in IO_KINDS:
            raise ConfigError("parameters.io", io, f"one of {IO_KINDS}")
        self.io = io
        self.server = ParameterServer(config)
        self.session: LookupSession = self.server.session(model)
        self.model = model
        m = next(x for x in self.server.config.models if x.model == model)
        if max_keys is not None and (isinstance(max_keys, bool) or int(max_keys) < 1):
            raise ConfigError("parameters.max_keys", max_keys, "an integer >= 1")
        self.max_keys = int(max_keys) if max_keys is not None else m.max_keys_per_request()
        self.dims = [t.dim for t in self.session.tables]
        self.on_device = bool(output_on_device) and self.session.device.eligible
        self.warm_up_seconds: float | None = None
        if warm_up:
            self.warm_up()

    def warm_up(self) -> None:
        """Compile (or load from numba's disk cache) the kernels requests and updates run."""
        from .warmup import warm_up

        try:
            self.warm_up_seconds = warm_up(self.session, self.io, self.max_keys)
        except Exception as e:  # serving works without it: the kernels compile on first use
            log.warning("%s: kernel warm-up failed (%s); kernels compile on first use",
                        self.model, e)  # fmt: skip
            return
        if self.warm_up_seconds is not None:
            log.info("%s: kernels ready in %.1f s", self.model, self.warm_up_seconds)

    @classmethod
    def from_parameters(
        cls,
        params: dict[str, str],
        model_dir: str | os.PathLike | None = None,
        server: dict[str, str] | None = None,
    ) -> EmbeddingService:
        """Build from a Triton model's string parameters (``config``, ``model``, ``io``, ...).

        The config is the model's parameter ``config`` (or ``ps``), else the server's
        ``--backend-config=hps,ps=<path>`` (``server``: those settings, read from the server's
        command line when None), else env ``HPS_CONFIG``."""
        path = params.get("config") or params.get("ps")
        if not path:
            server = server_backend_config() if server is None else server
            path = server.get("ps") or os.environ.get("HPS_CONFIG")
        if not path:
            raise ConfigError(
                "parameters.config",
                None,
                "the path of an hps.json or our YAML/JSON config (or the server's "
                "--backend-config=hps,ps=<path>, or env HPS_CONFIG)",
            )
        cfg, model = serving_config(
            path,
            params.get("model") or None,
            preloaded=_flag(params, "preloaded", False),
            model_dir=Path(model_dir) if model_dir else None,
        )
        max_keys = params.get("max_keys")
        try:
            max_keys_n = int(max_keys) if max_keys not in (None, "") else None
        except ValueError:
            max_keys_n = 0
        if max_keys_n is not None and max_keys_n < 1:  # 0 meant the default; -5 refused all
            raise ConfigError("parameters.max_keys", max_keys, "an integer >= 1") from None
        return cls(
            cfg,
            model,
            io=params.get("io", "hps"),
            max_keys=max_keys_n,
            output_on_device=_flag(params, "output_on_device", False),
            warm_up=_flag(params, "warm_up", True),
        )

    # -- requests -----------------------------------------------------------------------------
    def run_hps(self, keys: np.ndarray, num_keys: np.ndarray) -> np.ndarray:
        """KEYS + NUMKEYS -> OUTPUT0 (flat float32): HugeCTR's HPS backend I/O."""
        keys, num_keys = np.asarray(keys), np.asarray(num_keys)
        if keys.size > self.max_keys:
            raise InvalidInputError("KEYS", f"{keys.size} keys", f"at most {self.max_keys}")
        # HugeCTR clients send [1, n] tensors: any leading dimensions of size 1 are dropped
        keys = _squeeze("KEYS", keys)
        num_keys = _squeeze("NUMKEYS", num_keys)
        out, _ = self.session.lookup_concatenated(
            keys, num_keys, stats=False, on_device=self.on_device
        )
        return out

    def run_slots(
        self, batches: list[np.ndarray], on_device: bool | None = None
    ) -> list[np.ndarray | HPSError]:
        """Each request's CAT [B, slots] -> [B, sum(dims)] float32, one lookup for all requests.

        A bad request gets its error in its place in the list; the others are answered.
        ``on_device``: with GPU L1 caches the rows stay on the device (CuPy arrays), see
        ``LookupSession.lookup_columns``; None: as the service was built (``output_on_device``).
        """
        if on_device is None:
            on_device = self.on_device
        results: list[np.ndarray | HPSError | None] = [None] * len(batches)
        good: list[tuple[int, np.ndarray]] = []
        for i, cat in enumerate(batches):
            try:
                good.append((i, self._check_slots(np.asarray(cat))))
            except HPSError as e:
                results[i] = e
        if good:
            allcat = np.concatenate([c for _, c in good]) if len(good) > 1 else good[0][1]
            emb = self._lookup_slots(allcat, on_device)
            start = 0
            for i, c in good:
                results[i] = emb[start : start + len(c)]
                start += len(c)
        return results  # type: ignore[return-value]

    def _check_slots(self, cat: np.ndarray) -> np.ndarray:
        slots = len(self.session.tables)
        if cat.dtype.kind not in "iu":
            raise InvalidInputError("CAT", f"dtype {cat.dtype}", "INT64 categorical features")
        if cat.ndim != 2 or cat.shape[1] != slots:
            raise InvalidInputError("CAT", f"shape {list(cat.shape)}", f"[batch, {slots}]")
        if cat.size > self.max_keys:
            raise InvalidInputError("CAT", f"{cat.size} keys", f"at most {self.max_keys}")
        if cat.dtype == np.uint64 and cat.size and int(cat.max()) > np.iinfo(np.int64).max:
            raise InvalidInputError("CAT", "a key >= 2**63", "keys that fit in INT64")
        return cat.astype(np.int64, copy=False)

    def _lookup_slots(self, cat: np.ndarray, on_device: bool = False) -> np.ndarray:
        return self.session.lookup_columns(cat, on_device=on_device)

    # -- metrics ------------------------------------------------------------------------------
    def table_stats(self) -> dict[str, LookupStats]:
        """Cumulative statistics per table (keys per level, seconds per stage)."""
        return {t.name: t.stats for t in self.session.tables}

    def close(self) -> None:
        self.server.close()


def _squeeze(field: str, a: np.ndarray) -> np.ndarray:
    if a.ndim > 1 and all(d == 1 for d in a.shape[:-1]):
        return a.reshape(-1)
    if a.ndim != 1:
        raise InvalidInputError(field, f"shape {list(a.shape)}", "[n] or [1, n]")
    return a


__all__ = ["IO_KINDS", "LEVELS", "EmbeddingService", "serving_config"]
