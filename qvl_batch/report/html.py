"""``_report.html``: a self-contained report of one output (tables and PNG plots, no JS).

Everything is read through :class:`OutputState`: ``_job.json``, ``_metrics.json`` (absent while
a job runs), the commit markers and a few columns of the ``data/`` part files.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import itertools
import statistics
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..output.state import REPORT_FILE, OutputState
from .timeline import job_span, parse_time, timeline_section

READ_THREADS = 16  # small GETs in parallel: object stores answer each in ~10-50 ms
MAX_PART_FILES = 200  # per-row plots sample at most this many data files: bounded time and memory
ROW_COLUMNS = ["resized_width", "resized_height", "vision_tokens", "output_tokens"]
TOP_GRIDS = 15


def _png(draw, size=(7.5, 3.2)) -> str:
    """Render ``draw(fig)`` with the Agg canvas (no display, no pyplot) as an <img> tag."""
    from matplotlib.figure import Figure  # lazy: only the report needs matplotlib

    fig = Figure(figsize=size, dpi=100, layout="tight")
    draw(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _read_rows(state: OutputState, files: list[str]) -> tuple[dict[str, list[int]], str]:
    note = ""
    if len(files) > MAX_PART_FILES:
        note = f"per-row plots sample {MAX_PART_FILES} of {len(files):,} data files, evenly spaced"
        files = [files[i * len(files) // MAX_PART_FILES] for i in range(MAX_PART_FILES)]

    def read(name: str) -> pa.Table:
        blob = state.read_path(state.path(name))
        return pq.read_table(pa.BufferReader(blob), columns=ROW_COLUMNS)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        tables = list(pool.map(read, files))
    cols: dict[str, list[int]] = {c: [] for c in ROW_COLUMNS}
    for t in tables:
        for c in ROW_COLUMNS:
            cols[c] += t.column(c).to_pylist()
    return cols, note


def _throughput(times: list[dt.datetime], rows: list[int], origin=None, span_s: float = 0.0):
    """Rows committed over time. ``origin``: the run's start (x = 0 there; commits before it,
    earlier runs' of a resumed job, are left out); None: x = 0 at the first commit.
    ``span_s``: the job's length from ``origin``, so the axis reaches the job's end."""
    earlier = 0
    if origin is not None:
        kept = [(t, n) for t, n in zip(times, rows) if t >= origin]
        earlier = len(times) - len(kept)
        if kept:
            times, rows = [t for t, _ in kept], [n for _, n in kept]
        else:  # this run committed nothing: show the earlier runs' commits from the first one
            origin = None
    zero = origin or times[0]
    span = max((times[-1] - zero).total_seconds(), span_s if origin else 0.0)
    # Bins of a round width giving about 30 or fewer bars: per minute for long jobs.
    step = next((s for s in (0.1, 1, 10, 60, 600) if span / s <= 30), 3600)
    scale, axis = (60, "minutes") if step >= 60 else (1, "seconds")
    per_bin: Counter = Counter()
    for t, n in zip(times, rows):
        per_bin[int((t - zero).total_seconds() // step)] += n
    xs = list(range(max(per_bin) + 1))
    unit = f"{step:g} s" if step < 60 else f"{step // 60:g} min"
    since = "job start" if origin else "first commit"

    def draw(fig):
        ax = fig.add_subplot()
        lefts, heights = [x * step / scale for x in xs], [per_bin[x] for x in xs]
        ax.bar(lefts, heights, width=step / scale * 0.9, align="edge", color="tab:blue")
        ax.set(xlabel=f"{axis} since {since}", ylabel=f"rows committed per {unit}")
        ax.set_xlim(0, max(span, step) / scale)
        cum = ax.twinx()
        at = [0.0] + [(t - zero).total_seconds() / scale for t in times]
        cum.plot(at, [0, *itertools.accumulate(rows)], color="tab:orange", drawstyle="steps-post")
        cum.set_ylabel("cumulative rows", color="tab:orange")

    caption = f"Throughput: rows committed per {unit} (bars), cumulative rows (line), "
    if origin:
        caption += (
            "from the start of this run (x = 0: the driver started; the first bars stay empty "
            "while actors start and load the model)."
        )
        if earlier:
            caption += f" Left out: {earlier:,} unit(s) committed by earlier runs, before it."
    else:
        why = "this run committed none" if earlier else "no start time in _metrics.json"
        caption += f"from the first commit ({why})."
    return _png(draw), caption


def _sizes(cols: dict[str, list[int]], batch_counts: dict) -> str:
    grids = Counter(zip(cols["resized_width"], cols["resized_height"])).most_common(TOP_GRIDS)

    def draw(fig):
        left, right = fig.subplots(1, 2)
        if grids:
            left.barh([f"{w}x{h}" for (w, h), _ in grids][::-1], [n for _, n in grids][::-1])
        left.set_title(f"resized image size (top {TOP_GRIDS} grids)")
        left.set_xlabel("rows")
        counts = {int(k): v for k, v in batch_counts.items()}  # JSON keys are strings
        if counts:
            right.bar(list(counts), list(counts.values()), color="tab:green")
        else:
            right.text(0.5, 0.5, "no batch sizes (no _metrics.json)", ha="center")
        right.set_title("engine batch sizes")
        right.set_xlabel("rows per batch")
        right.set_ylabel("batches")

    return _png(draw, (9, 3.8))


def _latency(intervals: list[float]) -> str:
    def draw(fig):
        ax = fig.add_subplot()
        ax.hist(intervals, bins=min(40, max(5, len(intervals) // 3)), color="tab:purple")
        ax.set(xlabel="seconds between consecutive unit commits", ylabel="intervals")

    return _png(draw)


def _errors(codes: dict[str, int]) -> str:
    ordered = sorted(codes.items(), key=lambda kv: kv[1])  # largest on top of a barh chart

    def draw(fig):
        fig.add_subplot().barh(*zip(*ordered), color="tab:red")

    return _png(draw, (7.5, 1 + 0.4 * len(ordered)))


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{cells}</table>"


def _pct(values: list[int]) -> str:
    if not values:
        return "-"
    q = statistics.quantiles(values, n=20) if len(values) > 1 else [values[0]] * 19
    return f"mean {statistics.fmean(values):.1f}, p50 {q[9]:.0f}, p95 {q[18]:.0f}"


def build_report(state: OutputState) -> bytes:
    """The HTML report of the output behind ``state`` (works on running and finished jobs)."""
    job = state.job() or {}
    metrics = state.metrics()  # None: no _metrics.json yet
    markers = state.markers()
    markers.sort(key=lambda m: m.committed_at)
    data_files = sorted(f for m in markers for f in m.files if f.startswith("data/"))
    cols, sample_note = _read_rows(state, data_files)
    parts = ["<h2>Summary</h2>", _table(_summary(job, metrics or {}, markers, cols))]
    if sample_note:
        parts.append(f"<p class=note>{html.escape(sample_note)}</p>")
    parts += _plots(metrics, markers, cols)
    return _page(f"qvl-batch report: {job.get('job_id', state.url)}", parts)


def _summary(job: dict, metrics: dict, markers: list, cols: dict) -> list[tuple[str, Any]]:
    """The summary table's rows: the job, what committed, speed, padding, stages, storage."""
    summary, padding = metrics.get("summary", {}), metrics.get("padding", {})
    cfg = job.get("config", {})
    engine = cfg.get("engine", {})
    rows = sum(m.num_rows for m in markers)
    table = [
        ("job id", job.get("job_id", "?")),
        ("config name", cfg.get("job", {}).get("name", "?")),
        ("model", f"{engine.get('model', '?')} (engine {engine.get('name', '?')})"),
        ("created at", job.get("created_at", "?")),
        ("status", summary.get("status", "running (no _metrics.json yet)")),
        ("units committed", f"{len(markers):,}"),
        ("rows committed", f"{rows:,} of {job.get('input', {}).get('rows', '?')} planned"),
        ("data rows", f"{sum(m.data_rows for m in markers):,}"),
        ("error rows", f"{sum(m.error_rows for m in markers):,}"),
    ]
    if summary:
        table += _speed(summary)
    if padding:
        fifo = f"(FIFO would be {padding.get('fifo_padding_fraction', 0):.4f})"
        table.append(("padding fraction", f"{padding.get('padding_fraction', 0):.4f} {fifo}"))
        table.append(("mean batch size", padding.get("mean_batch_size", "-")))
        if padding.get("token_capped_batches"):
            capped = f"{padding['token_capped_batches']:,} of {padding.get('batches', 0):,}"
            table.append(("batches cut by batching.max_tokens_per_batch", capped))
    for stage, secs in sorted(metrics.get("actor_timings_s", {}).items()):
        table.append((f"stage {stage}", f"{secs:,.1f} s (all actors)"))
    if "storage" in metrics:
        st = metrics["storage"]
        kinds = "".join(f", {k}={v}" for k, v in sorted(st.get("by_kind", {}).items()))
        table.append(
            ("storage retries", f"{st.get('retries', 0)} (gave up {st.get('gave_up', 0)}{kinds})")
        )
    table.append(("vision tokens/row", _pct(cols["vision_tokens"])))
    table.append(("output tokens/row", _pct(cols["output_tokens"])))
    return table


