"""fsspec storage for the runner: filesystems from config, retries on every request, atomic writes.

Every read, list and write the runner makes goes through :meth:`Storage.call`, which retries
transient failures (5xx, SlowDown/throttling, timeouts, dropped connections) with exponential
backoff and jitter, counts them, and lets permanent ones (no such bucket or key, access denied)
through at once so a job stops before any work with a message naming the path and the cause.
The filesystems' own retry loops are switched off where they have one, so retries are counted
in one place and bounded by one policy (``storage.max_attempts``).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import posixpath
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol

from .errors import StorageError

log = logging.getLogger("qvl_batch")

T = TypeVar("T")

# Filesystems whose single-object PUT is atomic: the object is visible complete or not at all.
ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}
LOCAL_PROTOCOLS = {"file", "local"}

# Error codes and exception names that mean "try again", whatever the backend.
TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeoutException",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestLimitExceeded",
    "OperationAborted",
}
TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ProxyConnectionError",
    "HTTPClientError",
    "ResponseParserError",
    "IncompleteRead",
    "ClientPayloadError",
    "ServerDisconnectedError",
    "ClientConnectorError",
    "ClientOSError",
    "ServerTimeoutError",
    "FSTimeoutError",
}
TRANSIENT_ERRNOS = {
    errno.EBUSY,  # s3fs: SlowDown / 503
    getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs: InternalError / 500
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
}
PERMANENT_TYPES = (
    FileNotFoundError,
    PermissionError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
)


# ---- error classification -----------------------------------------------------------------


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    status = getattr(exc, "status", None)  # aiohttp ClientResponseError
    return status if isinstance(status, int) else None


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: throttling, 5xx, timeouts, dropped connections."""
    if isinstance(exc, PERMANENT_TYPES):
        return False
    for e in _chain(exc):
        if isinstance(e, (TimeoutError, ConnectionError, socket.timeout)):
            return True
        if type(e).__name__ in TRANSIENT_NAMES:
            return True
        status = _http_status(e)
        if status is not None and (status >= 500 or status == 429):
            return True
        if _error_code(e) in TRANSIENT_CODES:
            return True
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
    return False


def describe(exc: BaseException) -> str:
    """A short cause for a message: what kind of failure, then the backend's words."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, PermissionError):
        return f"access denied ({text}); check the credentials and their permissions"
    if isinstance(exc, FileNotFoundError):
        return f"not found ({text})"
    return f"{type(exc).__name__}: {text}"


# ---- retry accounting ---------------------------------------------------------------------


class RequestStats:
    """Requests and retries one :class:`Storage` made (thread-safe); actors report theirs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0  # calls made, first attempts and retries alike
        self.retries = 0
        self.gave_up = 0
        self.by_kind: Counter[str] = Counter()

    def record_request(self) -> None:
        with self._lock:
            self.requests += 1

    def record(self, exc: BaseException) -> None:
        with self._lock:
            self.retries += 1
            self.by_kind[type(exc).__name__] += 1

    def record_give_up(self) -> None:
        with self._lock:
            self.gave_up += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "retries": self.retries,
                "gave_up": self.gave_up,
                "by_kind": dict(self.by_kind),
            }


def merge_request_stats(total: dict, part: dict) -> dict:
    """Sum two :meth:`RequestStats.snapshot` results."""
    kinds = Counter(total.get("by_kind", {}))
    kinds.update(part.get("by_kind", {}))
    return {
        "requests": total.get("requests", 0) + part.get("requests", 0),
        "retries": total.get("retries", 0) + part.get("retries", 0),
        "gave_up": total.get("gave_up", 0) + part.get("gave_up", 0),
        "by_kind": dict(kinds),
    }


# ---- the storage facade -------------------------------------------------------------------


