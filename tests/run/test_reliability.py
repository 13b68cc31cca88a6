"""Poison rows and engine crashes: exactly the poisoned rows become errors, the rest succeed."""

from __future__ import annotations

import pytest

from qvl_batch.errors import Exit
from qvl_batch.run.driver import run_job
from qvl_batch.run.validate import load_job

from ..conftest import check_fake_output, input_rows, read_output, write_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "Describe this image."


def _good_ids(dataset, n: int, offset: int = 0) -> list[str]:
    rows = [r for r in input_rows(dataset) if r["kind"] != "corrupt" and r["image"]]
    return [r["id"] for r in rows[offset :: max(1, len(rows) // n)][:n]]


def test_batches_that_raise_are_split_until_exactly_the_poison_rows_fail(
    tmp_path, dataset, ray_head
):
    poison = set(_good_ids(dataset, 3))
    out = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml", dataset, out, ray_head, engine__fake={"raise_ids": sorted(poison)}
    )
    summary = run_job(load_job(job), progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    check_fake_output(dataset, out, dict.fromkeys(poison, "ENGINE_ERROR"))
    assert summary.actor_restarts == 0 and summary.error_codes["ENGINE_ERROR"] == len(poison)


# Lock-step batches through the adapter, and a stream into an in-flight engine.
INFLIGHT = {"mode": "inflight", "slots": 8, "step_s": 0.002, "answer_lengths": "uniform:1:6"}


@pytest.mark.parametrize("engine", [{}, INFLIGHT], ids=["batches", "stream"])
def test_rows_that_kill_the_actor_are_isolated_and_become_engine_crash_rows(
    tmp_path, dataset, ray_head, engine
):
    poison = set(_good_ids(dataset, 2, offset=5))
    out = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        dataset,
        out,
        ray_head,
        engine__fake={"crash_ids": sorted(poison), **engine},
    )
    summary = run_job(load_job(job), progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    _, errors = check_fake_output(dataset, out, dict.fromkeys(poison, "ENGINE_CRASH"))
    # Each poison row: a death among others (suspects then run alone), then two deaths alone.
    assert 2 * len(poison) <= summary.actor_restarts <= 3 * len(poison), summary.lines()
    assert all("died" in r["error_message"] for r in errors if r["id"] in poison)


def test_bad_rows_get_their_codes_and_hostile_ids_stay_inside_the_output(tmp_path, ray_head):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qvl_batch.tooling.pictures import encode_jpeg, photo_like

    rng = np.random.default_rng(3)
    jpeg = [encode_jpeg(photo_like(rng, 96 + 8 * i, 80)) for i in range(4)]
    rows = [  # (id, image, hint, expected outcome)
        ("ok-0", jpeg[0], "a cat", "OK"),
        ("ok-1", jpeg[1], "a dog", "OK"),
        ("../../escape", jpeg[2], "a tree", "OK"),
        ("/abs/../../x\\y", jpeg[3], "a car", "OK"),
        ("no-image", None, "a cat", "MISSING_IMAGE"),
        ("empty-image", b"", "a cat", "MISSING_IMAGE"),
        ("null-field", jpeg[0], None, "BAD_PROMPT"),
        ("long-tokens", jpeg[1], "word " * 5000, "PROMPT_TOO_LONG"),  # ~6,300 tokens
        ("long-chars", jpeg[2], "x" * 200_000, "PROMPT_TOO_LONG"),  # refused untokenized
        (None, jpeg[3], "a cat", "MISSING_ID"),
    ]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    table = pa.table(
        {
            "id": pa.array([r[0] for r in rows], pa.string()),
            "image": pa.array([r[1] for r in rows], pa.binary()),
            "hint": pa.array([r[2] for r in rows], pa.string()),
            "source": pa.array(["t"] * len(rows), pa.string()),
        }
    )
    pq.write_table(table, data_dir / "part-0.parquet")
    out = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        data_dir,
        out,
        ray_head,
        prompt={"template": "Describe {hint}."},
        limits__max_error_fraction=1.0,
    )
    before = {p for p in tmp_path.rglob("*") if "out" not in p.relative_to(tmp_path).parts}
    summary = run_job(load_job(job), progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    data, errors = read_output(out)
    got = {r["id"]: "OK" for r in data} | {r["id"]: r["error_code"] for r in errors}
    derived = "part-0.parquet:9"  # a null id is replaced by <shard>:<row> on the error row
    want = {(r[0] if r[0] is not None else derived): r[3] for r in rows}
    assert got == want
    expected_counts = {}
    for code in want.values():
        if code != "OK":
            expected_counts[code] = expected_counts.get(code, 0) + 1
    assert summary.error_codes == expected_counts
    after = {p for p in tmp_path.rglob("*") if "out" not in p.relative_to(tmp_path).parts}
    assert after - before <= {tmp_path / "job.yaml"}, "nothing written outside the output"
    names = {p.name for p in out.rglob("*") if p.is_file()}
    assert all(n.startswith(("part-", "_", "00000-")) for n in names), names


def test_error_fraction_over_the_limit_fails_cleanly_and_a_rerun_resumes(
    tmp_path, dataset, ray_head
):
    from qvl_batch.commands.verify import verify_output

    failing = _good_ids(dataset, 60)  # with the corrupt rows, about 30% of rows fail
    out = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        dataset,
        out,
        ray_head,
        engine__fake={"fail_ids": failing, "batch_latency_s": 0.05},
        limits={"max_error_fraction": 0.2, "min_rows_for_error_check": 80},
        cluster__num_actors=1,
        batching__units_in_flight_per_actor=1,
    )
    summary = run_job(load_job(job), progress_bar=False)
    assert summary.exit_code == Exit.FAILED, summary.lines()
    assert "over limits.max_error_fraction 0.2" in summary.message
    assert summary.rows_this_run < len(input_rows(dataset)), "stopped mid-run"
    assert not (out / "_SUCCESS").exists() and (out / "_metrics.json").exists()
    partial = verify_output(str(out), allow_incomplete=True)
    assert partial.ok and partial.units_committed > 0 and partial.units_pending > 0, partial.lines()
    assert not verify_output(str(out)).ok, "incomplete without --allow-incomplete"

    # A re-run with the same limit counts the rows committed before it: it stops at once.
    same = run_job(load_job(job), progress_bar=False)
    assert same.exit_code == Exit.FAILED and same.rows_this_run <= 40, same.lines()  # one unit
    summary.rows_this_run += same.rows_this_run

    # The limit is a policy, not part of the fingerprint: a re-run with a looser one resumes.
    again = run_job(load_job(job, ["limits.max_error_fraction=0.5"]), progress_bar=False)
    assert again.exit_code == Exit.OK, again.lines()
    assert again.rows_this_run == len(input_rows(dataset)) - summary.rows_this_run
    assert verify_output(str(out)).ok
