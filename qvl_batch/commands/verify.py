"""``qvl-batch verify OUTPUT``: check an output folder against the input it was made from.

The input is re-planned from the config saved in ``_job.json``; then the output contract
(README, "Output layout") is checked: every planned unit committed, markers backed by their
part files and no part file without a marker, part schemas, and per unit that each input row
is in exactly one of ``data/`` and ``errors/`` with its input id. Units are checked a few at a
time, so memory is O(unit) whatever the size of the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import posixpath
import sys
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..config import Config, ConfigError, StorageConfig
from ..errors import Exit
from ..output.coverage import coverage
from ..output.marker import Marker
from ..output.schema import LINEAGE, ROW_RESULT, part_columns
from ..output.state import (
    DATA_DIR,
    ERRORS_DIR,
    UNITS_DIR,
    NotAJobOutput,
    OutputState,
    data_file,
    errors_file,
    unit_id_of,
)
from ..output.structured import columns_of
from ..report.totals import error_codes_line
from ..rows.manifest import InputError, Plan, WorkUnit, job_unit_rows, plan_job
from ..rows.reader import read_unit_table
from ..storage import Storage, StorageError, describe, is_temporary
from .existing_output import open_output

# Units checked at once: each is a few GETs of tens of ms on object stores and holds one unit's
# ids and row numbers, so this bounds both open connections and memory.
VERIFY_THREADS = 8
MAX_LINES = 50  # violations printed by lines(); --json lists them all
EXAMPLES = 3  # rows named per violation
COLUMN_TYPES = {f.name: f.type for f in [*ROW_RESULT, *LINEAGE]}
COLUMN_TYPES.update(source_shard=pa.string(), attempts=pa.int32())
READ_COLUMNS = ["id", "source_row", "source_shard", "error_code", "job_id", "config_fingerprint"]


@dataclass
class VerifyReport:
    """What verify found: counts, and one line per violation of the output contract."""

    output: str
    job_id: str = ""
    complete: bool = False  # _SUCCESS present
    input_rows: int = 0
    units_planned: int | None = None  # None: the input could not be planned as the job saw it
    units_committed: int = 0
    units_pending: int | None = None
    rows_pending: int | None = None
    data_rows: int = 0
    error_rows: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def lines(self) -> list[str]:
        """A summary for people: counts, notes, the first MAX_LINES violations."""
        n = lambda v: "?" if v is None else f"{v:,}"  # noqa: E731
        out = [
            f"verify {self.output}: {'OK' if self.ok else 'VIOLATIONS'}  (job {self.job_id}, "
            f"{'complete' if self.complete else 'incomplete: no _SUCCESS'})",
            f"  input: {self.input_rows:,} rows; units: {n(self.units_planned)} planned, "
            f"{self.units_committed:,} committed, {n(self.units_pending)} pending "
            f"({n(self.rows_pending)} rows)",
            f"  output: {self.data_rows:,} rows in data/, {self.error_rows:,} in errors/",
        ]
        if self.error_codes:
            out.append(error_codes_line(self.error_codes))
        out += [f"  note: {note}" for note in self.notes]
        out.append(f"  violations: {len(self.violations)}")
        out += [f"  - {v}" for v in self.violations[:MAX_LINES]]
        if len(self.violations) > MAX_LINES:
            out.append(f"  ... and {len(self.violations) - MAX_LINES} more (--json lists all)")
        return out

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}


# ---- the job and its input ------------------------------------------------------------------


def _replan(cfg: Config, job: dict, report: VerifyReport) -> Plan | None:
    """The input planned again; None (and a violation) when it is not the job's input any more."""
    report.input_rows = int((job.get("input") or {}).get("rows") or 0)
    saved = (job.get("fingerprint_fields") or {}).get("input")
    try:
        plan = plan_job(cfg, unit_rows=job_unit_rows(job, cfg))
    except (InputError, StorageError) as exc:
        report.violations.append(f"the input cannot be planned any more: {exc}")
        return None
    if plan.fingerprint != saved:
        report.violations.append(
            f"the input changed since the job ran (input fingerprint {saved} then, "
            f"{plan.fingerprint} now: shard paths, sizes or versions differ); units and rows "
            "were checked against the markers only"
        )
        return None
    report.input_rows = plan.total_rows
    return plan


