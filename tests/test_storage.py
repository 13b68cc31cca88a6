"""Object storage end to end: a real S3 protocol server (moto) on loopback, through s3fs.

Jobs read shards and image URIs from ``s3://`` and write outputs there, through a proxy that
injects 503 SlowDown, dropped connections and stalls; wrong buckets and denied access stop
before any unit runs. The server is a subprocess the module starts and stops.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from qvl_batch.cli import main
from qvl_batch.commands.verify import verify_output
from qvl_batch.config import StorageConfig
from qvl_batch.errors import Exit
from qvl_batch.rows.manifest import plan_job
from qvl_batch.run.driver import run_job
from qvl_batch.run.validate import load_job
from qvl_batch.tooling.s3local import MotoServer

from .conftest import check_fake_output, input_rows, write_job
from .s3util import FaultProxy, Faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "Describe this image."
LAYOUT = re.compile(
    r"^(_job\.json|_metrics\.json|_report\.html|_SUCCESS|_state/units/\d{5}-\d{5}\.json"
    r"|(data|errors)/part-\d{5}-\d{5}\.parquet)$"
)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto") / "server.log")
    yield server
    server.stop()


def direct(server: MotoServer) -> s3fs.S3FileSystem:
    """The test's own view of the bucket, bypassing any proxy and the runner's retry policy."""
    return s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True)


def upload(fs, local: Path, url: str) -> None:
    bucket = url.split("/")[2]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for f in sorted(local.glob("*.parquet")):
        fs.put_file(str(f), f"{url.removeprefix('s3://')}/{f.name}")


def output_keys(fs, url: str) -> list[str]:
    root = url.removeprefix("s3://").rstrip("/")
    fs.invalidate_cache()
    return sorted(p[len(root) + 1 :] for p in fs.find(root))


def download(fs, url: str, local: Path) -> Path:
    fs.invalidate_cache()
    fs.get(url.removeprefix("s3://") + "/", str(local) + "/", recursive=True)
    return local


def s3_job(tmp_path, inp: str, out: str, ray_head, endpoint: str, **extra) -> Path:
    storage = {"endpoint_url": endpoint, **extra.pop("storage", {})}
    return write_job(
        tmp_path / "job.yaml",
        inp,
        out,
        ray_head,
        storage=storage,
        **extra,  # type: ignore[arg-type]
    )


def test_s3_to_s3_job_exactly_once_with_no_temporary_objects(
    tmp_path, dataset, ray_head, s3, caplog
):
    fs = direct(s3)
    upload(fs, dataset, "s3://e2e-in/shards")
    out = "s3://e2e-out/run-1"
    # Credentials passed explicitly (users rely on the standard chain): they must not leak.
    creds = {"key": "AKIAQVLTESTKEY", "secret": "qvl-very-secret-value"}
    job = s3_job(
        tmp_path,
        "s3://e2e-in/shards",
        out,
        ray_head,
        s3.endpoint,
        input__storage_options=creds,
        output__storage_options=creds,
    )
    fs.mkdir("e2e-out")
    caplog.set_level(logging.DEBUG)  # every logger, the storage libraries' included
    summary = run_job(load_job(job), progress_bar=False)
    assert "qvl-very-secret-value" not in caplog.text
    assert summary.exit_code == Exit.OK, summary.lines()
    assert summary.storage_retries == 0

    keys = output_keys(fs, out)
    assert keys and all(LAYOUT.match(k) for k in keys), [k for k in keys if not LAYOUT.match(k)]
    assert "_SUCCESS" in keys
    local = download(fs, out, tmp_path / "out")
    check_fake_output(dataset, local)
    job_json = (local / "_job.json").read_text()
    assert "qvl-very-secret-value" not in job_json and "AKIAQVLTESTKEY" not in job_json
    assert json.loads(job_json)["config"]["input"]["storage_options"]["secret"] == "***"

    # on S3; credentials from the environment (the job's own were redacted in _job.json)
    report = verify_output(out, storage=StorageConfig(endpoint_url=s3.endpoint))
    assert report.ok, report.lines()
    assert main(["verify", out, "--endpoint-url", s3.endpoint]) == 0
    again = run_job(load_job(job), progress_bar=False)
    assert again.status == "already_complete"


def test_manifest_on_s3_names_the_shards(tmp_path, dataset, s3):
    fs = direct(s3)
    upload(fs, dataset, "s3://manifest-in/shards")
    shards = sorted(p for p in fs.ls("manifest-in/shards") if p.endswith(".parquet"))
    fs.pipe_file(
        "manifest-in/list.txt",
        ("# two of three shards\n" + "\n".join(f"s3://{p}" for p in shards[:2])).encode(),
    )
    job = s3_job(tmp_path, "unused", str(tmp_path / "out"), None, s3.endpoint)
    cfg = load_job(job, ["input.paths=[]", "input.manifest=s3://manifest-in/list.txt"])
    plan = plan_job(cfg)
    assert [s.url for s in plan.shards] == [f"s3://{p}" for p in shards[:2]]
    expected = sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(dataset.glob("*"))[:2])
    assert plan.total_rows == expected
    assert all(s.version for s in plan.shards), "the ETag goes into the input fingerprint"


def _cli(job, *args):
    cmd = [sys.executable, "-m", "qvl_batch.cli", "run", str(job), "--no-progress", *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def test_kill_driver_and_resume_on_s3(tmp_path, dataset, ray_head, s3):
    fs = direct(s3)
    upload(fs, dataset, "s3://resume-in/shards")
    fs.mkdir("resume-out")
    out = "s3://resume-out/run"
    job = s3_job(
        tmp_path,
        "s3://resume-in/shards",
        out,
        ray_head,
        s3.endpoint,
        engine__fake={"batch_latency_s": 0.1},
    )
    proc = _cli(job)
    deadline = time.monotonic() + 120
    markers: list[str] = []
    while len(markers) < 2:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "job made no progress"
        time.sleep(0.1)
        markers = [k for k in output_keys(fs, out) if k.startswith("_state/units/")]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert "_SUCCESS" not in output_keys(fs, out)

    proc = _cli(job)
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == Exit.OK, log
    keys = output_keys(fs, out)
    assert all(LAYOUT.match(k) for k in keys), keys
    local = download(fs, out, tmp_path / "out")
    check_fake_output(dataset, local)
    metrics = json.loads((local / "_metrics.json").read_text())
    assert metrics["summary"]["rows_this_run"] < len(input_rows(dataset)), "resumed, not redone"
    assert verify_output(out, storage=StorageConfig(endpoint_url=s3.endpoint)).ok


def images_as_uris(dataset: Path, out: Path, store) -> None:
    """Copy the dataset's shards to ``out`` with each image replaced by ``store(id, bytes)``,
    the URI where that image now lives (null images stay null)."""
    for f in sorted(dataset.glob("*.parquet")):
        table = pq.read_table(f)
        uris = [
            None if image is None else store(row_id, image)
            for row_id, image in zip(table["id"].to_pylist(), table["image"].to_pylist())
        ]
        column = pa.array(uris, pa.string())
        table = table.set_column(table.schema.get_field_index("image"), "image", column)
        pq.write_table(table, out / f.name, row_group_size=32)


def _uri_dataset(fs, dataset: Path, tmp_path: Path, bucket: str, missing: int) -> frozenset:
    """Rewrite the dataset so images are s3:// URIs to objects; ``missing`` of them deleted."""
    fs.mkdir(bucket)

    def store(row_id: str, image: bytes) -> str:
        fs.pipe_file(f"{bucket}/images/{row_id}.jpg", image)
        return f"s3://{bucket}/images/{row_id}.jpg"

    images_as_uris(dataset, tmp_path, store)
    ok_rows = [r for r in input_rows(dataset) if r["kind"] != "corrupt" and r["image"]]
    gone = {r["id"] for r in ok_rows[:missing]}
    for row_id in gone:
        fs.rm_file(f"{bucket}/images/{row_id}.jpg")
    upload(fs, tmp_path, f"s3://{bucket}/shards")
    return frozenset(gone)


