"""Which cells a compression evicts, given the scores: no model needed."""
import numpy as np
import pytest

from ea_local.engine.session import BudgetError, scored_layers, select_evictions


def test_lowest_scores_go_sinks_and_recent_window_stay():
    pos = np.arange(20)
    scores = np.arange(20, 0, -1).astype(float)  # the newest cells score lowest
    # sinks 0..3 and the recent window 16..19 (next_pos 20, recent 4) are never chosen
    got = select_evictions(pos, scores, n_sink=4, recent=4, next_pos=20, n=5)
    assert got.tolist() == [11, 12, 13, 14, 15]


def test_positions_with_gaps_are_returned_sorted():
    pos = np.array([0, 1, 5, 9, 12, 30, 31, 40])
    scores = np.array([0.0, 0.0, 0.9, 0.1, 0.5, 0.2, 0.8, 0.0])
    got = select_evictions(pos, scores, n_sink=2, recent=5, next_pos=41, n=3)
    assert got.tolist() == [9, 12, 30]  # 40 is recent, 0 and 1 are sinks
    assert got.dtype == pos.dtype


def test_ties_take_the_older_cell():
    pos = np.arange(10)
    got = select_evictions(pos, np.ones(10), n_sink=0, recent=0, next_pos=10, n=3)
    assert got.tolist() == [0, 1, 2]


def test_not_enough_unprotected_cells():
    pos = np.arange(10)
    with pytest.raises(BudgetError, match="cannot evict 4 cells: only 3"):
        select_evictions(pos, np.zeros(10), n_sink=4, recent=3, next_pos=10, n=4)
    assert select_evictions(pos, np.zeros(10), n_sink=4, recent=3, next_pos=10, n=0).size == 0


def test_scored_layers_are_evenly_spaced_with_both_ends():
    glob = list(range(30))
    picked = scored_layers(glob, 15)
    assert len(picked) == 15 and picked[0] == 0 and picked[-1] == 29
    assert max(np.diff(picked)) - min(np.diff(picked)) <= 1  # as even as integers allow
    assert scored_layers([5, 11, 17], 15) == [5, 11, 17]  # fewer global layers than n: all of them
    assert scored_layers(glob, 1) == [0]
