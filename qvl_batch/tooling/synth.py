"""Synthetic image/prompt Parquet datasets for the demo, the tests and the benchmarks.

Every row is generated from its own random stream seeded by ``(seed, row index)`` and the row kinds
come from one seeded plan, so the same :class:`SynthSpec` always yields byte-identical image bytes
and ids, whatever the shard count. Images are photo-like (gradients, blobs, edges, grain) so JPEG
decoding costs about what real photos cost.

Row kinds (column ``kind``):

* ``ok``: a JPEG (some progressive), stored upright.
* ``exif``: a JPEG whose pixels are stored un-rotated with an EXIF Orientation tag 2..8;
  ``width``/``height`` record the *oriented* (displayed) size, i.e. the size of
  ``ImageOps.exif_transpose(img)``.
* ``png``: an RGB PNG. ``rgba``: an RGBA PNG with transparent regions.
* ``corrupt``: undecodable bytes, a mix of truncated JPEGs, random bytes and empty bytes;
  ``width``/``height`` are null. (A truncated JPEG fails ``Image.open(...).load()`` under Pillow's
  defaults; it would decode partially with ``ImageFile.LOAD_TRUNCATED_IMAGES = True``.)
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .pictures import encode_jpeg, encode_png, photo_like, stored_as, with_alpha

KINDS = ("ok", "exif", "corrupt", "png", "rgba")
SOURCES = (
    "synth/landscape",
    "synth/portrait",
    "synth/street",
    "synth/product",
    "synth/document",
    "synth/animal",
    "synth/food",
    "synth/indoor",
)
QUESTIONS = (
    "Describe this image in one sentence.",
    "What is the main object in this picture?",
    "How many distinct shapes can you see?",
    "What colours dominate this image?",
    "Is this photo taken indoors or outdoors?",
    "Write a short alt-text for this image.",
    "List three things you notice in the picture, separated by commas.",
    "Describe the image in detail: the layout, the colours, the shapes and their positions, "
    "and anything that looks unusual. Answer in a paragraph.",
)
COMMON_SIZES = (
    (224, 224),
    (336, 336),
    (448, 448),
    (512, 512),
    (320, 240),
    (640, 480),
    (480, 640),
    (800, 600),
    (1024, 768),
    (1280, 720),
    (720, 1280),
    (1920, 1080),
)
# A prefix no Pillow plugin accepts (byte 1 = 0xFF also rules out headerless TGA).
_GARBAGE_PREFIX = b"\x00\xffNOT-AN-IMAGE\x00"
_TINY_SIDE = 56
_TINY_DISTINCT = 16

# Internal row plan codes; the three corrupt variants all report kind "corrupt".
_OK, _EXIF, _PNG, _RGBA, _TRUNCATED, _GARBAGE, _EMPTY = range(7)
_KIND_OF_CODE = ("ok", "exif", "png", "rgba", "corrupt", "corrupt", "corrupt")


@dataclass
class SynthSpec:
    """What synthetic dataset to write; the same spec always writes the same rows."""

    rows: int = 2000
    shards: int = 4
    row_group_rows: int = 128  # rows per Parquet row group
    min_side: int = 64  # both sides of a drawn image lie in [min_side, max_side]
    max_side: int = 640
    size_choices: list[tuple[int, int]] | None = None  # if set, draw (w, h) from these instead
    exif_fraction: float = 0.05  # JPEGs stored un-rotated with EXIF orientation 2..8
    corrupt_fraction: float = 0.01  # truncated JPEG / random bytes / empty bytes, in turn
    png_fraction: float = 0.05  # PNGs, half of them RGBA with transparency
    image_format: str = "bytes"  # "bytes": binary column; "struct": {bytes, path} as HF writes
    prompt_column: bool = False  # add a per-row 'question' string column
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError on a spec that cannot be generated, before any file is written."""
        _require(self.rows >= 0, f"rows must be >= 0, got {self.rows}")
        _require(self.shards >= 1, f"shards must be >= 1, got {self.shards}")
        _require(
            self.row_group_rows >= 1, f"row_group_rows must be >= 1, got {self.row_group_rows}"
        )
        _require(
            1 <= self.min_side <= self.max_side,
            f"need 1 <= min_side <= max_side, got {self.min_side}, {self.max_side}",
        )
        _require(self.size_choices is None or len(self.size_choices) > 0, "size_choices is empty")
        for w, h in self.size_choices or ():
            _require(w >= 1 and h >= 1, f"size_choices has a bad size {(w, h)}")
        fractions = (self.exif_fraction, self.corrupt_fraction, self.png_fraction)
        _require(all(0.0 <= f <= 1.0 for f in fractions), "fractions must lie in [0, 1]")
        _require(sum(fractions) <= 1.0, "exif + corrupt + png fractions must not exceed 1")
        _require(self.image_format in ("bytes", "struct"), "image_format: 'bytes' or 'struct'")
        _require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")


