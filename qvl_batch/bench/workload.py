"""``qvl-batch bench gpu --workload``: the bare and runner sections on real-shaped rows.

``square`` (the default) is the old headline: every row one ``--image-size`` square, answers of
``--max-tokens``. ``photos``: mixed photo sizes (:data:`MIXED_SIZES`) resized under the job's own
``image.max_pixels`` (Qwen's default, 1280 vision tokens), caption-like answers
(``lognormal:110:300``). ``moderation``: the same photos, a moderation prompt and short answers
(``uniform:12:28``, at most 32; no JSON schema: guided decoding on random weights never ends).
Random weights never say EOS, so ``engine.benchmark.answer_lengths`` sets each answer's length.

Both sides batch alike: the runner buckets by size under ``batching.max_tokens_per_batch``, and
the bare engine's batches come from the same :class:`~qvl_batch.engines.bucketing.Bucketer`
with the same budget (``workload_bare``), not in arrival order. The budget holds B rows of the
workload's largest image, so the batch size bounds a batch on both sides. Each side's compute
floor comes from its own rows' token counts (``floor.py``).
"""

from __future__ import annotations

import argparse
import shutil
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import Config
from .engine import Variant, same_variant
from .floor import floor_for
from .workload_bare import bench_bare_workload, room

# Image sizes as (width, height, weight): common photo and screen sizes, landscape and portrait.
# Under image.max_pixels=602112 (768 vision tokens, the bucketing section) they resize to 8
# grids of 256 to ~768 tokens; under Qwen's default (1280 tokens) to 256 to ~1280.
MIXED_SIZES: tuple[tuple[int, int, float], ...] = (
    (448, 448, 0.20),  # already on the grid: 256 tokens
    (640, 480, 0.15),  # VGA / older phones: 391 tokens
    (480, 640, 0.10),
    (1024, 768, 0.15),  # 4:3 camera, downscaled to the token cap
    (768, 1024, 0.10),
    (1280, 720, 0.15),  # 16:9 screenshots and video frames
    (720, 1280, 0.05),
    (896, 896, 0.10),  # square social-media uploads
)


@dataclass(frozen=True)
class Workload:
    """What a workload sets unless the command line does: answer lengths, the answer cap and
    job overrides (its prompt)."""

    answer_lengths: str
    max_tokens: int
    overrides: tuple[str, ...] = ()


MODERATION_SYSTEM = (
    "You are a content moderator for a public image platform. Judge only what is visible."
)
MODERATION_TEMPLATE = (
    "Moderate this image. Give the verdict (allow, review or block), the policy categories "
    "that apply and one short reason."
)
WORKLOADS = {
    "square": Workload("fixed", 64),
    "photos": Workload("lognormal:110:300", 300),
    "moderation": Workload(
        "uniform:12:28",
        32,
        (f"prompt.system='{MODERATION_SYSTEM}'", f"prompt.template='{MODERATION_TEMPLATE}'"),
    ),
}


def resolve(args: argparse.Namespace) -> Workload:
    """The workload of ``--workload``; --answer-lengths and --max-tokens left out take its own."""
    w = WORKLOADS[args.workload]
    if args.answer_lengths is None:
        args.answer_lengths = [w.answer_lengths]
    if args.max_tokens is None:
        args.max_tokens = w.max_tokens
    return w


# ---------------------------------------------------------------------------------- data


def _synth_rows(sizes: list[tuple[int, int]], seed: int) -> list[dict]:
    """One photo-like JPEG per size, each from its own seeded stream: id, image, source."""
    from ..tooling.pictures import encode_jpeg, photo_like
    from ..tooling.synth import SOURCES

    def make(i: int) -> dict:
        w, h = sizes[i]
        img = photo_like(np.random.default_rng([seed, i]), w, h)
        return {
            "id": f"img-{i:06d}",
            "image": encode_jpeg(img, quality=90),
            "source": SOURCES[i % len(SOURCES)],
        }

    with ThreadPoolExecutor(8) as pool:  # Pillow releases the GIL while it encodes
        return list(pool.map(make, range(len(sizes))))


def mixed_sizes(rows: int, seed: int) -> list[tuple[int, int]]:
    """``rows`` sizes drawn from :data:`MIXED_SIZES` by weight (seeded)."""
    weights = np.array([w for _, _, w in MIXED_SIZES])
    picks = np.random.default_rng([seed, 7]).choice(
        len(MIXED_SIZES), rows, p=weights / weights.sum()
    )
    return [MIXED_SIZES[int(k)][:2] for k in picks]


def _write_shard(folder: Path, rows: list[dict], row_group_rows: int) -> None:
    """One Parquet shard with the synthetic datasets' id, image and source columns."""
    schema = pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("image", pa.binary()),
            pa.field("source", pa.string()),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-00000.parquet", row_group_size=row_group_rows)
    (folder / ".done").touch()  # written last: a folder without it is rebuilt


