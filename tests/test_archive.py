"""The recall archive and its selection rules as pure functions of arrays (no model)."""
from __future__ import annotations

import numpy as np
import pytest

from ea_local.engine.archive import Archive, plan_swap, pool_spans
from ea_local.engine.recall import max_attention_share


def _rows(pos, layers=(0, 3), kb=6, vb=4):
    pos = np.asarray(pos)
    return {il: (np.repeat((pos % 251).astype(np.uint8)[:, None] + il, kb, axis=1),
                 np.repeat((pos % 251).astype(np.uint8)[:, None] + 2 * il, vb, axis=1)) for il in layers}


def _digest(pos, layers=(3,)):
    pos = np.asarray(pos, dtype=np.float32)
    return {il: np.stack([pos, -pos], axis=1)[:, None, :] for il in layers}


def test_add_take_keeps_rows_with_their_cells():
    a = Archive((0, 3))
    a.add([10, 11, 12], [100, 101, 102], _rows([10, 11, 12]), _digest([10, 11, 12]))
    a.add([40, 5], [140, 105], _rows([40, 5]), _digest([40, 5]))
    assert len(a) == 5
    assert a.bytes_per_token == (6 + 4) * 2 + 2 * 4  # raw rows of two layers + one float32 digest (1 head x 2)
    assert a.nbytes == 5 * a.bytes_per_token
    pos, rot, tok, rows, dig, rec = a.take([3, 0])  # positions 40 and 10: returned in position order
    assert pos.tolist() == [10, 40] and rot.tolist() == [10, 40] and tok.tolist() == [100, 140]
    assert rows[3][0][:, 0].tolist() == [13, 43] and rows[0][1][:, 0].tolist() == [10, 40]
    assert dig[3][:, 0, 0].tolist() == [10, 40]
    assert rec.tolist() == [1, 1]
    assert sorted(a.pos.tolist()) == [5, 11, 12] and len(a.k[0]) == 3 and len(a.digest[3]) == 3
    np.testing.assert_array_equal(a.k[0][:, 0], a.pos % 251)


def test_bounds_drop_least_recalled_then_oldest():
    a = Archive((0,), max_tokens=4)
    a.add([1, 2, 3], [1, 2, 3], _rows([1, 2, 3], (0,)), {}, recalls=[0, 2, 0])
    dropped = a.add([7, 8], [7, 8], _rows([7, 8], (0,)), {})
    assert dropped == 1 and a.dropped == 1
    assert sorted(a.pos.tolist()) == [2, 3, 7, 8]  # position 1: never recalled and oldest
    a.add([9], [9], _rows([9], (0,)), {})
    assert sorted(a.pos.tolist()) == [2, 7, 8, 9]  # then 3; 2 was recalled twice and stays
    b = Archive((0,), max_bytes=3 * 10)  # 10 bytes a cell
    b.add(np.arange(5), np.arange(5), _rows(np.arange(5), (0,)), {})
    assert b.pos.tolist() == [2, 3, 4]


def test_remap_truncate_copy():
    a = Archive((0,))
    a.add([5, 9, 20], [1, 2, 3], _rows([5, 9, 20], (0,)), {})
    a.remap([0, 5, 9, 15, 20], [0, 1, 2, 3, 4])
    assert a.pos.tolist() == [1, 2, 4] and a.rotated_at.tolist() == [5, 9, 20]
    with pytest.raises(ValueError):
        a.remap([0, 1], [0, 1])
    c = a.copy()
    assert a.truncate(3) == 1 and a.pos.tolist() == [1, 2]
    assert c.pos.tolist() == [1, 2, 4] and len(c.k[0]) == 3


def test_pool_spans_over_archived_neighbours_only():
    pos = np.array([30, 10, 11, 12, 50, 13])
    s = np.array([0.0, 0.0, 5.0, 0.0, 1.0, 0.0])
    out = pool_spans(pos, s, radius=2)
    assert out.tolist() == [0.0, 5.0, 5.0, 5.0, 1.0, 5.0]
    assert pool_spans(pos, s, 0).tolist() == s.tolist()


def test_plan_swap_fills_room_then_replaces_weaker_live_cells():
    arch = np.array([0.9, 0.1, 0.5, 0.7])
    live = np.array([0.3, 0.05, 0.6, 0.2])
    ok = np.array([True, True, True, False])
    back, out = plan_swap(arch, live, ok, room=1, max_recall=10)
    # 0.9 -> free cell; 0.7 replaces 0.05; 0.5 replaces 0.3; 0.1 < 0.6 stops
    assert back.tolist() == [0, 3, 2] and out.tolist() == [1, 0]
    back, out = plan_swap(arch, live, ok, room=0, max_recall=1)
    assert back.tolist() == [0] and out.tolist() == [1]
    back, out = plan_swap(np.array([0.01]), live, ok, room=5, max_recall=10)
    assert back.tolist() == [] and out.tolist() == []  # weaker than every live cell: not even into free room


def test_max_attention_share_finds_the_key_one_query_wants():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(50, 1, 8)).astype(np.float32)
    q = rng.normal(size=(20, 2, 8)) * 0.1
    q[7, 1] = keys[33, 0] * 4  # one query of the group looks for cell 33
    s = max_attention_share(q, keys, 1.0)
    assert s.argmax() == 33 and s.max() > 0.9
    assert np.all((s >= 0) & (s <= 1))


def test_appending_reuses_the_buffer_and_keeps_earlier_views():
    a = Archive((0,))
    a.add([1, 2], [11, 12], _rows([1, 2], layers=(0,)), _digest([1, 2]))
    first_pos, first_k = a.pos, a.k[0]
    a.add([3], [13], _rows([3], layers=(0,)), _digest([3]))
    assert a.pos.base is first_pos.base and a.k[0].base is first_k.base  # no copy of the archive
    assert first_pos.tolist() == [1, 2] and a.pos.tolist() == [1, 2, 3] and a.tokens.tolist() == [11, 12, 13]
    a.take([0])
    a.add([4], [14], _rows([4], layers=(0,)), _digest([4]))
    assert a.pos.tolist() == [2, 3, 4] and a.digest[3][:, 0, 0].tolist() == [2, 3, 4]
    c = a.copy()
    c.add([5], [15], _rows([5], layers=(0,)), _digest([5]))
    assert a.pos.tolist() == [2, 3, 4] and c.pos.tolist() == [2, 3, 4, 5]


def test_buffers_stay_within_the_bound():
    """Growing in place never holds more than the bound plus one batch: the host memory the --archive
    limit promises."""
    a = Archive((0,), max_tokens=100)
    for start in range(0, 1000, 30):
        pos = list(range(start, start + 30))
        a.add(pos, pos, _rows(pos, layers=(0,)), _digest(pos))
        assert len(a) <= 100
        for arr in (a.pos, a.k[0], a.v[0], a.digest[3]):
            assert len(arr.base if arr.base is not None else arr) <= 100 + 30
    assert sorted(a.pos.tolist()) == list(range(920, 1020)) and a.dropped == 920  # the oldest go first
