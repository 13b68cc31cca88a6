"""An actor's state timeline: seconds per state in bins of wall time, coarsened as it grows."""

from __future__ import annotations

import pytest

from qvl_batch.run.timeline import StateTimeline


def test_seconds_are_spread_over_the_bins_they_cover():
    t = StateTimeline(bin_s=1.0, origin=100.0)
    t.add("busy", 100.5, 102.25)  # 0.5 in bin 0, 1.0 in bin 1, 0.25 in bin 2
    t.add("waiting", 102.25, 103.0)
    t.add("idle", 99.0, 100.0)  # before the origin: not counted
    snap = t.snapshot()
    assert snap["busy"] == [0.5, 1.0, 0.25]
    assert snap["waiting"] == [0.0, 0.0, 0.75]
    assert snap["idle"] == [0.0, 0.0, 0.0]
    assert snap["origin"] == 100.0 and snap["bin_s"] == 1.0


def test_a_long_timeline_doubles_its_bins_and_keeps_every_second():
    t = StateTimeline(bin_s=1.0, max_bins=8, origin=0.0)
    t.add("busy", 0.0, 7.5)
    t.add("idle", 7.5, 30.0)  # 30 bins of 1 s do not fit in 8: 4 s bins
    snap = t.snapshot()
    assert snap["bin_s"] == 4.0 and len(snap["busy"]) <= 8
    assert sum(snap["busy"]) == pytest.approx(7.5) and sum(snap["idle"]) == pytest.approx(22.5)
    assert snap["busy"][:2] == [4.0, 3.5] and snap["idle"][1] == pytest.approx(0.5)