def _id_projection(cfg: Config) -> Config | None:
    """``cfg`` with the id and passthrough columns as its only required columns, so that
    read_unit_table reads those and never the images. None when there is nothing to read."""
    cols = [c for c in [cfg.input.id_column, *cfg.input.passthrough_columns] if c]
    if not cols:
        return None
    inp = dataclasses.replace(cfg.input, image_column=cols[0], prompt_column=cols[0])
    return dataclasses.replace(cfg, input=inp)


# ---- the ledger and its files ---------------------------------------------------------------


def _read_markers(state: OutputState, report: VerifyReport) -> dict[str, Marker]:
    """Every commit marker by unit id; unreadable or incomplete ones are violations."""
    markers = {}
    for path, blob in state.marker_blobs():
        uid, name = unit_id_of(path), f"{UNITS_DIR}/{posixpath.basename(path)}"
        marker = Marker.parse(blob)
        if marker is None or marker.unit_id != uid:
            report.violations.append(f"marker {name}: not JSON, incomplete or of another unit")
        else:
            markers[uid] = marker
    return markers


def _check_units(plan, markers, report: VerifyReport, allow_incomplete: bool) -> list[WorkUnit]:
    """Markers against the plan; returns the committed units, whose rows are checked next."""
    if plan is None:
        report.units_committed = len(markers)
        return [
            WorkUnit(u, -1, m.shard, m.row_start, m.num_rows) for u, m in sorted(markers.items())
        ]
    planned = {u.unit_id: u for u in plan.units()}
    for uid in sorted(set(markers) - set(planned)):
        report.violations.append(f"marker {UNITS_DIR}/{uid}.json: unit {uid} is not in the plan")
    pending = [u for u in planned.values() if u.unit_id not in markers]
    report.units_planned, report.units_pending = len(planned), len(pending)
    report.rows_pending = sum(u.num_rows for u in pending)
    if pending and (report.complete or not allow_incomplete):
        why = "yet _SUCCESS says the job finished" if report.complete else "(--allow-incomplete?)"
        report.violations += [
            f"unit {u.unit_id} ({u.shard_url} rows {u.row_start}-"
            f"{u.row_start + u.num_rows - 1}) is not committed {why}"
            for u in pending
        ]
    units = [planned[uid] for uid in sorted(markers) if uid in planned]
    for u in units:
        planned_fields = {"shard": u.shard_url, "row_start": u.row_start, "num_rows": u.num_rows}
        for key, want in planned_fields.items():
            if getattr(markers[u.unit_id], key) != want:
                report.violations.append(
                    f"marker of unit {u.unit_id}: {key} is {getattr(markers[u.unit_id], key)!r}, "
                    f"the plan says {want!r}"
                )
    report.units_committed = len(units)
    return units


def _check_files(state, markers, report: VerifyReport, tolerate_leftovers: bool) -> set[str]:
    """Part files against the markers; returns the relative paths of the part files present."""
    present, leftovers = set(), []
    for sub in (DATA_DIR, ERRORS_DIR, UNITS_DIR):
        for path in state._list(sub):
            rel, uid = f"{sub}/{posixpath.basename(path)}", unit_id_of(path)
            if is_temporary(rel):
                leftovers.append(f"{rel}: temporary file left behind by a write")
            elif sub == UNITS_DIR:
                continue
            elif uid is None:
                report.violations.append(f"{rel}: not a part file; unexpected in {sub}/")
            elif uid not in markers:
                leftovers.append(f"{rel}: orphan part file (no marker for unit {uid})")
            elif rel not in markers[uid].files:
                report.violations.append(f"{rel}: not listed in the marker of unit {uid}")
            present.add(rel)
    if tolerate_leftovers and leftovers:  # a resumed run deletes them
        report.notes.append(f"{len(leftovers)} leftover file(s) of an interrupted run")
    else:
        report.violations += leftovers
    for uid, record in sorted(markers.items()):
        files = record.files
        data = [f for f in files if f.startswith(f"{DATA_DIR}/")]
        errors = [f for f in files if f.startswith(f"{ERRORS_DIR}/")]
        retries = len(record.retries)
        named = {data_file(uid, n) for n in range(retries + 1)}
        named |= {errors_file(uid, n) for n in range(retries + 1)}
        if (
            bool(data) != (record.data_rows > 0)
            or len(errors) != (record.error_rows > 0)
            or len(data) + len(errors) != len(files)
            or not set(files) <= named
        ):
            report.violations.append(
                f"marker of unit {uid}: files {record.files} do not "
                f"match its counts {record.data_rows}/{record.error_rows}"
            )
        for rel in record.files:
            if rel not in present:
                report.violations.append(f"unit {uid}: {rel} is listed in its marker but missing")
    return present


