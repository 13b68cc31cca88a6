"""The commit marker: the ledger entry ``_state/units/<unit>.json`` that says a unit is done.

Written last by a commit (after its part files), so a unit is committed if and only if its
marker exists; read by the driver (what to skip on resume), ``retry-failed`` (what to redo),
``status``, ``verify``, the report and ``reuse.outputs``. One type, so they agree on its fields.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Marker:
    unit_id: str
    shard: str  # the shard's URL
    row_start: int
    num_rows: int
    data_rows: int
    error_rows: int
    files: list[str]  # data/ and errors/ part files, relative to the output
    committed_at: str = ""  # ISO time of the commit (retry-failed passes add theirs to retries)
    attempts: int = 1
    reused_rows: int = 0  # data rows carried over from reuse.outputs
    error_codes: dict[str, int] = field(default_factory=dict)
    retries: list[dict] = field(default_factory=list)  # retry-failed passes over this unit

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Marker:
        """A marker from its JSON object (fields unknown to this version are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})

    @classmethod
    def parse(cls, blob: bytes) -> Marker | None:
        """A marker file's bytes, or None if they are not a marker (truncated, foreign)."""
        try:
            record = json.loads(blob)
            return cls.from_json(record) if isinstance(record, dict) else None
        except (ValueError, TypeError):
            return None

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        if not record["retries"]:
            del record["retries"]
        return record
