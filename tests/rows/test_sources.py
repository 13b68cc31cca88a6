"""Inputs as users hold them, planned and read the way actors read them (no Ray): folders and
globs of images, CSV and JSONL manifests, WebDataset tars, OpenAI Batch files."""

from __future__ import annotations

import json

import pytest

from qvl_batch.errors import InputError
from qvl_batch.rows.manifest import plan_job
from qvl_batch.rows.prepare import fetch_uri
from qvl_batch.rows.reader import read_unit_table, unit_rows
from qvl_batch.run.validate import load_job, with_input_settings
from qvl_batch.storage import Storage

from ..byo import make_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("byo"))


def cfg_for(*overrides):
    return load_job(None, ["output.path=/tmp/unused", *overrides])


def rows_of(cfg, unit_rows_n=7):
    """Every row of the job's input: (plan, cfg with the input's settings, {id: RowInput})."""
    plan = plan_job(cfg)
    cfg = with_input_settings(cfg, plan.settings)
    storage = Storage.for_input(cfg)
    plan.unit_rows = unit_rows_n  # small units: ranges that start and end inside groups
    got = {}
    for unit in plan.units():
        for row in unit_rows(unit, read_unit_table(unit, cfg, storage), cfg):
            assert row.row_id not in got, f"{row.row_id} read twice"
            got[row.row_id] = row
    assert len(got) == plan.total_rows
    return plan, cfg, got


def image_bytes(row, storage=None):
    data = row.image
    return fetch_uri(data, storage or Storage()) if isinstance(data, str) else data


@pytest.mark.parametrize("how", ["folder", "glob"])
def test_image_folder_and_glob(inputs, how):
    path = str(inputs.folder) if how == "folder" else f"{inputs.folder}/*/*.jpg"
    plan, _, got = rows_of(cfg_for(f"input.paths=[{path}]"))
    assert plan.format == "images"
    want = {r for r in inputs.images if how == "folder" or r.endswith(".jpg")}
    want |= {"b/broken.jpg"}
    assert set(got) == want, "ids are paths relative to the root; notes.txt is no image"
    for rel, row in got.items():
        assert row.error is None
        if rel in inputs.images:
            assert image_bytes(row) == inputs.images[rel]
    again = plan_job(cfg_for(f"input.paths=[{path}]"))
    assert [s.members for s in again.shards] == [s.members for s in plan.shards], "sorted listing"
    assert again.fingerprint == plan.fingerprint


def test_csv_manifest_relative_paths_and_a_short_record(inputs):
    cfg = cfg_for(f"input.manifest={inputs.csv}", "prompt.template='About {topic}: describe.'")
    plan, _, got = rows_of(cfg)
    assert plan.format == "csv"
    names = list(inputs.images)
    for i, rel in enumerate(names):
        row = got[f"c{i:03d}"]
        assert row.error is None and row.prompt == f"About topic, {i}: describe."
        assert image_bytes(row) == inputs.images[rel], "paths relative to the manifest's folder"
    bad = [r for r in got.values() if r.error is not None]
    assert len(bad) == 1 and bad[0].error.code == "MALFORMED_INPUT"
    assert "2 fields" in bad[0].error.message and "3" in bad[0].error.message


def test_jsonl_manifest_blank_lines_and_a_broken_line(inputs):
    plan, _, got = rows_of(cfg_for(f"input.paths=[{inputs.jsonl}]"))
    assert plan.format == "jsonl" and plan.total_rows == len(inputs.images) + 1
    for i, rel in enumerate(inputs.images):
        assert image_bytes(got[f"j{i:03d}"]) == inputs.images[rel]
    bad = [r for r in got.values() if r.error is not None]
    assert [r.error.code for r in bad] == ["MALFORMED_INPUT"]
    assert "not JSON" in bad[0].error.message
    at = int(bad[0].error.message.split(" at byte ")[1].split(":")[0])
    assert inputs.jsonl.read_bytes()[at:].startswith(b'{"id": "j-bad"'), "names the line"


def test_webdataset_tars_samples_and_a_sample_without_image(inputs):
    cfg = cfg_for(
        f"input.paths=[{inputs.tars}]",
        "prompt.template='{txt}. Describe it.'",
        "input.passthrough_columns=[url]",
    )
    plan, cfg, got = rows_of(cfg)
    assert plan.format == "webdataset" and len(plan.shards) == 2
    for rel, data in inputs.images.items():
        key = rel.replace("/", "_").rsplit(".", 1)[0]
        row = got[key]
        assert row.error is None and image_bytes(row) == data
        assert row.prompt == f"caption of {key}. Describe it."
    assert got["noimage"].error.code == "MALFORMED_INPUT"
    unit = next(plan.units())
    table = read_unit_table(unit, cfg, Storage())
    assert table.column("url").to_pylist()[0].startswith("http://x/"), "json fields as columns"


