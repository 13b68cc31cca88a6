"""Tests for qvl_batch.tooling.synth: shard layout, determinism, row kinds, formats, filesystems."""

from __future__ import annotations

import io
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from qvl_batch.tooling import synth
from qvl_batch.tooling.pictures import encode_jpeg, photo_like
from qvl_batch.tooling.synth import SynthSpec, make_dataset, make_tiny_rows_dataset

ORIENTATION = 0x0112
SPEC = SynthSpec(
    rows=61,
    shards=3,
    row_group_rows=8,
    min_side=32,
    max_side=200,
    exif_fraction=0.25,
    corrupt_fraction=0.1,
    png_fraction=0.1,
    prompt_column=True,
    seed=7,
)


def _read(paths: list[str], fs=None) -> pa.Table:
    """Concatenate the shards at paths, in order."""
    fs = fs or fsspec.filesystem("file")
    tables = []
    for path in paths:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


def _rows(table: pa.Table) -> list[dict]:
    """The table as a list of row dicts."""
    return table.to_pylist()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[list[str], pa.Table]:
    """SPEC written once to a temp dir: (shard paths, all rows)."""
    paths = make_dataset(tmp_path_factory.mktemp("synth") / "ds", SPEC)
    return paths, _read(paths)


def test_shards_rows_and_ids(dataset):
    paths, table = dataset
    assert [p.rsplit("/", 1)[1] for p in paths] == [f"part-0000{i}.parquet" for i in range(3)]
    assert paths == sorted(paths)
    assert [pq.ParquetFile(p).metadata.num_rows for p in paths] == [21, 20, 20]
    assert table.num_rows == 61
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == 61
    assert ids[0] == "img-000000" and ids[-1] == "img-000060"
    assert table.schema == synth.synth_schema("bytes", prompt_column=True)
    assert table.schema.field("width").type == pa.int32()
    assert all(q for q in table.column("question").to_pylist())


