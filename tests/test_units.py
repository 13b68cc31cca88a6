"""Planner, bucketing, prompts, config and commit: the pieces, without Ray."""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pytest

from qvl_batch.bucketing import Bucketer
from qvl_batch.config import (
    ConfigError,
    fingerprint,
    fingerprint_fields,
    load_config,
    redact,
    to_dict,
)
from qvl_batch.manifest import InputError, Shard, WorkUnit, cut_units, plan_job
from qvl_batch.prompts import PromptError, render_prompt, template_fields
from qvl_batch.schema import DATA_COLUMNS, ERROR_COLUMNS, ROW_RESULT
from qvl_batch.state import OutputState
from qvl_batch.writer import UnitIncomplete, check_exactly_once, commit_unit

from .conftest import write_job

# ---- planner --------------------------------------------------------------------------


def _shard(rows):
    return Shard(3, "mem://s.parquet", 0, "v", tuple(rows))


def test_units_group_whole_row_groups_and_split_big_ones():
    units = list(cut_units(_shard([10, 10, 10, 100, 5]), unit_rows=25))
    spans = [(u.row_start, u.num_rows) for u in units]
    # 10+10 fit, the third group starts a new unit, 100 is cut in 4 slices of 25, then 5.
    assert spans == [(0, 20), (20, 10), (30, 25), (55, 25), (80, 25), (105, 25), (130, 5)]
    assert [u.unit_id for u in units][:2] == ["00003-00000", "00003-00001"]
    covered = [r for u in units for r in range(u.row_start, u.row_start + u.num_rows)]
    assert covered == list(range(135)), "units tile the shard exactly"


def test_units_are_stable_across_plans():
    # A unit's id names its shard and its place in it, so a resumed run (another plan of the
    # same input) finds the same units in the ledger: 20 groups of 7 rows, 4 groups a unit.
    units = list(cut_units(_shard([7] * 20), 30))
    assert [u.unit_id for u in units] == [f"00003-{k:05d}" for k in range(5)]
    assert [(u.row_start, u.num_rows) for u in units] == [(28 * k, 28) for k in range(5)]
    # The same shard under another index (a shard added before it) keeps its row ranges.
    moved = list(cut_units(Shard(4, "mem://s.parquet", 0, "v", (7,) * 20), 30))
    assert [(u.row_start, u.num_rows) for u in moved] == [(u.row_start, u.num_rows) for u in units]


def test_plan_lists_sorted_shards_and_checks_columns(tmp_path, dataset):
    cfg = load_config(write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None))
    plan = plan_job(cfg)
    assert [s.url for s in plan.shards] == sorted(s.url for s in plan.shards)
    assert plan.total_rows == 240 and len(plan.fingerprint) == 16
    bad = load_config(
        write_job(tmp_path / "j2.yaml", dataset, tmp_path / "o", None),
        ["input.passthrough_columns=[nope]"],
    )
    with pytest.raises(InputError, match=r"lacks column\(s\) \['nope'\]"):
        plan_job(bad)


def test_input_fingerprint_changes_when_a_shard_changes(tmp_path, dataset):
    cfg = load_config(write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None))
    before = plan_job(cfg).fingerprint
    shard = sorted(dataset.glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes())  # same bytes, new mtime
    import os

    os.utime(shard, ns=(1, 1))
    assert plan_job(cfg).fingerprint != before


def test_manifest_file_lists_shards(tmp_path, dataset):
    manifest = tmp_path / "manifest.txt"
    shards = sorted(str(p) for p in dataset.glob("*.parquet"))
    manifest.write_text("# shards\n" + "\n".join(shards[:2]) + "\n")
    cfg = load_config(
        write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None),
        ["input.paths=[]", f"input.manifest={manifest}"],
    )
    assert [s.url for s in plan_job(cfg).shards] == shards[:2]


