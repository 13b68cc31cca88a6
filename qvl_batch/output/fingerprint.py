"""What decides a job's outputs: the fingerprint ``_job.json`` keeps and the reuse key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from ..config import Config, model_absolute


def result_settings(cfg: Config) -> dict[str, Any]:
    """Settings besides the image and prompt that decide a row's result (the reuse key)."""
    out = {
        "engine": {"name": cfg.engine.name, "model": cfg.engine.model, "dtype": cfg.engine.dtype},
        "sampling": dataclasses.asdict(cfg.sampling),
        "image": dataclasses.asdict(cfg.image),
    }
    lengths = cfg.engine.benchmark.answer_lengths
    if cfg.engine.name == "hf" and lengths:  # benchmark answers end early (the hf engine reads it)
        out["engine"]["answer_lengths"] = lengths
    if cfg.structured.json_schema is not None:  # absent when unused: older fingerprints hold
        out["structured"] = dataclasses.asdict(cfg.structured)
        # The fingerprint hashes sorted keys; the property order (column order) counts too.
        out["structured"]["columns"] = list(cfg.structured.json_schema["properties"])
    return out


def fingerprint_fields(cfg: Config, input_fingerprint: str) -> dict[str, Any]:
    """What decides the outputs. Batching, cluster, limits, reuse and output location do not."""
    return {
        **result_settings(cfg),
        "prompt": dataclasses.asdict(cfg.prompt),
        "columns": {
            "id": cfg.input.id_column,
            "image": cfg.input.image_column,
            "prompt": cfg.input.prompt_column,
            "passthrough": list(cfg.input.passthrough_columns),
        },
        "input": input_fingerprint,
    }


def fingerprint(fields: dict[str, Any]) -> str:
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def same_but_relative_model(saved_fields: dict, saved: str, fields: dict[str, Any]) -> bool:
    """True when an output fingerprinted by an older version, which kept a relative
    ``engine.model`` as typed, is this job: its model made absolute here is today's, and every
    other field is the same (the saved fingerprint recomputed with the old spelling matches)."""
    old = (saved_fields.get("engine") or {}).get("model")
    now = fields["engine"]["model"]
    if not isinstance(old, str) or old == now or model_absolute(old) != now:
        return False
    return fingerprint({**fields, "engine": {**fields["engine"], "model": old}}) == saved
