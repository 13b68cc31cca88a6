"""WebDataset tar shards as row sources: one sample a row (what img2dataset writes).

A sample is the run of consecutive members sharing a key (the member path up to the first dot
of its basename): ``key.jpg`` the image, ``key.txt`` a ``txt`` column, ``key.json`` its top-level
fields as columns. Planning walks the tar headers only (seeking past member data) and keeps the
offset of every GROUP_ROWS-th sample, so a unit opens the tar at its own first sample.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

from .formats import EXTENSIONS
from .textfiles import Layout, malformed

IMAGE_EXTS = tuple(e.lstrip(".") for e in EXTENSIONS["images"])


def split_key(name: str) -> tuple[str, str]:
    """(key, extension): ``a/b/000123.seg.png`` -> (``a/b/000123``, ``seg.png``)."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


def _samples(tf: tarfile.TarFile, end: int | None) -> Iterator[tuple[int, str, list]]:
    """(offset of the first member, key, members) of each sample, up to byte ``end``."""
    current: tuple[int, str, list] | None = None
    for info in tf:
        if end is not None and info.offset >= end:
            break
        if not info.isfile():
            continue
        key, _ = split_key(info.name)
        if current is None or key != current[1]:
            if current is not None:
                yield current
            current = (info.offset, key, [])
        current[2].append(info)
    if current is not None:
        yield current


def scan_tar(fh, size: int) -> Layout:
    layout = Layout()
    with tarfile.open(fileobj=fh, mode="r:") as tf:
        for offset, _, members in _samples(tf, None):
            layout.row_start(offset)
            for info in members:
                ext = split_key(info.name)[1]
                layout.columns.add("txt" if ext == "txt" else "image" if ext in IMAGE_EXTS else ext)
    layout.offsets.append(size)
    return layout


def _sample_row(tf: tarfile.TarFile, key: str, members: list) -> dict[str, Any]:
    row: dict[str, Any] = {}
    image = None
    for info in members:
        ext = split_key(info.name)[1]
        try:
            data = tf.extractfile(info).read()
        except (tarfile.TarError, OSError) as exc:
            return {"id": key, **malformed(f"{info.name}: cannot be read ({exc})")}
        if ext == "json":
            try:
                fields = json.loads(data)
            except ValueError as exc:
                return {"id": key, **malformed(f"{info.name}: not JSON ({exc})")}
            if isinstance(fields, dict):
                row.update({k: v for k, v in fields.items() if k not in ("id", "image")})
        elif ext == "txt":
            row["txt"] = data.decode("utf-8", errors="replace")
        elif image is None and ext.rsplit(".", 1)[-1] in IMAGE_EXTS:
            image = data
    if image is None:
        kinds = sorted({split_key(i.name)[1] for i in members})
        return {"id": key, **malformed(f"sample {key} has no image member (has: {kinds})")}
    return {**row, "id": key, "image": image}


def tar_rows(fh, start: int, end: int) -> list[dict[str, Any]]:
    """The samples whose first member lies in ``[start, end)``, as rows."""
    fh.seek(start)
    with tarfile.open(fileobj=fh, mode="r:") as tf:
        return [_sample_row(tf, key, members) for _, key, members in _samples(tf, end)]
