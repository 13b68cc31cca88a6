"""Crash isolation (isolation.py): rows held by an engine at a death run alone next time, a row
whose process dies while it runs alone ``max_row_crashes`` times is skipped, per unit."""

from __future__ import annotations

from qvl_batch.run.isolation import CrashIsolation


def test_a_crash_in_a_batch_makes_its_rows_of_this_unit_solo():
    iso = CrashIsolation(max_row_crashes=2)
    assert iso.process_args("u1") == ()  # nothing learnt: no extra arguments
    crash = [("u1", 7), ("u2", 1), ("u1", 3)]
    assert iso.learn("u1", crash) is True
    assert iso.process_args("u1") == ([3, 7], {})
    assert iso.learn("u3", crash) is False  # u3 held no rows at the death
    assert iso.process_args("u3") == ()


def test_a_row_that_crashes_alone_max_row_crashes_times_is_condemned():
    iso = CrashIsolation(max_row_crashes=2)
    iso.learn("u1", [("u1", 3), ("u1", 7)])
    iso.learn("u1", [("u1", 3)])  # alone, first death: still run, alone
    assert iso.process_args("u1") == ([3, 7], {})
    iso.learn("u1", [("u1", 3)])  # alone, second death: skipped from now on
    assert iso.process_args("u1") == ([7], {3: "ENGINE_CRASH"})


def test_one_alone_crash_condemns_with_max_row_crashes_1_and_forget_clears_a_unit():
    iso = CrashIsolation(max_row_crashes=1)
    iso.learn("u1", [("u1", 5)])
    iso.learn("u2", [("u2", 0), ("u2", 1)])
    assert iso.process_args("u1") == ([], {5: "ENGINE_CRASH"})
    iso.forget("u1")
    iso.forget("never-seen")  # forgetting an unknown unit is harmless
    assert iso.process_args("u1") == ()
    assert iso.process_args("u2") == ([0, 1], {})


def test_a_row_whose_last_death_alone_was_a_stall_is_condemned_as_engine_stall():
    iso = CrashIsolation(max_row_crashes=2)
    iso.learn("u1", [("u1", 2), ("u1", 4)], stalled=True)  # a stalled batch: both suspects
    iso.learn("u1", [("u1", 2)], stalled=True)
    iso.learn("u1", [("u1", 2)], stalled=True)
    iso.learn("u1", [("u1", 4)])  # 4 crashes alone once: still run
    assert iso.process_args("u1") == ([4], {2: "ENGINE_STALL"})
    iso.learn("u1", [("u1", 4)])
    assert iso.process_args("u1") == ([], {2: "ENGINE_STALL", 4: "ENGINE_CRASH"})
