"""``qvl-batch plan``: counts match the planner, the sample matches the input, problems exit 1."""

from __future__ import annotations

import argparse
import json

import pytest

from qvl_batch.commands.plan import add_plan_parser, plan_report
from qvl_batch.rows.manifest import plan_job
from qvl_batch.run.validate import load_job
from qvl_batch.tooling.synth import SynthSpec, make_dataset

from ..conftest import input_rows, write_job

pytestmark = pytest.mark.timeout(120)


def plan_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *map(str, argv)])
    return args.func(args)


@pytest.fixture
def job(tmp_path, dataset):
    return write_job(tmp_path / "job.yaml", dataset, tmp_path / "out", None)


def test_counts_match_the_planner(job, tmp_path):
    cfg = load_job(job)
    plan = plan_job(cfg)
    report = plan_report(cfg, sample=50)
    assert (report.shards, report.units, report.rows) == (3, plan.num_units(), 240)
    assert plan.total_rows == 240
    assert len(report.sample) == 50
    assert len({r.shard_url for r in report.sample}) == 3  # spread over the shards
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_sampled_sizes_match_the_input(job, dataset):
    report = plan_report(load_job(job))
    by_id = {str(r["id"]): r for r in input_rows(dataset)}
    assert len(report.sample) == 200 and len(report.prepared) > 150
    for row in report.prepared:
        src = by_id[row.row_id]
        assert row.source_size == (src["width"], src["height"])
        w, h = row.resized_size
        assert w % 28 == 0 and h % 28 == 0 and row.vision_tokens == (w // 28) * (h // 28)
        assert row.text_tokens == 24 + len("Describe this image.") // 4
    assert sum(report.size_histogram().values()) == len(report.prepared)
    assert report.tokens("vision")["p50"] > 0


def test_corrupt_rows_are_counted(job, dataset):
    report = plan_report(load_job(job), sample=240)  # the whole dataset
    corrupt = {str(r["id"]) for r in input_rows(dataset) if r["kind"] == "corrupt"}
    errors = {r.row_id: r.error for r in report.sample if r.error}
    assert corrupt and set(errors) == corrupt
    assert set(errors.values()) <= {"DECODE_ERROR", "MISSING_IMAGE"}
    fractions = report.error_fractions()
    assert sum(fractions.values()) == pytest.approx(len(corrupt) / 240)
    assert not report.problems


def test_gpu_hours_from_rate(job, capsys):
    report = plan_report(load_job(job), sample=20, rate=0.01)
    assert report.gpu_hours == pytest.approx(240 / 0.01 / 3600)
    assert plan_report(load_job(job), sample=20, rate=0.01, gpus=4).gpu_hours == (
        pytest.approx(240 / 0.01 / 3600 / 4)
    )
    assert plan_cli(job, "--sample", 20, "--rate", 0.01, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu_hours"] == pytest.approx(240 / 0.01 / 3600)
    assert out["rows"] == 240 and out["sampled_rows"] == 20
    assert plan_cli(job, "--sample", 20) == 0
    assert "GPU-hours: unknown" in capsys.readouterr().out


def test_missing_template_column_exits_2(job, capsys):
    assert plan_cli(job, "prompt.template=Describe {caption}.") == 2
    assert "caption" in capsys.readouterr().err
    assert plan_cli(job, "no_such_section.key=1") == 2


def test_mostly_corrupt_dataset_exits_1(tmp_path, capsys):
    spec = SynthSpec(rows=64, shards=1, row_group_rows=32, max_side=200, corrupt_fraction=0.9)
    make_dataset(str(tmp_path / "bad"), spec)
    job = write_job(tmp_path / "job.yaml", tmp_path / "bad", tmp_path / "out", None)
    assert plan_cli(job, "--sample", 64) == 1
    out = capsys.readouterr().out
    assert "problem:" in out and "limits.max_error_fraction 0.5" in out
    assert not (tmp_path / "out").exists()


def test_no_preparable_row_is_a_problem(job):
    report = plan_report(load_job(job, ["image.min_side=1000"]), sample=30)
    assert report.error_fractions().get("IMAGE_TOO_SMALL", 0) > 0.8
    assert "no row in the sample could be prepared" in report.problems