def dataset(folder: Path, sizes: list[tuple[int, int]]) -> list[dict]:
    """The rows for ``sizes`` (made once per workdir, then read back from the shard)."""
    shard = folder / "part-00000.parquet"
    if (folder / ".done").exists():
        return pq.read_table(shard).to_pylist()
    shutil.rmtree(folder, ignore_errors=True)
    print(f"making {len(sizes)} photo-like JPEGs in {folder} ...", flush=True)
    rows = _synth_rows(sizes, seed=0)
    # Small row groups so units of any size (unit_rows = 4 x batch size) cut evenly.
    _write_shard(folder, rows, row_group_rows=8)
    return rows


# ------------------------------------------------------------------------------ sections


def _config(config, out: str, batch_size: int, extra: tuple[str, ...], data: Path) -> Config:
    """The job's config for ``batch_size`` with a token budget that holds B rows of the
    workload's largest image (``room``); a batching.max_tokens_per_batch override still wins."""
    probe = config(out, batch_size, extra, data)
    budget = f"batching.max_tokens_per_batch={room(probe, MIXED_SIZES, batch_size)}"
    return config(out, batch_size, (*extra, budget), data)


def _output_tokens(out: Path) -> tuple[dict, dict]:
    """Mean tokens per row (vision, prompt text, answer) and resized sizes of a job's output."""
    from ..output.state import DATA_DIR

    cols = ["prompt_tokens", "vision_tokens", "output_tokens", "resized_width", "resized_height"]
    parts = sorted((out / DATA_DIR).glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(p, columns=cols) for p in parts]).to_pydict()
    n = max(1, len(table["vision_tokens"]))
    vision = sum(table["vision_tokens"])
    tokens = {
        "vision": round(vision / n, 2),
        "prompt": round((sum(table["prompt_tokens"]) - vision) / n, 2),  # it counts the image
        "answer": round(sum(table["output_tokens"]) / n, 2),
    }
    sizes = Counter(f"{w}x{h}" for w, h in zip(table["resized_width"], table["resized_height"]))
    return tokens, dict(sorted(sizes.items()))


def _with_floor(run: dict, rate: str, model: str, device: str) -> None:
    """``run``'s floor from its own token counts, and its rate as a fraction of it."""
    floor = floor_for(model, device, run["tokens_per_row"])
    run["floor"] = floor
    run["floor_rows_per_s"] = floor["rows_per_s"]
    run["floor_fraction"] = round(run[rate] / floor["rows_per_s"], 4)


@dataclass
class Lent:
    """What ``bench gpu`` lends these sections (it imports this module, not the reverse): its
    config maker, runner, child-process runner, and the variants of the command line."""

    config: Callable[..., Config]
    run_runner: Callable[[Config, str, bool], dict]
    in_child: Callable
    variants: tuple[Variant, ...]
    runner_variants: list[Variant]


def run_workload(args, sections, report: dict, lent: Lent, device: str, cuda: bool) -> bool:
    """The bare and runner sections of ``--workload`` in the order given; True if one failed."""
    w = resolve(args)
    folder = Path(args.workdir) / f"gpu-mixed-{args.rows}"  # the bucketing section's rows too
    rows = dataset(folder, mixed_sizes(args.rows, seed=0))
    report["workload"] = info = {
        **report.get("workload", {}),
        "name": args.workload,
        "rows": args.rows,
        "sizes": [list(s) for s in MIXED_SIZES],
        "answer_lengths": args.answer_lengths,
        "max_tokens": args.max_tokens,
        "overrides": list(w.overrides),
    }
    failed = False
    for section in sections:
        if section == "bare":
            cfgs = {
                b: _config(lent.config, "gpu-unused", b, w.overrides, folder)
                for b in args.batch_sizes
            }
            run = lent.in_child if not args.bare_in_process else (lambda fn, *a: fn(*a))
            bare = run(bench_bare_workload, cfgs, rows, args.bare_max_s, lent.variants)
            for x in bare["runs"]:
                _with_floor(x, "images_per_s", report["model"], device)
            report["bare"] = bare
            info["resized_sizes"] = bare["resized_sizes"]
            info["image_max_pixels"] = cfgs[args.batch_sizes[0]].image.max_pixels
        elif section == "runner":
            bare = report.get("bare")
            b = args.runner_batch_size or (
                bare["best_batch_size"] if bare else max(args.batch_sizes)
            )
            report["runners"] = [
                _runner(args, lent, w, folder, b, variant, report["model"], device, cuda)
                for variant in lent.runner_variants
            ]
            report["runner"] = report["runners"][0]
            failed |= any(x["status"] != "succeeded" for x in report["runners"])
            info.setdefault("resized_sizes", report["runner"].get("resized_sizes"))
    first = (report.get("bare") or {}).get("runs", [None])[0] or report.get("runner") or {}
    if "floor" in first:
        info["floor"] = first["floor"]
        report["compute_floor"] = {
            "images_per_s": first["floor"]["rows_per_s"],
            "for": f"{args.size} on {first['floor']['card']}, workload {args.workload}, "
            "its own token counts",
        }
    info["comparison"] = compare(report)
    return failed


