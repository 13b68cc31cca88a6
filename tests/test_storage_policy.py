"""The storage retry policy and backend options, without a server: what is transient, what
is permanent, how retries are counted and bounded, and how ranged reads behave."""

from __future__ import annotations

import errno
import io

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from qvl_batch.config import ConfigError, StorageConfig
from qvl_batch.run.validate import load_job
from qvl_batch.storage import (
    RangeReader,
    Storage,
    StorageError,
    backend_kwargs,
    describe,
    is_transient,
)


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


def translated(code: str, status: int, exc_type=OSError, *args) -> Exception:
    """What s3fs raises: a Python error whose cause is botocore's ClientError."""
    exc = exc_type(*args, code)
    exc.__cause__ = client_error(code, status)
    return exc


@pytest.mark.parametrize(
    "exc",
    [
        translated("SlowDown", 503, OSError, errno.EBUSY),
        translated("InternalError", 500),
        client_error("ServiceUnavailable", 503),
        client_error("ThrottlingException", 400),
        client_error("502", 502),
        ReadTimeoutError(endpoint_url="http://x"),
        EndpointConnectionError(endpoint_url="http://x"),
        ConnectionResetError("reset"),
        TimeoutError("timed out"),
        OSError(errno.ECONNRESET, "reset"),
    ],
)
def test_transient_errors_are_retried(exc):
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        translated("NoSuchBucket", 404, FileNotFoundError),
        translated("AccessDenied", 403, PermissionError),
        translated("InvalidAccessKeyId", 403, PermissionError),
        client_error("AccessDenied", 403),
        client_error("NoSuchKey", 404),
        ValueError("bad argument"),
        OSError(errno.EINVAL, "invalid"),
    ],
)
def test_permanent_errors_are_not(exc):
    assert not is_transient(exc)


def test_call_retries_with_backoff_counts_and_gives_up_naming_the_operation(monkeypatch):
    sleeps = []
    monkeypatch.setattr("qvl_batch.storage.time.sleep", sleeps.append)
    storage = Storage(StorageConfig(max_attempts=4, backoff_s=0.1, max_backoff_s=0.3))
    calls = []

    def flaky(n_failures):
        calls.append(1)
        if len(calls) <= n_failures:
            raise translated("SlowDown", 503, OSError, errno.EBUSY)
        return "ok"

    assert storage.call("read s3://b/k", flaky, 2) == "ok"
    assert storage.stats.snapshot()["retries"] == 2
    # exponential backoff with jitter in [0.5, 1.5) of 0.1, 0.2
    assert 0.05 <= sleeps[0] < 0.15 and 0.1 <= sleeps[1] < 0.3

    calls.clear()
    sleeps.clear()
    with pytest.raises(StorageError, match=r"read s3://b/k: gave up after 4 attempts"):
        storage.call("read s3://b/k", flaky, 100)
    assert len(calls) == 4 and len(sleeps) == 3
    assert storage.stats.snapshot() == {
        "requests": 7,  # 3 for the first call (2 failures, then ok), 4 for the second
        "retries": 5,
        "gave_up": 1,
        "by_kind": {"OSError": 5},
    }
    assert all(s < 0.3 * 1.5 for s in sleeps), "capped at max_backoff_s (with jitter)"


def test_permanent_error_is_raised_at_once(monkeypatch):
    monkeypatch.setattr("qvl_batch.storage.time.sleep", lambda s: pytest.fail("slept"))
    calls = []

    def denied():
        calls.append(1)
        raise translated("AccessDenied", 403, PermissionError)

    with pytest.raises(PermissionError):
        Storage(StorageConfig()).call("list s3://b", denied)
    assert len(calls) == 1
    assert describe(PermissionError("Access Denied")).startswith("access denied")


def test_backend_kwargs_map_the_storage_section():
    s = StorageConfig(endpoint_url="http://127.0.0.1:9000", region="eu-west-1", profile="p")
    kw = backend_kwargs("s3", s)
    assert kw["endpoint_url"] == "http://127.0.0.1:9000"
    assert kw["client_kwargs"] == {"region_name": "eu-west-1"}
    assert kw["profile"] == "p" and "anon" not in kw
    assert kw["config_kwargs"]["retries"]["total_max_attempts"] == 1, "one retry loop, ours"
    assert backend_kwargs("gs", StorageConfig(anon=True)) == {"token": "anon"}
    assert backend_kwargs("az", StorageConfig(anon=True)) == {"anon": True}
    assert backend_kwargs("file", s) == {}
    assert "timeout" in backend_kwargs("https", s)["client_kwargs"]
    # raw per-side options win, and never reach the local filesystem
    storage = Storage(s, {"anon": True})
    assert storage.fs_kwargs("s3")["anon"] is True and storage.fs_kwargs("file") == {}


def test_storage_section_is_validated_and_secrets_in_options_are_redacted(tmp_path):
    from qvl_batch.output.saved_config import redact, to_dict

    job = tmp_path / "job.yaml"
    job.write_text("input: {paths: [x]}\noutput: {path: out}\n")
    with pytest.raises(ConfigError, match=r"storage\.max_attempts"):
        load_job(job, ["storage.max_attempts=0"])
    with pytest.raises(ConfigError, match=r"unknown key 'storage\.endpoint'"):
        load_job(job, ["storage.endpoint=http://x"])
    cfg = load_job(job, ["output.storage_options.secret=s3cr3t", "storage.region=eu"])
    red = redact(to_dict(cfg))
    assert red["output"]["storage_options"]["secret"] == "***"
    assert red["storage"]["region"] == "eu"


class _Flaky:
    """A filesystem stand-in whose ranged reads fail every other call (no server needed)."""

    def __init__(self, blob: bytes):
        self.blob, self.calls = blob, 0
        self.protocol = "memory"

    def cat_file(self, path, start, end):
        self.calls += 1
        if self.calls % 2:
            raise ConnectionResetError("dropped")
        return self.blob[start:end]

    def unstrip_protocol(self, path):
        return f"memory://{path}"


def test_range_reader_retries_each_ranged_read(monkeypatch):
    monkeypatch.setattr("qvl_batch.storage.time.sleep", lambda s: None)
    blob = bytes(range(256)) * 1000
    fs = _Flaky(blob)
    reader = io.BufferedReader(RangeReader(Storage(StorageConfig()), fs, "k", len(blob)), 4096)
    reader.seek(1000)
    assert reader.read(10_000) == blob[1000:11_000]
    reader.seek(-5, io.SEEK_END)
    assert reader.read() == blob[-5:]
    assert fs.calls >= 4 and fs.calls % 2 == 0, "every failed read was retried"