def test_faults_between_runner_and_server_are_retried_and_counted(tmp_path, dataset, ray_head, s3):
    fs = direct(s3)
    shards = tmp_path / "uri-shards"
    shards.mkdir()
    missing = _uri_dataset(fs, dataset, shards, "faults-in", missing=3)
    fs.mkdir("faults-out")
    faults = Faults(slowdown=0.08, drop=0.04, stall=0.02, stall_s=2.5, seed=7)
    proxy = FaultProxy(s3.port, faults)
    try:
        job = s3_job(
            tmp_path,
            "s3://faults-in/shards",
            "s3://faults-out/run",
            ray_head,
            proxy.endpoint,
            storage={"read_timeout_s": 1.0, "connect_timeout_s": 1.0, "backoff_s": 0.05},
            # Work the driver takes back may be mid-request when the job ends: a fault the proxy
            # counted whose retry comes after the job's count (a backup copy's loser: 98 faults,
            # 97 retries; a unit moved off a busy actor: 92, 91). One actor, no copies: every
            # request here is awaited.
            batching__backup_copies=False,
            cluster__num_actors=1,
        )
        summary = run_job(load_job(job), progress_bar=False)
    finally:
        proxy.stop()
    assert summary.exit_code == Exit.OK, summary.lines()
    counts = faults.counts
    assert counts["slowdown"] > 5 and counts["drop"] > 2 and counts["stall"] > 0, counts
    # 503s and stalls reach the runner's retry loop; a dropped answer on a reused connection
    # may be retried once inside aiohttp first, so drops are only an upper bound.
    assert counts["slowdown"] + counts["stall"] <= summary.storage_retries <= proxy.injected
    assert f"{summary.storage_retries} storage retries" in "\n".join(summary.lines())
    keys = output_keys(fs, "s3://faults-out/run")
    assert all(LAYOUT.match(k) for k in keys), keys
    local = download(fs, "s3://faults-out/run", tmp_path / "out")
    check_fake_output(dataset, local, dict.fromkeys(missing, "FETCH_ERROR"))
    metrics = json.loads((local / "_metrics.json").read_text())
    # _metrics.json is written before its own (and _SUCCESS's) write could be retried.
    assert 0 < metrics["storage"]["retries"] <= summary.storage_retries


