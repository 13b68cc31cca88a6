"""The actor pipeline in-process (no Ray): bucketing across units, poison-row isolation."""

from __future__ import annotations

import threading

import pytest

from qvl_batch.actor import UnitWorker
from qvl_batch.config import load_config
from qvl_batch.manifest import plan_job

from .conftest import expected_for, input_rows, write_job

pytestmark = pytest.mark.timeout(120)


def _worker(tmp_path, dataset, *overrides):
    cfg = load_config(
        write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None), list(overrides)
    )
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
