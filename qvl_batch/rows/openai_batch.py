"""OpenAI Batch API request files as input: one ``/v1/chat/completions`` request a line.

A line's ``custom_id`` is the row id; its user message's text parts (joined) the prompt and its
one ``image_url`` (a ``data:`` URI or a URL) the image. The job runs every line with one set of
settings, so the settings the lines ask for (``max_tokens``, ``temperature``, ``top_p``, a
``json_schema`` response format, the system message) become the job's: the value most lines
give (lines that leave one out accept the job's). A line asking for another value is an
UNSUPPORTED_REQUEST row, never a silently different answer.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from ..errors import RowError
from .textfiles import Layout, malformed

ENDPOINT = "/v1/chat/completions"
# Line settings and the job settings they become.
SETTINGS = {
    "max_tokens": "sampling.max_tokens",
    "temperature": "sampling.temperature",
    "top_p": "sampling.top_p",
    "json_schema": "structured.json_schema",
    "system": "prompt.system",
}


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        ]
        return "\n".join(parts)
    return None


def line_settings(body: dict[str, Any]) -> dict[str, Any]:
    """What one line asks for, by the names of :data:`SETTINGS` (absent: no preference)."""
    asked: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        asked["max_tokens"] = max_tokens
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            asked[key] = float(body[key])
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        asked["json_schema"] = (fmt.get("json_schema") or {}).get("schema")
    elif isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        asked["json_schema"] = f"response_format {fmt.get('type')}"  # matches no job setting
    systems = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    systems = [m for m in systems if m.get("role") in ("system", "developer")]
    if systems:
        asked["system"] = "\n".join(_text(m.get("content")) or "" for m in systems)
    return asked


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def count_settings(obj: dict[str, Any], layout: Layout) -> None:
    """Scan hook: tally what each line asks for (the plan picks the most common values)."""
    body = obj.get("body")
    if not isinstance(body, dict):
        return
    tally = layout.facts.setdefault("settings", {})
    for name, value in line_settings(body).items():
        tally.setdefault(name, Counter())[_key(value)] += 1


def job_settings(layouts: list[Layout]) -> dict[str, Any]:
    """The job settings the files ask for: per setting, the value most lines give."""
    total: dict[str, Counter] = {}
    for layout in layouts:
        for name, counts in layout.facts.get("settings", {}).items():
            total.setdefault(name, Counter()).update(counts)
    chosen = {}
    for name, counts in total.items():
        value = json.loads(counts.most_common(1)[0][0])
        if name == "json_schema" and not isinstance(value, dict):
            continue  # json_object or another kind: each such line says so on its own
        chosen[SETTINGS[name]] = value
    return chosen


def _user_parts(body: dict[str, Any]) -> tuple[str | None, list[str], str | None]:
    """(prompt, image URLs, problem) of the request's one user turn."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None, [], "body.messages is not a list"
    turns = [
        m for m in messages if isinstance(m, dict) and m.get("role") not in ("system", "developer")
    ]
    if len(turns) != 1 or turns[0].get("role") != "user":
        return None, [], "one user message is supported (no assistant turns, no tools)"
    content = turns[0].get("content")
    images = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url":
                ref = part.get("image_url")
                images.append(ref.get("url") if isinstance(ref, dict) else ref)
    return _text(content), images, None


def batch_row(line: dict[str, Any], job: dict[str, Any], where: str) -> dict[str, Any]:
    """One Batch line as a row (``id``, ``image``, ``prompt``), or an error row. ``job``: the
    job's values of the :data:`SETTINGS` it runs every line with."""
    cid, body = line.get("custom_id"), line.get("body")
    if not isinstance(cid, str) or not cid or not isinstance(body, dict):
        return malformed(f"{where}: a Batch line needs a custom_id string and a body object")
    row: dict[str, Any] = {"id": cid}
    if line.get("url", ENDPOINT) != ENDPOINT:
        return {
            **row,
            "_error": (RowError.UNSUPPORTED_REQUEST, f"url {line.get('url')!r}: only {ENDPOINT}"),
        }
    prompt, images, problem = _user_parts(body)
    if problem:
        return {**row, "_error": (RowError.UNSUPPORTED_REQUEST, problem)}
    if len(images) > 1:
        return {
            **row,
            "_error": (RowError.UNSUPPORTED_REQUEST, f"{len(images)} images; one a request"),
        }
    for name, value in line_settings(body).items():
        if _key(value) != _key(job.get(name)):
            return {
                **row,
                "_error": (
                    RowError.UNSUPPORTED_REQUEST,
                    f"asks {name}={_short(value)}; the job runs every line with "
                    f"{SETTINGS[name]}={_short(job.get(name))}",
                ),
            }
    row["prompt"] = prompt
    row["image"] = images[0] if images else None
    return row


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
