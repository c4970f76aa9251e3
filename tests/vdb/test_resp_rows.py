"""The HMGET reply parser of the Redis VDB's fetch against replies built by hand."""

from __future__ import annotations

import numpy as np
import pytest

from hps_core.vdb import _resp as R

WIDTH = 8


def reply(rows, null=b"$-1\r\n"):
    out = b"*%d\r\n" % len(rows)
    for r in rows:
        out += null if r is None else b"$%d\r\n%s\r\n" % (len(r), r)
    return out


def parse(wire: bytes, counts, sel, chunk: int):
    """Feed wire in pieces of ``chunk`` bytes, as recv_into would."""
    n = len(sel)
    counts = np.asarray(counts, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    rows = np.zeros((n, WIDTH), np.uint8)
    found = np.zeros(n, bool)
    state = np.array([0, -1, 0], np.int64)
    err = np.full((len(counts), 2), -1, np.int64)
    buf = np.frombuffer(wire, np.uint8)
    status = R.MORE
    for end in [*range(chunk, len(wire), chunk), len(wire)]:
        status = R.parse_rows(buf, end, state, counts, np.asarray(sel), starts, rows, found, err)
        if status != R.MORE:
            break
    return status, rows, found, err, state


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 10**6])
@pytest.mark.parametrize("null", [b"$-1\r\n", b"_\r\n"])  # RESP2, RESP3
def test_rows_land_at_their_positions_whatever_the_pieces(chunk, null):
    rng = np.random.default_rng(chunk)
    vals = [rng.integers(0, 256, WIDTH, dtype=np.uint8).tobytes() for _ in range(7)]
    # one value holds CR LF and '$' bytes: only lengths frame a value
    vals[2] = b"\r\n$-1\r\n*"
    first = [vals[0], None, vals[1], vals[2]]
    second = [None, vals[3], vals[4]]
    third = [vals[5], vals[6]]
    sel = [6, 0, 3, 8, 1, 5, 2, 4, 7]  # where each field's row goes
    wire = reply(first, null) + reply(second, null) + reply(third, null)
    status, rows, found, err, _ = parse(wire, [4, 3, 2], sel, chunk)
    assert status == R.DONE
    fields = first + second + third
    for pos, v in zip(sel, fields, strict=True):
        assert found[pos] == (v is not None)
        expect = np.frombuffer(v, np.uint8) if v is not None else np.zeros(WIDTH, np.uint8)
        np.testing.assert_array_equal(rows[pos], expect)
    assert (err == -1).all()


def test_an_error_reply_is_kept_and_the_next_reply_still_parsed():
    v = b"A" * WIDTH
    wire = b"-MOVED 3999 127.0.0.1:6381\r\n" + reply([v, None])
    status, rows, found, err, _ = parse(wire, [1, 2], [2, 0, 1], 5)
    assert status == R.DONE
    assert wire[err[0, 0] : err[0, 1]] == b"MOVED 3999 127.0.0.1:6381"
    assert (err[1] == -1).all()
    np.testing.assert_array_equal(found, [True, False, False])
    assert rows[0].tobytes() == v


def test_a_row_of_another_width_or_a_foreign_reply_is_refused():
    status, *_ = parse(reply([b"x" * (WIDTH + 1)]), [1], [0], 10**6)
    assert status == R.BAD_WIDTH
    status, *_, state = parse(b":5\r\n", [1], [0], 10**6)
    assert status == R.BAD and state[0] == 0
    status, *_ = parse(reply([b"x" * WIDTH, None]), [3], [0, 1, 2], 10**6)  # 2 fields, not 3
    assert status == R.BAD


def test_reply_bytes_bounds_the_largest_reply():
    counts = np.array([3, 1])
    full = reply([b"x" * WIDTH] * 3) + b"-" + b"E" * 400 + b"\r\n"
    assert len(full) <= R.reply_bytes(counts, WIDTH)


@pytest.mark.parametrize(
    "n, parts, max_batch", [(0, 3, 10), (1, 1, 1), (1000, 7, 64), (3000, 2, 5000)]
)
def test_hmget_commands_equal_the_per_argument_encoding(n, parts, max_batch):
    rng = np.random.default_rng(n)
    keys = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64)
    keys[: n // 10] = np.arange(-(n // 20), n // 10 - n // 20)  # small keys, negative ones too
    hkeys = [f"hps_et{{t/p{p}}}v" for p in range(parts)]
    raw = [R.bulk("HMGET") + R.bulk(hk) for hk in hkeys]
    head_at = np.cumsum([0] + [len(b) for b in raw])
    heads = np.frombuffer(b"".join(raw), np.uint8)
    perm = rng.permutation(parts)  # the partitions in node order
    wire, at, part, lo, hi, order, first = R.hmget_commands(
        keys, parts, max_batch, heads, head_at, perm
    )
    # reference: group by partition (batch order kept), chunk, encode argument by argument
    by_part = R.group_keys(keys, parts)
    expected, expected_sel, expected_first = [], [], []
    for p in perm:
        sel = by_part[0][by_part[1][p] : by_part[1][p + 1]]
        expected_first.append(len(expected))
        for s in range(0, len(sel), max_batch):
            chunk = sel[s : s + max_batch]
            args = [
                b"HMGET",
                hkeys[p].encode(),
                *(int(k).to_bytes(8, "little", signed=True) for k in keys[chunk]),
            ]
            expected.append((p, b"*%d\r\n" % len(args) + b"".join(R.bulk(a) for a in args)))
            expected_sel.append(chunk)
    assert len(part) == len(expected) and at[-1] == len(wire)
    assert first.tolist() == [*expected_first, len(expected)]
    if len(expected):  # a node's keys are one slice of order: the commands' in turn
        assert lo[0] == 0 and hi[-1] == n and (lo[1:] == hi[:-1]).all()
    for c, (p, cmd) in enumerate(expected):
        assert part[c] == p
        assert wire[at[c] : at[c + 1]].tobytes() == cmd
        assert np.array_equal(order[lo[c] : hi[c]], expected_sel[c])