# ---- rows, unit by unit ---------------------------------------------------------------------


def _schema_problems(rel: str, schema: pa.Schema, expected: list[str], types: dict) -> list[str]:
    """Column names (exactly, in order) and types of one part file against the contract."""
    out = []
    if schema.names != expected:
        missing = [c for c in expected if c not in schema.names]
        extra = [c for c in schema.names if c not in expected]
        detail = f"missing {missing}, unexpected {extra}" if missing or extra else "out of order"
        out.append(f"{rel}: columns differ from the contract: {detail}")
    for f in schema:
        want = types.get(f.name)
        if f.name in expected and want is not None and not f.type.equals(want):
            out.append(f"{rel}: column {f.name} is {f.type}, expected {want}")
    return out


@dataclass
class UnitResult:
    data_rows: int = 0
    error_rows: int = 0
    error_codes: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


class UnitChecker:
    """Checks one committed unit's part files, row by row, against its marker and its input."""

    def __init__(self, state, cfg: Config, job: dict, present: set[str], with_input: bool):
        self.state, self.cfg, self.present, self.with_input = state, cfg, present, with_input
        self.lineage = {"job_id": job.get("job_id"), "config_fingerprint": job.get("fingerprint")}
        self.passthrough = list(cfg.input.passthrough_columns)
        schema = cfg.structured.json_schema
        self.structured = columns_of(schema) if schema is not None else pa.schema([])
        # The contract of each part file, before lineage (passthrough columns included).
        self.columns = dict(zip((DATA_DIR, ERRORS_DIR), part_columns(cfg)))
        self._labels: dict[tuple[str, str], str] = {}  # (unit, sub) -> the files read
        self.projection = _id_projection(cfg)
        self.input_storage = Storage.for_input(cfg)

    def check(self, unit: WorkUnit, marker: Marker) -> UnitResult:
        res = UnitResult()
        try:
            ids, input_schema = self._input_ids(unit, res)
            types = dict(COLUMN_TYPES)
            types.update({f.name: f.type for f in self.structured})
            if input_schema is not None:
                types.update({c: input_schema.field(c).type for c in self.passthrough})
            parts = {sub: self._read_parts(marker, sub, types, res) for sub in self.columns}
            self._check_counts(unit, marker, parts, res)
            lineage = {k: {v} for k, v in self.lineage.items()}
            for retry in marker.retries:  # rows retry-failed computed
                lineage["job_id"].add(retry.get("job_id"))
                lineage["config_fingerprint"].add(retry.get("fingerprint"))
            rows = {
                s: self._check_part(unit, s, t, ids, lineage, res)
                for s, t in parts.items()
                if t is not None
            }
            _exactly_once(unit, {s: r for s, r in rows.items() if r is not None}, res)
        except Exception as exc:  # a malformed file or a bug: report it, verify the other units
            res.violations.append(f"unit {unit.unit_id}: cannot be checked: {describe(exc)}")
        return res

    def _input_ids(self, unit: WorkUnit, res: UnitResult) -> tuple[list | None, pa.Schema | None]:
        """The ids of the unit's input rows; derived as reader.unit_rows does where null."""
        if not self.with_input:
            return None, None
        name = posixpath.basename(unit.shard_url)
        ids = [f"{name}:{r}" for r in range(unit.row_start, unit.row_start + unit.num_rows)]
        if self.projection is None:
            return ids, None
        try:
            table = read_unit_table(unit, self.projection, self.input_storage)
        except Exception as exc:
            res.violations.append(f"unit {unit.unit_id}: cannot read its input rows: {exc}")
            return None, None
        if self.cfg.input.id_column:
            values = table.column(self.cfg.input.id_column).to_pylist()
            ids = [d if v is None else str(v) for d, v in zip(ids, values)]
        return ids, table.schema

    def _read_parts(self, marker: Marker, sub: str, types: dict, res):
        """The columns verify needs of the unit's part files in ``sub`` (None if none): those
        its marker names and any other present (readers of ``sub/*.parquet`` see them too)."""
        uid = marker.unit_id
        rels = {f for f in marker.files if f.startswith(f"{sub}/")}
        rels |= {f for f in self.present if f.startswith(f"{sub}/") and unit_id_of(f) == uid}
        tables = [
            t for rel in sorted(rels) if (t := self._read_part(rel, sub, types, res)) is not None
        ]
        if not tables:
            return None
        table = pa.concat_tables(tables, promote_options="default")
        self._labels[(uid, sub)] = " + ".join(sorted(rels))
        return table

    def _read_part(self, rel: str, sub: str, types: dict, res: UnitResult):
        """The columns verify needs of one part file (None if absent); its schema checked."""
        if rel not in self.present:
            return None
        try:
            pf = pq.ParquetFile(io.BytesIO(self.state.read_path(self.state.path(rel))))
        except Exception as exc:
            res.violations.append(f"{rel}: unreadable: {describe(exc)}")
            return None
        expected = self.columns[sub] + LINEAGE.names
        res.violations += _schema_problems(rel, pf.schema_arrow, expected, types)
        return pf.read(columns=[c for c in READ_COLUMNS if c in pf.schema_arrow.names])

    @staticmethod
    def _check_counts(unit: WorkUnit, marker: Marker, parts: dict, res: UnitResult) -> None:
        """Rows and error codes in the part files against the marker and the unit's size."""
        uid, errors = unit.unit_id, parts[ERRORS_DIR]
        res.data_rows = parts[DATA_DIR].num_rows if parts[DATA_DIR] is not None else 0
        res.error_rows = errors.num_rows if errors is not None else 0
        if errors is not None and "error_code" in errors.column_names:
            codes = errors.column("error_code")
            res.error_codes.update(c for c in codes.to_pylist() if c is not None)
            if codes.null_count:
                res.violations.append(f"{errors_file(uid)}: {codes.null_count} null error_code(s)")
        for key, got in (("data_rows", res.data_rows), ("error_rows", res.error_rows)):
            if getattr(marker, key) != got:
                res.violations.append(
                    f"unit {uid}: marker says {key}={getattr(marker, key)}, files have {got}"
                )
        if marker.error_codes != dict(res.error_codes):
            res.violations.append(
                f"unit {uid}: marker error_codes {marker.error_codes} "
                f"!= files {dict(res.error_codes)}"
            )
        if res.data_rows + res.error_rows != unit.num_rows:
            n = res.data_rows + res.error_rows
            res.violations.append(f"unit {uid}: {n} rows in its part files for {unit.num_rows}")

    def _check_part(self, unit: WorkUnit, sub: str, table: pa.Table, ids, lineage, res):
        """Shard, lineage and ids of a unit's rows in ``sub``; returns its rows of the shard."""
        rel = self._labels.pop((unit.unit_id, sub), sub)
        for col, want in {"source_shard": {unit.shard_url}, **lineage}.items():
            if col not in table.column_names:
                continue  # a schema violation already
            allowed = pa.array(sorted(w for w in want if w is not None), pa.string())
            same = pc.sum(pc.is_in(table[col], value_set=allowed)).as_py() or 0  # nulls too
            if table.num_rows - same:
                shown = sorted(want)[0] if len(want) == 1 else sorted(want)
                res.violations.append(
                    f"{rel}: {table.num_rows - same} row(s) whose {col} is not {shown!r}"
                )
        if not {"source_row", "source_shard"} <= set(table.column_names):
            return None
        # Rows of another shard are reported above and left out of the exactly-once count.
        table = table.filter(pc.fill_null(pc.equal(table["source_shard"], unit.shard_url), False))
        rows = table["source_row"].to_numpy()
        if ids is not None and "id" in table.column_names:
            lo, hi = unit.row_start, unit.row_start + unit.num_rows
            got = zip(rows.tolist(), table["id"].to_pylist())
            bad = [(r, g, ids[r - lo]) for r, g in got if lo <= r < hi and g != ids[r - lo]]
            if bad:
                eg = "; ".join(f"row {r}: {g!r}, input has {w!r}" for r, g, w in bad[:EXAMPLES])
                res.violations.append(f"{rel}: {len(bad)} id(s) differ from the input: {eg}")
        return rows


