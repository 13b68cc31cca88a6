"""The actor pipeline in-process (no Ray): bucketing across units, poison-row isolation."""

from __future__ import annotations

import threading
import time

import pytest

from qvl_batch.rows.manifest import plan_job
from qvl_batch.run.actor import UnitWorker
from qvl_batch.run.validate import load_job

from ..conftest import expected_for, input_rows, write_job

pytestmark = pytest.mark.timeout(120)


def _worker(tmp_path, dataset, *overrides):
    cfg = load_job(write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None), list(overrides))
    return cfg, UnitWorker(cfg), list(plan_job(cfg).units())


def test_units_processed_concurrently_answer_every_row_once(tmp_path, dataset):
    cfg, worker, units = _worker(tmp_path, dataset)
    inputs = {r["id"]: r for r in input_rows(dataset)}
    results = {}

    def run(unit):
        results[unit.unit_id] = worker.process_unit(unit)

    threads = [threading.Thread(target=run, args=(u,)) for u in units[:3]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    worker.close()
    for unit in units[:3]:
        table = results[unit.unit_id]
        rows = table.column("source_row").to_pylist()
        assert rows == list(range(unit.row_start, unit.row_start + unit.num_rows))
        for r in table.to_pylist():
            if r["ok"]:
                assert r["text"] == expected_for(inputs[r["id"]]["image"], cfg.prompt.template)[0]
    stats = worker.stats()
    assert stats["padding"]["rows"] > 0
    assert stats["padding"]["padding_fraction"] <= stats["padding"]["fifo_padding_fraction"]


def test_engine_exception_is_isolated_to_failing_rows(tmp_path, dataset):
    # raise_after_rows raises once; fail_ids fail always. The batch is split until only the
    # chosen rows fail: they become ENGINE_ERROR rows, every other row succeeds.
    poison = [r["id"] for r in input_rows(dataset) if r["kind"] == "ok"][:2]
    _, worker, units = _worker(
        tmp_path,
        dataset,
        "engine.fake.raise_after_rows=5",
        f"engine.fake.fail_ids=[{','.join(poison)}]",
    )
    tables = [worker.process_unit(u) for u in units]
    worker.close()
    rows = [r for t in tables for r in t.to_pylist()]
    engine_errors = {r["id"] for r in rows if r["error_code"] == "ENGINE_ERROR"}
    assert engine_errors == set(poison)
    assert (
        sum(r["ok"] for r in rows)
        == sum(1 for r in input_rows(dataset) if r["kind"] != "corrupt") - 2
    )


def _collector(worker, unit_id, ready=lambda c: True, timeout=30.0):
    """The worker's record of ``unit_id`` once it is registered and ``ready(record)``."""
    deadline = time.monotonic() + timeout
    while (c := worker._units.get(unit_id)) is None or not ready(c):
        assert time.monotonic() < deadline, f"unit {unit_id} never got there"
        time.sleep(0.01)
    return c


def _threads(worker, units, results):
    def run(unit):
        results[unit.unit_id] = worker.process_unit(unit)

    threads = []
    for unit in units:
        t = threading.Thread(target=run, args=(unit,))
        t.start()
        threads.append(t)
        time.sleep(0.05)  # handed out in this order
    return threads


def test_units_take_turns_and_a_queued_one_can_be_moved(tmp_path, dataset):
    # A slow engine holding one batch of rows at a time: unit 0 is running while unit 1 is
    # only read ahead (none of its rows in the engine), so it can be withdrawn (moved); unit 0
    # cannot be, it has started.
    # (unit 1 can enter only once 28 of unit 0's rows are back: 3 batches, 3 s)
    _, worker, units = _worker(
        tmp_path, dataset, "engine.fake.batch_latency_s=1.0", "batching.window_batches=1"
    )
    results: dict = {}
    threads = _threads(worker, units[:2], results)
    _collector(worker, units[0].unit_id, lambda c: c.entered > 0)
    second = _collector(worker, units[1].unit_id)
    assert second.entered == 0, "unit 1 waits for unit 0's turn"
    assert not worker.withdraw(units[0].unit_id), "a started unit is not moved"
    assert worker.withdraw(units[1].unit_id), "a unit not started is"
    for t in threads:
        t.join(60)
    assert results[units[1].unit_id] is None
    table = results[units[0].unit_id]
    assert table.num_rows == units[0].num_rows
    # The worker is whole again: the moved unit runs here later, every row once.
    again = worker.process_unit(units[1])
    assert again.column("source_row").to_pylist() == list(
        range(units[1].row_start, units[1].row_start + units[1].num_rows)
    )
    worker.close()


def test_a_dropped_copy_lets_its_rows_inside_finish_and_the_unit_run_again(tmp_path, dataset):
    _, worker, units = _worker(tmp_path, dataset, "engine.fake.batch_latency_s=0.3")
    results: dict = {}
    (thread,) = _threads(worker, units[:1], results)
    _collector(worker, units[0].unit_id, lambda c: c.inside > 0)
    assert worker.withdraw(units[0].unit_id, unstarted_only=False)
    thread.join(10)
    assert not thread.is_alive() and results[units[0].unit_id] is None
    # Its rows still inside the engine come back and are dropped; the same unit then runs
    # again in this worker (waiting for them) and every row is answered exactly once.
    again = worker.process_unit(units[0])
    assert again.column("source_row").to_pylist() == list(
        range(units[0].row_start, units[0].row_start + units[0].num_rows)
    )
    assert not worker._draining
    timeline = worker.stats()["timeline"]
    assert sum(timeline["busy"]) > 0.3 and set(timeline) >= {"busy", "waiting", "idle"}
    worker.close()
