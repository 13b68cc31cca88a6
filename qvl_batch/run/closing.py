"""How a run ends, once for ``run`` and ``retry-failed``: the error-fraction rule and the
closing files (``_metrics.json``, ``_report.html``, the Batch files, then ``_SUCCESS``).

The order is the contract: ``_SUCCESS`` is written last and only when nothing failed, so a
reader that sees it also sees the metrics and the report of the same run.
"""

from __future__ import annotations

import logging

from ..config import LimitsConfig
from ..output.batch_files import ERROR_FILE, OUTPUT_FILE, write_batch_files
from ..output.state import METRICS_FILE, SUCCESS_FILE, OutputState

log = logging.getLogger("qvl_batch")


def error_fraction_problem(
    errors: int, rows: int, limits: LimitsConfig, *, running: bool = False, still: bool = False
) -> str | None:
    """What is wrong if ``errors`` of ``rows`` is over ``limits.max_error_fraction``; None if
    not. ``running``: judged mid-job, only after ``min_rows_for_error_check`` rows (a few
    early bad rows do not fail a job). ``still``: said of a pass that tried to fix them."""
    if not rows or (running and rows < limits.min_rows_for_error_check):
        return None
    fraction = errors / rows
    if fraction <= limits.max_error_fraction:
        return None
    where = f" after {rows:,} rows" if running else ""
    verb = "is still over" if still else "is over"
    stop = ": stopping" if running else ""
    return (
        f"error fraction {fraction:.3f}{where} {verb} limits.max_error_fraction "
        f"{limits.max_error_fraction}{stop}"
    )


def write_report(state: OutputState) -> None:
    """``_report.html`` with plots; a report that cannot be made never fails the job."""
    try:
        from ..report.html import write_report as write

        write(state)
    except Exception as exc:  # matplotlib missing, a plot failing on odd data, ...
        log.warning("no _report.html: %s: %s", type(exc).__name__, exc)


def close_output(
    state: OutputState, metrics: dict, success: dict | None, batch_files: bool = False
) -> None:
    """``_metrics.json``, the report, the OpenAI Batch files if asked (``output.format``), then
    ``_SUCCESS`` with ``success`` (None: the run failed, no ``_SUCCESS``)."""
    state.write_json(METRICS_FILE, metrics)
    write_report(state)
    if batch_files:
        lines, errors = write_batch_files(state)
        log.info("wrote %s (%d lines) and %s (%d lines)", OUTPUT_FILE, lines, ERROR_FILE, errors)
    if success is not None:
        state.write_json(SUCCESS_FILE, success)
