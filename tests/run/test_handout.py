"""Hand-out across actors: balanced, nothing queued on a busy actor while another idles, backup
copies at the tail (first result commits, exactly once, also across a driver kill)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from qvl_batch.bench.chaos import job_actors, job_id_of, start_driver
from qvl_batch.commands.verify import verify_output
from qvl_batch.errors import Exit
from qvl_batch.rows.manifest import WorkUnit, plan_job
from qvl_batch.run.driver import run_job
from qvl_batch.run.handout import HandOut, Run, Runs
from qvl_batch.run.validate import load_job
from qvl_batch.tooling.synth import SynthSpec, make_dataset

from ..conftest import DATA_KEYS, comparable, input_rows, read_output, write_job

UNIT_ROWS = 40


def _unit(n: int) -> WorkUnit:
    return WorkUnit(f"u{n}", 0, "mem://shard", n * 10, 10)


def _run(n: int, slot: int, start: float, copy: bool = False) -> Run:
    return Run(_unit(n), slot, 0, 1, copy, start)


# ---- the policy, without Ray ---------------------------------------------------------------
def test_each_live_actor_gets_one_before_any_gets_a_second():
    runs, handout = Runs(3), HandOut(depth=2, backups=True)
    live = [True, True, True]
    given = []
    for n in range(6):
        slot = handout.slot_for_next(live, runs)
        given.append(slot)
        runs.add(f"r{n}", _run(n, slot, n))
    assert given == [0, 1, 2, 0, 1, 2]
    assert handout.slot_for_next(live, runs) is None, "every actor holds its window"
    runs.pop("r1")  # actor 1 finished one: it (the least loaded) takes the next
    assert handout.slot_for_next(live, runs) == 1
    assert handout.slot_for_next([True, False, True], Runs(3)) in (0, 2)


def test_an_idle_actor_takes_a_queued_unit_first_then_copies_the_newest_running_one():
    runs = Runs(2)
    runs.add("a", _run(0, 0, 0.0))  # running on actor 0
    runs.add("b", _run(1, 0, 1.0))  # queued behind it
    assert HandOut.idle_slots([True, True], runs) == [1]
    assert HandOut.to_move(runs, idle=1) == "b"
    runs.by_ref["b"].started = True  # its actor said it has begun: not movable
    assert HandOut.to_move(runs, idle=1) == "a", "its calls may have begun in either order"
    runs.by_ref["a"].started = True
    assert HandOut.to_move(runs, idle=1) is None
    assert HandOut(2, backups=True).to_copy(runs, idle=1) == "b", "the most work left"
    assert HandOut(2, backups=False).to_copy(runs, idle=1) is None
    runs.add("c", _run(1, 1, 2.0, copy=True))
    assert HandOut(2, backups=True).to_copy(runs, idle=1) == "a", "one copy per unit"
    runs.settled.add("u0")
    assert HandOut(2, backups=True).to_copy(runs, idle=1) is None


def test_a_slots_only_unit_is_not_moved_to_an_idle_actor():
    # Moving it would idle its own slot, which would take it back: a one-unit job's ping-pong.
    runs = Runs(2)
    runs.add("a", _run(0, 0, 0.0))
    assert HandOut.idle_slots([True, True], runs) == [1]
    assert HandOut.to_move(runs, idle=1) is None
    assert HandOut(2, backups=True).to_copy(runs, idle=1) == "a", "a copy may still help"


# ---- jobs on a local Ray cluster -----------------------------------------------------------
@pytest.fixture
def four_units(tmp_path):
    """160 rows in one shard, row groups of 40: exactly four units of 40 rows, none corrupt."""
    spec = SynthSpec(rows=160, shards=1, row_group_rows=UNIT_ROWS, corrupt_fraction=0.0)
    make_dataset(str(tmp_path / "data"), spec)
    return tmp_path / "data"


def _job(tmp_path, data, out, ray_head, name="job.yaml", **extra):
    return write_job(
        tmp_path / name,
        data,
        out,
        ray_head,
        batching__unit_rows=UNIT_ROWS,
        batching__bucketing=False,  # full batches of 8 in arrival order: a known amount of work
        **extra,
    )


def _runs_of(out) -> list[dict]:
    return json.loads((out / "_metrics.json").read_text())["unit_runs"]


def _markers(out) -> list[dict]:
    return [json.loads(p.read_text()) for p in (out / "_state" / "units").glob("*.json")]


def _last_unit_row(data) -> str:
    """The last unit's last row (the kill test hangs both copies on it, in either order)."""
    return sorted(input_rows(data), key=lambda r: r["id"])[-1]["id"]


