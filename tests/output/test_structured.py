"""Structured output: schema -> typed columns, parsing, OUTPUT_PARSE_ERROR, moderation preset."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from qvl_batch.commands.verify import verify_output
from qvl_batch.config import ConfigError
from qvl_batch.errors import Exit
from qvl_batch.output.structured import OutputParser, SchemaError, columns_of, example_for
from qvl_batch.run.driver import run_job
from qvl_batch.run.validate import load_job

from ..conftest import REPO, check_fake_output, input_rows, read_output

MODERATION = load_job(REPO / "jobs" / "moderation.yaml", ["input.paths=[x]"]).structured
SCHEMA = MODERATION.json_schema


def test_schema_maps_to_typed_columns():
    cols = columns_of(SCHEMA)
    assert cols.names == ["verdict", "categories", "score", "reason"]
    assert cols.field("verdict").type == pa.string()
    assert cols.field("categories").type == pa.list_(pa.string())
    assert cols.field("score").type == pa.float64()
    nested = {
        "type": "object",
        "properties": {
            "n": {"type": ["integer", "null"]},
            "ok": {"type": "boolean"},
            "box": {"type": "object", "properties": {"x": {"type": "number"}}},
            "tags": {"enum": ["a", "b"]},
        },
    }
    got = columns_of(nested)
    assert got.field("n").type == pa.int64()
    assert got.field("ok").type == pa.bool_()
    assert got.field("box").type == pa.struct([("x", pa.float64())])
    assert got.field("tags").type == pa.string()


@pytest.mark.parametrize(
    "schema, message",
    [
        ({"type": "array", "items": {"type": "string"}}, "top level must be"),
        ({"type": "object", "properties": {"a": {"type": "array"}}}, "needs 'items'"),
        ({"type": "object", "properties": {"a": {"type": "null"}}}, "not supported"),
        ({"type": "object", "properties": {"a": {"enum": [1, 2]}}}, "only strings"),
        ({"type": "object", "properties": {"a": {"type": "string", "minLength": "x"}}}, "valid"),
        ({"type": "object", "properties": {"a": {"type": ["string", "integer"]}}}, "one type"),
    ],
)
def test_unusable_schemas_are_refused(schema, message):
    with pytest.raises(SchemaError, match=message):
        columns_of(schema)


def test_bad_schema_or_clashing_property_stops_the_job_at_load(tmp_path):
    bad = {"type": "object", "properties": {"verdict": {"type": "tuple"}}}
    job = tmp_path / "j.yaml"
    job.write_text(json.dumps({"input": {"paths": ["x"]}, "structured": {"json_schema": bad}}))
    with pytest.raises(ConfigError, match=r"json_schema: .* at properties/verdict/type: 'tuple'"):
        load_job(job, ["output.path=o"])
    clash = {"type": "object", "properties": {"text": {"type": "string"}}}
    job.write_text(json.dumps({"input": {"paths": ["x"]}, "structured": {"json_schema": clash}}))
    with pytest.raises(ConfigError, match=r"\['text'\] would replace output columns"):
        load_job(job, ["output.path=o"])
    with pytest.raises(ConfigError, match=r"structured\.guided"):
        load_job(job, ["output.path=o", "structured.json_schema=null", "structured.guided=x"])


def test_parse_valid_fenced_invalid_and_off_schema_answers():
    p = OutputParser(SCHEMA)
    good = {"verdict": "review", "categories": ["weapons"], "score": 1, "reason": "a knife"}
    values, problem = p.parse(json.dumps(good), "stop")
    assert problem is None
    assert values == {**good, "score": 1.0} and isinstance(values["score"], float)
    fenced = f"```json\n{json.dumps(good)}\n```"
    assert p.parse(fenced, "stop") == (values, None)
    values, problem = p.parse('{"verdict": "allow", "categ', "length")
    assert values is None and "not JSON (output stopped at sampling.max_tokens)" in problem
    assert '\'{"verdict": "allow", "categ\'' in problem  # the answer is quoted
    off = {**good, "verdict": "maybe", "score": 3}
    values, problem = p.parse(json.dumps(off), "stop")
    assert values is None
    assert "does not match the schema at score" in problem and "(+1 more)" in problem
    assert p.parse(json.dumps({**good, "extra": 1}), "stop")[1] is not None
    assert p.parse("The image shows a cat.", "stop")[1].startswith("not JSON:")


def test_examples_are_valid_instances():
    p = OutputParser(SCHEMA)
    rng = random.Random(7)
    for _ in range(200):
        assert p.parse(json.dumps(example_for(SCHEMA, rng)), "stop")[1] is None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_moderation_preset_typed_columns_and_parse_errors(tmp_path, dataset, ray_head):
    out = tmp_path / "out"
    inputs = input_rows(dataset)
    good = sorted(r["id"] for r in inputs if r["kind"] != "corrupt")
    broken = good[:5]
    cfg = load_job(
        REPO / "jobs" / "moderation.yaml",
        [
            f"input.paths=[{dataset}/*.parquet]",
            f"output.path={out}",
            "engine.name=fake",  # stands in for TensorRT-LLM, which cannot run here
            "engine.model=fake://qwen2.5-vl",
            f"engine.fake.bad_json_ids=[{','.join(broken)}]",
            f"cluster.address={ray_head}",
            "cluster.num_actors=2",
            "limits.max_error_fraction=0.5",
            "batching.unit_rows=64",
        ],
    )
    summary = run_job(cfg, progress_bar=False)
    assert summary.exit_code == Exit.OK, summary.lines()
    expected = dict.fromkeys(broken, "OUTPUT_PARSE_ERROR")
    data, errors = check_fake_output(
        dataset, out, expected, prompt=cfg.prompt.template, max_tokens=128, schema=SCHEMA
    )
    schema = ds.dataset(str(out / "data")).schema
    assert schema.field("categories").type == pa.list_(pa.string())
    assert schema.field("score").type == pa.float64()
    assert len(data) == len(good) - len(broken)
    for row in data:  # the typed columns hold exactly what the JSON text says
        answer = json.loads(row["text"])
        assert {k: row[k] for k in answer} == {**answer, "score": float(answer["score"])}
        assert row["verdict"] in ("allow", "review", "block") and 0 <= row["score"] <= 1
    parse_errors = [r for r in errors if r["error_code"] == "OUTPUT_PARSE_ERROR"]
    assert sorted(r["id"] for r in parse_errors) == broken
    assert all("not JSON" in r["error_message"] for r in parse_errors)
    report = verify_output(str(out))
    assert report.ok, report.violations
    assert report.error_codes["OUTPUT_PARSE_ERROR"] == len(broken)
    _, errors_again = read_output(out)
    assert len(errors_again) == len(errors)
