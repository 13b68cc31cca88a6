"""fsspec helpers: one place that knows how to open a URL and write an object atomically."""

from __future__ import annotations

import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

# Filesystems whose single-object PUT is atomic: the object is visible complete or not at all.
ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}


class StorageError(RuntimeError):
    """A storage path that cannot be used: says which path and why."""


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None):
    """(filesystem, path-in-filesystem) for any fsspec URL or local path."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def protocol_of(fs) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def full_url(fs, path: str) -> str:
    """A URL that url_to_fs maps back to ``path`` on ``fs`` (protocol kept for non-local)."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts)


def atomic_write(fs, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the whole object or nothing.

    Object stores: one PUT (multipart uploads also become visible only on completion).
    Local and other POSIX-like filesystems: write a hidden temporary file in the same folder,
    then rename it over the target (atomic within one filesystem).
    """
    if protocol_of(fs) in ATOMIC_PUT_PROTOCOLS:
        fs.pipe_file(path, data)
        return
    parent = posixpath.dirname(path)
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    fs.makedirs(parent, exist_ok=True)
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
        if isinstance(fs, LocalFileSystem):
            fh.flush()
            import os

            os.fsync(fh.fileno())
    fs.mv(tmp, path)


def is_temporary(name: str) -> bool:
    return posixpath.basename(name).startswith(".tmp-")
