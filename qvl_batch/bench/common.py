"""What the benchmarks share: datasets made once per work folder, and the overrides that point a
job at a dataset, an output and the fake engine."""

from __future__ import annotations

import json
from pathlib import Path

# The fake engine: the runner's own cost, or a simulated engine with its knobs set after these.
FAKE_ENGINE = ("engine.name=fake", "engine.model=fake://qwen2.5-vl")


def made_once(folder: Path, make) -> Path:
    """``folder``, made by ``make(str(folder))`` unless an earlier run finished it (``.done`` is
    written last: a folder without it is made again)."""
    if not (folder / ".done").exists():
        make(str(folder))
        (folder / ".done").touch()
    return folder


def tiny_rows(folder: Path, rows: int, shards: int = 0, unit_rows: int | None = None) -> Path:
    """Tiny-image rows (16 distinct 56x56 JPEGs) in ``folder``; ``shards`` 0 = one per 50k rows;
    ``unit_rows`` = rows per row group (one unit each), else synth's default."""
    from ..tooling.synth import make_tiny_rows_dataset

    extra = {} if unit_rows is None else {"row_group_rows": unit_rows}
    shards = shards or max(1, rows // 50_000)
    return made_once(
        folder, lambda path: make_tiny_rows_dataset(path, rows=rows, shards=shards, **extra)
    )


def job_io(data: Path | str, out: Path | str) -> list[str]:
    """Read every shard of ``data``, write to ``out`` (replacing an earlier run's output)."""
    return [f"input.paths=[{data}/*.parquet]", f"output.path={out}", "output.mode=overwrite"]


def emit_json(report: dict, json_out: str | None) -> None:
    """The report as one JSON line, printed and, with ``json_out``, written there too."""
    line = json.dumps(report)
    print(line, flush=True)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(line + "\n")
