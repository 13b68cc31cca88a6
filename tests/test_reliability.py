"""Poison rows and engine crashes: exactly the poisoned rows become errors, the rest succeed."""

from __future__ import annotations

import pytest

from qvl_batch.config import load_config
from qvl_batch.driver import EXIT_OK, run_job

from .conftest import expected_for, input_rows, read_output, write_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "Describe this image."


def _good_ids(dataset, n: int, offset: int = 0) -> list[str]:
    rows = [r for r in input_rows(dataset) if r["kind"] != "corrupt" and r["image"]]
    return [r["id"] for r in rows[offset :: max(1, len(rows) // n)][:n]]


def _check(dataset, out, poison: set[str], code: str):
    data, errors = read_output(out)
    inputs = {r["id"]: r for r in input_rows(dataset)}
    assert sorted([r["id"] for r in data] + [r["id"] for r in errors]) == sorted(inputs)
    corrupt = {i for i, r in inputs.items() if r["kind"] == "corrupt"}
    assert {r["id"] for r in errors if r["error_code"] == code} == poison
    assert {r["id"] for r in errors} == poison | corrupt, "only the poisoned rows fail"
    for row in data:
        assert row["text"] == expected_for(inputs[row["id"]]["image"], PROMPT)[0]
    return data, errors


def test_batches_that_raise_are_split_until_exactly_the_poison_rows_fail(
    tmp_path, dataset, ray_head
):
    poison = set(_good_ids(dataset, 3))
    out = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml", dataset, out, ray_head, engine__fake={"raise_ids": sorted(poison)}
    )
    summary = run_job(load_config(job), progress_bar=False)
    assert summary.exit_code == EXIT_OK, summary.lines()
    _check(dataset, out, poison, "ENGINE_ERROR")
    assert summary.actor_restarts == 0 and summary.error_codes["ENGINE_ERROR"] == len(poison)


def test_rows_that_kill_the_actor_are_isolated_and_become_engine_crash_rows(
    tmp_path, dataset, ray_head
):
    poison = set(_good_ids(dataset, 2, offset=5))
    out = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml", dataset, out, ray_head, engine__fake={"crash_ids": sorted(poison)}
    )
    summary = run_job(load_config(job), progress_bar=False)
    assert summary.exit_code == EXIT_OK, summary.lines()
    _, errors = _check(dataset, out, poison, "ENGINE_CRASH")
    # Each poison row: a death in a batch (suspects then run alone), then two deaths alone.
    assert 2 * len(poison) <= summary.actor_restarts <= 3 * len(poison), summary.lines()
    assert all("died" in r["error_message"] for r in errors if r["id"] in poison)