# ---- bucketing ------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_bucketer_emits_full_buckets_by_size_and_token_budget():
    b = Bucketer(max_batch_size=3, max_tokens=1000, max_wait_s=5, clock=Clock())
    for i in range(5):
        b.add(("a", i), key=(28, 28), tokens=10, seq_len=10)
        b.add(("b", i), key=(56, 56), tokens=10, seq_len=20)
    first = b.next_batch()
    assert first == [("a", 0), ("a", 1), ("a", 2)]
    assert b.next_batch() == [("b", 0), ("b", 1), ("b", 2)]
    assert b.next_batch() is None, "partial buckets wait for max_wait_s"
    # token budget: 3 rows of 400 tokens do not fit in 1000
    t = Bucketer(max_batch_size=10, max_tokens=1000, max_wait_s=5, clock=Clock())
    for i in range(3):
        t.add(i, key="k", tokens=400, seq_len=400)
    assert t.next_batch() == [0, 1]


def test_bucketer_flushes_oldest_after_wait_or_when_forced():
    clock = Clock()
    b = Bucketer(max_batch_size=8, max_tokens=10_000, max_wait_s=2, clock=clock)
    b.add("old", key="x", tokens=1, seq_len=1)
    clock.t = 1.0
    b.add("new", key="y", tokens=1, seq_len=1)
    assert b.next_batch() is None
    assert b.seconds_until_due() == pytest.approx(1.0)
    clock.t = 2.0
    assert b.next_batch() == ["old"]
    assert b.next_batch(force=True) == ["new"]
    assert b.pending == 0 and b.next_batch(force=True) is None


def test_bucketing_avoids_padding_that_arrival_order_would_have():
    b = Bucketer(max_batch_size=4, max_tokens=10**6, max_wait_s=0, clock=Clock())
    sizes = [100, 400] * 8  # alternating image sizes: arrival-order batches mix them
    for i, s in enumerate(sizes):
        b.add(i, key=s, tokens=s, seq_len=s)
    while b.next_batch(force=True):
        pass
    assert b.stats.rows == 16 and b.stats.padded_tokens == 0
    assert b.stats.fifo_padded_tokens == 4 * (2 * 300)  # each fifo batch pads two 100s to 400
    assert b.stats.fifo_padding_fraction > 0.3


def test_bucketer_tops_up_a_bucket_with_the_nearest_sizes_within_the_padding_limit():
    b = Bucketer(max_batch_size=8, max_tokens=10**6, max_wait_s=5, clock=Clock(), max_padding=0.1)
    for i in range(5):  # interleaved arrivals of three sizes
        b.add(("s", i), key=(28, 28), tokens=100, seq_len=100)
        b.add(("m", i), key=(56, 28), tokens=104, seq_len=104)
        b.add(("l", i), key=(56, 56), tokens=400, seq_len=400)
    # No bucket is full, but 100s topped up with 104s fill a batch (padding 20/832): now.
    assert b.next_batch() == [("s", i) for i in range(5)] + [("m", i) for i in range(3)]
    assert b.stats.padded_tokens == 8 * 104 - (5 * 100 + 3 * 104)
    # 400s would pad 104s by far more than 10%: nothing else fills, so nothing goes yet...
    assert b.next_batch() is None
    # ...until forced (or due): the oldest bucket alone, then the other.
    assert b.next_batch(force=True) == [("m", 3), ("m", 4)]
    assert b.next_batch(force=True) == [("l", i) for i in range(5)]
    assert b.pending == 0


def test_bucketer_merges_sizes_with_the_same_token_count_at_no_padding():
    """640x480 and 480x640 resize to different grids but the same number of tokens."""
    b = Bucketer(max_batch_size=4, max_tokens=10**6, max_wait_s=5, clock=Clock(), max_padding=0.1)
    for i in range(2):
        b.add(("land", i), key=(644, 476), tokens=423, seq_len=423)
        b.add(("port", i), key=(476, 644), tokens=423, seq_len=423)
    assert sorted(b.next_batch()) == [("land", 0), ("land", 1), ("port", 0), ("port", 1)]
    assert b.stats.padded_tokens == 0
    exact = Bucketer(max_batch_size=4, max_tokens=10**6, max_wait_s=5, clock=Clock())
    for i in range(2):
        exact.add(("land", i), key=(644, 476), tokens=423, seq_len=423)
        exact.add(("port", i), key=(476, 644), tokens=423, seq_len=423)
    assert exact.next_batch() is None, "max_padding=0 (the default) keeps sizes apart"
    assert exact.next_batch(force=True) == [("land", 0), ("land", 1)]


