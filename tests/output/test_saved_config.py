"""The config as _job.json keeps it (output/saved_config.py): secrets hidden, settings kept."""

from __future__ import annotations

import json
import os

import pytest

from qvl_batch.config import ConfigError, with_absolute_paths
from qvl_batch.output.saved_config import (
    absolute_saved_paths,
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

    base = ["input.paths=[/in/x.parquet]", "output.path=o", "engine.name=hf", "engine.model=m"]
    saved = saved_config(load_job(None, base))
    for lengths in ("", "fixed:8"):
        old = json.loads(json.dumps(saved))
        old["engine"].pop("benchmark")
        old["engine"]["hf"]["answer_lengths"] = lengths
        cfg = config_from_job({"config": old}, "/elsewhere/out")
        assert cfg.engine.benchmark.answer_lengths == lengths
        assert cfg.output.path == "/elsewhere/out"
    assert read_back({"engine": {"hf": {"answer_lengths": ""}}}) == {"engine": {"hf": {}}}


def test_local_paths_are_saved_absolute_urls_and_hub_ids_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    cfg = with_absolute_paths(
        load_job(
            None,
            [
                "input.paths=[data/*.parquet,s3://b/in/*.parquet,/abs/x.parquet]",
                "input.manifest=lists/m.txt",
                "output.path=out",
                "engine.model=model",
            ],
        )
    )
    assert cfg.input.paths == [
        f"{tmp_path}/data/*.parquet",
        "s3://b/in/*.parquet",
        "/abs/x.parquet",
    ]
    assert cfg.input.manifest == f"{tmp_path}/lists/m.txt"
    assert cfg.engine.model == f"{tmp_path}/model"
    hub = with_absolute_paths(
        load_job(None, ["input.paths=[x]", "output.path=o", "engine.model=Qwen/Qwen2.5-VL"])
    )
    assert hub.engine.model == "Qwen/Qwen2.5-VL"  # no such folder here: a hub id, kept
    url = with_absolute_paths(
        load_job(None, ["input.paths=[x]", "output.path=o", "engine.model=s3://b/m"])
    )
    assert url.engine.model == "s3://b/m"


def _old(paths, output="runs/out", model="model"):
    """The config part of an older _job.json: paths as the user typed them."""
    return {"input": {"paths": list(paths)}, "output": {"path": output}, "engine": {"model": model}}


def test_an_older_outputs_relative_paths_resolve_where_the_job_ran(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "data" / "a.parquet").write_bytes(b"")
    (proj / "model").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # From anywhere: the output path, saved relative, says where the job ran.
    saved = _old(["data/*.parquet"])
    assert absolute_saved_paths(saved, str(proj / "runs" / "out")) == []
    assert saved["input"]["paths"] == [f"{proj}/data/*.parquet"]
    assert saved["engine"]["model"] == f"{proj}/model"
    # An output moved away: the current directory is tried too.
    monkeypatch.chdir(proj)
    saved = _old(["data/a.parquet"])
    assert absolute_saved_paths(saved, str(tmp_path / "moved")) == []
    assert saved["input"]["paths"] == [f"{proj}/data/a.parquet"]
    # Found nowhere: the caller is told which key, and says how to override it.
    monkeypatch.chdir(elsewhere)
    saved = _old(["data/*.parquet"])
    assert absolute_saved_paths(saved, str(tmp_path / "moved")) == [
        ("input.paths[0]", "data/*.parquet")
    ]


def test_an_older_output_whose_relative_input_is_lost_says_how_to_override(tmp_path, monkeypatch):
    from qvl_batch.commands.existing_output import config_from_job

    monkeypatch.chdir(tmp_path)
    saved = saved_config(load_job(None, ["input.paths=[/in/x.parquet]", "output.path=o"]))
    saved["input"]["paths"] = ["data/*.parquet"]  # as an older version saved it
    with pytest.raises(ConfigError) as err:
        config_from_job({"config": saved}, str(tmp_path / "moved"))
    text = str(err.value)
    assert "input.paths[0] 'data/*.parquet' was saved relative" in text
    assert "run this command from the directory the job ran in" in text and "input.paths=" in text
    # retry-failed's override of the input is the way out
    cfg = config_from_job({"config": saved}, str(tmp_path / "moved"), None, ["input.paths=[/d]"])
    assert cfg.input.paths == ["/d"]
    assert os.path.isabs(cfg.engine.model) or "://" in cfg.engine.model