def _require(cond: bool, message: str) -> None:
    """Raise ValueError with message unless cond holds."""
    if not cond:
        raise ValueError(f"SynthSpec: {message}")


# ----------------------------------------------------------------------------- row plan


def _count(rows: int, fraction: float) -> int:
    """Rows of a kind with this share: rounded, but at least one when the share is > 0."""
    if fraction <= 0 or rows == 0:
        return 0
    return max(1, round(rows * fraction))


def _plan(spec: SynthSpec) -> np.ndarray:
    """One int8 plan code per row: exact shares of each kind, at seeded random positions."""
    rows = spec.rows
    codes = np.full(rows, _OK, dtype=np.int8)
    order = np.random.default_rng([spec.seed, 0]).permutation(rows)
    n_corrupt = min(rows, _count(rows, spec.corrupt_fraction))
    n_png = min(rows - n_corrupt, _count(rows, spec.png_fraction))
    n_exif = min(rows - n_corrupt - n_png, _count(rows, spec.exif_fraction))
    corrupt = order[:n_corrupt]
    codes[corrupt] = _TRUNCATED + np.arange(n_corrupt) % 3  # in turn
    png = order[n_corrupt : n_corrupt + n_png]
    codes[png] = np.where(np.arange(n_png) % 2 == 0, _PNG, _RGBA)
    codes[order[n_corrupt + n_png : n_corrupt + n_png + n_exif]] = _EXIF
    return codes


def _draw_size(rng: np.random.Generator, spec: SynthSpec) -> tuple[int, int]:
    """A (width, height): from size_choices, else a common size or a random aspect 1:3..3:1."""
    if spec.size_choices:
        w, h = spec.size_choices[int(rng.integers(len(spec.size_choices)))]
        return int(w), int(h)
    common = [s for s in COMMON_SIZES if spec.min_side <= min(s) and max(s) <= spec.max_side]
    if common and rng.random() < 0.15:
        return common[int(rng.integers(len(common)))]
    long_side = int(rng.integers(spec.min_side, spec.max_side + 1))
    ratio = math.exp(rng.uniform(0.0, math.log(3.0)))
    short_side = min(long_side, max(spec.min_side, round(long_side / ratio)))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _corrupt_bytes(rng: np.random.Generator, code: int, width: int, height: int) -> bytes:
    """Undecodable image bytes: a JPEG cut short, random bytes, or nothing."""
    if code == _EMPTY:
        return b""
    if code == _GARBAGE:
        return _GARBAGE_PREFIX + rng.bytes(int(rng.integers(16, 4096)))
    data = encode_jpeg(photo_like(rng, width, height), quality=int(rng.integers(75, 96)))
    return data[: int(len(data) * rng.uniform(0.3, 0.8))]


