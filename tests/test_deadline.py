"""The averaging deadline follows the measured link and the adapter size, not a constant."""

from __future__ import annotations

import pytest

from node.swarm.deadline import MARGIN, MIN_S, SLACK_S, AveragingDeadline


def test_before_any_measurement_the_manifest_timeout_holds():
    d = AveragingDeadline(30.0)
    assert d.throughput is None
    assert d.seconds_for(10**9) == 30.0


def test_a_slow_link_lengthens_the_deadline_in_proportion_to_the_bytes():
    d = AveragingDeadline(3.0)
    d.observe(bytes_moved=1_000_000, seconds=4.0)  # 250 kB/s = 2 Mbit/s
    assert d.throughput == pytest.approx(250_000)
    assert d.seconds_for(1_000_000) == pytest.approx(MARGIN * 4.0 + SLACK_S)
    assert d.seconds_for(4_000_000) == pytest.approx(MARGIN * 16.0 + SLACK_S)
    # once measured, a fast link takes it below the manifest's timeout (a lost peer costs seconds, not the
    # timeout), but never below MIN_S
    fast = AveragingDeadline(30.0)
    fast.observe(bytes_moved=10**6, seconds=0.01)
    assert fast.seconds_for(10**6) == MIN_S
    assert fast.seconds_for(10**9) == pytest.approx(MARGIN * 10.0 + SLACK_S)


def test_one_slow_round_does_not_swing_the_estimate():
    d = AveragingDeadline(3.0)
    for _ in range(5):
        d.observe(1_000_000, 1.0)
    d.observe(1_000_000, 60.0)  # a stalled round (CPU contention, a peer's hiccup)
    assert d.throughput == pytest.approx(1_000_000)


def test_a_timeout_doubles_the_next_deadline_up_to_the_cap_and_a_success_resets_it():
    d = AveragingDeadline(3.0, cap_s=20.0)
    d.timed_out()
    assert d.seconds_for(100) == 6.0
    d.timed_out()
    d.timed_out()
    assert d.seconds_for(100) == 20.0  # 24 capped
    d.observe(100, 0.001)
    assert d.seconds_for(100) == MIN_S


def test_a_non_positive_floor_is_refused():
    with pytest.raises(ValueError):
        AveragingDeadline(0)
