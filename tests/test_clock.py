"""StepClock: the learnt step time that sizes long-feed slices and generation's K."""
from __future__ import annotations

import pytest
from rnnserve.server.clock import StepClock


def test_nothing_timed_means_no_estimate() -> None:
    assert StepClock().estimate(8) is None


def test_an_estimate_scales_the_nearest_smaller_bucket_linearly() -> None:
    c = StepClock()
    c.timed(rows=8, steps=10, seconds=0.010)  # 1 ms a step for 8 rows
    assert c.estimate(8) == pytest.approx(0.001)
    assert c.estimate(12) == pytest.approx(0.0015)  # bucket 8, scaled by 12/8
    assert c.estimate(4) is None  # nothing timed at or below 4 rows
    c.timed(rows=3, steps=1, seconds=0.0003)
    assert c.estimate(4) == pytest.approx(0.0006)  # 3 rows land in bucket 2; scaled by 4/2


def test_new_timings_are_smoothed_not_taken_whole() -> None:
    c = StepClock()
    c.timed(16, 4, 0.004)
    c.timed(16, 4, 0.040)  # one slow call (a busy machine) moves the estimate a fifth of the way
    assert c.estimate(16) == pytest.approx(0.8 * 0.001 + 0.2 * 0.010)
    c.timed(16, 0, 0.005)  # a call of no steps counts as one
    assert c.estimate(16) == pytest.approx(0.8 * (0.8 * 0.001 + 0.2 * 0.010) + 0.2 * 0.005)
