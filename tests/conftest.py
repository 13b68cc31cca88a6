"""Shared fixtures: a local Ray cluster for the session, synthetic datasets, job files."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import yaml

from qvl_batch.engines.fake import expected_text
from qvl_batch.tooling.synth import SynthSpec, make_dataset

REPO = Path(__file__).resolve().parent.parent

# Credentials for the local S3 server the storage tests start (moto accepts any). Set before
# the session's Ray head starts, so actors inherit them like a real worker's credential chain;
# shared AWS files and the instance metadata service are kept out of it.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A standalone Ray head on loopback for the session; jobs join it via cluster.address.

    ``ray start --block`` runs in its own process group and is stopped by killing that group
    only: ``ray stop`` would stop every Ray cluster on the machine, not just this one.
    """
    import signal
    import socket
    import subprocess
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tmp_path_factory.mktemp("ray")
    # A throwaway cluster private to this test session: token auth off, so the test process
    # and the driver subprocesses it starts can join without sharing a token.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        # Four logical CPUs on a two-core machine: two one-CPU actors plus room for a second
        # driver's actors while a killed driver's are being cleaned up.
        "--num-cpus=4",
        "--num-gpus=0",
        "--include-dashboard=false",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    log = open(temp / "head.log", "wb")  # noqa: SIM115 - held for the whole session
    head = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while True:
        assert head.poll() is None, (temp / "head.log").read_text()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.monotonic() < deadline, "ray head did not start"
        time.sleep(0.2)
    time.sleep(1.0)  # GCS port open; give the raylet a moment to register
    try:
        yield f"127.0.0.1:{port}"
    finally:
        # `ray start --block` shuts down on SIGINT (in about 5 s); it ignores SIGTERM.
        for sig in (signal.SIGINT, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=20)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        log.close()


@pytest.fixture
def dataset(tmp_path):
    """A small synthetic dataset: 3 shards, 240 rows, row groups of 32, a few corrupt rows."""
    spec = SynthSpec(rows=240, shards=3, row_group_rows=32, max_side=400, corrupt_fraction=0.05)
    make_dataset(str(tmp_path / "data"), spec)
    return tmp_path / "data"


def write_job(path: Path, data_dir: Path, output: Path, ray_address: str | None, **extra) -> Path:
    """A job file like a user would write, with small units so jobs have many commits."""
    job = {
        "defaults": ["engine/fake"],
        "job": {"name": "test"},
        "input": {"paths": [f"{data_dir}/*.parquet"], "passthrough_columns": ["source"]},
        "prompt": {"template": "Describe this image."},
        "batching": {"unit_rows": 40, "max_batch_size": 8, "max_wait_s": 0.2},
        "output": {"path": str(output)},
        "cluster": {"num_actors": 2, "address": ray_address},
        "limits": {"max_error_fraction": 0.5},
    }
    for dotted, value in extra.items():
        node = job
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(job))
    return path


def read_output(output: Path) -> tuple[list[dict], list[dict]]:
    """(data rows, error rows) of an output folder, sorted by id."""

    def rows(sub: str) -> list[dict]:
        folder = output / sub
        if not folder.exists() or not any(folder.glob("*.parquet")):
            return []
        return sorted(ds.dataset(str(folder)).to_table().to_pylist(), key=lambda r: r["id"])

    return rows("data"), rows("errors")


def input_rows(data_dir: Path) -> list[dict]:
    return ds.dataset(str(data_dir)).to_table().to_pylist()


def comparable(rows: list[dict], keys: tuple[str, ...]) -> list[tuple]:
    return sorted(tuple(r[k] for k in keys) for r in rows)


DATA_KEYS = ("id", "text", "finish_reason", "output_tokens", "resized_width", "resized_height")
ERROR_KEYS = ("id", "error_code")


def expected_for(
    image_bytes: bytes, prompt: str, seed: int = 0, max_tokens: int = 64, schema: dict | None = None
):
    return expected_text(hashlib.sha256(image_bytes).hexdigest(), prompt, seed, max_tokens, schema)


def check_fake_output(
    dataset: Path,
    output: Path,
    expected_errors: dict[str, str] | None = None,
    prompt: str = "Describe this image.",
    max_tokens: int = 64,
    schema: dict | None = None,
) -> tuple[list[dict], list[dict]]:
    """A fake-engine job's output against its input: every input id once across data/ and
    errors/; each data row has the fake engine's text and finish reason; the error rows are the
    corrupt inputs (DECODE_ERROR / MISSING_IMAGE) plus ``expected_errors`` (id -> code)."""
    data, errors = read_output(output)
    inputs = {r["id"]: r for r in input_rows(dataset)}
    assert sorted([r["id"] for r in data] + [r["id"] for r in errors]) == sorted(inputs)
    for row in data:
        image = inputs[row["id"]]["image"]
        want = expected_for(image, prompt, max_tokens=max_tokens, schema=schema)
        assert (row["text"], row["finish_reason"]) == want, row["id"]
    expected_errors = expected_errors or {}
    corrupt = {i for i, r in inputs.items() if r["kind"] == "corrupt"}
    got = {r["id"]: r["error_code"] for r in errors}
    assert set(got) == corrupt | set(expected_errors), "errors are exactly the expected rows"
    assert {i: got[i] for i in expected_errors} == expected_errors
    assert {got[i] for i in corrupt} <= {"DECODE_ERROR", "MISSING_IMAGE"}
    return data, errors


# A moderation-like structured-output schema for engine tests. Unlike jobs/moderation.yaml it
# has no free-text field, so a random model's guided answer is short and bounded.
MODERATION = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["allow", "review", "block"]},
        "categories": {
            "type": "array",
            "items": {"type": "string", "enum": ["violence", "sexual", "hate", "spam"]},
            "maxItems": 3,
            "uniqueItems": True,
        },
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["verdict", "categories", "score"],
    "additionalProperties": False,
}
