"""The job config (config.py): errors that name the key."""

from __future__ import annotations

import pytest

from qvl_batch.config import ConfigError
from qvl_batch.run.validate import load_job

from .conftest import write_job


def test_config_errors_name_the_key(tmp_path, dataset):
    job = write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None)
    with pytest.raises(ConfigError, match=r"unknown key 'engine\.nmae'.*name"):
        load_job(job, ["engine.nmae=hf"])
    with pytest.raises(ConfigError, match=r"batching\.max_batch_size: must be >= 1"):
        load_job(job, ["batching.max_batch_size=0"])
    with pytest.raises(ConfigError, match=r"engine\.name: 'gpt' is not one of"):
        load_job(job, ["engine.name=gpt"])
    with pytest.raises(ConfigError, match="no input"):
        load_job(job, ["input.paths=[]"])
    with pytest.raises(ConfigError, match="not found"):
        load_job(tmp_path / "missing.yaml")
    (tmp_path / "typo.yaml").write_text("input:\n  pathz: [x]\noutput:\n  path: o\n")
    with pytest.raises(ConfigError, match=r"unknown key 'input\.pathz'"):
        load_job(tmp_path / "typo.yaml")