def test_bucketer_padding_stays_within_the_limit_over_random_sizes():
    import random

    rng = random.Random(7)
    sizes = [288, 423, 761, 788, 800, 300, 1056]
    b = Bucketer(max_batch_size=16, max_tokens=12_000, max_wait_s=5, clock=Clock(), max_padding=0.1)
    seq_len: dict[int, int] = {}
    batches: list[list[int]] = []
    for i in range(2000):
        seq_len[i] = n = rng.choice(sizes)
        b.add(i, key=n, tokens=n + 64, seq_len=n)
        if i % 7 == 0 and (batch := b.next_batch()):
            batches.append(batch)
    while batch := b.next_batch(force=True):
        batches.append(batch)
    assert sorted(i for batch in batches for i in batch) == list(range(2000)), "each row once"
    for batch in batches:
        lengths = [seq_len[i] for i in batch]
        assert len(batch) <= 16 and sum(n + 64 for n in lengths) <= 12_000
        assert len(lengths) * max(lengths) - sum(lengths) <= 0.1 * len(lengths) * max(lengths)
    assert 0 < b.stats.padding_fraction <= 0.1  # 761/788/800 do share batches
    assert b.stats.as_dict()["mean_batch_size"] > 12  # so batches stay nearly full


# ---- prompts and config ---------------------------------------------------------------


def test_template_fields_and_rendering():
    assert template_fields("Q: {question} ({lang})") == ["question", "lang"]
    assert render_prompt("Q: {q}", ["q"], {"q": "why?"}) == "Q: why?"
    with pytest.raises(PromptError) as err:
        render_prompt("Q: {q}", ["q"], {"q": None})
    assert err.value.code == "BAD_PROMPT"
    for unsafe in ("{q.__class__}", "{q[0]}", "{q!r}", "{q:>10}"):
        with pytest.raises(ValueError, match="not allowed"):
            template_fields(unsafe)


def test_config_errors_name_the_key(tmp_path, dataset):
    job = write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None)
    with pytest.raises(ConfigError, match=r"unknown key 'engine\.nmae'.*name"):
        load_config(job, ["engine.nmae=hf"])
    with pytest.raises(ConfigError, match=r"batching\.max_batch_size: must be >= 1"):
        load_config(job, ["batching.max_batch_size=0"])
    with pytest.raises(ConfigError, match=r"engine\.name: 'gpt' is not one of"):
        load_config(job, ["engine.name=gpt"])
    with pytest.raises(ConfigError, match="no input"):
        load_config(job, ["input.paths=[]"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "typo.yaml").write_text("input:\n  pathz: [x]\noutput:\n  path: o\n")
    with pytest.raises(ConfigError, match=r"unknown key 'input\.pathz'"):
        load_config(tmp_path / "typo.yaml")


def test_fingerprint_covers_outputs_not_performance_knobs(tmp_path, dataset):
    job = write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None)

    def fp(*ov):
        return fingerprint(fingerprint_fields(load_config(job, list(ov)), "input-fp"))

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
    assert "s3cr3t" not in json.dumps(redact(to_dict(load_config(None, _min_overrides()))))
    secret_keys = ["access_key", "sessionToken", "sas_token", "client-secret", "Authorization"]
    kept = ["max_tokens", "max_tokens_per_batch", "max_num_tokens", "keyframe", "region"]
    red = redact({k: "v" for k in secret_keys + kept})
    assert [k for k in red if red[k] == "***"] == secret_keys
    saved = redact(to_dict(load_config(None, _min_overrides())))
    assert saved["sampling"]["max_tokens"] == 64, "settings are saved, only secrets hidden"
    assert saved["engine"]["fake"]["token_latency_s"] == 0.0


def _min_overrides():
    return [
        "input.paths=[x.parquet]",
        "output.path=o",
        "input.storage_options.secret=s3cr3t",
    ]


# ---- commit -----------------------------------------------------------------------------