def _run_cli(capsys, job, *overrides) -> tuple[int, str]:
    code = main(["run", str(job), "--no-progress", *overrides])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_missing_buckets_fail_fast(tmp_path, dataset, s3, capsys):
    fs = direct(s3)
    upload(fs, dataset, "s3://present-in/shards")
    job = s3_job(tmp_path, "s3://no-such-bucket-in/shards", "s3://whatever/out", None, s3.endpoint)
    t0 = time.monotonic()
    code, text = _run_cli(capsys, job)
    assert code == Exit.CONFIG
    assert "bucket 'no-such-bucket-in' does not exist" in text, text

    job = s3_job(
        tmp_path, "s3://present-in/shards", "s3://no-such-bucket-out/run", None, s3.endpoint
    )
    code, text = _run_cli(capsys, job)
    assert code == Exit.CONFIG
    assert "output.path s3://no-such-bucket-out/run" in text and "bucket does not exist" in text
    assert time.monotonic() - t0 < 60, "permanent errors must not be retried for long"


def test_denied_access_fails_fast_before_any_unit(tmp_path, dataset, s3, capsys):
    # A server that checks credentials: the test's keys are unknown to it.
    with MotoServer(tmp_path / "auth.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as strict:
        job = s3_job(
            tmp_path, "s3://any-bucket/shards", str(tmp_path / "out"), None, strict.endpoint
        )
        code, text = _run_cli(capsys, job)
    assert code == Exit.CONFIG
    assert "s3://any-bucket/shards" in text and "access denied" in text, text
    assert not (tmp_path / "out").exists()

    # Reads allowed, writes to the output bucket denied (403 AccessDenied from the proxy).
    fs = direct(s3)
    upload(fs, dataset, "s3://denied-in/shards")
    fs.mkdir("denied-out")
    proxy = FaultProxy(s3.port, Faults(deny=r"^PUT /denied-out/"))
    try:
        job = s3_job(tmp_path, "s3://denied-in/shards", "s3://denied-out/run", None, proxy.endpoint)
        code, text = _run_cli(capsys, job)
    finally:
        proxy.stop()
    assert code == Exit.CONFIG
    assert "output.path s3://denied-out/run" in text and "access denied" in text, text
    assert proxy.faults.counts["denied"] == 1, "refused at the first write, not retried"
    assert output_keys(fs, "s3://denied-out/run") == []


def test_http_image_uris_are_fetched_and_a_404_is_an_error_row(tmp_path, dataset, ray_head):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    images = tmp_path / "site"
    images.mkdir()
    shards = tmp_path / "http-shards"
    shards.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(images))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    missing = set()

    def store(row_id: str, image: bytes) -> str:
        if len(missing) < 2 and row_id.endswith("7"):
            missing.add(row_id)  # a URI that answers 404
        else:
            (images / f"{row_id}.jpg").write_bytes(image)
        return f"{base}/{row_id}.jpg"

    try:
        images_as_uris(dataset, shards, store)
        assert missing
        out = tmp_path / "out"
        job = write_job(tmp_path / "job.yaml", shards, out, ray_head)
        summary = run_job(load_job(job), progress_bar=False)
    finally:
        server.shutdown()
        server.server_close()
    assert summary.exit_code == Exit.OK, summary.lines()
    _, errors = check_fake_output(dataset, out, dict.fromkeys(missing, "FETCH_ERROR"))
    assert all("not found" in r["error_message"] for r in errors if r["id"] in missing)


def test_closing_files_that_cannot_be_written_fail_the_job_and_a_rerun_finishes(
    tmp_path, dataset, ray_head, s3, capsys
):
    fs = direct(s3)
    upload(fs, dataset, "s3://closing-in/shards")
    fs.mkdir("closing-out")
    proxy = FaultProxy(s3.port, Faults(deny=r"^PUT /closing-out/run/_metrics\.json"))
    try:
        job = s3_job(
            tmp_path, "s3://closing-in/shards", "s3://closing-out/run", ray_head, proxy.endpoint
        )
        code, text = _run_cli(capsys, job)
    finally:
        proxy.stop()
    assert code == Exit.FAILED, text
    assert "closing files not written" in text and "_metrics.json" in text, text
    keys = output_keys(fs, "s3://closing-out/run")
    assert "_SUCCESS" not in keys and any(k.startswith("data/") for k in keys)

    again = s3_job(
        tmp_path, "s3://closing-in/shards", "s3://closing-out/run", ray_head, s3.endpoint
    )
    code, text = _run_cli(capsys, again)
    assert code == Exit.OK, text
    assert "this run: 0 rows" in text, "every unit was already committed"
    assert "_SUCCESS" in output_keys(fs, "s3://closing-out/run")