def test_openai_batch_file_rows_and_settings(inputs):
    plan, cfg, got = rows_of(cfg_for(f"input.paths=[{inputs.batch}]"))
    assert plan.format == "openai-batch"
    assert plan.settings["sampling.max_tokens"] == 24, "the value most lines ask for"
    assert cfg.sampling.max_tokens == 24 and cfg.input.prompt_column == "prompt"
    for i, data in enumerate(inputs.images.values()):
        row = got[f"req-{i:03d}"]
        assert row.error is None and row.prompt == f"What is in photo {i}?"
        assert image_bytes(row) == data, "data: URIs fetched like any URI"
    assert got["req-long"].error.code == "UNSUPPORTED_REQUEST"
    assert "max_tokens=500" in got["req-long"].error.message
    malformed = [r for r in got.values() if r.error and r.error.code == "MALFORMED_INPUT"]
    assert len(malformed) == 1


def test_batch_response_format_becomes_the_schema(tmp_path, inputs):
    from ..byo import batch_line

    schema = {"type": "object", "properties": {"safe": {"type": "boolean"}}, "required": ["safe"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "v", "schema": schema, "strict": True}}
    data = next(iter(inputs.images.values()))
    lines = [batch_line(f"r{i}", data, "Safe?", response_format=fmt) for i in range(3)]
    lines.append(batch_line("r-text", data, "Safe?", response_format={"type": "json_object"}))
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    _, cfg, got = rows_of(cfg_for(f"input.paths=[{path}]"))
    assert cfg.structured.json_schema == schema
    assert got["r-text"].error.code == "UNSUPPORTED_REQUEST"
    assert all(got[f"r{i}"].error is None for i in range(3))


def test_auto_refuses_a_mix_and_unknown_names(tmp_path, inputs):
    with pytest.raises(InputError, match="several formats"):
        plan_job(cfg_for(f"input.paths=[{inputs.csv},{inputs.jsonl}]"))
    odd = tmp_path / "data.bin"
    odd.write_bytes(b"x")
    with pytest.raises(InputError, match=r"input\.format"):
        plan_job(cfg_for(f"input.paths=[{odd}]"))
    with pytest.raises(InputError, match="no input files match"):
        plan_job(cfg_for(f"input.paths=[{tmp_path}/nothing/*.jpg]"))


def test_a_changed_folder_changes_the_fingerprint(tmp_path):
    inp = make_inputs(tmp_path, n=4)
    before = plan_job(cfg_for(f"input.paths=[{inp.folder}]")).fingerprint
    (inp.folder / "a" / "img000.jpg").write_bytes(b"\xff\xd8 changed")
    assert plan_job(cfg_for(f"input.paths=[{inp.folder}]")).fingerprint != before


def test_manifests_of_rows_and_of_urls(tmp_path, inputs):
    as_json = tmp_path / "rows.json"  # JSON lines under a .json name: rows, not a URL list
    as_json.write_bytes(inputs.jsonl.read_bytes())
    plan = plan_job(cfg_for(f"input.manifest={as_json}"))
    assert plan.format == "jsonl" and plan.total_rows == len(inputs.images) + 1
    listing = tmp_path / "list.txt"
    listing.write_text(f"{inputs.csv}\n# a comment\n")
    assert plan_job(cfg_for(f"input.manifest={listing}")).format == "csv"
    bad = tmp_path / "bad.txt"
    bad.write_text('{"custom_id" :: no}\n')
    with pytest.raises(InputError):
        plan_job(cfg_for(f"input.manifest={bad}"))


@pytest.mark.timeout(300)
def test_folders_tars_and_batch_files_on_s3(tmp_path, inputs):
    """The same kinds on an S3-compatible server: listed in pages (one request, not a stat a
    file), read by ranged requests."""
    import s3fs

    from qvl_batch.tooling.s3local import MotoServer

    server = MotoServer(tmp_path / "moto.log")
    try:
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True)
        fs.mkdir("byo")
        fs.put(str(inputs.folder) + "/", "byo/photos/", recursive=True)
        fs.put(str(inputs.tars) + "/", "byo/shards/", recursive=True)
        fs.put_file(str(inputs.batch), "byo/requests.jsonl")
        endpoint = f"storage.endpoint_url={server.endpoint}"
        _, _, got = rows_of(cfg_for("input.paths=[s3://byo/photos]", endpoint))
        assert set(got) == set(inputs.images) | {"b/broken.jpg"}
        store = Storage.for_input(cfg_for("input.paths=[x]", endpoint))
        assert all(image_bytes(got[r], store) == inputs.images[r] for r in inputs.images)
        _, _, tars = rows_of(cfg_for("input.paths=['s3://byo/shards/*.tar']", endpoint))
        _, _, local = rows_of(cfg_for(f"input.paths=[{inputs.tars}]"))
        assert {k: r.image for k, r in tars.items()} == {k: r.image for k, r in local.items()}
        _, cfg, lines = rows_of(cfg_for("input.paths=[s3://byo/requests.jsonl]", endpoint))
        assert cfg.sampling.max_tokens == 24 and len(lines) == len(inputs.images) + 2
    finally:
        server.stop()
