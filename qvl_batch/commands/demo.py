"""``qvl-batch demo``: make a synthetic dataset and run jobs/demo.yaml over it on a local Ray."""

from __future__ import annotations

import logging
import os

from ..config import conf_dir
from ..run.driver import run_job
from ..run.validate import load_job
from ..tooling.synth import SynthSpec, make_dataset

log = logging.getLogger("qvl_batch")


def demo_job_file() -> str:
    """jobs/demo.yaml: inside an installed wheel, or at the top of the repo."""
    return str(conf_dir().parent / "jobs" / "demo.yaml")


def run_demo(data_dir: str, output: str, rows: int, shards: int, overrides: list[str]) -> int:
    """Write ``rows`` synthetic rows (varied sizes, EXIF-rotated, a few corrupt) and run the job."""
    marker = os.path.join(data_dir, f".made-{rows}-{shards}")
    if not os.path.exists(marker):
        log.info("making %d synthetic rows in %d shards under %s", rows, shards, data_dir)
        spec = SynthSpec(rows=rows, shards=shards, row_group_rows=128, max_side=512)
        make_dataset(data_dir, spec)
        open(marker, "w").close()
    cfg = load_job(
        demo_job_file(),
        [f"input.paths=[{data_dir}/*.parquet]", f"output.path={output}", *overrides],
    )
    if cfg.engine.name == "hf" and not os.path.exists(
        os.path.join(cfg.engine.model, "config.json")
    ):
        from ..tooling.modelgen import make_test_model

        log.info("building a tiny random-weight Qwen2.5-VL in %s", cfg.engine.model)
        make_test_model(cfg.engine.model, size="tiny")
    if cfg.engine.name != "fake":
        print(
            f"NOTE: {cfg.engine.model} has random weights, so its captions are noise. "
            "Set engine.model=<a Qwen2.5-VL model directory> for real captions."
        )
    log.info("engine %s, model %s", cfg.engine.name, cfg.engine.model)
    summary = run_job(cfg)
    for line in summary.lines():
        print(line)
    print(f"outputs: {output}/data/*.parquet, errors: {output}/errors/*.parquet")
    return summary.exit_code