def _image_bytes(rng: np.random.Generator, code: int, width: int, height: int) -> bytes:
    """Encoded image bytes for one non-corrupt row; (width, height) is the displayed size."""
    quality = int(rng.integers(75, 96))
    if code == _EXIF:
        orientation = int(rng.integers(2, 9))
        stored = stored_as(photo_like(rng, width, height), orientation)
        return encode_jpeg(stored, quality=quality, exif_orientation=orientation)
    img = photo_like(rng, width, height)
    if code == _PNG:
        return encode_png(img)
    if code == _RGBA:
        return encode_png(with_alpha(rng, img))
    return encode_jpeg(img, quality=quality, progressive=bool(rng.random() < 0.1))


def _make_row(spec: SynthSpec, index: int, code: int, id_width: int) -> dict:
    """Generate row index from its own seeded stream (independent of sharding).

    Besides the table's columns the row carries 'path', the file name an HF struct would record.
    """
    rng = np.random.default_rng([spec.seed, 1, index])
    width, height = _draw_size(rng, spec)
    is_corrupt = _KIND_OF_CODE[code] == "corrupt"
    if is_corrupt:
        data = _corrupt_bytes(rng, code, width, height)
    else:
        data = _image_bytes(rng, code, width, height)
    row = {
        "id": f"img-{index:0{id_width}d}",
        "image": data,
        "source": SOURCES[int(rng.integers(len(SOURCES)))],
        "kind": _KIND_OF_CODE[code],
        "width": None if is_corrupt else width,
        "height": None if is_corrupt else height,
        "path": f"img-{index:0{id_width}d}.{'png' if code in (_PNG, _RGBA) else 'jpg'}",
    }
    if spec.prompt_column:
        row["question"] = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
    return row


# ----------------------------------------------------------------------------- parquet


