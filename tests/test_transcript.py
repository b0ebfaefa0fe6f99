"""The session's transcript (engine/transcript.py) as a pure function of the tokens fed."""
from __future__ import annotations

from ea_local.engine.transcript import Transcript


def test_record_renumber_truncate():
    t = Transcript()
    t.record([10, 11, 12, 13, 14], 0)
    t.record([15, 16], 5)
    # a compaction kept the cells at positions 0, 3, 5, 6 (1, 2 and 4 were evicted): ranks 0..3
    t.renumber([0, 3, 5, 6])
    assert t.positions == [0, 1, 1, 1, 2, 2, 3]  # an evicted token takes the rank of the next kept cell
    assert t.tokens == [10, 11, 12, 13, 14, 15, 16]
    t.record([17], 4)
    t.truncate(2)  # cells at positions >= 2 dropped: the tokens that sit there go too
    assert t.tokens == [10, 11, 12, 13] and t.positions == [0, 1, 1, 1] and len(t) == 4


def test_copy_is_independent():
    t = Transcript([5, 6], [0, 1])
    c = t.copy()
    c.record([7], 2)
    assert t.tokens == [5, 6] and t.positions == [0, 1] and c.tokens == [5, 6, 7] and c.positions == [0, 1, 2]