def _exactly_once(unit: WorkUnit, rows: dict, res: UnitResult) -> None:
    """The multiset of source_row over data/ + errors/ is exactly the unit's row range."""
    uid, lo, hi = unit.unit_id, unit.row_start, unit.row_start + unit.num_rows
    found = coverage(np.concatenate([*rows.values(), np.empty(0, np.int64)]), lo, hi)

    def where(r: int) -> str:
        return ", ".join(f"{s}/ x{int((v == r).sum())}" for s, v in rows.items() if r in v)

    if found.duplicated.size:
        dup = found.duplicated
        eg = "; ".join(f"{r} ({where(r)})" for r in dup[:EXAMPLES].tolist())
        res.violations.append(f"unit {uid}: {dup.size} source_row(s) more than once: {eg}")
    if found.outside.size:
        res.violations.append(
            f"unit {uid}: {found.outside.size} source_row(s) outside its rows "
            f"{lo}-{hi - 1}: {found.outside[:EXAMPLES].tolist()}"
        )
    if found.missing.size:
        res.violations.append(
            f"unit {uid}: {found.missing.size} input row(s) in neither data/ nor "
            f"errors/: {found.missing[:EXAMPLES].tolist()}"
        )


# ---- entry points ---------------------------------------------------------------------------


def verify_output(
    url: str,
    *,
    allow_incomplete: bool = False,
    storage_overrides: dict | None = None,
    storage: StorageConfig | None = None,
) -> VerifyReport:
    """Check the output folder ``url`` against its input; violations are listed, not raised.

    ``storage`` (endpoint, region, ...) reaches ``_job.json`` on object storage; by default the
    job's own saved ``storage`` section is used once that file is read (an endpoint there, such
    as a local S3 server, then needs ``storage`` here too, to read the file in the first place).
    Raises NotAJobOutput where ``url`` holds no job, ConfigError where its saved config does
    not load, StorageError where the output cannot be listed.
    """
    existing = open_output(url, storage, storage_overrides)
    job, cfg = existing.job, existing.config(storage_overrides)
    if storage is not None:
        cfg.storage = storage
    state = existing.reopened(cfg)
    success = state.success()
    report = VerifyReport(url, job_id=str(job.get("job_id")), complete=success is not None)
    if success is not None and success.get("job_id") != job.get("job_id"):
        report.violations.append(f"_SUCCESS names job {success.get('job_id')}, not {report.job_id}")
    plan = _replan(cfg, job, report)
    markers = _read_markers(state, report)
    units = _check_units(plan, markers, report, allow_incomplete)
    present = _check_files(state, markers, report, allow_incomplete and not report.complete)
    checker, codes = UnitChecker(state, cfg, job, present, plan is not None), Counter()
    with ThreadPoolExecutor(VERIFY_THREADS) as pool:
        window: deque = deque()  # at most 2 x threads units submitted ahead of the results
        for unit in [*units, None]:
            if unit is not None:
                window.append(pool.submit(checker.check, unit, markers[unit.unit_id]))
            while window and (unit is None or len(window) >= 2 * VERIFY_THREADS):
                res = window.popleft().result()
                report.data_rows += res.data_rows
                report.error_rows += res.error_rows
                codes.update(res.error_codes)
                report.violations += res.violations
    report.error_codes = dict(sorted(codes.items()))
    return report


