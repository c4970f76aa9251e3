"""``hps doctor --config``: a config's files, Redis addresses and memory against its estimate."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from .config import split_address
from .doctor import FAIL, OK, WARN, Check
from .vdb.shm import shm_dir

REDIS_TIMEOUT_S = 1.0


def redis_ping(host: str, port: int, password: str = "", user: str = "default",
               timeout: float = REDIS_TIMEOUT_S) -> str:  # fmt: skip
    """PING a Redis server over a raw socket; returns its reply line (``+PONG`` when healthy)."""

    def command(*args: str) -> bytes:
        parts = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = a.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(parts)

    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        f = s.makefile("rb")
        if password:
            s.sendall(command("AUTH", user, password))
            reply = f.readline().decode(errors="replace").strip()
            if not reply.startswith("+"):
                return reply
        s.sendall(command("PING"))
        return f.readline().decode(errors="replace").strip()


def check_redis_address(address: str, password: str = "", user: str = "default") -> Check:
    """One Redis endpoint answers PING within REDIS_TIMEOUT_S."""
    name = f"redis {address}"
    hp = split_address(address)
    if hp is None:
        return Check(name, FAIL, "not host:port", "set volatile_db.address to host:port[,...]")
    host, port = hp
    try:
        reply = redis_ping(host, port, password, user)
    except OSError as e:
        return Check(name, FAIL, f"unreachable within {REDIS_TIMEOUT_S:.0f} s ({e})",
                     f"start it (redis-server --port {port}) or fix volatile_db.address")  # fmt: skip
    if reply == "+PONG":
        return Check(name, OK, "PING -> PONG", data={"reply": reply})
    return Check(
        name, FAIL, f"PING -> {reply!r}", "set volatile_db.user_name / password", {"reply": reply}
    )


def check_config(path: str) -> list[Check]:
    """The config loads, its files and Redis addresses are there, its memory fits."""
    from .config import load_config
    from .errors import HPSError, ModelFileError
    from .model_io import SparseTable

    if not os.path.isfile(path):
        return [Check("config", FAIL, f"{path}: no such file",
                      "pass an existing hps.json/.yaml (hps synth DIR writes an example)")]  # fmt: skip
    try:
        cfg = load_config(path)
    except HPSError as e:
        return [Check("config", FAIL, str(e), f"edit {path} (the field named above)")]
    out = [Check("config", OK, f"{path}: {len(cfg.models)} model(s)")]
    files_ok = True
    for m in cfg.models:
        bad, rows = [], 0
        for t, p in enumerate(m.sparse_files):
            try:
                with SparseTable.open(p, m.embedding_vecsize_per_table[t]) as f:
                    rows += f.rows
            except ModelFileError as e:
                bad.append(str(e))
        if bad:
            files_ok = False
            out.append(Check(f"sparse files {m.model}", FAIL, "; ".join(bad),
                             f"fix sparse_files in {path} or write them (hps synth)"))  # fmt: skip
        else:
            out.append(Check(f"sparse files {m.model}", OK,
                             f"{len(m.sparse_files)} tables, {rows:,} rows"))  # fmt: skip
    p = cfg.persistent_db
    if p.type != "disabled":
        if os.path.isdir(p.path):
            out.append(Check("rocksdb path", OK, p.path))
        elif p.read_only:
            out.append(Check("rocksdb path", FAIL, f"{p.path} missing and read_only is set",
                             f"hps load {path}  (with read_only: false) or fix persistent_db.path"))  # fmt: skip
        else:
            parent = Path(p.path).parent
            writable = next((d for d in (parent, *parent.parents) if d.exists()), Path("/"))
            if os.access(writable, os.W_OK):
                out.append(Check("rocksdb path", WARN, f"{p.path} missing: hps load creates it",
                                 f"hps load {path}"))  # fmt: skip
            else:
                out.append(Check("rocksdb path", FAIL, f"{p.path} missing, {writable} not writable",
                                 f"mkdir -p {p.path} (as a user who may) or fix persistent_db.path"))  # fmt: skip
    v = cfg.volatile_db
    if v.type == "redis_cluster":
        out += [check_redis_address(a, v.password, v.user_name) for a in v.addresses()]
    if files_ok:
        out += check_memory(cfg)
        if p.type != "disabled" and not p.read_only:
            out.append(check_disk(cfg))
    return out


def check_disk(cfg) -> Check:
    """Free disk space where RocksDB lives against the tables' estimate (``pdb_bytes``). The
    database's own files count as room: a reload rewrites them. Compactions write the files
    they merge before deleting the old ones, so under 1.5x the estimate is a warning."""
    from .estimate import estimate_config

    path = Path(cfg.persistent_db.path)
    est = sum(e.pdb_bytes for e in estimate_config(cfg))
    where = next(d for d in (path, *path.parents) if d.exists())
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    held = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
    have = free + held
    detail = f"{size(free)} free at {where} (+{size(held)} of its database), estimate {size(est)}"
    data = {"path": str(where), "free_bytes": free, "own_bytes": held, "estimate_bytes": est}
    if have < est:
        c = Check("rocksdb disk", FAIL, detail, "free disk space there or move "
                  "persistent_db.path to a larger disk (a full disk stops hps load)")  # fmt: skip
    elif have < 1.5 * est:
        c = Check("rocksdb disk", WARN, detail + " (< 50% headroom for compactions)",
                  "free disk space there or move persistent_db.path to a larger disk")  # fmt: skip
    else:
        c = Check("rocksdb disk", OK, detail)
    c.data = data
    return c


def shared_room(cfg) -> tuple[int, int]:
    """(free bytes, bytes of this config's own tables) where a ``multi_process_hash_map``
    VDB keeps its files (``shm_dir()``): a load replaces its own tables, so both are room."""
    d = shm_dir()
    if not d.is_dir():  # some minimal containers have no /dev/shm at all
        return 0, 0
    st = os.statvfs(d)
    prefix = cfg.volatile_db.shared_memory_name + "."
    held = sum(f.stat().st_size for f in d.glob(prefix + "*") if f.is_file())
    return st.f_bavail * st.f_frsize, held


def check_memory(cfg) -> list[Check]:
    """/dev/shm (multi_process_hash_map) or host RAM against ``hps estimate``."""
    import psutil

    from .estimate import estimate_config

    est = estimate_config(cfg)
    vdb = sum(e.vdb_bytes for e in est)
    host_l1 = sum(e.l1_bytes for e in est if e.l1_device == "host")
    rocksdb = sum(e.pdb_host_bytes for e in est)
    sketches = sum(e.admission_bytes for e in est)
    out = []
    if cfg.volatile_db.type == "multi_process_hash_map":
        free, held = shared_room(cfg)
        have = free + held
        detail = f"{size(free)} free (+{size(held)} of its own tables), estimate {size(vdb)}"
        data = {"free_bytes": free, "own_bytes": held, "estimate_bytes": vdb}
        d = shm_dir()
        if have < vdb:
            out.append(Check(str(d), FAIL, detail, f"sudo mount -o remount,size="
                             f"{int(vdb * 1.2 / 2**30) + 1}G {d} (docker: --shm-size)"))  # fmt: skip
        elif have < 1.2 * vdb:
            out.append(Check(str(d), WARN, detail + " (< 20% headroom)",
                             f"sudo mount -o remount,size={int(vdb * 1.5 / 2**30) + 1}G {d}"))  # fmt: skip
        else:
            out.append(Check(str(d), OK, detail))
        out[-1].data = data
        vdb = 0  # not in the process's own memory
    need = vdb + host_l1 + rocksdb + sketches
    avail = psutil.virtual_memory().available
    parts = "VDB + host L1 + RocksDB" + (" + L1 admission sketches" if sketches else "")
    detail = f"{size(avail)} available, estimate {size(need)} ({parts})"
    if need > avail:
        out.append(Check("host memory", FAIL, detail, "lower initial_cache_rate, use "
                         "storage_dtype float16, bfloat16 or int8, or a larger machine"))  # fmt: skip
    else:
        out.append(Check("host memory", OK, detail))
    out[-1].data = {"available_bytes": avail, "estimate_bytes": need}
    return out


def mount_of(path: Path, mounts: str) -> tuple[str, str, dict[str, str]] | None:
    """(mount point, filesystem type, options) of the mount holding ``path``, from the text of
    /proc/mounts (the longest mount point that is a prefix of the resolved path)."""
    target = str(path.resolve())
    best = None
    for line in mounts.splitlines():
        f = line.split()
        if len(f) < 4:
            continue
        point = f[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):  # the last mount wins
            opts = dict(o.partition("=")[::2] for o in f[3].split(","))
            best = (point, f[2], opts)
    return best


HUGE_MAPPED = ("always", "within_size")  # tmpfs huge= values that map our files with 2 MiB pages


def check_shm_pages(path: Path | None = None, mounts: Path = Path("/proc/mounts")) -> Check:
    """Whether the tmpfs holding the shared VDB (``HPS_SHM_DIR``, /dev/shm) gives its files
    huge pages: with 4 KiB pages a random row read of a large table also misses the TLB."""
    if path is None:
        path = shm_dir()  # where the VDB puts its files
    name = f"{path} pages"
    try:
        m = mount_of(path, mounts.read_text())
    except OSError as e:
        return Check(name, WARN, f"cannot read {mounts} ({e})")
    if m is None or m[1] != "tmpfs":
        kind = m[1] if m else "no mount found"
        return Check(name, OK, f"{kind}: not tmpfs, pages as that filesystem gives them",
                     data={"fstype": kind})  # fmt: skip
    point, _, opts = m
    huge = opts.get("huge", "never")
    data = {"mount": point, "huge": huge}
    if huge in HUGE_MAPPED:
        return Check(name, OK, f"tmpfs huge={huge}: shared tables map with 2 MiB pages", data=data)
    return Check(
        name, WARN,
        f"tmpfs huge={huge}: shared tables map with 4 KiB pages, so random row reads also miss "
        "the TLB (multi_process_hash_map fetch at dim 128 ran at 0.85-0.99x the rate of a "
        "table in process memory; README)",
        f"sudo mount -o remount,huge=within_size {point} (then reload the tables)", data=data,
    )  # fmt: skip


def size(n: float) -> str:
    """Bytes as MiB below 1 GiB, else GiB."""
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"