def synth_schema(image_format: str = "bytes", prompt_column: bool = False) -> pa.Schema:
    """The Arrow schema of the synthetic shards."""
    if image_format == "struct":
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    elif image_format == "bytes":
        image_type = pa.binary()
    else:
        raise ValueError(f"image_format must be 'bytes' or 'struct', got {image_format!r}")
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", image_type),
        pa.field("source", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
    if prompt_column:
        fields.append(pa.field("question", pa.string()))
    return pa.schema(fields)


def _image_array(data: pa.Array, paths: pa.Array, image_format: str) -> pa.Array:
    """The image column: binary as is, or an HF-style {bytes, path} struct."""
    if image_format == "bytes":
        return data
    return pa.StructArray.from_arrays([data, paths], names=["bytes", "path"])


def _shard_bounds(rows: int, shards: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges splitting rows as evenly as possible (first shards get extras)."""
    base, extra = divmod(rows, shards)
    bounds, start = [], 0
    for i in range(shards):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _id_width(rows: int) -> int:
    """Digits in ids: at least 6 ('img-000123'), more for big datasets, so ids sort as numbers."""
    return max(6, len(str(max(rows - 1, 0))))


def _resolve(out_dir: str | os.PathLike, fs) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and output directory path; fs=None infers it from out_dir (local default)."""
    out = os.fspath(out_dir)
    if fs is None:
        return fsspec.core.url_to_fs(out)
    return fs, out


def _shard_path(out_dir: str, shard: int) -> str:
    """Path of shard number shard under out_dir."""
    return f"{out_dir.rstrip('/')}/part-{shard:05d}.parquet"


def _write_shard(
    fs, path: str, schema: pa.Schema, groups: Iterator[dict[str, pa.Array | list]]
) -> None:
    """Write one shard, one Parquet row group per table yielded by groups."""
    with fs.open(path, "wb") as f, pq.ParquetWriter(f, schema) as writer:
        for columns in groups:
            table = pa.table(columns, schema=schema)
            writer.write_table(table, row_group_size=max(1, table.num_rows))


def _row_groups(
    spec: SynthSpec, codes: np.ndarray, bounds: tuple[int, int], pool: ThreadPoolExecutor
) -> Iterator[dict[str, pa.Array | list]]:
    """Generate rows [start, stop) as column dicts of at most spec.row_group_rows rows each.

    Rows of a group are made in parallel threads (Pillow releases the GIL while it encodes);
    each row has its own seeded stream, so the output does not depend on the thread count.
    """
    start, stop = bounds
    id_width = _id_width(spec.rows)
    for lo in range(start, stop, spec.row_group_rows):
        indices = range(lo, min(stop, lo + spec.row_group_rows))
        rows = list(pool.map(lambda i: _make_row(spec, i, int(codes[i]), id_width), indices))
        columns = {name: [r[name] for r in rows] for name in rows[0]}
        paths = pa.array(columns.pop("path"), pa.string())
        image = pa.array(columns["image"], pa.binary())
        columns["image"] = _image_array(image, paths, spec.image_format)
        yield columns


def make_dataset(
    out_dir: str | os.PathLike, spec: SynthSpec, fs=None, *, workers: int | None = None
) -> list[str]:
    """Write spec.shards Parquet shards part-00000.parquet ... under out_dir; return their paths.

    Columns: id, image (binary or {bytes, path} struct), source, kind, width, height (int32, the
    displayed size; null for corrupt rows) and question if spec.prompt_column. Rows are split as
    evenly as possible across shards and streamed one row group at a time. fs: an fsspec
    filesystem; default: inferred from out_dir (local for a plain path). workers: threads that
    make images (default: up to 8 CPUs); the bytes written do not depend on it.
    """
    spec.validate()
    fs, root = _resolve(out_dir, fs)
    fs.makedirs(root, exist_ok=True)
    schema = synth_schema(spec.image_format, spec.prompt_column)
    codes = _plan(spec)
    paths = []
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        for shard, bounds in enumerate(_shard_bounds(spec.rows, spec.shards)):
            groups = _row_groups(spec, codes, bounds, pool)
            _write_shard(fs, _shard_path(root, shard), schema, groups)
            paths.append(_shard_path(os.fspath(out_dir), shard))
    return sorted(paths)


# ----------------------------------------------------------------------------- tiny rows


def _tiny_images(seed: int) -> pa.Array:
    """A handful of distinct pre-encoded 56x56 JPEGs that tiny-row datasets reuse."""
    rng = np.random.default_rng([seed, 2])
    images = [
        encode_jpeg(photo_like(rng, _TINY_SIDE, _TINY_SIDE), quality=85)
        for _ in range(_TINY_DISTINCT)
    ]
    return pa.array(images, pa.binary())


def _tiny_ids(start: int, stop: int, id_width: int) -> pa.Array:
    """Ids 'img-<zero-padded index>' for rows [start, stop), built vectorised in Arrow."""
    digits = pc.cast(pa.array(np.arange(start, stop, dtype=np.int64)), pa.string())
    padded = pc.utf8_lpad(digits, width=id_width, padding="0")
    return pc.binary_join_element_wise("img-", padded, "")


def _tiny_groups(
    rng: np.random.Generator,
    images: pa.Array,
    bounds: tuple[int, int],
    row_group_rows: int,
    id_width: int,
    options: tuple[str, bool],
) -> Iterator[dict[str, pa.Array]]:
    """Column dicts of tiny rows for rows [start, stop), row_group_rows at a time."""
    start, stop = bounds
    image_format, prompt_column = options
    sources = pa.array(SOURCES, pa.string())
    questions = pa.array(QUESTIONS, pa.string())
    for lo in range(start, stop, row_group_rows):
        n = min(stop, lo + row_group_rows) - lo
        ids = _tiny_ids(lo, lo + n, id_width)
        paths = pc.binary_join_element_wise(ids, ".jpg", "")
        picks = pa.array(rng.integers(0, len(images), n))
        size = pa.array(np.full(n, _TINY_SIDE, dtype=np.int32))
        columns = {
            "id": ids,
            "image": _image_array(images.take(picks), paths, image_format),
            "source": sources.take(pa.array(rng.integers(0, len(SOURCES), n))),
            "kind": pa.array(np.full(n, "ok", dtype=object), pa.string()),
            "width": size,
            "height": size,
        }
        if prompt_column:
            columns["question"] = questions.take(pa.array(rng.integers(0, len(QUESTIONS), n)))
        yield columns


def make_tiny_rows_dataset(
    out_dir: str | os.PathLike,
    rows: int,
    shards: int,
    row_group_rows: int = 4096,
    seed: int = 0,
    fs=None,
    *,
    image_format: str = "bytes",
    prompt_column: bool = False,
) -> list[str]:
    """Write many tiny rows (16 distinct 56x56 JPEGs, reused) fast, for scale/memory benchmarks.

    Same columns and shard naming as make_dataset, every row kind='ok'; returns the shard paths.
    """
    SynthSpec(
        rows=rows,
        shards=shards,
        row_group_rows=row_group_rows,
        image_format=image_format,
        seed=seed,
    ).validate()
    fs, root = _resolve(out_dir, fs)
    fs.makedirs(root, exist_ok=True)
    schema = synth_schema(image_format, prompt_column)
    images = _tiny_images(seed)
    rng = np.random.default_rng([seed, 3])
    options = (image_format, prompt_column)
    paths = []
    for shard, bounds in enumerate(_shard_bounds(rows, shards)):
        groups = _tiny_groups(rng, images, bounds, row_group_rows, _id_width(rows), options)
        _write_shard(fs, _shard_path(root, shard), schema, groups)
        paths.append(_shard_path(os.fspath(out_dir), shard))
    return sorted(paths)


# ----------------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line of `python -m qvl_batch.tooling.synth`."""
    parser = argparse.ArgumentParser(
        prog="python -m qvl_batch.tooling.synth",
        description="Write a synthetic image Parquet dataset.",
    )
    parser.add_argument("out_dir", help="output directory or fsspec URL")
    parser.add_argument("--rows", type=int, default=SynthSpec.rows)
    parser.add_argument("--shards", type=int, default=SynthSpec.shards)
    parser.add_argument("--row-group-rows", type=int, default=None)
    parser.add_argument("--max-side", type=int, default=SynthSpec.max_side)
    parser.add_argument("--image-format", choices=("bytes", "struct"), default="bytes")
    parser.add_argument("--prompt-column", action="store_true", help="add a 'question' column")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="many tiny rows (56x56, reused)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Write the dataset the command line asks for and print what was written."""
    args = _parse_args(argv)
    started = time.perf_counter()
    common = {"image_format": args.image_format, "prompt_column": args.prompt_column}
    if args.tiny:
        group = args.row_group_rows or 4096
        paths = make_tiny_rows_dataset(
            args.out_dir, args.rows, args.shards, group, args.seed, **common
        )
    else:
        spec = SynthSpec(
            rows=args.rows,
            shards=args.shards,
            row_group_rows=args.row_group_rows or SynthSpec.row_group_rows,
            max_side=args.max_side,
            seed=args.seed,
            **common,
        )
        paths = make_dataset(args.out_dir, spec)
    elapsed = time.perf_counter() - started
    for path in paths:
        print(path)
    rate = args.rows / elapsed if elapsed > 0 else float("inf")
    print(f"wrote {args.rows} rows in {len(paths)} shards in {elapsed:.2f}s ({rate:,.0f} rows/s)")


if __name__ == "__main__":
    main()


def photo_dataset(
    data: Path, rows: int, shards: int = 4, max_side: int = 2000, exif_fraction: float = 0.0
) -> Path:
    """Photo-like JPEGs (512 to ``max_side`` px, 4 shards) in ``data``, made once and reused."""
    if not (data / ".done").exists():
        print(f"making {rows} photo-like JPEGs, 512-{max_side} px ...", flush=True)
        spec = SynthSpec(
            rows=rows,
            shards=shards,
            row_group_rows=32,
            min_side=512,
            max_side=max_side,
            corrupt_fraction=0.0,
            png_fraction=0.0,
            exif_fraction=exif_fraction,
        )
        make_dataset(str(data), spec)
        (data / ".done").touch()
    return data