def _speed(summary: dict) -> list[tuple[str, Any]]:
    """Rows/s over the whole job and steady, elapsed time, retries and restarts."""
    out = []
    run_rows, elapsed = summary.get("rows_this_run"), summary.get("elapsed_s") or 0
    pipeline = summary.get("pipeline_s") or 0
    if isinstance(run_rows, int) and elapsed > 0:
        per_s = f"{run_rows / elapsed:,.1f}"
        why = f"{run_rows:,} rows this run / {elapsed:,.1f} s from the driver's start"
        out.append(("rows/s (whole job)", f"{per_s} ({why})"))
    else:
        out.append(("rows/s (last run)", f"{summary.get('rows_per_s', 0):,.1f}"))
    if isinstance(run_rows, int) and pipeline > 0:
        why = f"first actor ready to last commit, {pipeline:,.1f} s"
        out.append(("rows/s (steady)", f"{run_rows / pipeline:,.1f} ({why})"))
    out.append(("elapsed (last run)", f"{elapsed:,.1f} s"))
    out.append(("unit retries", summary.get("unit_retries", 0)))
    out.append(("actor restarts", summary.get("actor_restarts", 0)))
    return out


def _plots(metrics: dict | None, markers: list, cols: dict) -> list[str]:
    """Errors by code, throughput, the actors' timeline, sizes and commit latency."""
    codes: Counter = Counter()
    for m in markers:
        codes.update(m.error_codes)
    timed = [(t, m.num_rows) for m in markers if (t := parse_time(m.committed_at))]
    times = [t for t, _ in timed]
    padding = (metrics or {}).get("padding", {})
    parts = ["<h2>Errors by code</h2>"]
    if codes:
        parts += [_table(sorted(codes.items())), _errors(dict(codes))]
    else:
        parts.append("<p class=note>No error rows.</p>")
    parts.append("<h2>Throughput</h2>")
    if times:
        origin = parse_time((metrics or {}).get("started_at"))
        img, caption = _throughput(times, [n for _, n in timed], origin, job_span(metrics) or 0)
        parts += [img, f"<p class=note>{caption}</p>"]
    else:
        parts.append("<p class=note>No units committed yet.</p>")
    parts += timeline_section(metrics, _png)
    parts.append("<h2>Image and batch sizes</h2>")
    if sum(m.data_rows for m in markers) or padding.get("batch_size_counts"):
        parts.append(_sizes(cols, padding.get("batch_size_counts", {})))
    else:
        parts.append("<p class=note>No data rows and no batch sizes: nothing to plot.</p>")
    parts.append("<h2>Unit commit latency</h2>")
    intervals = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    if intervals:
        parts += [
            _latency(intervals),
            "<p class=note>Unit commit latency: time between consecutive commits across "
            "all actors (not per-row latency).</p>",
        ]
    else:
        parts.append("<p class=note>Fewer than two commits: no intervals to plot.</p>")
    return parts


def _page(title: str, parts: list[str]) -> bytes:
    title = html.escape(title)
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:960px}th{text-align:left;"
        "padding-right:1em}td,th{border-bottom:1px solid #ddd}.note{color:#555}"
    )
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset=utf-8><title>{title}</title>"
        f"<style>{style}</style></head><body><h1>{title}</h1>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    ).encode()


def write_report(state: OutputState) -> str:
    """Write ``_report.html`` into the output; returns its path there."""
    state.write_bytes(REPORT_FILE, build_report(state))
    return state.path(REPORT_FILE)
