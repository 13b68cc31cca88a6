"""The planner (manifest.py): shards, units cut from row groups, the input fingerprint."""

from __future__ import annotations

import pytest

from qvl_batch.rows.manifest import InputError, Shard, cut_units, plan_job
from qvl_batch.run.validate import load_job

from ..conftest import write_job


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
    cfg = load_job(write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None))
    plan = plan_job(cfg)
    assert [s.url for s in plan.shards] == sorted(s.url for s in plan.shards)
    assert plan.total_rows == 240 and len(plan.fingerprint) == 16
    bad = load_job(
        write_job(tmp_path / "j2.yaml", dataset, tmp_path / "o", None),
        ["input.passthrough_columns=[nope]"],
    )
    with pytest.raises(InputError, match=r"lacks column\(s\) \['nope'\]"):
        plan_job(bad)


def test_input_fingerprint_changes_when_a_shard_changes(tmp_path, dataset):
    cfg = load_job(write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None))
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
    cfg = load_job(
        write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None),
        ["input.paths=[]", f"input.manifest={manifest}"],
    )
    assert [s.url for s in plan_job(cfg).shards] == shards[:2]
