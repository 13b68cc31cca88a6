"""``qvl-batch plan``: a dry run from the input's metadata and a sample of its rows.

No Ray, no engine, nothing written: the planner lists the shards and cuts the units as ``run``
would, then reads a sample of rows spread over evenly spaced units and prepares them as the
runner does, to estimate image sizes, tokens, row errors and (given a rate) GPU-hours.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..config import Config, ConfigError
from ..engines.base import estimate_text_tokens
from ..errors import Exit, RowFailure
from ..rows.manifest import InputError, WorkUnit, plan_job
from ..rows.prepare import PreparedRow, prepare_row
from ..rows.reader import read_unit_table, unit_rows
from ..run.closing import error_fraction_problem
from ..run.validate import load_job, with_input_settings
from ..storage import Storage, StorageError

ROWS_PER_UNIT = 8  # sampled rows per unit read: spreads the sample, bounds the units read
SIZE_BUCKETS = ((256, "<256"), (512, "256-512"), (1024, "512-1024"), (2048, "1024-2048"))
TOP_GRIDS = 5


def size_bucket(width: int, height: int) -> str:
    """The histogram bucket of a source image, by its long side."""
    side = max(width, height)
    return next((name for limit, name in SIZE_BUCKETS if side < limit), ">=2048")


def percentile(values: list[int], q: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)])


def _stats(values: list[int]) -> dict[str, float]:
    mean = sum(values) / len(values) if values else 0.0
    return {"mean": round(mean, 1), "p50": percentile(values, 50), "p95": percentile(values, 95)}


@dataclass
class SampledRow:
    """One sampled row as the runner would see it: its error code, or its sizes and tokens."""

    shard_url: str
    row: int  # position in the shard
    row_id: str
    error: str | None = None
    source_size: tuple[int, int] | None = None  # (width, height), upright
    resized_size: tuple[int, int] | None = None
    vision_tokens: int = 0
    text_tokens: int = 0  # an estimate (see estimate_text_tokens)


@dataclass
class PlanReport:
    """What a job would do: shards, units, rows, and estimates from a sample of rows."""

    shards: int
    units: int
    rows: int
    rate: float | None = None  # rows/s per GPU
    gpus: int = 1
    max_error_fraction: float = 0.1
    sample: list[SampledRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def prepared(self) -> list[SampledRow]:
        return [r for r in self.sample if r.error is None]

    def error_fractions(self) -> dict[str, float]:
        counts = Counter(r.error for r in self.sample if r.error)
        return {code: n / len(self.sample) for code, n in counts.most_common()}

    def size_histogram(self) -> dict[str, int]:
        counts = Counter(size_bucket(*r.source_size) for r in self.prepared if r.source_size)
        names = [name for _, name in SIZE_BUCKETS] + [">=2048"]
        return {name: counts[name] for name in names}

    def resized_grids(self) -> dict[str, int]:
        counts = Counter(f"{r.resized_size[0]}x{r.resized_size[1]}" for r in self.prepared)
        return dict(counts.most_common(TOP_GRIDS))

    def tokens(self, kind: str) -> dict[str, float]:
        """Per prepared row stats and the total extrapolated to all rows (errors spend none)."""
        values = [getattr(r, f"{kind}_tokens") for r in self.prepared]
        total = sum(values) / len(self.sample) * self.rows if self.sample else 0.0
        return {**_stats(values), "total": round(total)}

    @property
    def gpu_hours(self) -> float | None:
        return None if self.rate is None else self.rows / self.rate / 3600 / self.gpus

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "units": self.units,
            "rows": self.rows,
            "sampled_rows": len(self.sample),
            "image_size_histogram": self.size_histogram(),
            "resized_grids": self.resized_grids(),
            "vision_tokens": self.tokens("vision"),
            "text_tokens_estimate": self.tokens("text"),
            "error_fractions": self.error_fractions(),
            "rate_rows_per_s_per_gpu": self.rate,
            "gpus": self.gpus,
            "gpu_hours": self.gpu_hours,
            "problems": list(self.problems),
            "sample": [asdict(r) for r in self.sample],
        }

    def lines(self) -> list[str]:
        vis, txt = self.tokens("vision"), self.tokens("text")
        out = [
            f"input: {self.shards} shards, {self.units} units, {self.rows:,} rows",
            f"sample: {len(self.sample)} rows, {len(self.prepared)} prepared",
            "source sizes (long side): "
            + ", ".join(f"{k}: {v}" for k, v in self.size_histogram().items()),
            "resized grids (top): "
            + (", ".join(f"{k}: {v}" for k, v in self.resized_grids().items()) or "none"),
            f"vision tokens/row: mean {vis['mean']}, p50 {vis['p50']:.0f}, p95 {vis['p95']:.0f};"
            f" total ~{vis['total']:,}",
            f"text tokens/row (estimate, 24 + chars/4): mean {txt['mean']}, p50 {txt['p50']:.0f},"
            f" p95 {txt['p95']:.0f}; total ~{txt['total']:,}",
        ]
        errors = ", ".join(f"{c} {f:.1%}" for c, f in self.error_fractions().items())
        out.append(f"row errors in sample: {errors or 'none'}")
        if self.gpu_hours is None:
            out.append(
                "GPU-hours: unknown (measure a rate with `qvl-batch bench gpu`, pass --rate)"
            )
        else:
            out.append(f"GPU-hours: ~{self.gpu_hours:.2f} ({self.rate:g} rows/s/GPU x {self.gpus})")
        out += [f"problem: {p}" for p in self.problems]
        return out


def _spread(units: list[WorkUnit], sample: int) -> list[WorkUnit]:
    """Sub-units to read: evenly spaced units, a contiguous run of ~ROWS_PER_UNIT rows from the
    middle of each, so only the row groups holding those rows are read."""
    if not units or sample <= 0:
        return []
    k = min(len(units), -(-sample // ROWS_PER_UNIT))
    picked = [units[i * len(units) // k] for i in range(k)]
    while sum(u.num_rows for u in picked) < sample and k < len(units):
        k += 1
        picked = [units[i * len(units) // k] for i in range(k)]
    quotas, left = {}, sample
    by_size = sorted(range(k), key=lambda i: picked[i].num_rows)
    for n, i in enumerate(by_size):  # small units first, so their shortfall moves on
        quotas[i] = min(picked[i].num_rows, -(-left // (k - n)))
        left -= quotas[i]
    return [
        replace(u, row_start=u.row_start + (u.num_rows - quotas[i]) // 2, num_rows=quotas[i])
        for i, u in enumerate(picked)
        if quotas[i]
    ]


def _sample_unit(unit: WorkUnit, cfg: Config, storage: Storage) -> list[SampledRow]:
    out = []
    for row in unit_rows(unit, read_unit_table(unit, cfg, storage), cfg):
        item = SampledRow(unit.shard_url, unit.row_start + row.index, row.row_id)
        out.append(item)
        if row.error:
            item.error = row.error.code
            continue
        item.text_tokens = estimate_text_tokens(row.prompt or "", cfg.prompt.system)
        try:  # the runner's rule, with an estimated token count (no engine loaded here)
            prepared = prepare_row(row, cfg, storage, estimate_text_tokens)
        except RowFailure as exc:
            item.error = exc.code
            continue
        assert isinstance(prepared, PreparedRow)  # no reuse in a plan
        img = prepared.image
        item.source_size, item.resized_size = img.original_size, img.resized_size
        item.vision_tokens = img.vision_tokens
    return out


def plan_report(
    cfg: Config, sample: int = 200, rate: float | None = None, gpus: int = 1
) -> PlanReport:
    """Plan the job and prepare a sample of rows; ``problems`` says why it should not run."""
    storage = Storage.for_input(cfg)
    plan = plan_job(cfg, storage)
    cfg = with_input_settings(cfg, plan.settings)
    units = list(plan.units())
    report = PlanReport(
        len(plan.shards), len(units), plan.total_rows, rate, gpus, cfg.limits.max_error_fraction
    )
    for unit in _spread(units, sample):
        report.sample += _sample_unit(unit, cfg, storage)
    bad = len(report.sample) - len(report.prepared)
    if problem := error_fraction_problem(bad, len(report.sample), cfg.limits):
        report.problems.append(f"the sample's {problem}: the job would fail")
    if not report.prepared:
        report.problems.append("no row in the sample could be prepared")
    return report


def cmd_plan(args) -> int:
    """``qvl-batch plan``: 0 when the sample looks runnable, 1 on problems, 2 on bad config."""
    if args.sample < 1 or args.gpus < 1 or (args.rate is not None and args.rate <= 0):
        print("qvl-batch: error: --sample and --gpus must be >= 1, --rate > 0", file=sys.stderr)
        return Exit.CONFIG
    try:
        cfg = load_job(args.job, list(args.overrides))
        report = plan_report(cfg, args.sample, args.rate, args.gpus)
    except (ConfigError, InputError, StorageError) as exc:
        print(f"qvl-batch: error: {exc}", file=sys.stderr)
        return Exit.CONFIG
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(report.lines()))
    return Exit.PROBLEMS if report.problems else Exit.OK


def add_plan_parser(sub) -> None:
    """Add ``plan JOB [overrides] [--sample N] [--rate R] [--gpus N] [--json]`` to subparsers."""
    p = sub.add_parser("plan", help="dry run: shards, units, rows, sizes, tokens, GPU-hours")
    p.add_argument("job", help="job YAML file (see jobs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--sample", type=int, default=200, help="rows to read and prepare")
    p.add_argument("--rate", type=float, metavar="ROWS_PER_S", help="rows/s per GPU")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the job will use")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_plan)
