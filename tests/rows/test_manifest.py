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


def _table_shard(folder, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), folder / "part-0.parquet")
    return folder


@pytest.mark.parametrize(
    ("column", "kind"),
    [
        ([b"\xff\xd8"], "bytes"),
        (["s3://b/k.jpg"], "uri"),
        ([{"bytes": b"x", "path": "a.jpg"}], "struct"),
        ([{"path": "a.jpg"}], "path"),
    ],
)
def test_image_columns_of_the_allowed_types_plan_with_their_kind(tmp_path, column, kind):
    data = _table_shard(tmp_path / "d", id=["a"], image=column)
    cfg = load_job(write_job(tmp_path / "j.yaml", data, tmp_path / "o", None))
    cfg.input.passthrough_columns = []
    assert plan_job(cfg).image_kind == kind


def test_an_image_column_of_another_type_is_refused_naming_it(tmp_path):
    # An int64 column passed the column check before and made every row MISSING_IMAGE.
    data = _table_shard(tmp_path / "d", id=["a", "b"], image=[1, 2])
    cfg = load_job(write_job(tmp_path / "j.yaml", data, tmp_path / "o", None))
    cfg.input.passthrough_columns = []
    with pytest.raises(InputError, match=r"column 'image' of .* is int64, .* must be binary"):
        plan_job(cfg)


def test_a_small_job_is_cut_so_each_actor_gets_two_units(tmp_path):
    from qvl_batch.tooling.synth import SynthSpec, make_dataset

    spec = SynthSpec(rows=202, shards=1, row_group_rows=202, max_side=64, corrupt_fraction=0)
    make_dataset(str(tmp_path / "d"), spec)
    job = write_job(tmp_path / "j.yaml", tmp_path / "d", tmp_path / "o", None)
    cfg = load_job(job, ["batching.unit_rows=512", "cluster.num_actors=2"])
    units = list(plan_job(cfg).units())
    assert len(units) >= 4 and sum(u.num_rows for u in units) == 202, units
    # Never below the floor: 202 rows on 64 actors are units of 16 rows, not of 2.
    many = load_job(job, ["batching.unit_rows=512", "cluster.num_actors=64"])
    assert plan_job(many).unit_rows == 16
    # A large job keeps batching.unit_rows; min_units_per_actor=0 turns the cap off.
    off = load_job(job, ["batching.unit_rows=512", "batching.min_units_per_actor=0"])
    assert plan_job(off).num_units() == 1
    assert plan_job(cfg, unit_rows=512).num_units() == 1  # a resumed job's size wins
