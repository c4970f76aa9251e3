"""RESP wire encoding of the VDB's bulk commands, built with numpy instead of per-argument Python.

A command is an array of bulk strings: ``*<n>\\r\\n`` then ``$<len>\\r\\n<bytes>\\r\\n`` per
argument. Keys are 8-byte fields and rows have one fixed width per table, so every field (and
every field/value pair) of a batch is a fixed-size record that numpy writes in one pass. This
takes the client's encoding cost from ~1 us to a few ns per key.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..hash_kernels import copy_bytes, mix, order_by_part

CRLF = b"\r\n"
_FIELD_HEAD = np.frombuffer(b"$8\r\n", np.uint8)
_CRLF = np.frombuffer(CRLF, np.uint8)
FIELD_BYTES = 14  # one 8-byte field as a bulk string: $8 CRLF <8 bytes> CRLF


def bulk(arg: bytes | str | int | float) -> bytes:
    """One argument as a RESP bulk string."""
    if isinstance(arg, str):
        arg = arg.encode()
    elif not isinstance(arg, bytes):
        arg = repr(arg).encode() if isinstance(arg, float) else str(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def command(*args: bytes | str | int | float) -> bytes:
    """A whole command from a few scalar arguments."""
    return b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)


def head(n_args: int, *args: bytes | str | int | float) -> bytes:
    """The start of a command of ``n_args`` arguments whose first arguments are ``args``."""
    return b"*%d\r\n" % n_args + b"".join(bulk(a) for a in args)


def key_bytes(keys: np.ndarray) -> np.ndarray:
    """uint8 [n, 8]: little-endian int64 keys, the hash field names."""
    return np.ascontiguousarray(keys, dtype="<i8").view(np.uint8).reshape(-1, 8)


def fields(kb: np.ndarray, extra: bytes = b"") -> bytes:
    """Bulk strings of 8-byte fields, each optionally preceded by the bulk string ``extra``."""
    n = len(kb)
    e = len(extra)
    rec = np.empty((n, e + 14), np.uint8)
    if e:
        rec[:, :e] = np.frombuffer(extra, np.uint8)
    rec[:, e : e + 4] = _FIELD_HEAD
    rec[:, e + 4 : e + 12] = kb
    rec[:, e + 12 :] = _CRLF
    return rec.tobytes()


@njit(inline="always", cache=True)
def partition(key, parts):
    """Redis partition of a key: ``splitmix64(key) % parts``."""
    return np.int64(mix(key) % np.uint64(parts))


@njit(nogil=True, cache=True)
def group_keys(keys, parts):
    """Counting sort of key positions by Redis partition (``partition``):
    (order, starts[parts + 1]); batch order is kept within a partition."""
    part = np.empty(len(keys), np.int64)
    for i in range(len(keys)):
        part[i] = partition(keys[i], parts)
    return order_by_part(part, parts)


@njit(inline="always", cache=True)
def _write_count(wire, pos, v):
    """``*<v>\r\n`` at wire[pos:]; the position after it."""
    wire[pos] = 42  # '*'
    digits = 1
    t = v
    while t >= 10:
        t //= 10
        digits += 1
    for d in range(digits, 0, -1):
        wire[pos + d] = 48 + v % 10
        v //= 10
    wire[pos + digits + 1] = 13
    wire[pos + digits + 2] = 10
    return pos + digits + 3


@njit(nogil=True, cache=True)
def hmget_commands(keys, parts, max_batch, heads, head_at, perm):
    """Every HMGET of a fetch, encoded in one pass: the keys grouped by partition
    (``partition``; batch order kept within one, as ``group_keys``), at most ``max_batch``
    fields per command, partitions in the order ``perm`` (the partitions of one node next to
    each other, so a node's commands are one slice of the wire and its keys one slice of
    ``order``). ``heads[head_at[p]:head_at[p + 1]]`` holds partition p's first arguments
    (``$5 HMGET`` and its hash key, as bulk strings).

    Returns (wire, at, part, lo, hi, order, first): command c is wire[at[c]:at[c + 1]], reads
    partition part[c], and asks for keys[order[lo[c]:hi[c]]], in that order; the commands of
    partition perm[r] start at first[r] (first[parts] is the number of commands)."""
    rank = np.empty(parts, np.int64)
    for r in range(parts):
        rank[perm[r]] = r
    by_rank = np.empty(len(keys), np.int64)
    for i in range(len(keys)):
        by_rank[i] = rank[partition(keys[i], parts)]
    order, starts = order_by_part(by_rank, parts)
    n_cmd = 0
    size = 0
    for r in range(parts):
        p = perm[r]
        c = starts[r + 1] - starts[r]
        k = (c + max_batch - 1) // max_batch
        n_cmd += k
        size += k * (23 + head_at[p + 1] - head_at[p]) + FIELD_BYTES * c
    wire = np.empty(size, np.uint8)
    at = np.empty(n_cmd + 1, np.int64)
    part = np.empty(n_cmd, np.int64)
    lo = np.empty(n_cmd, np.int64)
    hi = np.empty(n_cmd, np.int64)
    first = np.empty(parts + 1, np.int64)
    pos = 0
    c = 0
    for r in range(parts):
        p = perm[r]
        first[r] = c
        for s in range(starts[r], starts[r + 1], max_batch):
            e = min(starts[r + 1], s + max_batch)
            at[c], part[c], lo[c], hi[c] = pos, p, s, e
            pos = _write_count(wire, pos, e - s + 2)
            for b in range(head_at[p], head_at[p + 1]):
                wire[pos] = heads[b]
                pos += 1
            for i in range(s, e):
                k = np.uint64(keys[order[i]])
                wire[pos], wire[pos + 1], wire[pos + 2], wire[pos + 3] = 36, 56, 13, 10  # $8
                for b in range(8):  # the key's 8 bytes, little-endian
                    wire[pos + 4 + b] = np.uint8((k >> np.uint64(8 * b)) & np.uint64(0xFF))
                wire[pos + 12], wire[pos + 13] = 13, 10
                pos += FIELD_BYTES
            c += 1
    first[parts] = c
    at[c] = pos
    return wire[:pos], at, part, lo, hi, order, first


def pairs(kb: np.ndarray, vb: np.ndarray) -> bytes:
    """Bulk strings field, value, field, value... for 8-byte fields and fixed-width values."""
    n, width = vb.shape
    vh = np.frombuffer(b"$%d\r\n" % width, np.uint8)
    h = len(vh)
    rec = np.empty((n, 14 + h + width + 2), np.uint8)
    rec[:, :4] = _FIELD_HEAD
    rec[:, 4:12] = kb
    rec[:, 12:14] = _CRLF
    rec[:, 14 : 14 + h] = vh
    rec[:, 14 + h : 14 + h + width] = vb
    rec[:, 14 + h + width :] = _CRLF
    return rec.tobytes()


# -- replies --------------------------------------------------------------------------------
# A fetch reads its HMGET replies straight from the socket into the output rows: a reply is
# ``*<m>\r\n`` then per field ``$<width>\r\n<row>\r\n`` or, for an absent field, ``$-1\r\n``
# (RESP2) or ``_\r\n`` (RESP3), so a numba loop can copy each row where it belongs. Parsing
# them into m Python bytes objects first cost about a microsecond per key, as much as the
# server's work.

DONE, MORE, BAD, BAD_WIDTH = 0, 1, 2, 3


@njit(inline="always", cache=True)
def _line_int(buf, pos, end):
    """(integer, position after its CRLF) of the line at pos; (0, -1) if the line is incomplete."""
    neg = False
    v = 0
    i = pos
    if i < end and buf[i] == 45:  # '-'
        neg = True
        i += 1
    while i < end and buf[i] != 13:
        v = v * 10 + (np.int64(buf[i]) - 48)
        i += 1
    if i + 1 >= end:
        return 0, -1
    return (-v if neg else v), i + 2


@njit(nogil=True, cache=True)
def parse_rows(buf, end, state, counts, sel, starts, rows, found, err):
    """Parse HMGET replies from buf[state[2]:end], resuming at command state[0], field state[1].

    Command c asked for counts[c] fields whose rows go to rows[sel[starts[c] + j]] (uint8
    [n, width]); found[...] says which were present. An error reply (``-...\\r\\n``) sets
    err[c] = (start, end) of its message and parsing goes on with the next command. Returns
    DONE, MORE (wait for more bytes; state says where to resume), BAD_WIDTH (a field of
    another width) or BAD (not a reply to HMGET); state[0] is then the command.
    """
    width = rows.shape[1]
    c, j, pos = state[0], state[1], state[2]
    while c < len(counts):
        if j < 0:  # the reply's header (or an error) is next
            if pos >= end:
                break
            if buf[pos] == 45:  # '-': an error reply
                e = pos + 1
                while e < end and buf[e] != 13:
                    e += 1
                if e + 1 >= end:
                    break
                err[c, 0], err[c, 1] = pos + 1, e
                pos = e + 2
                c += 1
                continue
            if buf[pos] != 42:  # not '*'
                state[0], state[1], state[2] = c, np.int64(buf[pos]), pos
                return BAD
            m, nxt = _line_int(buf, pos + 1, end)
            if nxt < 0:
                break
            if m != counts[c]:
                state[0], state[1], state[2] = c, m, pos
                return BAD
            pos = nxt
            j = 0
        while j < counts[c]:
            if pos >= end:
                break
            if buf[pos] == 95:  # '_': RESP3's null, an absent field
                if pos + 2 >= end:
                    break
                found[sel[starts[c] + j]] = False
                pos += 3
                j += 1
                continue
            if buf[pos] != 36:  # '$'
                state[0], state[1], state[2] = c, np.int64(buf[pos]), pos
                return BAD
            n, nxt = _line_int(buf, pos + 1, end)
            if nxt < 0:
                break
            i = sel[starts[c] + j]
            if n < 0:
                found[i] = False
                pos = nxt
            elif n != width:
                state[0], state[1], state[2] = c, n, pos
                return BAD_WIDTH
            else:
                if nxt + width + 2 > end:
                    break
                copy_bytes(rows, (i, 0), buf, (nxt,), width)
                found[i] = True
                pos = nxt + width + 2
            j += 1
        if j < counts[c]:
            break
        c += 1
        j = -1
    state[0], state[1], state[2] = c, j, pos
    return DONE if c == len(counts) else MORE


def reply_bytes(counts: np.ndarray, width: int) -> int:
    """The most bytes the HMGET replies of ``counts`` fields of ``width`` bytes can take (with
    room for an error message instead of any of them)."""
    per_field = len(b"$%d\r\n" % width) + width + 2
    return int(counts.sum()) * per_field + len(counts) * 512