def _runner(
    args,
    lent: Lent,
    w: Workload,
    folder: Path,
    b: int,
    variant: Variant,
    model: str,
    device: str,
    cuda: bool,
) -> dict:
    """One whole job over the workload's shard at batch size ``b``, with its own floor."""
    extra = (*variant.overrides(), *w.overrides)
    cfg = _config(lent.config, "gpu-runner-out", b, extra, folder)
    x = lent.run_runner(cfg, f"runner {args.workload} B={b} {variant.label()}", cuda)
    x.update(batch_size=b, variant=asdict(variant))
    x["max_tokens_per_batch"] = cfg.batching.max_tokens_per_batch
    x["warmup_s"] = x["actor_timings_s"].get("warmup_s")
    if x["status"] == "succeeded":
        x["tokens_per_row"], x["resized_sizes"] = _output_tokens(Path(cfg.output.path))
        _with_floor(x, "steady_rows_per_s", model, device)
    return x


def compare(report: dict) -> dict | None:
    """The first runner beside the bare run of its batch size and variant: each figure of both
    and runner/bare."""
    runner = report.get("runner")
    same = [
        r
        for r in (report.get("bare") or {}).get("runs", [])
        if runner and r["batch_size"] == runner["batch_size"] and same_variant(r, runner["variant"])
    ]
    if not runner or not same or runner["status"] != "succeeded":
        return None
    bare = same[0]
    pairs = {
        "rows_per_s": (bare["images_per_s"], runner["steady_rows_per_s"]),
        "floor_rows_per_s": (bare["floor_rows_per_s"], runner["floor_rows_per_s"]),
        "floor_fraction": (bare["floor_fraction"], runner["floor_fraction"]),
        "warmup_s": (bare.get("warmup_s"), runner.get("warmup_s")),
        "mean_batch_size": (
            bare["padding"].get("mean_batch_size"),
            runner["padding"].get("mean_batch_size"),
        ),
        "padding_fraction": (
            bare["padding"].get("padding_fraction"),
            runner["padding"].get("padding_fraction"),
        ),
        "gpu_memory_peak_mib": (
            (bare.get("gpu") or {}).get("memory_used_peak_mib"),
            (runner.get("gpu") or {}).get("memory_used_peak_mib"),
        ),
    }
    for k in ("vision", "prompt", "answer"):
        pairs[f"{k}_tokens_per_row"] = (bare["tokens_per_row"][k], runner["tokens_per_row"][k])
    stages = bare["engine_s_per_batch"]
    for k in [*stages, *(s for s in runner["engine_s_per_batch"] if s not in stages)]:
        got = (stages.get(k), runner["engine_s_per_batch"].get(k))
        pairs[f"s_per_batch_{k}"] = got
    out = {k: {"bare": a, "runner": b, "ratio": _ratio(b, a)} for k, (a, b) in pairs.items()}
    out["bare_torch_max_reserved_mib"] = bare["torch_max_reserved_mib"]
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def print_workload(r: dict) -> None:
    """The workload's figures, bare and runner side by side, with runner/bare."""
    info = r.get("workload") or {}
    if info.get("name", "square") == "square":
        return
    sizes = info.get("resized_sizes") or {}
    floor = info.get("floor") or {}
    print(
        f"--- workload {info['name']}: {info['rows']} rows, {len(sizes)} resized sizes, answers "
        f"{'/'.join(info['answer_lengths'])} (cap {info['max_tokens']}), floor "
        f"{floor.get('rows_per_s', float('nan')):.2f} rows/s on {floor.get('card', '?')}"
    )
    comparison = info.get("comparison")
    if not comparison:
        print("          (runner vs bare: needs both sections, same batch size and variant)")
        return
    print(f"          {'':<26}{'bare':>12}{'runner':>12}{'runner/bare':>13}")
    for key, x in comparison.items():
        if not isinstance(x, dict):
            continue
        cells = [_cell(x["bare"]), _cell(x["runner"]), _cell(x["ratio"])]
        print(f"          {key:<26}" + "".join(f"{c:>12} " for c in cells).rstrip())
    reserved = comparison.get("bare_torch_max_reserved_mib")
    if reserved is not None:
        print(f"          bare torch max_memory_reserved {reserved / 1024:.1f} GiB")


def _cell(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
