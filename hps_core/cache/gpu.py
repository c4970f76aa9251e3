"""The L1 embedding cache on a GPU: CuPy arrays owned here, our CUDA kernels in ``kernels/``.

Semantics
    Set-associative mode (the default) is ``cache/reference.py`` on the device: the same
    ``num_sets``, set hash, clock, LRU/LFU stamps, insert order and fp16/bf16 rounding, so
    ``snapshot()`` compares with the reference slot by slot. ``static=True`` is a different
    table (HPS's static cache): open addressing with linear probing over a power-of-two slot
    array at least twice the row capacity, no eviction; ``insert`` raises ``CacheFullError``
    (and changes nothing) when the new keys would not fit.

Kernels (``kernels/cache.cu``, ``kernels/static_table.cu``, helpers in ``kernels/slot.cuh``)
    ``find``: one warp per key; lane w reads way w's state word and key, ``__ballot_sync``
    picks the way, then the warp copies the row with 16-byte loads when ``dim`` is a multiple
    of 16 bytes' worth of elements and ``out`` is 16-byte aligned, element by element otherwise.
    Rows of at most 32 such chunks (dim <= 128 fp32, 256 fp16/bf16) are held in registers, one
    chunk a lane, and written to ``out`` once the seqlock check has passed
    (``cache_find<S, O, 1>``, 32 registers: 64 warps per SM). An LRU hit whose stamp already
    holds the call's clock (a hot key touched earlier in the call) is not stored again.
    ``insert``: a stable device argsort of the keys keeps each key's last occurrence; one warp
    per key overwrites and touches the cached ones (reference step 2); a stable argsort of the
    set indices then gives each set to one warp, which places that set's new keys in batch
    order, choosing victims from the set's stamps held in registers (reference step 3).

Concurrency: a per-slot seqlock
    Each slot has a 32-bit state word: bit 0 LOCK, bit 1 OCC (occupied), bit 2 TOMB (static
    table: erased), bits 3.. a version. A writer (insert, assign, erase) takes LOCK with
    ``atomicCAS`` (the word is "odd"), ``__threadfence()``, writes key and row,
    ``__threadfence()``, then stores the word with the version advanced (``st.release``). A
    reader (find, contains) loads the word with ``ld.acquire``, ignores locked slots, loads key
    and row with ``ld.relaxed.gpu`` (L2-coherent, never a stale L1 line), ``fence.acq_rel``,
    and reloads the word: if any lane saw a different word it retries (up to 128 times, with a
    nanosleep back-off) and then reports a miss. The set-associative ``find`` probes all ways'
    words and keys with relaxed loads at once (a hint) and then reads the matched slot as
    above: every lane acquires its word (equal to the probed one), lane 0 loads the key again
    with the row, and after the fence the hit stands only if the word is unchanged and the
    key is still the one looked up. So ``find`` on one stream concurrent with
    ``insert``/``assign`` on another never returns a torn row or another key's row; a key
    being rewritten may read as a miss (its row of a caller's ``out`` is then zeroed). Stamps
    are outside the seqlock (a touch racing an eviction may land on the new key). Writers must
    be ordered among themselves (one stream, or synchronised): two concurrent inserts could
    place one key twice.

Arrays in, arrays out
    Keys and vectors may be NumPy or CuPy arrays. CuPy in -> CuPy out, nothing copied to the
    host (``erase``, ``size`` and static ``insert`` return or need a count, which synchronises).
    NumPy in -> NumPy out. Every verb takes ``stream`` (a ``cupy.cuda.Stream``; default: the
    current stream). CuPy is imported when a cache is constructed, not when this module is.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import numpy as np

from ..errors import ConfigError, HPSError, InvalidInputError, StorageError
from .base import EmbeddingCache
from .reference import DTYPES, POLICIES, check_keys, check_vectors

KERNEL_DIR = Path(__file__).with_name("kernels")
OUTPUT_DTYPES = ("float32", "float16")
NVRTC_OPTIONS = ("-std=c++17",)
_KIND = {"float32": 0, "float16": 1, "bfloat16": 2}  # Kind in slot.cuh
_VEC = {"float32": 4, "float16": 8, "bfloat16": 8}  # stored elements per 16 bytes
_OCC, _FLAGS_BITS = 2, 3  # slot.cuh: OCC, and the version starts at bit 3
_BLOCK = 256  # threads per block; cache_find is compiled for at most 256 (__launch_bounds__)
_INT64_MAX = np.iinfo(np.int64).max


def _template(name: str, *params: tuple[int, ...]) -> list[str]:
    return [f"{name}<{', '.join(map(str, p))}>" for p in params]


_S = [(s,) for s in range(3)]
_SO = [(s, o) for s in range(3) for o in range(2)]
_SOR = [(s, o, r) for s in range(3) for o in range(2) for r in range(2)]
KERNELS: dict[str, tuple[list[str], list[str]]] = {
    # file -> (template instances as NVRTC name expressions, extern "C" kernels)
    "cache.cu": (
        _template("cache_find", *_SOR)
        + [n for k in ("update", "place", "assign", "erase") for n in _template(f"cache_{k}", *_S)]
        + _template("gather_rows", *_S),
        ["cache_contains", "cache_set_index", "mark_last", "scatter_missing"],
    ),
    "static_table.cu": (
        _template("static_find", *_SO)
        + _template("static_insert", *_S)
        + _template("static_assign", *_S),
        ["static_contains", "static_classify", "static_erase"],
    ),
}
"""Every kernel gpu.py launches; the compile test instantiates exactly these."""


class GPUUnavailableError(HPSError, ImportError):
    """CuPy or a CUDA device is missing."""


class CacheFullError(StorageError):
    """A static GPU table has no room for an insert's new keys."""


