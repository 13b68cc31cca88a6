"""The config as _job.json keeps it (output/saved_config.py): secrets hidden, settings kept."""

from __future__ import annotations

import json

from qvl_batch.output.saved_config import (
    read_back,
    redact,
    saved_config,
    to_dict,
    without_redacted,
)
from qvl_batch.run.validate import load_job


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


def test_a_saved_config_read_back_drops_only_what_was_hidden():
    saved = saved_config(load_job(None, _min_overrides()))
    back = without_redacted(saved)
    assert "secret" not in back["input"]["storage_options"]
    assert back["sampling"] == saved["sampling"]
    assert without_redacted({"a": ["x", "***"], "b": ["x"]}) == {"b": ["x"]}


def test_an_older_outputs_saved_config_still_loads():
    """Every hf job saved ``engine.hf.answer_lengths`` before it moved to engine.benchmark:
    verify and retry-failed must still read those outputs."""
    from qvl_batch.commands.existing_output import config_from_job

    base = ["input.paths=[x.parquet]", "output.path=o", "engine.name=hf", "engine.model=m"]
    saved = saved_config(load_job(None, base))
    for lengths in ("", "fixed:8"):
        old = json.loads(json.dumps(saved))
        old["engine"].pop("benchmark")
        old["engine"]["hf"]["answer_lengths"] = lengths
        cfg = config_from_job({"config": old}, "/elsewhere/out")
        assert cfg.engine.benchmark.answer_lengths == lengths
        assert cfg.output.path == "/elsewhere/out"
    assert read_back({"engine": {"hf": {"answer_lengths": ""}}}) == {"engine": {"hf": {}}}
