"""Job files are data: no code runs from them, no environment leaks through them."""

from __future__ import annotations

import pytest

from qvl_batch.config import ConfigError
from qvl_batch.run.validate import load_job


def _job(tmp_path, body: str):
    path = tmp_path / "job.yaml"
    path.write_text("input: {paths: [data/*.parquet]}\noutput: {path: out}\n" + body)
    return path


def test_yaml_python_tags_do_not_run(tmp_path):
    marker = tmp_path / "pwned"
    job = _job(tmp_path, f'job: {{name: !!python/object/apply:os.system ["touch {marker}"]}}\n')
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(job)
    assert not marker.exists()


@pytest.mark.parametrize(
    "value",
    [
        "${oc.env:AWS_SECRET_ACCESS_KEY}",
        "${oc.decode:'{a: 1}'}",
        "prefix-${eval:1+1}",
        "${oc.env:HOME,/tmp}",
    ],
)
def test_resolvers_are_refused(tmp_path, value, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    job = _job(tmp_path, f'job: {{name: "{value}"}}\n')
    with pytest.raises(ConfigError, match=r"job\.name: .* is not allowed") as info:
        load_job(job)
    assert "do-not-leak" not in str(info.value)
    with pytest.raises(ConfigError):  # from the command line too
        load_job(_job(tmp_path, ""), [f"prompt.system={value}"])


def test_references_to_other_keys_still_work(tmp_path):
    cfg = load_job(_job(tmp_path, "job: {name: nightly}\nprompt: {system: 'job ${job.name}'}\n"))
    assert cfg.prompt.system == "job nightly"


def test_template_fields_cannot_reach_into_objects(tmp_path):
    for template in ("{id.__class__}", "{id[0]}", "{id!r}", "{0}"):
        with pytest.raises(ConfigError, match="not allowed"):
            load_job(_job(tmp_path, f'prompt: {{template: "{template}"}}\n'))


def test_trust_remote_code_is_off_unless_set(tmp_path):
    from types import SimpleNamespace

    from qvl_batch.engines.trtllm.api import llm_kwargs

    cfg = load_job(_job(tmp_path, "engine: {name: hf, model: m}\n"))
    assert cfg.engine.hf.trust_remote_code is False
    api = SimpleNamespace(llmapi=SimpleNamespace(KvCacheConfig=dict, CudaGraphConfig=dict))
    trt = load_job(_job(tmp_path, "engine: {name: trtllm, model: m}\n"))
    assert llm_kwargs(trt, api)["trust_remote_code"] is False
