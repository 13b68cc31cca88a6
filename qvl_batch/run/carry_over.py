"""Rows whose result an earlier output already has (``reuse.outputs``): the lookup a prepare
thread makes for each row, and the Result such a row carries over into this job."""

from __future__ import annotations

from ..config import Config
from ..engines.base import Result
from ..output.reuse import ReuseIndex, ReuseReader, result_key, settings_digest
from ..output.schema import IMAGE_COLUMNS
from ..rows.prepare import ReusedRow
from ..storage import Storage


class CarryOver:
    """One per actor: result keys from this job's settings, looked up in the reuse index."""

    def __init__(self, cfg: Config, reuse: ReuseIndex | None, columns: list[str]):
        self._system = cfg.prompt.system
        self._settings = settings_digest(cfg)
        self._reader = ReuseReader(reuse, Storage.for_output(cfg)) if reuse is not None else None
        self._columns = columns  # the structured output's typed columns, if any

    def key_of(self, image_sha256: str, prompt: str) -> str:
        return result_key(image_sha256, self._system, prompt, self._settings)

    def find(self, rkey: str) -> tuple[dict, str] | None:
        return self._reader.find(rkey) if self._reader is not None else None

    def result(self, key: tuple[str, int], row: ReusedRow) -> tuple[Result, dict]:
        """The earlier output's result for ``row`` (same image, prompt and settings), and the
        image columns and result key its output row keeps."""
        earlier, columns = row.earlier, self._columns
        result = Result(
            key,
            text=earlier["text"],
            finish_reason=earlier["finish_reason"],
            prompt_tokens=earlier["prompt_tokens"],
            vision_tokens=earlier["vision_tokens"],
            output_tokens=earlier["output_tokens"],
            values={c: earlier.get(c) for c in columns} if columns else None,
            reused_from=earlier.get("reused_from") or row.job,  # the job that computed it
        )
        meta = {name: earlier.get(name) for name in IMAGE_COLUMNS}
        return result, {**meta, "result_key": row.result_key}