def kernel_source(file: str) -> str:
    """A kernels/*.cu file with slot.cuh pasted over its #include (CuPy caches by source text)."""
    header = (KERNEL_DIR / "slot.cuh").read_text()
    return re.sub(
        r'^#include "slot\.cuh"$', lambda _: header, (KERNEL_DIR / file).read_text(), flags=re.M
    )


def _import_cupy(device: int):
    try:
        import cupy
    except ImportError as e:
        raise GPUUnavailableError(
            f"GPUCache needs CuPy ({e}); install cupy-cuda12x or cupy-cuda13x to match the "
            "CUDA driver, or use the host cache on machines without a GPU"
        ) from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or the driver is older than CuPy's CUDA
        raise GPUUnavailableError(f"GPUCache: no usable CUDA device ({e})") from e
    if not 0 <= device < count:
        raise ConfigError("device", device, f"a CUDA device index in [0, {count})")
    return cupy


_NO_CONTEXT = contextlib.nullcontext()
_I32 = (np.int32(0), np.int32(1))
_modules: dict[str, object] = {}  # file -> cupy.RawModule (it compiles once per device)
_functions: dict[tuple[str, str], object] = {}  # (file, name) -> cupy.RawKernel


class GPUCache(EmbeddingCache):
    """L1 embedding cache in GPU memory: set-associative LRU/LFU, or a static hash table.

    Args:
        capacity: rows; set-associative mode rounds up to ``num_sets * ways`` (``capacity``
            is then that), a static table holds exactly this many.
        dim: floats per row.
        ways: slots per set, 1..32 (one warp lane each); ignored by a static table.
        policy: ``"lru"`` or ``"lfu"`` eviction; ignored by a static table.
        dtype: storage, ``"float32"``, ``"float16"`` or ``"bfloat16"`` (rounded to nearest even).
        device: CUDA device index; every array and kernel of the cache lives there.
        static: an open-addressing table that never evicts (``insert`` raises
            ``CacheFullError`` when full) instead of the set-associative cache.
        output_dtype: rows returned by ``find``, ``"float32"`` or ``"float16"``.
    """

    def __init__(
        self,
        capacity: int,
        dim: int,
        ways: int = 32,
        policy: str = "lru",
        dtype: str = "float32",
        device: int = 0,
        static: bool = False,
        output_dtype: str = "float32",
    ):
        for field, value in (("capacity", capacity), ("dim", dim), ("ways", ways)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(field, value, "an integer >= 1")
        if ways > 32:
            raise ConfigError("ways", ways, "at most 32 (one warp lane per way)")
        if static and capacity >= 2**32:
            raise ConfigError("capacity", capacity, "< 2**32 rows for a static table")
        if policy not in POLICIES:
            raise ConfigError("policy", policy, f"one of {POLICIES}")
        if dtype not in DTYPES:
            raise ConfigError("dtype", dtype, f"one of {DTYPES}")
        if output_dtype not in OUTPUT_DTYPES:
            raise ConfigError("output_dtype", output_dtype, f"one of {OUTPUT_DTYPES}")
        cp = self._cp = _import_cupy(int(device))
        self.device, self.static = int(device), bool(static)
        self.dim, self.ways, self.policy, self.dtype = int(dim), int(ways), policy, dtype
        self.output_dtype = output_dtype
        self.clock = 0
        self._kind, self._lfu = _KIND[dtype], np.int32(policy == "lfu")
        self._out_kind = OUTPUT_DTYPES.index(output_dtype)
        self._out_dt = np.dtype(output_dtype)
        storage = cp.float32 if dtype == "float32" else cp.uint16
        with cp.cuda.Device(self.device) as dev:
            self._max_blocks = dev.attributes["MultiProcessorCount"] * 32
            if self.static:
                self.capacity = int(capacity)
                self.table_slots = slots = 1 << max(6, (2 * self.capacity - 1).bit_length())
                self._aux = self._row_of = cp.zeros(slots, cp.uint32)
                self._free_rows = cp.zeros(self.capacity, cp.uint32)
                self._values = cp.zeros((self.capacity, self.dim), storage)
                where: tuple = (np.uint64(slots - 1),)
                self._next_row = self._free_top = self._size = 0
            else:
                self.num_sets = max(1, math.ceil(capacity / ways))
                self.capacity = slots = self.num_sets * self.ways
                self._aux = self._stamp = cp.zeros(slots, cp.uint64)
                self._values = cp.zeros((slots, self.dim), storage)
                where = (np.uint64(self.num_sets), np.int32(self.ways))
            self._keys = cp.zeros(slots, cp.int64)
            self._state = cp.zeros(slots, cp.uint32)
        # what every kernel of the mode takes after its batch arguments (see the .cu headers)
        self._view = (self._keys, self._state, self._aux, self._values, *where, np.int32(dim))
        self._file = "static_table.cu" if self.static else "cache.cu"
        self._prefix = "static" if self.static else "cache"
        self._row_vec = self.dim % _VEC[dtype] == 0  # stored rows are whole 16-byte chunks
        # find kernels by vec (rows copied 16 bytes at a time); cache_find's third parameter:
        # 1 when a lane holds its row chunk in registers (vec and at most 32 chunks of 16 bytes)
        if self.static:
            names = [f"static_find<{self._kind}, {self._out_kind}>"] * 2
        else:
            regs = int(self._row_vec and self.dim // _VEC[dtype] <= 32)
            names = [f"cache_find<{self._kind}, {self._out_kind}, {r}>" for r in (0, regs)]
        self._find_names = names
        self._find_fns: list = [None, None]  # their cupy functions, looked up at first use
        for file in {self._file, "cache.cu"}:
            if file not in _modules:
                _modules[file] = cp.RawModule(
                    code=kernel_source(file),
                    options=NVRTC_OPTIONS,
                    name_expressions=KERNELS[file][0],
                )

    # -- plumbing -------------------------------------------------------------------------------
    def _launch(self, name: str, items: int, per_warp: bool, *args, file: str = "") -> None:
        """Runs a grid-stride kernel over items (warps or threads) on the current stream."""
        if items <= 0:
            return
        file = file or self._file
        kernel = _functions.get((file, name))
        if kernel is None:
            kernel = _functions[file, name] = _modules[file].get_function(name)
        per_block = _BLOCK // 32 if per_warp else _BLOCK
        kernel((min(-(-items // per_block), self._max_blocks),), (_BLOCK,), args)

    def _on(self, stream):
        """Context: this cache's device current, and stream (if given) the current stream."""
        if self._cp.cuda.runtime.getDevice() == self.device:  # nothing to switch
            return _NO_CONTEXT if stream is None else stream
        ctx = contextlib.ExitStack()
        ctx.enter_context(self._cp.cuda.Device(self.device))
        if stream is not None:
            ctx.enter_context(stream)
        return ctx

    def _keys_in(self, keys) -> tuple[object, bool]:
        """(int64 keys on the device, whether they came as a CuPy array)."""
        cp = self._cp
        if not isinstance(keys, cp.ndarray):
            return cp.asarray(np.ascontiguousarray(check_keys(keys))), False
        if keys.dtype.kind not in "iu":
            raise InvalidInputError(
                "keys", f"dtype {keys.dtype}", "an integer array (int64, int32, uint32)"
            )
        if keys.ndim != 1:
            raise InvalidInputError("keys", f"shape {keys.shape}", "a 1-D array")
        if keys.dtype == np.int64 and keys.flags.c_contiguous:
            return keys, True  # what ascontiguousarray would return
        if keys.dtype == cp.uint64 and keys.size and bool((keys > _INT64_MAX).any()):
            raise InvalidInputError("keys", "a uint64 key >= 2**63", "keys that fit in int64")
        return cp.ascontiguousarray(keys, dtype=cp.int64), True

    def _vectors_in(self, vectors, n: int) -> tuple[object, np.int32]:
        """(fp32 [n, dim] C-contiguous on the device, whether rows can be read 16 bytes at once)."""
        cp = self._cp
        if not isinstance(vectors, cp.ndarray):
            v = cp.asarray(np.ascontiguousarray(check_vectors(vectors, n, self.dim)))
        elif vectors.dtype.kind != "f":
            raise InvalidInputError("vectors", f"dtype {vectors.dtype}", "a floating-point array")
        else:
            if vectors.size == 0 and n == 0:
                vectors = vectors.reshape(0, self.dim)
            if vectors.shape != (n, self.dim):
                raise InvalidInputError(
                    "vectors", f"shape {vectors.shape}", f"shape ({n}, {self.dim}): one row per key"
                )
            v = cp.ascontiguousarray(vectors, dtype=cp.float32)
        return v, np.int32(self.dim % 4 == 0 and v.data.ptr % 16 == 0)

    def _out_in(self, out, n: int, on_device: bool) -> tuple[object, int]:
        """(device rows to write, zero_miss): a fresh zeroed-on-miss array unless out is CuPy."""
        cp, shape, dt = self._cp, (n, self.dim), self._out_dt
        if out is not None:
            kind = cp.ndarray if on_device else np.ndarray
            if not isinstance(out, kind) or out.dtype != dt:
                side = "CuPy" if on_device else "NumPy"
                raise InvalidInputError("out", type(out).__name__, f"a {dt} {side} array")
            if out.shape != shape:
                raise InvalidInputError("out", f"shape {out.shape}", str(shape))
            if on_device:
                if not out.flags.c_contiguous:
                    raise InvalidInputError("out", "a strided array", "a C-contiguous array")
                return out, 0
        return cp.empty(shape, dt), 1

    def _last_occurrence(self, keys):
        """bool [n]: whether each position is its key's last occurrence in the batch."""
        n = len(keys)
        order = self._cp.argsort(keys, kind="stable")  # equal keys stay in batch order
        keep = self._cp.empty(n, self._cp.bool_)
        self._launch("mark_last", n, False, order, keys, np.int64(n), keep, file="cache.cu")
        return keep

    # -- find -------------------------------------------------------------------------------------
    def _find(self, keys, out):
        """(on_device, the caller's NumPy out or None, device rows, device hit): one lookup."""
        cp = self._cp
        k, on_device = self._keys_in(keys)
        n = len(k)
        rows, zero_miss = self._out_in(out, n, on_device)
        hit = cp.empty(n, cp.bool_)
        self._find_launch(k, rows, hit, zero_miss)
        return on_device, (None if on_device else out), rows, hit

    def _find_launch(self, k, rows, hit, zero_miss: int) -> None:
        """One find kernel on the current stream: k int64 [n], rows [n, dim] of the output
        dtype and hit bool [n], all C-contiguous on this cache's device."""
        n = len(k)
        self.clock += 1
        if not n:
            return
        vec = int(self._row_vec and rows.data.ptr % 16 == 0)
        kernel = self._find_fns[vec]
        if kernel is None:
            key = (self._file, self._find_names[vec])
            kernel = _functions.get(key)
            if kernel is None:
                kernel = _functions[key] = _modules[self._file].get_function(key[1])
            self._find_fns[vec] = kernel
        touch = () if self.static else (self._lfu, np.uint64(self.clock))
        args = (k, np.int64(n), *self._view, rows, hit, _I32[vec], _I32[zero_miss], *touch)
        blocks = min(-(-n // (_BLOCK // 32)), self._max_blocks)
        kernel((blocks,), (_BLOCK,), args)  # as _launch(name, n, True, *args)

    def find_into(self, keys, out, hit) -> None:
        """``find`` for callers that hold device arrays already (``hps_core/device.py``): keys
        int64 [n], out [n, dim] in the output dtype and hit bool [n], C-contiguous CuPy arrays
        on this cache's device, which must be current. Nothing is checked or allocated; hits'
        rows go to out (misses keep theirs), hit says which."""
        self._find_launch(keys, out, hit, 0)

    def _finish_find(self, on_device, host_out, rows, hit):
        if on_device:
            return rows, hit
        rows, hit = rows.get(), hit.get()
        if host_out is None:
            return rows, hit
        host_out[hit] = rows[hit]  # a miss leaves its row of out as it was
        return host_out, hit

    def find(self, keys, out=None, stream=None):
        """Look up keys -> (rows [n, dim] in output_dtype, hit bool [n]); hits are touched."""
        with self._on(stream):
            return self._finish_find(*self._find(keys, out))

    def find_missing(self, keys, out=None, stream=None):
        """find() plus the misses' positions, computed on the device.

        Returns (rows, hit, missing_index, missing_count): missing_index int64 [n] holds the
        positions of the misses in batch order in its first missing_count entries and -1 after;
        missing_count is a 0-d int64 array (CuPy on the CuPy path: no synchronisation).
        """
        cp = self._cp
        with self._on(stream):
            on_device, host_out, rows, hit = self._find(keys, out)
            n = len(hit)
            missing = cp.full(n, -1, cp.int64)
            count = cp.zeros((), cp.int64)
            if n:
                cum = cp.cumsum(~hit, dtype=cp.int64)
                args = (hit, cum, np.int64(n), missing)
                self._launch("scatter_missing", n, False, *args, file="cache.cu")
                count = cum[-1]
            rows, hit = self._finish_find(on_device, host_out, rows, hit)
            if on_device:
                return rows, hit, missing, count
            return rows, hit, missing.get(), count.get()

    # -- writers ------------------------------------------------------------------------------------
    def insert(self, keys, vectors, stream=None) -> None:
        """Insert or overwrite rows (last duplicate wins), evicting by the policy in full sets."""
        cp = self._cp
        with self._on(stream):
            k, _ = self._keys_in(keys)
            n = len(k)
            v, vec = self._vectors_in(vectors, n)
            if self.static:
                self._static_insert(k, v, vec)
                return
            self.clock += 1
            if n == 0:
                return
            keep = self._last_occurrence(k)
            is_new = cp.empty(n, cp.uint8)
            policy = (vec, self._lfu, np.uint64(self.clock))
            n64 = np.int64(n)
            # reference step 2: cached keys overwritten and touched
            self._launch(f"cache_update<{self._kind}>", n, True, k, v, keep, n64, *self._view,
                         *policy, is_new)  # fmt: skip
            # reference step 3: one warp per set, its new keys in batch order
            sets = cp.empty(n, cp.int64)
            self._launch("cache_set_index", n, False, k, n64, self._view[4], sets)
            order = cp.argsort(sets, kind="stable")
            self._launch(f"cache_place<{self._kind}>", -(-n // 32), True, k, v, is_new, order,
                         sets[order], n64, *self._view, *policy)  # fmt: skip

    def _static_insert(self, k, v, vec) -> None:
        cp, n = self._cp, len(k)
        if n == 0:
            self.clock += 1
            return
        keep = self._last_occurrence(k)
        kind = cp.empty(n, cp.uint8)  # 0 duplicate, 1 new, 2 cached
        self._launch("static_classify", n, True, k, keep, np.int64(n), *self._view, kind)
        new = int(cp.count_nonzero(kind == 1))
        if self._size + new > self.capacity:
            raise CacheFullError(
                f"static GPU table (device {self.device}): insert of {new} new keys with "
                f"{self._size} of {self.capacity} rows used; nothing was inserted"
            )
        self.clock += 1
        counters = cp.zeros(2, cp.uint64)  # rows handed out, keys that found no slot
        rows = (self._free_rows, np.uint64(self._free_top), np.uint64(self._next_row), counters)
        self._launch(f"static_insert<{self._kind}>", n, True, k, v, kind, np.int64(n),
                     *self._view, vec, *rows)  # fmt: skip
        failed = int(counters[1])
        reused = min(new, self._free_top)
        self._free_top -= reused
        self._next_row += new - reused
        self._size += new - failed
        if failed:
            raise StorageError(f"static GPU table: {failed} keys found no free slot (a bug)")

    def assign(self, keys, vectors, stream=None):
        """Overwrite cached keys only (no touch, last duplicate wins); bool [n] of which were."""
        with self._on(stream):
            k, on_device = self._keys_in(keys)
            n = len(k)
            v, vec = self._vectors_in(vectors, n)
            cached = self._cp.empty(n, self._cp.bool_)
            if n:
                keep = self._last_occurrence(k)
                self._launch(f"{self._prefix}_assign<{self._kind}>", n, True, k, v, keep,
                             np.int64(n), *self._view, vec, cached)  # fmt: skip
            return cached if on_device else cached.get()

    def erase(self, keys, stream=None) -> int:
        """Remove keys; returns how many distinct keys were cached (synchronises)."""
        with self._on(stream):
            k, _ = self._keys_in(keys)
            n = len(k)
            if n == 0:
                return 0
            counter = self._cp.zeros(1, self._cp.uint64)
            if self.static:
                extra: tuple = (self._free_rows, np.uint64(self._free_top), counter)
                name = "static_erase"
            else:
                extra, name = (counter,), f"cache_erase<{self._kind}>"
            self._launch(name, n, True, k, np.int64(n), *self._view, *extra)
            erased = int(counter[0])
            if self.static:
                self._free_top += erased
                self._size -= erased
            return erased

    def clear(self, stream=None) -> None:
        """Empty every slot (the clock keeps running; versions advance for concurrent readers)."""
        cp = self._cp
        with self._on(stream):
            self._keys.fill(0)
            self._state[...] = ((self._state >> _FLAGS_BITS) + cp.uint32(1)) << _FLAGS_BITS
            self._aux.fill(0)
            self._values.fill(0)
            if self.static:
                self._next_row = self._free_top = self._size = 0

    # -- readers without touch ----------------------------------------------------------------------
    def contains(self, keys, stream=None):
        """bool [n]: whether each key is cached (no touch, clock unchanged)."""
        with self._on(stream):
            k, on_device = self._keys_in(keys)
            n = len(k)
            found = self._cp.empty(n, self._cp.bool_)
            self._launch(f"{self._prefix}_contains", n, True, k, np.int64(n), *self._view, found)
            return found if on_device else found.get()

    def _gather(self, rows, m: int):
        """fp32 [m, dim] decoded from the stored rows (rows: int64 [m], -1 a zero row; None: all)."""
        out = self._cp.empty((m, self.dim), self._cp.float32)
        rows = np.uint64(0) if rows is None else rows  # a null pointer
        args = (self._values, rows, np.int64(m), np.int32(self.dim), out)
        self._launch(f"gather_rows<{self._kind}>", m * self.dim, False, *args, file="cache.cu")
        return out

    def _occupied(self):
        return (self._state & self._cp.uint32(_OCC)) != 0

    def export(self, on_device: bool = False, stream=None):
        """All cached rows as (keys int64 [n], fp32 vectors [n, dim]) in slot order."""
        cp = self._cp
        with self._on(stream):
            slots = cp.flatnonzero(self._occupied())
            keys = self._keys[slots]
            rows = self._row_of[slots].astype(cp.int64) if self.static else slots
            vectors = self._gather(rows, len(slots))
            return (keys, vectors) if on_device else (keys.get(), vectors.get())

    def size(self) -> int:
        """Number of cached rows."""
        if self.static:
            return self._size
        with self._on(None):
            return int(self._cp.count_nonzero(self._occupied()))

    def memory_bytes(self) -> int:
        """Bytes of the device arrays."""
        arrays = [self._keys, self._state, self._aux, self._values]
        return sum(a.nbytes for a in arrays) + (self._free_rows.nbytes if self.static else 0)

    def snapshot(self) -> dict[str, np.ndarray | int]:
        """Copies of the slot state as NumPy arrays (set-associative: the reference's layout).

        Set-associative: keys, occupied, stamp [num_sets, ways], fp32 values
        [num_sets, ways, dim], clock. Static: keys, occupied [table_slots], values
        [table_slots, dim] (zero rows where free), clock.
        """
        cp = self._cp
        with self._on(None):
            occupied = self._occupied()
            snap = {"keys": self._keys.get(), "occupied": occupied.get(), "clock": self.clock}
            if self.static:
                rows = cp.where(occupied, self._row_of.astype(cp.int64), -1)
                snap["values"] = self._gather(rows, self.table_slots).get()
                return snap
            shape = (self.num_sets, self.ways)
            snap["keys"] = snap["keys"].reshape(shape)
            snap["occupied"] = snap["occupied"].reshape(shape)
            snap["stamp"] = self._stamp.get().reshape(shape)
            snap["values"] = self._gather(None, self.capacity).get().reshape(*shape, self.dim)
            return snap

    def __repr__(self) -> str:
        mode = "static" if self.static else f"{self.ways}-way {self.policy}"
        return (
            f"GPUCache({mode}, capacity={self.capacity}, dim={self.dim}, dtype={self.dtype}, "
            f"device={self.device})"
        )