def _results(rows, ok=True):
    cols = {name: [None] * len(rows) for name in ROW_RESULT.names}
    cols["source_row"] = list(rows)
    cols["id"] = [f"id-{r}" for r in rows]
    cols["ok"] = [ok] * len(rows)
    cols["text"] = ["t" if ok else None for _ in rows]
    cols["error_code"] = [None if ok else "DECODE_ERROR" for _ in rows]
    return pa.table(cols, schema=ROW_RESULT)


def test_exactly_once_check_rejects_missing_and_duplicate_rows():
    unit = WorkUnit("00000-00001", 0, "s", 10, 4)
    check_exactly_once(unit, _results([13, 10, 12, 11]))
    with pytest.raises(UnitIncomplete, match="1 missing"):
        check_exactly_once(unit, _results([10, 11, 12]))
    with pytest.raises(UnitIncomplete, match="1 duplicated"):
        check_exactly_once(unit, _results([10, 11, 12, 12]))


def test_commit_writes_parts_then_marker_and_cleans_orphans():
    fs = fsspec.filesystem("memory")
    root = "memory://commit-test"
    state = OutputState(root)
    unit = WorkUnit("00000-00000", 0, "s", 0, 3)
    table = pa.concat_tables([_results([0, 2]), _results([1], ok=False)])
    lineage = dict(job_id="j", model="m", engine="fake", engine_version="1", config_fingerprint="f")
    writes = []  # every file written, in order: the marker must come after both part files
    write_bytes = state.write_bytes

    def logged(rel, blob):
        writes.append(rel)
        return write_bytes(rel, blob)

    state.write_bytes = logged
    record = commit_unit(state, unit, table, lineage, 1, (DATA_COLUMNS, ERROR_COLUMNS))
    assert record.data_rows == 2 and record.error_codes == {"DECODE_ERROR": 1}
    assert writes == [
        "data/part-00000-00000.parquet",
        "errors/part-00000-00000.parquet",
        "_state/units/00000-00000.json",
    ], writes
    assert state.committed_units() == {"00000-00000"}
    # an interrupted commit of another unit: part file written, marker missing
    fs.pipe_file("/commit-test/data/part-00000-00001.parquet", b"partial")
    fs.pipe_file("/commit-test/data/.tmp-abc-part-00000-00002.parquet", b"tmp")
    # a committed unit's file that its marker does not name (a retry died before its marker)
    fs.pipe_file("/commit-test/data/part-00000-00000.retry-1.parquet", b"unnamed")
    removed = state.clean_orphans(state.markers())
    assert sorted(p.rsplit("/", 1)[1] for p in removed) == [
        ".tmp-abc-part-00000-00002.parquet",
        "part-00000-00000.retry-1.parquet",
        "part-00000-00001.parquet",
    ]
    assert fs.exists("/commit-test/data/part-00000-00000.parquet")
    assert fs.exists("/commit-test/errors/part-00000-00000.parquet")


# ---- actor layout ---------------------------------------------------------------------


def test_actor_layout_one_per_gpu_cpu_fallback_and_tensor_parallel(tmp_path, dataset):
    from qvl_batch.cluster import ClusterError, actor_layout

    job = write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None)

    def layout(resources, *ov):
        return actor_layout(load_config(job, ["cluster.num_actors=0", *ov]), resources)

    n, opts = layout({"GPU": 8, "CPU": 64})
    assert n == 8 and opts["num_gpus"] == 1
    n, opts = layout({"CPU": 6}, "cluster.cpus_per_actor=2")
    assert n == 3 and "num_gpus" not in opts and opts["num_cpus"] == 2
    n, opts = layout(
        {"GPU": 8, "CPU": 64},
        "engine.name=trtllm",
        "engine.model=m",
        "engine.trtllm.tensor_parallel_size=2",
    )
    assert n == 4 and opts["num_gpus"] == 2
    n, _ = layout({"GPU": 2, "CPU": 64}, "cluster.num_actors=5")
    assert n == 2, "capped at what the cluster fits"
    with pytest.raises(ClusterError, match="room for no actor"):
        layout(
            {"GPU": 1, "CPU": 8},
            "engine.name=trtllm",
            "engine.model=m",
            "engine.trtllm.tensor_parallel_size=2",
        )