def _first_row(data) -> str:
    """The first unit's first row: the straggler for the backup-copy test. Its original meets it
    in its engine's first batch, and a copy of its unit can only start once the other actor has
    run every other unit to the end (nothing left to hand out or move): the original takes the
    one slow turn by construction, not by a race. (Two earlier versions slowed a row of the last
    unit; there a copy sometimes met the row before the original, still busy with the unit
    before it, did, and CI failed on it.)"""
    return input_rows(data)[0]["id"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_four_units_on_two_actors_run_two_each_near_the_ideal_time(tmp_path, four_units, ray_head):
    batch_s = 0.5  # a unit is 5 batches of 8: 2.5 s of engine time
    out = tmp_path / "out"
    job = _job(tmp_path, four_units, out, ray_head, engine__fake={"batch_latency_s": batch_s})
    assert plan_job(load_job(job)).num_units() == 4
    summary = run_job(load_job(job), progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    runs = _runs_of(out)
    committed = [r for r in runs if r["outcome"] == "committed"]
    per_actor = sorted(sum(r["actor"] == a for r in committed) for a in (0, 1))
    assert per_actor == [2, 2], runs
    # From the moment both actors were live to the last commit; ideal: 2 units x 5 batches.
    metrics = json.loads((out / "_metrics.json").read_text())
    both_live = next(t for t, n in metrics["actors_live"] if n == 2)
    last_end = max(r["end_s"] for r in committed)
    first_start = min(r["start_s"] for r in committed)
    span = last_end - max(both_live, first_start)
    ideal = 2 * (UNIT_ROWS // 8) * batch_s
    assert span <= 1.1 * ideal, (span, ideal, runs)
    assert verify_output(str(out)).ok


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backups", [True, False], ids=["backups", "no-backups"])
def test_a_straggling_unit_is_overtaken_by_a_backup_copy(tmp_path, four_units, ray_head, backups):
    slow_s = 30 if backups else 6  # with copies off the job waits this long for the straggler
    markers = tmp_path / "slow-markers"
    markers.mkdir()
    slow_row = _first_row(four_units)
    out = tmp_path / "out"
    fake = {
        "batch_latency_s": 0.05,
        "slow_ids": [slow_row],
        "slow_s": slow_s,
        "slow_times": 1,  # only the first engine to meet the row is slow
        "marker_dir": str(markers),
    }
    job = _job(
        tmp_path, four_units, out, ray_head, engine__fake=fake, batching__backup_copies=backups
    )
    t0 = time.monotonic()
    summary = run_job(load_job(job), progress_bar=False)
    elapsed = time.monotonic() - t0
    assert summary.exit_code == Exit.OK, summary.lines()
    slow_unit = next(m["unit_id"] for m in _markers(out) if m["row_start"] == 0)
    runs = [r for r in _runs_of(out) if r["unit_id"] == slow_unit]
    winner = [r for r in runs if r["outcome"] == "committed"]
    assert len(winner) == 1, runs
    if backups:
        assert winner[0]["copy"], f"the backup copy commits first: {runs}"
        # A unit sharing a batch with the slow row may be overtaken by its copy too.
        assert summary.backup_copies >= summary.backup_wins >= 1
        assert any(r["outcome"] == "discarded" and not r["copy"] for r in runs), runs
        assert elapsed < slow_s, "the job did not wait for the straggler"
    else:
        assert summary.backup_copies == 0 and not any(r["copy"] for r in _runs_of(out))
        assert winner[0]["end_s"] - winner[0]["start_s"] >= slow_s, "it waited for the slow copy"
    assert sorted(m["unit_id"] for m in _markers(out)) == sorted(
        {m["unit_id"] for m in _markers(out)}
    )
    assert len(_markers(out)) == 4
    data, errors = read_output(out)
    assert sorted(r["id"] for r in data) == sorted(r["id"] for r in input_rows(four_units))
    assert not errors
    report = verify_output(str(out))
    assert report.ok, report.lines()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_driver_killed_while_a_unit_and_its_copy_run_commits_it_once(
    tmp_path, four_units, ray_head
):
    # Reference: the same job, uninterrupted.
    ref_out = tmp_path / "ref"
    ref = _job(tmp_path, four_units, ref_out, ray_head, name="ref.yaml")
    assert run_job(load_job(ref), progress_bar=False).exit_code == Exit.OK

    markers = tmp_path / "slow-markers"
    markers.mkdir()
    out = tmp_path / "out"
    fake = {
        "batch_latency_s": 0.05,
        "slow_ids": [_last_unit_row(four_units)],
        "slow_s": 600,  # both the unit and its copy hang on the row until the driver dies
        "slow_times": 2,
        "marker_dir": str(markers),
    }
    job = _job(tmp_path, four_units, out, ray_head, engine__fake=fake)
    log_path = tmp_path / "driver.log"
    proc = start_driver(job, log_path)
    job_id = job_id_of(out)
    slow_unit = "00000-00003"  # rows 120-159: the slow row's unit
    deadline = time.monotonic() + 120
    while f"backup copy of unit {slow_unit}" not in log_path.read_text(errors="replace"):
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, "no backup copy of the slow unit started"
        time.sleep(0.1)
    while len(list(markers.iterdir())) < 2:  # both copies are inside the slow row
        assert time.monotonic() < deadline, "the copy never reached the slow row"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "_SUCCESS").exists()
    before = [m["unit_id"] for m in _markers(out)]
    # (a unit that shared the slow row's batch is stuck with it and may be uncommitted too)
    assert slow_unit not in before and len(before) >= 2, before
    deadline = time.monotonic() + 60
    while job_actors(job_id):  # Ray ends a dead driver's actors
        assert time.monotonic() < deadline, "the killed job's actors outlived it"
        time.sleep(0.2)

    # The re-run: the slow row is slow no more (both copies used it up); one commit.
    summary = run_job(load_job(job), progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    assert summary.units_this_run == 4 - len(before)  # the slow unit among them, once
    ids = [m["unit_id"] for m in _markers(out)]
    assert len(ids) == len(set(ids)) == 4
    report = verify_output(str(out))
    assert report.ok, report.lines()
    data, errors = read_output(out)
    ref_data, ref_errors = read_output(ref_out)
    assert comparable(data, DATA_KEYS) == comparable(ref_data, DATA_KEYS)
    assert not errors and not ref_errors


def test_while_others_start_a_live_actor_holds_one_running_and_one_read_ahead():
    runs, handout = Runs(2), HandOut(depth=3, backups=True)
    for n in range(2):
        assert handout.slot_for_next([True, False], runs, starting=True) == 0
        runs.add(f"r{n}", _run(n, 0, n))
    assert handout.slot_for_next([True, False], runs, starting=True) is None, "no hoard"
    assert handout.slot_for_next([True, True], runs, starting=False) == 1
    assert handout.slot_for_next([True, False], runs, starting=False) == 0, "all up: full window"


def _split_and_ideal(out, units: int, unit_s: float) -> tuple[list[int], int, float, float]:
    """(units committed by the first ready and the second actor, the first's ideal count, the
    span from the first actor ready to the last commit, the ideal span given the gap between
    their readiness): the ideal puts k units on the first, N - k on the second from the gap."""
    metrics = json.loads((out / "_metrics.json").read_text())
    first_live = next(t for t, n in metrics["actors_live"] if n >= 1)
    gap = next(t for t, n in metrics["actors_live"] if n == 2) - first_live
    committed = [r for r in metrics["unit_runs"] if r["outcome"] == "committed"]
    first = min(committed, key=lambda r: r["start_s"])["actor"]
    per = [sum(r["actor"] == a for r in committed) for a in (first, 1 - first)]
    spans = {k: max(k * unit_s, gap + (units - k) * unit_s) for k in range(units + 1)}
    k_best = min(spans, key=spans.get)
    span = max(r["end_s"] for r in committed) - first_live
    return per, k_best, span, spans[k_best]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("units", [4, 8])
@pytest.mark.parametrize("gap_s", [0.1, 1.0, 5.0])
def test_actors_ready_apart_split_the_units_near_the_ideal(tmp_path, ray_head, units, gap_s):
    """The second actor is ready ``gap_s`` after the first (units_in_flight_per_actor 3): the
    first does not hoard the job, the split is the ideal one within a unit, the pipeline within
    10% of the ideal for that gap."""
    data = tmp_path / "data"
    make_dataset(str(data), SynthSpec(rows=units * UNIT_ROWS, shards=1, row_group_rows=UNIT_ROWS))
    batch_s = 0.5  # a unit is 5 batches of 8: 2.5 s of engine time
    out = tmp_path / "out"
    fake = {"batch_latency_s": batch_s, "load_s_by_incarnation": [0.0, gap_s]}
    job = _job(
        tmp_path,
        data,
        out,
        ray_head,
        engine__fake=fake,
        batching__units_in_flight_per_actor=3,
        limits__max_error_fraction=1.0,
    )
    summary = run_job(load_job(job), progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    assert verify_output(str(out)).ok
    per, k_best, span, ideal = _split_and_ideal(out, units, 5 * batch_s)
    assert sum(per) == units and abs(per[0] - k_best) <= 1, (per, k_best, _runs_of(out))
    assert span <= 1.1 * ideal, (span, ideal, per, _runs_of(out))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_read_ahead_unit_waiting_in_the_batching_window_moves_to_an_idle_actor(
    tmp_path, ray_head
):
    """Two units; the first actor takes both (the second is still loading): the second unit's
    rows are prepared and wait in the batching window behind the first's. When the second
    actor comes up idle, that unit is moved to it (nothing had started), and every row is
    batched once across both actors."""
    data = tmp_path / "data"
    spec = SynthSpec(rows=2 * UNIT_ROWS, shards=1, row_group_rows=UNIT_ROWS, corrupt_fraction=0)
    make_dataset(str(data), spec)  # 40 good rows a unit: no batch holds rows of both
    out = tmp_path / "out"
    fake = {"batch_latency_s": 1.5, "load_s_by_incarnation": [0.0, 1.0]}  # a unit: 7.5 s
    # backup copies off: the tail's copies would hide whether the unit moved
    # and two units of 40 rows, not a small job's smaller units
    job = _job(
        tmp_path,
        data,
        out,
        ray_head,
        engine__fake=fake,
        batching__backup_copies=False,
        batching__min_units_per_actor=0,
    )
    summary = run_job(load_job(job), progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    metrics = json.loads((out / "_metrics.json").read_text())
    why = (summary.lines(), metrics["actors_live"], _runs_of(out))
    assert summary.units_moved == 1 and summary.backup_copies == 0, why
    assert metrics["padding"]["rows"] == 2 * UNIT_ROWS, "a row batched twice (or never)"
    committed = {r["actor"] for r in _runs_of(out) if r["outcome"] == "committed"}
    assert committed == {0, 1}, _runs_of(out)
    assert verify_output(str(out)).ok
