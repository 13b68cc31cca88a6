"""``output.format: openai-batch``: the committed rows again as an OpenAI Batch API output file
and error file, so code written for the Batch API reads a job's results unchanged.

Made at job close from the part files each commit marker names (so exactly once holds here as
in ``data/`` and ``errors/``), in unit and row order. Ids are derived from the job and the row,
so writing them again (after ``retry-failed``) gives the same ids. The files are built in
memory: sized for Batch-API-sized jobs (the API takes 50,000 requests a file).
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import pyarrow.parquet as pq

from .state import BATCH_FILES, OutputState

OUTPUT_FILE, ERROR_FILE = BATCH_FILES


def _ref(prefix: str, *parts: str) -> str:
    return prefix + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _created(row: dict[str, Any]) -> int:
    created = row.get("created_at")
    return int(created.timestamp()) if created is not None else 0


def output_line(row: dict[str, Any]) -> dict[str, Any]:
    """A data row as a Batch output line: a chat completion with its usage."""
    job, cid = row["job_id"] or "", row["id"]
    prompt, completion = int(row["prompt_tokens"] or 0), int(row["output_tokens"] or 0)
    body = {
        "id": _ref("chatcmpl-", job, cid),
        "object": "chat.completion",
        "created": _created(row),
        "model": row["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": row["text"]},
                "logprobs": None,
                "finish_reason": row["finish_reason"],
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    response = {"status_code": 200, "request_id": _ref("req_", job, cid), "body": body}
    return {
        "id": _ref("batch_req_", job, cid),
        "custom_id": cid,
        "response": response,
        "error": None,
    }


def error_line(row: dict[str, Any]) -> dict[str, Any]:
    """An error row as a Batch error line: its code and message."""
    job, cid = row["job_id"] or "", row["id"]
    error = {"code": row["error_code"], "message": row["error_message"]}
    return {"id": _ref("batch_req_", job, cid), "custom_id": cid, "response": None, "error": error}


def write_batch_files(state: OutputState) -> tuple[int, int]:
    """Write both files from the committed parts; returns (output lines, error lines)."""
    out, err = io.BytesIO(), io.BytesIO()
    counts = [0, 0]
    for marker in sorted(state.markers(), key=lambda m: m.unit_id):
        for rel in sorted(marker.files):
            table = pq.read_table(io.BytesIO(state.read_path(state.path(rel))))
            is_data = rel.startswith("data/")
            for row in sorted(table.to_pylist(), key=lambda r: r["source_row"]):
                line = output_line(row) if is_data else error_line(row)
                (out if is_data else err).write(json.dumps(line).encode() + b"\n")
                counts[0 if is_data else 1] += 1
    state.write_bytes(OUTPUT_FILE, out.getvalue())
    state.write_bytes(ERROR_FILE, err.getvalue())
    return counts[0], counts[1]