class Storage:
    """Filesystems for one side of a job (input or output) and the retry policy for them.

    ``settings`` is the job's ``storage`` section (endpoint, region, anonymous access, profile,
    retry policy); ``overrides`` are raw fsspec keyword arguments for this side
    (``input.storage_options`` / ``output.storage_options``), applied to remote URLs only.
    Credentials come from each backend's standard chain unless the overrides set them.
    """

    def __init__(self, settings: Any = None, overrides: dict[str, Any] | None = None):
        self.settings = settings
        self.overrides = dict(overrides or {})
        self.max_attempts = getattr(settings, "max_attempts", 5)
        self.backoff_s = getattr(settings, "backoff_s", 0.2)
        self.max_backoff_s = getattr(settings, "max_backoff_s", 10.0)
        self.stats = RequestStats()

    @classmethod
    def for_input(cls, cfg: Any) -> Storage:
        """Shards, manifests and image URIs of the job ``cfg``."""
        return cls(cfg.storage, cfg.input.storage_options)

    @classmethod
    def for_output(cls, cfg: Any) -> Storage:
        return cls(cfg.storage, cfg.output.storage_options)

    # filesystems
    def fs_kwargs(self, protocol: str) -> dict[str, Any]:
        """fsspec keyword arguments for ``protocol``, from the settings and the overrides."""
        if protocol in LOCAL_PROTOCOLS:
            return {}
        return {**backend_kwargs(protocol, self.settings), **self.overrides}

    def fs(self, url: str) -> tuple[Any, str]:
        """(filesystem, path within it) for an fsspec URL or a local path."""
        protocol = get_protocol(url)
        fs, path = fsspec.core.url_to_fs(url, **self.fs_kwargs(protocol))
        if protocol_of(fs) in ("s3", "s3a"):
            fs.retries = 1  # s3fs retries some errors itself; this policy owns retries
        return fs, path

    # requests
    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retried on transient errors; permanent ones pass through.

        Raises :class:`StorageError` naming ``what`` once ``max_attempts`` transient failures
        in a row have been seen.
        """
        for attempt in range(1, self.max_attempts + 1):
            self.stats.record_request()
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt == self.max_attempts:
                    self.stats.record_give_up()
                    raise StorageError(
                        f"{what}: gave up after {attempt} attempts: {describe(exc)}"
                    ) from exc
                self.stats.record(exc)
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                delay *= 0.5 + random.random()  # jitter: retries of many workers spread out
                log.debug("%s: %s; retry %d in %.2fs", what, describe(exc), attempt, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def cat(self, url: str) -> bytes:
        fs, path = self.fs(url)
        return self.call(f"read {url}", fs.cat_file, path)

    def open_input(self, fs: Any, path: str, size: int | None = None) -> io.IOBase:
        """A seekable binary reader. Remote: each read is one ranged request, retried."""
        if isinstance(fs, LocalFileSystem):
            return fs.open(path, "rb")
        if size is None:
            size = int(self.call(f"stat {path}", fs.info, path)["size"])
        return io.BufferedReader(RangeReader(self, fs, path, size), buffer_size=1 << 16)

    def write_atomic(self, fs: Any, path: str, data: bytes) -> None:
        """Write ``data`` so readers see the whole object or nothing (see :func:`atomic_write`)."""
        self.call(f"write {full_url(fs, path)}", atomic_write, fs, path, data)


class RangeReader(io.RawIOBase):
    """A read-only, seekable view of one remote object: every read is a ranged GET, retried.

    Parquet readers seek to the footer and then to the column chunks they need; with this
    each of those reads is retried on its own, instead of failing a whole unit's read.
    """

    def __init__(self, storage: Storage, fs: Any, path: str, size: int):
        super().__init__()
        self.storage, self.fs, self.path, self.size = storage, fs, path, size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _read_exact(self, start: int, n: int) -> bytes:
        data = self.fs.cat_file(self.path, start=start, end=start + n)
        if len(data) != n:  # a body cut short by a dropped connection: worth another try
            raise ConnectionError(f"short read: {len(data)} of {n} bytes")
        return data

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        what = f"read {full_url(self.fs, self.path)} [{self.pos}:{self.pos + n}]"
        data = self.storage.call(what, self._read_exact, self.pos, n)
        buffer[:n] = data
        self.pos += n
        return n


def backend_kwargs(protocol: str, settings: Any) -> dict[str, Any]:
    """Map the typed ``storage`` settings onto one fsspec backend's keyword arguments."""
    if settings is None:
        return {}
    s = settings
    if protocol in ("s3", "s3a"):
        kwargs: dict[str, Any] = {
            "config_kwargs": {
                "connect_timeout": s.connect_timeout_s,
                "read_timeout": s.read_timeout_s,
                # botocore would retry 5xx itself; Storage.call owns retries and counts them.
                "retries": {"mode": "standard", "total_max_attempts": 1},
            }
        }
        if s.endpoint_url:
            kwargs["endpoint_url"] = s.endpoint_url
        if s.region:
            kwargs["client_kwargs"] = {"region_name": s.region}
        if s.anon:
            kwargs["anon"] = True
        if s.profile:
            kwargs["profile"] = s.profile
        return kwargs
    if protocol in ("gs", "gcs"):
        kwargs = {}
        if s.endpoint_url:
            kwargs["endpoint_url"] = s.endpoint_url
        if s.anon:
            kwargs["token"] = "anon"
        return kwargs
    if protocol in ("az", "abfs", "abfss"):
        return {"anon": True} if s.anon else {}
    if protocol in ("http", "https"):
        try:
            import aiohttp
        except ImportError:
            return {}
        total = s.connect_timeout_s + s.read_timeout_s
        timeout = aiohttp.ClientTimeout(total=total, connect=s.connect_timeout_s)
        return {"client_kwargs": {"timeout": timeout}}
    return {}


# ---- paths and atomic writes --------------------------------------------------------------


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

    Object stores: one PUT (multipart uploads also become visible only on completion), so no
    temporary object is ever visible or left behind. Local and other POSIX-like filesystems:
    write a hidden temporary file in the same folder, then rename it over the target.
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
            os.fsync(fh.fileno())
    fs.mv(tmp, path)


def is_temporary(name: str) -> bool:
    return posixpath.basename(name).startswith(".tmp-")


def bucket_of(fs, path: str) -> str | None:
    """The bucket (container) of ``path`` on an object store; None for other filesystems."""
    if protocol_of(fs) not in ATOMIC_PUT_PROTOCOLS - {"memory"}:
        return None
    return path.lstrip("/").split("/", 1)[0] or None
