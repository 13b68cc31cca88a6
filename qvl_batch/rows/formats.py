"""What the input paths hold, and the files each names.

``input.format: auto`` decides once per job from the files listed: by extension, and for JSON
lines by the first line (an OpenAI Batch line has ``custom_id`` and ``body``). A folder is read
for the first kind it holds, in the order of :data:`FOLDER_ORDER` (a folder of Parquet shards
with a README stays Parquet). One job reads one format: a mix stops before any work.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field

from ..errors import InputError
from ..storage import Storage, describe, full_url

GLOB_CHARS = "*?["

EXTENSIONS = {
    "parquet": (".parquet", ".pq"),
    "webdataset": (".tar",),
    "csv": (".csv", ".tsv"),
    "jsonl": (".jsonl", ".ndjson"),
    "images": (
        ".jpg",
        ".jpeg",
        ".png",
        ".webp",
        ".gif",
        ".bmp",
        ".tif",
        ".tiff",
        ".avif",
        ".heic",
        ".heif",
        ".mpo",
    ),
}
FOLDER_ORDER = ("parquet", "webdataset", "images", "csv", "jsonl")
# How much of a JSON lines file's start is read to tell a Batch file from a manifest: the
# first line of a Batch file may carry a base64 image, so it can be long.
SNIFF_BYTES = 1 << 20


@dataclass(frozen=True)
class Listed:
    """One input file: its filesystem and path, the root its row ids are relative to, and what
    the listing said of it (size, etag or mtime) where it said it: a folder of a million photos
    on S3 is listed in pages, not stat'ed a million times."""

    fs: object
    path: str
    root: str
    info: dict | None = field(default=None, compare=False)

    @property
    def url(self) -> str:
        return full_url(self.fs, self.path)


def kind_of_name(name: str) -> str | None:
    """The format a file name says, or None."""
    low = name.lower()
    for kind, exts in EXTENSIONS.items():
        if low.endswith(exts):
            return kind
    return "jsonl" if low.endswith(".json") else None


def _root_of(path: str) -> str:
    """The folder above the first glob character (ids of globbed images are relative to it)."""
    cut = min((path.find(c) for c in GLOB_CHARS if c in path), default=-1)
    head = path if cut < 0 else path[:cut]
    return head.rstrip("/") if cut < 0 else posixpath.dirname(head)


def list_pattern(storage: Storage, fs, path: str, fmt: str) -> list[Listed]:
    """The files one pattern names: a glob, a folder (every file below it, of ``fmt`` or, for
    auto, of the first kind in FOLDER_ORDER it holds) or one file. Sorted."""
    if any(c in path for c in GLOB_CHARS):
        listed = storage.call(f"list {path}", fs.glob, path, detail=True)
        files = sorted(p for p, info in listed.items() if info.get("type") != "directory")
        return [Listed(fs, p, _root_of(path), listed[p]) for p in files]
    if storage.call(f"stat {path}", fs.isdir, path):
        found = storage.call(f"list {path}", fs.find, path, detail=True)
        kinds = [fmt] if fmt != "auto" else FOLDER_ORDER
        for kind in kinds:
            exts = EXTENSIONS.get("jsonl" if kind == "openai-batch" else kind, ())
            picked = sorted(p for p in found if p.lower().endswith(exts))
            if picked:
                return [Listed(fs, p, path.rstrip("/"), found[p]) for p in picked]
        return []
    if storage.call(f"stat {path}", fs.exists, path):
        return [Listed(fs, path, posixpath.dirname(path))]
    return []


def _sniff_jsonl(storage: Storage, item: Listed) -> str:
    """openai-batch when the first line reads as a Batch request, else jsonl."""
    try:
        with storage.open_input(item.fs, item.path) as fh:
            head = fh.read(SNIFF_BYTES)
    except Exception as exc:
        raise InputError(f"input: cannot read {item.url}: {describe(exc)}") from None
    first = head.split(b"\n", 1)[0].strip()
    try:
        line = json.loads(first) if first else None
    except ValueError:
        return "jsonl"
    batch = isinstance(line, dict) and "custom_id" in line and isinstance(line.get("body"), dict)
    return "openai-batch" if batch else "jsonl"


def decide_format(fmt: str, listed: list[Listed], storage: Storage) -> str:
    """The job's one input format: ``fmt`` when named, else what the files say."""
    if fmt != "auto":
        return fmt
    kinds = {kind_of_name(item.path) for item in listed}
    if None in kinds:
        odd = next(item.url for item in listed if kind_of_name(item.path) is None)
        raise InputError(
            f"input: cannot tell the format of {odd} from its name; set input.format to one of "
            "parquet, images, csv, jsonl, webdataset, openai-batch"
        )
    if len(kinds) > 1:
        raise InputError(
            f"input: the paths hold several formats ({', '.join(sorted(kinds))}); one job reads "
            "one format: narrow input.paths or set input.format"
        )
    kind = kinds.pop()
    if kind == "jsonl":
        sniffed = {_sniff_jsonl(storage, item) for item in listed}
        if len(sniffed) > 1:
            raise InputError(
                "input: some JSON lines files are OpenAI Batch files and some are not; "
                "set input.format"
            )
        kind = sniffed.pop()
    return kind