def cmd_verify(args: argparse.Namespace) -> int:
    """0: the output keeps its contract; 1: violations; 2: no job there, or it cannot be read."""
    try:
        storage = None
        if args.endpoint_url or args.region or args.anon or args.profile:
            storage = StorageConfig(
                endpoint_url=args.endpoint_url,
                region=args.region,
                anon=args.anon,
                profile=args.profile,
            )
        report = verify_output(args.output, allow_incomplete=args.allow_incomplete, storage=storage)
    except (NotAJobOutput, ConfigError, StorageError) as exc:
        print(f"qvl-batch verify: {exc}", file=sys.stderr)
        return Exit.CONFIG
    print(json.dumps(report.to_dict(), indent=2) if args.json else "\n".join(report.lines()))
    return Exit.OK if report.ok else Exit.PROBLEMS


def add_verify_parser(sub) -> None:
    """Add ``verify OUTPUT [--allow-incomplete] [--json]`` to an argparse subparsers object."""
    p = sub.add_parser("verify", help="check an output folder against its input (exactly once)")
    p.add_argument("output", help="the job's output folder (a path or an fsspec URL)")
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="a running or interrupted job: pending units are reported, not violations",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint of the output and input")
    p.add_argument("--region", help="S3 region")
    p.add_argument("--profile", help="AWS named profile")
    p.add_argument("--anon", action="store_true", help="public buckets, no credentials")
    p.set_defaults(func=cmd_verify)
