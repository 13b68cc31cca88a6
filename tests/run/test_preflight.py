"""Pre-flight (run/preflight.py): a job that cannot work stops before Ray starts and before
``_job.json`` is written, with one line naming the setting to fix."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.registry import known_implementations

from qvl_batch.errors import ConfigError, InputError
from qvl_batch.output.state import OutputState
from qvl_batch.rows.manifest import plan_job
from qvl_batch.run import preflight as pf
from qvl_batch.run.driver import Driver
from qvl_batch.run.validate import load_job
from qvl_batch.storage import Storage

from ..conftest import write_job


def _cfg(tmp_path, data, *overrides):
    job = write_job(tmp_path / "job.yaml", data, tmp_path / "out", None)
    return load_job(job, list(overrides))


def _hf(tmp_path, dataset, model, *more):
    return _cfg(tmp_path, dataset, "engine.name=hf", f"engine.model={model}", *more)


def test_a_missing_model_folder_is_one_line_naming_engine_model(tmp_path, dataset):
    cfg = _hf(tmp_path, dataset, tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match=r"engine.model: folder .*no-such-model does not exist"):
        Driver(cfg).prepare()
    assert not (tmp_path / "out").exists(), "nothing written before the checks pass"


def test_model_folders_ids_in_the_hf_cache_and_urls(tmp_path, dataset, monkeypatch):
    storage = Storage()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        pf.check_model(_hf(tmp_path, dataset, empty), storage)
    (empty / "config.json").write_text("{}")
    assert pf.check_model(_hf(tmp_path, dataset, empty), storage) == "model ok"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=r"'Qwen/Qwen2.5-VL-3B-Instruct' is no local folder"):
        pf.check_model(_hf(tmp_path, dataset, "Qwen/Qwen2.5-VL-3B-Instruct"), storage)
    (tmp_path / "hub" / "models--Qwen--Qwen2.5-VL-3B-Instruct").mkdir(parents=True)
    cached = _hf(tmp_path, dataset, "Qwen/Qwen2.5-VL-3B-Instruct")
    assert pf.check_model(cached, storage) == "model in the Hugging Face cache"
    with pytest.raises(ConfigError, match=r"memory://models/none holds no config\.json"):
        pf.check_model(_hf(tmp_path, dataset, "memory://models/none"), storage)


def test_joining_a_cluster_a_missing_model_is_a_warning(tmp_path, dataset, caplog):
    # The actors' hosts may mount the model where this one does not (infra/kuberay).
    cfg = _hf(tmp_path, dataset, "/models/not-here", "cluster.address=auto")
    with caplog.at_level(logging.WARNING, logger="qvl_batch"):
        assert pf.check_model(cfg, Storage()) == "model not seen here"
    assert "not-here does not exist" in caplog.text


def test_a_missing_engine_package_is_refused_with_the_install_hint(tmp_path, dataset, monkeypatch):
    cfg = _hf(tmp_path, dataset, "m")
    monkeypatch.setattr(pf, "_findable", lambda p: p != "transformers")
    with pytest.raises(ConfigError, match=r"engine.name=hf needs transformers.*qvl-batch\[hf\]"):
        pf.check_engine_packages(cfg)
    monkeypatch.setattr(pf, "_findable", lambda p: True)
    assert pf.check_engine_packages(cfg) == "engine packages ok"
    assert pf.check_engine_packages(_cfg(tmp_path, dataset)) == ""  # fake: nothing to find


def _uri_dataset(folder, uris):
    folder.mkdir()
    ids = [str(i) for i in range(len(uris))]
    pq.write_table(pa.table({"id": ids, "image": uris}), folder / "part-0.parquet")
    return folder


def test_image_uris_whose_fsspec_backend_is_missing_are_refused(tmp_path, monkeypatch):
    # A protocol whose backend does not import, as s3:// is without s3fs.
    gone = {"class": "no_such_backend.FS", "err": "Install no-such-backend"}
    monkeypatch.setitem(known_implementations, "qvlgone", gone)
    data = _uri_dataset(tmp_path / "d", ["images/a.jpg", "qvlgone://bucket/b.jpg"])
    cfg = _cfg(tmp_path, data, "input.passthrough_columns=[]")
    plan = plan_job(cfg)
    with pytest.raises(ConfigError, match=r"holds qvlgone:// URIs .*Install no-such-backend"):
        pf.check_image_uris(cfg, plan, Storage())
    ok = _cfg(tmp_path, _uri_dataset(tmp_path / "d2", ["a.jpg", "memory://b/c.jpg"]))
    ok.input.passthrough_columns = []
    line = pf.check_image_uris(ok, plan_job(ok), Storage())
    assert line == "image column 'image' uri (file, memory)"
    bad = _cfg(tmp_path, _uri_dataset(tmp_path / "d3", ["nope://x/y.jpg"]))
    bad.input.passthrough_columns = []
    with pytest.raises(InputError, match="protocol 'nope'"):
        pf.check_image_uris(bad, plan_job(bad), Storage())


def test_an_output_folder_of_other_files_is_refused_even_with_overwrite(tmp_path):
    home = tmp_path / "home"
    state = OutputState(str(home))
    assert pf.check_output(state, "resume") == "output new"  # absent
    home.mkdir()
    (home / ".hidden").write_text("")
    assert pf.check_output(state, "resume") == "output new"  # empty but for dotfiles
    (home / "notes.txt").write_text("mine")
    (home / "data").mkdir()
    for mode in ("resume", "overwrite"):
        with pytest.raises(ConfigError, match=r"holds files and no _job.json \(notes.txt\)"):
            pf.check_output(state, mode)
    (home / "notes.txt").unlink()  # only qvl-batch's names, no _job.json: --fresh may clear it
    with pytest.raises(ConfigError, match="run with --fresh"):
        pf.check_output(state, "resume")
    assert pf.check_output(state, "overwrite") == "output overwritten"
    (home / "_job.json").write_text("{}")
    assert pf.check_output(state, "resume") == "output holds a job (resume)"


def test_the_summary_line_is_logged(tmp_path, dataset, caplog):
    with caplog.at_level(logging.INFO, logger="qvl_batch"):
        Driver(_cfg(tmp_path, dataset)).prepare()
    assert "pre-flight: image column 'image' bytes, output new" in caplog.text
