"""The job config (config.py): errors that name the key, the fingerprint, redacted secrets."""

from __future__ import annotations

import json

import pytest

from qvl_batch.config import (
    ConfigError,
    fingerprint,
    fingerprint_fields,
    redact,
    saved_config,
    to_dict,
)
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


def test_fingerprint_covers_outputs_not_performance_knobs(tmp_path, dataset):
    job = write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None)

    def fp(*ov):
        return fingerprint(fingerprint_fields(load_job(job, list(ov)), "input-fp"))

    base = fp()
    assert fp("batching.max_batch_size=2", "cluster.num_actors=1") == base
    assert fp("engine.fake.batch_latency_s=1") == base
    assert fp("prompt.template=Other") != base
    assert fp("sampling.max_tokens=9") != base
    assert fp("image.max_pixels=200000") != base


def test_secrets_are_redacted():
    cfg = {"input": {"storage_options": {"key": "AKIA", "secret": "s3cr3t", "region": "eu"}}}
    red = redact(cfg)
    assert red["input"]["storage_options"] == {"key": "***", "secret": "***", "region": "eu"}
    assert "s3cr3t" not in json.dumps(redact(to_dict(load_job(None, _min_overrides()))))
    secret_keys = ["access_key", "sessionToken", "sas_token", "client-secret", "Authorization"]
    kept = ["max_tokens", "max_tokens_per_batch", "max_num_tokens", "keyframe", "region"]
    red = redact({k: "v" for k in secret_keys + kept})
    assert [k for k in red if red[k] == "***"] == secret_keys
    saved = saved_config(load_job(None, _min_overrides()))
    assert saved["sampling"]["max_tokens"] == 64, "settings are saved, only secrets hidden"
    assert saved["engine"]["fake"]["token_latency_s"] == 0.0  # an engine's own setting


def _min_overrides():
    return [
        "input.paths=[x.parquet]",
        "output.path=o",
        "input.storage_options.secret=s3cr3t",
    ]


def test_benchmark_answer_lengths_are_in_the_fingerprint_only_when_set(tmp_path, dataset):
    job = write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None)
    base = ["engine.name=hf", "engine.model=m"]

    def fields(*ov):
        return fingerprint_fields(load_job(job, [*base, *ov]), "input-fp")

    speed = ("engine.hf.compile=true", "engine.hf.vision=stock", "engine.hf.static_cache_gib=2")
    assert fields() == fields(*speed)  # speed only
    assert "answer_lengths" not in fields()["engine"]
    assert fields("engine.hf.answer_lengths=fixed:8")["engine"]["answer_lengths"] == "fixed:8"