def test_row_groups_have_requested_size(dataset):
    paths, _ = dataset
    sizes = []
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        sizes.append([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    assert sizes == [[8, 8, 5], [8, 8, 4], [8, 8, 4]]


def test_deterministic_and_seeded(dataset, tmp_path):
    _, table = dataset
    images = table.column("image")
    again = _read(make_dataset(tmp_path / "again", SPEC, workers=1))
    assert again.column("image").equals(images)
    assert again.column("id").equals(table.column("id"))
    resharded = SynthSpec(**{**SPEC.__dict__, "shards": 5, "row_group_rows": 3})
    assert _read(make_dataset(tmp_path / "resharded", resharded)).column("image").equals(images)
    # An all-ok plan for both seeds, so only the pixels themselves can differ.
    plain = {**SPEC.__dict__, "rows": 6, "exif_fraction": 0, "corrupt_fraction": 0}
    plain["png_fraction"] = 0
    seven = _read(make_dataset(tmp_path / "seven", SynthSpec(**plain)))
    eight = _read(make_dataset(tmp_path / "eight", SynthSpec(**{**plain, "seed": 8})))
    assert set(seven.column("kind").to_pylist()) == {"ok"}
    assert all(a != b for a, b in zip(seven.column("image"), eight.column("image")))


def test_kind_shares(dataset):
    _, table = dataset
    kinds = table.column("kind").to_pylist()
    counts = {k: kinds.count(k) for k in synth.KINDS}
    assert counts["corrupt"] == round(61 * 0.1)
    assert counts["png"] + counts["rgba"] == round(61 * 0.1)
    assert counts["exif"] == round(61 * 0.25)
    assert min(counts.values()) >= 1
    assert set(table.column("source").to_pylist()) <= set(synth.SOURCES)


def test_corrupt_rows_fail_to_decode(dataset):
    _, table = dataset
    corrupt = [r for r in _rows(table) if r["kind"] == "corrupt"]
    for row in corrupt:
        assert row["width"] is None and row["height"] is None
        with pytest.raises(Exception):  # noqa: B017 - any decode error will do
            Image.open(io.BytesIO(row["image"])).load()
    blobs = [r["image"] for r in corrupt]
    assert b"" in blobs
    assert any(b.startswith(b"\xff\xd8") for b in blobs), "no truncated JPEG in the mix"
    assert any(b and not b.startswith(b"\xff\xd8") for b in blobs), "no random bytes in the mix"


def test_good_rows_decode_with_recorded_oriented_size(dataset):
    _, table = dataset
    for row in _rows(table):
        if row["kind"] == "corrupt":
            continue
        img = Image.open(io.BytesIO(row["image"]))
        img.load()
        orientation = img.getexif().get(ORIENTATION)
        assert ImageOps.exif_transpose(img).size == (row["width"], row["height"]), row["id"]
        assert SPEC.min_side <= min(row["width"], row["height"])
        assert max(row["width"], row["height"]) <= SPEC.max_side
        assert max(row["width"], row["height"]) <= 3 * min(row["width"], row["height"]) + 1
        if row["kind"] == "exif":
            assert img.format == "JPEG" and 2 <= orientation <= 8
            swapped = orientation >= 5
            expected_stored = (
                (row["height"], row["width"]) if swapped else (row["width"], row["height"])
            )
            assert img.size == expected_stored, "pixels must be stored un-rotated"
        elif row["kind"] == "ok":
            assert img.format == "JPEG" and img.mode == "RGB" and orientation is None
        elif row["kind"] == "png":
            assert img.format == "PNG" and img.mode == "RGB"
        else:
            assert img.format == "PNG" and img.mode == "RGBA"
            lo, hi = img.getchannel("A").getextrema()
            assert lo == 0 and hi > 0, "RGBA rows need transparent and opaque parts"


def test_struct_image_format_round_trips(dataset, tmp_path):
    _, table = dataset
    spec = SynthSpec(**{**SPEC.__dict__, "image_format": "struct"})
    struct_table = _read(make_dataset(tmp_path / "struct", spec))
    image_type = struct_table.schema.field("image").type
    assert pa.types.is_struct(image_type)
    assert [image_type.field(i).name for i in range(2)] == ["bytes", "path"]
    images = struct_table.column("image").to_pylist()
    assert [im["bytes"] for im in images] == table.column("image").to_pylist()
    for im, row in zip(images, _rows(table)):
        assert im["path"].startswith(row["id"])
        assert im["path"].endswith(".png" if row["kind"] in ("png", "rgba") else ".jpg")


def test_memory_filesystem():
    fs = fsspec.filesystem("memory")
    root = f"/synth-test-{uuid.uuid4().hex}"
    try:
        spec = SynthSpec(rows=10, shards=2, row_group_rows=4, max_side=96, seed=1)
        paths = make_dataset(root, spec, fs=fs)
        assert len(paths) == 2 and all(fs.exists(p) for p in paths)
        assert _read(paths, fs).num_rows == 10
        tiny = make_tiny_rows_dataset(f"{root}/tiny", rows=100, shards=2, fs=fs)
        assert _read(tiny, fs).num_rows == 100
    finally:
        fs.rm(root, recursive=True)


def test_size_choices_are_used(tmp_path):
    choices = [(100, 50), (40, 120)]
    spec = SynthSpec(rows=12, shards=1, size_choices=choices, corrupt_fraction=0, seed=3)
    table = _read(make_dataset(tmp_path, spec))
    sizes = set(zip(table.column("width").to_pylist(), table.column("height").to_pylist()))
    assert sizes <= set(choices)


def test_photo_like_has_realistic_entropy():
    img = photo_like(np.random.default_rng(0), 320, 240)
    assert img.mode == "RGB" and img.size == (320, 240)
    assert np.asarray(img).reshape(-1, 3).std(axis=0).min() > 10
    flat = Image.new("RGB", img.size, tuple(int(v) for v in np.asarray(img).mean(axis=(0, 1))))
    assert len(encode_jpeg(img)) > 10 * len(encode_jpeg(flat))
    again = photo_like(np.random.default_rng(0), 320, 240)
    assert np.array_equal(np.asarray(img), np.asarray(again))


def test_encode_jpeg_orientation_and_progressive():
    img = photo_like(np.random.default_rng(1), 64, 48)
    tagged = Image.open(io.BytesIO(encode_jpeg(img, exif_orientation=6)))
    assert tagged.getexif().get(ORIENTATION) == 6
    assert ImageOps.exif_transpose(tagged).size == (48, 64)
    plain = Image.open(io.BytesIO(encode_jpeg(img)))
    assert ORIENTATION not in plain.getexif()
    assert Image.open(io.BytesIO(encode_jpeg(img, progressive=True))).info.get("progressive")
    with pytest.raises(ValueError):
        encode_jpeg(img, exif_orientation=9)


def test_tiny_rows_dataset(tmp_path):
    paths = make_tiny_rows_dataset(tmp_path, rows=50_000, shards=3, row_group_rows=4096)
    table = _read(paths)
    assert table.num_rows == 50_000
    assert table.schema == synth.synth_schema("bytes")
    assert len(set(table.column("id").to_pylist())) == 50_000
    assert set(table.column("kind").to_pylist()) == {"ok"}
    meta = pq.ParquetFile(paths[0]).metadata
    assert meta.row_group(0).num_rows == 4096
    img = Image.open(io.BytesIO(table.column("image")[123].as_py()))
    assert img.size == (56, 56) and img.format == "JPEG"


def test_spec_validation(tmp_path):
    for bad in (
        {"shards": 0},
        {"row_group_rows": 0},
        {"min_side": 10, "max_side": 5},
        {"exif_fraction": 0.6, "png_fraction": 0.6},
        {"image_format": "jpeg"},
    ):
        with pytest.raises(ValueError):
            make_dataset(tmp_path, SynthSpec(rows=4, **bad))


def test_cli_prints_what_it_wrote(tmp_path, capsys):
    synth.main([str(tmp_path / "cli"), "--rows", "40", "--shards", "2", "--tiny"])
    out = capsys.readouterr().out
    assert "part-00000.parquet" in out and "part-00001.parquet" in out
    assert "wrote 40 rows in 2 shards" in out
