"""Query windows (engine/windows.py) as pure functions of arrays."""
from __future__ import annotations

import numpy as np

from ea_local.engine.windows import QueryWindow


def _q(pos, layers=(0, 3)):
    pos = np.asarray(pos)
    return {il: np.repeat(pos.astype(np.float32)[:, None, None] + il, 2, axis=1) for il in layers}


def test_push_keeps_the_newest_and_extends_or_replaces():
    w = QueryWindow()
    w.push(_q([1, 2, 3]), np.array([1, 2, 3]), keep=4)
    w.push(_q([4, 5]), np.array([4, 5]), keep=4)
    assert w.pos.tolist() == [2, 3, 4, 5] and w.q[3][:, 0, 0].tolist() == [5, 6, 7, 8] and len(w) == 4
    w.push(_q([9]), np.array([9]), keep=4, extend=False)
    assert w.pos.tolist() == [9] and w.q[0].shape == (1, 2, 1)
    w.push(_q([10]), np.array([10]), keep=0)
    assert len(w) == 0 and all(len(q) == 0 for q in w.q.values())


def test_last_truncate_remap_copy():
    w = QueryWindow(_q([3, 5, 8, 9]), np.array([3, 5, 8, 9]))
    last = w.last(2)
    assert last.pos.tolist() == [8, 9] and last.q[0][:, 0, 0].tolist() == [8, 9]
    last.pos[0] = -7
    assert w.pos[2] == 8  # a copy
    w.remap({3: 0, 8: 1, 9: 2})  # 5 was dropped by the compaction
    assert w.pos.tolist() == [0, -1, 1, 2]
    c = w.copy(layers=[3])
    w.truncate(1)
    assert w.pos.tolist() == [0, -1] and w.q[3][:, 0, 0].tolist() == [6, 8]
    assert list(c.q) == [3] and c.pos.tolist() == [0, -1, 1, 2] and c.covers([3]) and not c.covers([0, 3])
