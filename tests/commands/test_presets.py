"""The shipped job presets load, and run end to end (with the fake engine standing in)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvl_batch.commands.verify import verify_output
from qvl_batch.errors import Exit
from qvl_batch.run.driver import run_job
from qvl_batch.run.validate import load_job

from ..conftest import REPO, check_fake_output

JOBS = sorted((REPO / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("job", JOBS, ids=[p.stem for p in JOBS])
def test_every_preset_loads_and_says_how_to_launch_it(job: Path):
    cfg = load_job(job, ["input.paths=[x.parquet]"])
    assert cfg.job.name
    head = job.read_text().splitlines()[0]
    assert head.startswith("#"), "a top comment"
    assert "qvl-batch run jobs/" in job.read_text(), "the comment shows the launch command"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_caption_preset_runs_end_to_end(tmp_path, dataset, ray_head):
    out = tmp_path / "out"
    overrides = [
        f"input.paths=[{dataset}/*.parquet]",
        f"output.path={out}",
        "engine.name=fake",  # stands in for TensorRT-LLM, which cannot run here
        "engine.model=fake://qwen2.5-vl",
        f"cluster.address={ray_head}",
        "cluster.num_actors=2",
        "limits.max_error_fraction=0.5",
    ]
    cfg = load_job(REPO / "jobs" / "caption.yaml", overrides)
    summary = run_job(cfg, progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    check_fake_output(dataset, out, prompt=cfg.prompt.template, max_tokens=160)
    assert verify_output(str(out)).ok
