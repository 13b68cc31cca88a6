"""Each input kind users hold, as a job on a real local Ray cluster: killed mid-job, resumed,
then verified; every row exactly once, the fake engine's answers, bad entries as error rows.
And an OpenAI Batch file in and out."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import yaml

from qvl_batch.bench.chaos import start_driver
from qvl_batch.commands.verify import verify_output
from qvl_batch.errors import Exit
from qvl_batch.output.batch_files import ERROR_FILE, OUTPUT_FILE
from qvl_batch.run.driver import run_job
from qvl_batch.run.validate import load_job

from ..byo import make_inputs
from ..conftest import expected_for, read_output

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "Describe this image."


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("byo"), n=40)


def _kinds(inputs):
    """kind -> (input settings, {id: (image bytes, prompt)}, {id: error code})."""
    pics = list(inputs.images.items())
    key = {rel: rel.replace("/", "_").rsplit(".", 1)[0] for rel, _ in pics}
    return {
        "folder": (
            {"paths": [str(inputs.folder)]},
            {rel: (data, PROMPT) for rel, data in pics},
            {"b/broken.jpg": "DECODE_ERROR"},
        ),
        "glob": (
            {"paths": [f"{inputs.folder}/a/*.jpg"]},
            {rel[2:]: (data, PROMPT) for rel, data in pics if rel.startswith("a/")},  # from a/
            {},
        ),
        "csv": (
            {"manifest": str(inputs.csv)},
            {f"c{i:03d}": (data, PROMPT) for i, (_, data) in enumerate(pics)},
            {"images.csv:40": "MALFORMED_INPUT"},
        ),
        "jsonl": (
            {"paths": [str(inputs.jsonl)]},
            {f"j{i:03d}": (data, PROMPT) for i, (_, data) in enumerate(pics)},
            {"images.jsonl:40": "MALFORMED_INPUT"},
        ),
        "webdataset": (
            {"paths": [f"{inputs.tars}/*.tar"]},
            {key[rel]: (data, PROMPT) for rel, data in pics},
            {"noimage": "MALFORMED_INPUT"},
        ),
        "openai-batch": (
            {"paths": [str(inputs.batch)]},
            {f"req-{i:03d}": (data, f"What is in photo {i}?") for i, (_, data) in enumerate(pics)},
            {"req-long": "UNSUPPORTED_REQUEST", "requests.jsonl:41": "MALFORMED_INPUT"},
        ),
    }


def _job(tmp_path, ray_head, input_section, **output):
    job = {
        "defaults": ["engine/fake"],
        "job": {"name": "byo"},
        "input": input_section,
        "prompt": {"template": PROMPT},
        "batching": {"unit_rows": 8, "max_batch_size": 4, "max_wait_s": 0.1},
        "engine": {"fake": {"batch_latency_s": 0.15}},
        "output": {"path": str(tmp_path / "out"), **output},
        "cluster": {"num_actors": 2, "address": ray_head},
        "limits": {"max_error_fraction": 0.5},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.parametrize("kind", ["folder", "glob", "csv", "jsonl", "webdataset", "openai-batch"])
def test_kind_killed_resumed_verified(tmp_path, ray_head, inputs, kind):
    section, good, bad = _kinds(inputs)[kind]
    job = _job(tmp_path, ray_head, section)
    out = tmp_path / "out"
    proc = start_driver(job)
    units = out / "_state" / "units"
    deadline = time.monotonic() + 120
    # a marker, not the hidden temporary file a commit renames into one
    while not (units.exists() and [p for p in units.glob("*.json") if p.name[0] != "."]):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "no unit committed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "_SUCCESS").exists(), "the kill should land before the job finished"

    summary = run_job(load_job(job), progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    assert 0 < summary.rows_this_run < len(good) + len(bad), "resumed, not redone"
    data, errors = read_output(out)
    assert sorted(r["id"] for r in data + errors) == sorted([*good, *bad]), "exactly once"
    max_tokens = 24 if kind == "openai-batch" else 64
    for row in data:
        image, prompt = good[row["id"]]
        want = expected_for(image, prompt, max_tokens=max_tokens)
        assert (row["text"], row["finish_reason"]) == want, row["id"]
    assert {r["id"]: r["error_code"] for r in errors} == bad
    report = verify_output(str(out))
    assert report.violations == [] and report.complete, report.violations
    assert report.input_rows == len(good) + len(bad)


def test_openai_batch_in_and_out(tmp_path, ray_head, inputs):
    section, good, bad = _kinds(inputs)["openai-batch"]
    job = _job(tmp_path, ray_head, section, format="openai-batch")
    summary = run_job(load_job(job), progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    out = tmp_path / "out"
    data, errors = read_output(out)
    lines = [json.loads(x) for x in (out / OUTPUT_FILE).read_text().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(good), "one line per good request"
    texts = {r["id"]: r for r in data}
    for line in lines:
        body = line["response"]["body"]
        row = texts[line["custom_id"]]
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": row["text"]}
        assert body["choices"][0]["finish_reason"] == row["finish_reason"]
        usage = body["usage"]
        assert usage["completion_tokens"] == row["output_tokens"]
        assert usage["total_tokens"] == row["prompt_tokens"] + row["output_tokens"]
    assert len({x["id"] for x in lines}) == len(lines), "request ids unique"
    failed = [json.loads(x) for x in (out / ERROR_FILE).read_text().splitlines()]
    assert {x["custom_id"]: x["error"]["code"] for x in failed} == bad
    assert all(x["response"] is None and x["error"]["message"] for x in failed)
    assert {r["id"] for r in errors} == set(bad)
