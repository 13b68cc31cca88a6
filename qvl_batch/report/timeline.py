"""The "Actors over time" section of ``_report.html``: one lane per actor, from job start.

Reads three keys of ``_metrics.json`` the driver writes at the end of a run (older outputs and
running jobs lack them: the section is then a note)::

    started_at      ISO wall time of the driver's start: x = 0 of every plot from job start
    actor_timeline  {"bin_s", "actors": [{"actor", "incarnation", "gpus", "start_s",
                    "busy", "waiting", "idle"}]}: seconds per bin in each state
    unit_runs       [{"actor", "unit_id", "start_s", "end_s", "outcome", "copy"}]: hand-outs

Drawing cost is bounded whatever the job's length: each lane is three step-filled polygons over
at most ``MAX_DRAW_BINS`` bins, and the unit runs one ``broken_barh`` per (lane, row, kind).
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections import defaultdict

STATES = {  # key -> (colour, legend label)
    "busy": ("#2ca02c", "busy (engine holds rows)"),
    "waiting": ("#ff9f1c", "waiting for rows (reading / decoding)"),
    "idle": ("#d3d3d3", "idle (no unit)"),
}
OUTCOMES = {  # unit run outcome -> (colour, legend label)
    "committed": ("#1f2a44", "unit committed"),
    "discarded": ("#e377c2", "unit discarded (lost race)"),
    "moved": ("#17becf", "unit moved to another actor"),
    "failed": ("#d62728", "unit failed (retried)"),
}
COPY_HATCH = "////"
MAX_DRAW_BINS = 1200  # per lane: more bins are summed in groups (a PNG is ~700 px wide anyway)
MAX_UNIT_ROWS = 4  # overlapping unit runs of one actor are stacked in up to this many rows
BAND = (-0.42, 0.12)  # state band of lane i spans i+BAND[0] .. i+BAND[1] (y axis inverted)
UNITS = (0.17, 0.42)  # unit-run band below it


def parse_time(value) -> dt.datetime | None:
    """An ISO time as an aware datetime (naive ones taken as UTC); None if absent or bad."""
    if not isinstance(value, str):
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def time_axis(span_s: float) -> tuple[float, str]:
    """(divisor, unit name) of an x axis in seconds: minutes past 5 minutes, like throughput."""
    return (60.0, "minutes") if span_s > 300 else (1.0, "seconds")


def _floats(values) -> list[float]:
    return [float(v or 0.0) for v in values] if isinstance(values, list) else []


def _lanes(timeline: dict) -> list[dict]:
    bin_s = float(timeline["bin_s"])
    lanes = []
    for a in timeline["actors"]:
        series = {s: _floats(a.get(s)) for s in STATES}
        n = min(len(v) for v in series.values())  # equal by contract; never index past one
        lanes.append(
            {
                "actor": int(a["actor"]),
                "incarnation": a.get("incarnation", 0),
                "gpus": str(a.get("gpus") or ""),
                "start_s": float(a.get("start_s") or 0.0),
                "bin_s": bin_s,
                **{s: v[:n] for s, v in series.items()},
            }
        )
    return lanes


def _runs(raw) -> list[dict]:
    runs = []
    for r in raw if isinstance(raw, list) else []:
        try:
            start, end = float(r["start_s"]), float(r["end_s"])
            runs.append({**r, "actor": int(r["actor"]), "start_s": start, "end_s": max(end, start)})
        except (KeyError, TypeError, ValueError):
            continue
    return runs


def _lane_end(lane: dict) -> float:
    n = len(lane["busy"])
    if not n:
        return lane["start_s"]
    last = sum(lane[s][-1] for s in STATES)
    return lane["start_s"] + (n - 1) * lane["bin_s"] + (min(last, lane["bin_s"]) or lane["bin_s"])


def _label(actor: int, lane: dict | None) -> str:
    if lane is None:
        return f"actor {actor} (no timeline)"
    gpus = lane["gpus"]
    where = "CPU" if not gpus else f"GPU{'s' if ',' in gpus else ''} {gpus}"
    inc = f", inc. {lane['incarnation']}" if lane["incarnation"] else ""
    return f"actor {actor} ({where}{inc})"


def _draw_states(ax, y: float, lane: dict, scale: float) -> None:
    import numpy as np

    vals = np.array([lane[s] for s in STATES], dtype=float)  # (3, n)
    n = vals.shape[1]
    if not n:
        return
    group = math.ceil(n / MAX_DRAW_BINS)
    if group > 1:  # sum groups of bins: bounded polygons however long the job
        vals = np.pad(vals, ((0, 0), (0, -n % group))).reshape(3, -1, group).sum(axis=2)
    edges = lane["start_s"] + np.arange(vals.shape[1] + 1) * lane["bin_s"] * group
    edges[-1] = min(edges[-1], _lane_end(lane))
    total = vals.sum(axis=0)
    frac = np.divide(vals, total, out=np.zeros_like(vals), where=total > 0)
    x = edges / scale
    bottom, height = y + BAND[1], BAND[1] - BAND[0]
    done = np.zeros(vals.shape[1])
    for (colour, _), f in zip(STATES.values(), frac):
        lo, hi = bottom - height * done, bottom - height * (done + f)
        # step="post": value i holds over [x[i], x[i+1]]; the last value is repeated.
        lo, hi = np.append(lo, lo[-1]), np.append(hi, hi[-1])
        ax.fill_between(x, lo, hi, step="post", color=colour, linewidth=0)
        done = done + f


def _draw_runs(ax, y: float, runs: list[dict], scale: float, min_w: float) -> None:
    ends: list[float] = []  # greedy interval packing: overlapping runs go to separate rows
    placed: dict[tuple[int, str, bool], list[tuple[float, float]]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: r["start_s"]):
        row = next((i for i, e in enumerate(ends) if e <= r["start_s"]), None)
        if row is None and len(ends) < MAX_UNIT_ROWS:
            row = len(ends)
            ends.append(0.0)
        if row is None:
            row = min(range(len(ends)), key=ends.__getitem__)
        ends[row] = max(ends[row], r["end_s"])
        kind = r.get("outcome") if r.get("outcome") in OUTCOMES else "failed"
        width = max(r["end_s"] - r["start_s"], min_w)
        placed[(row, kind, bool(r.get("copy")))].append((r["start_s"] / scale, width / scale))
    rows = max(len(ends), 1)
    h = (UNITS[1] - UNITS[0]) / rows
    for (row, kind, copy), bars in placed.items():
        ax.broken_barh(
            bars,
            (y + UNITS[0] + row * h, h * 0.85),
            facecolor=OUTCOMES[kind][0],
            edgecolor="white",  # thin gaps between back-to-back units; the copies' hatch
            hatch=COPY_HATCH if copy else None,
            linewidth=0.3,
        )


def _plot(lanes: dict[int, dict], runs: dict[int, list], span: float, bin_s: float, png) -> str:
    from matplotlib.patches import Patch

    actors = sorted(set(lanes) | set(runs))
    scale, unit = time_axis(span)

    def draw(fig):
        ax = fig.add_subplot()
        for y, actor in enumerate(actors):
            if actor in lanes:
                _draw_states(ax, y, lanes[actor], scale)
            _draw_runs(ax, y, runs.get(actor, []), scale, min_w=span / 800)
        ax.set_yticks(range(len(actors)), [_label(a, lanes.get(a)) for a in actors])
        ax.set_ylim(len(actors) - 0.5, -0.5)  # actor 0 on top
        ax.set_xlim(0, span / scale)
        ax.set_xlabel(f"{unit} since job start (bins of {bin_s:g} s)")
        ax.grid(axis="x", color="#eee", linewidth=0.6)
        ax.set_axisbelow(True)
        kinds = {r.get("outcome") for rs in runs.values() for r in rs}
        handles = [Patch(color=c, label=label) for c, label in STATES.values()]
        handles += [Patch(color=c, label=lb) for k, (c, lb) in OUTCOMES.items() if k in kinds]
        if any(r.get("copy") for rs in runs.values() for r in rs):
            handles.append(
                Patch(facecolor="#1f2a44", edgecolor="white", hatch=COPY_HATCH, label="copy")
            )
        ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.01), ncol=4, fontsize=7)

    return png(draw, (9, 1.6 + 0.45 * len(actors)))


def _html_table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _actor_table(lanes: dict[int, dict], runs: dict[int, list], span: float) -> str:
    scale, unit = time_axis(span)
    actors = sorted(set(lanes) | set(runs))
    # what each would have committed in an even split: a hoard shows as a gap to it
    even = sum(r.get("outcome") == "committed" for rs in runs.values() for r in rs) / len(actors)
    rows = []
    for actor in actors:
        lane, rs = lanes.get(actor), runs.get(actor, [])
        secs = {s: sum(lane[s]) if lane else 0.0 for s in STATES}
        counts = defaultdict(int)
        for r in rs:
            counts[r.get("outcome")] += 1
        last = max((r["end_s"] for r in rs if r.get("outcome") == "committed"), default=None)
        rows.append(
            [
                actor,
                (lane["gpus"] or "CPU") if lane else "?",
                lane["incarnation"] if lane else "?",
                *(f"{secs[s] / span:.1%}" for s in STATES),
                f"{max(0.0, 1 - sum(secs.values()) / span):.1%}",
                counts["committed"],
                f"{even:.1f}",
                sum(1 for r in rs if r.get("copy")),
                counts["discarded"],
                counts["moved"],
                counts["failed"],
                "-" if last is None else f"{last / scale:,.1f}",
            ]
        )
    header = ["actor", "GPUs", "incarnation", "busy", "waiting", "idle", "not tracked"]
    header += ["units committed", "even share", "copies run", "discarded", "moved", "failed"]
    header.append(f"last commit ({unit[:3]})")
    return _html_table(header, rows)


def job_span(metrics: dict | None) -> float | None:
    """Seconds from job start to its end: the summary's elapsed_s, else the timeline's extent."""
    metrics = metrics or {}
    elapsed = (metrics.get("summary") or {}).get("elapsed_s")
    if isinstance(elapsed, (int, float)) and elapsed > 0:
        return float(elapsed)
    try:
        ends = [_lane_end(lane) for lane in _lanes(metrics["actor_timeline"])]
    except (KeyError, TypeError, ValueError, AttributeError):
        ends = []
    ends += [r["end_s"] for r in _runs(metrics.get("unit_runs"))]
    return max(ends) if ends and max(ends) > 0 else None


def timeline_section(metrics: dict | None, png) -> list[str]:
    """HTML parts of the section; ``png(draw, size)`` renders a figure (report_html._png)."""
    parts = ["<h2>Actors over time</h2>"]
    timeline = (metrics or {}).get("actor_timeline")
    if not timeline:
        why = "no _metrics.json yet" if metrics is None else "not in _metrics.json"
        parts.append(
            f"<p class=note>No actor timeline ({why}: written at the end of a run by "
            "versions that record it).</p>"
        )
        return parts
    try:
        lanes = {lane["actor"]: lane for lane in _lanes(timeline)}
        runs: dict[int, list] = defaultdict(list)
        for r in _runs(metrics.get("unit_runs")):
            runs[r["actor"]].append(r)
        span = job_span(metrics) or 1.0
        extent = max([span, *(_lane_end(x) for x in lanes.values())])
        extent = max([extent, *(r["end_s"] for rs in runs.values() for r in rs)])
        if not lanes and not runs:
            raise ValueError("no actors")
        bin_s = float(timeline["bin_s"])
        img = _plot(lanes, dict(runs), extent, bin_s, png)
        table = _actor_table(lanes, dict(runs), span)
    except Exception as exc:  # a malformed section must not cost the rest of the report
        parts.append(f"<p class=note>Actor timeline unreadable: {html.escape(repr(exc))}.</p>")
        return parts
    parts += [
        img,
        "<p class=note>One lane per actor slot, x = 0 at job start. The wide band shows, per "
        f"{bin_s:g} s bin, the share of the actor's time it was <b>busy</b> (green: the engine "
        "held rows), <b>waiting for rows</b> (orange: it had units but the engine was empty, "
        "rows being read and decoded) or <b>idle</b> (grey: the driver gave it no unit). Blank: "
        "the actor was not running yet (Ray start-up, model load) or the time belongs to an "
        "earlier incarnation that died (only the current one's timeline is kept). The thin bars "
        "under it are the units handed to that slot, from hand-out to result on the driver's "
        "clock: dark committed, pink discarded (a duplicate copy that lost or was withdrawn), "
        "cyan moved to another actor before it started, red failed (retried); hatched: a "
        "backup copy of a unit also running elsewhere. A lane still busy after the others went "
        "grey is a straggler.</p>",
        table,
        f"<p class=note>Fractions are of the job's {span:,.1f} s (driver start to end); "
        "not tracked: time the actor's current process was not running (before it started: "
        "Ray start-up, model load). Even share: the units committed over the actors; an actor "
        f"far above it held units others could have run. Moves tried and refused (the unit's "
        f"rows had started computing): {(metrics.get('summary') or {}).get('moves_refused', 0)}."
        "</p>",
    ]
    return parts
