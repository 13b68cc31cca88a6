"""``qvl-batch bench gpu``: the engine alone vs the whole runner on one GPU, in one command.

Four sections, each optional, run in the order ``--sections`` gives them, all printed side by
side at the end with one JSON line:

- ``bare``: the engine alone (one load, reused) on rows already prepared in memory, for each
  ``--batch-sizes`` B (and each ``--bare-preprocess`` mode): one warm-up batch, then
  ``engine.generate`` over the rows in chunks of B (``engine``).
- ``actor``: the same timing inside one idle Ray actor with the runner's resources: what being a
  Ray worker costs the engine, with no reads, preparation or commits around it.
- ``runner``: the whole job (``run_job``: Ray, Parquet reads, prepare pool, bucketing, commits)
  over the same images from a local Parquet shard at the best bare B, with the GPU's busy
  fraction sampled in the background. Steady rows/s over bare images/s is the runner's cost.
- ``bucketing``: a mixed-size set (:data:`MIXED_SIZES`) run with ``batching.bucketing`` on and
  off: rows/s of each and the padding each leaves.
- ``scaling``: the same job on 1 and on N GPU actors, short and long, and one actor over N
  GPUs (``gpu_scaling``); not in the default sections.
- ``contention``: the bare engine on GPU 0 alone, then one per GPU on N GPUs at once (one
  process each): what engines on one host slow each other by, with no Ray or runner; not in the
  default sections.

Variants (hf): ``--vision stock dense`` x ``--decode eager compiled`` x ``--decode-attention
stock grouped`` x ``--answer-lengths`` (``fixed``: every answer runs to ``--max-tokens``, as
random weights never stop; or ``uniform:LO:HI`` / ``lognormal:MEAN:CAP``: each row's answer ends
at a length drawn from its id, ``engine.benchmark.answer_lengths``). The bare section times every
variant on one loaded model; the runner section runs each of ``--runner-variants``
(vision/decode[/attention]) at every answer length and is compared with the bare run of the same
variant; contention runs the first variant.

``--schedules lockstep inflight`` runs every variant both ways (``engine.hf.schedule``): bare,
the in-flight engine with B slots wraps the bare section's loaded model and is fed as a stream
(``stream.py``: every row through the engine seam, results from the sink, occupancy from its
clocks); in the runner, a job with ``engine.hf.schedule=inflight``. In-flight over lock-step at
the same B and variant is printed and in the JSON's ``inflight_vs_lockstep`` (``gpu_schedules.py``).

The figures are compared with the compute floor of the issue (:data:`FLOOR_IMAGES_PER_S`), which
only means something for the 7B in bf16 on an H200.

``--workload photos|moderation`` (``workload.py``) runs the bare and runner sections on mixed photo
sizes with caption-like or short moderation answers instead, the bare batches bucketed as the
runner's are, each side's floor from its own token counts (``floor.py``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..run.validate import load_job
from .common import emit_json, job_io
from .engine import (
    VARIANT_CHOICES,
    Variant,
    bench_bare,
    bench_in_actor,
    contention,
)
from .floor import FLOOR_IMAGES_PER_S, FLOOR_NOTE
from .gpu_runner import in_child, run_runner
from .gpu_scaling import add_scaling_args, scaling
from .gpu_schedules import add_schedule_ratios, print_schedules
from .gpu_table import BUCKETING_VARIANTS, add_ratios, print_table
from .workload import (
    MIXED_SIZES,
    WORKLOADS,
    Lent,
    dataset,
    mixed_sizes,
    print_workload,
    resolve,
    run_workload,
)

SECTIONS = ("bare", "actor", "runner", "bucketing", "scaling", "contention")
DEFAULT_SECTIONS = ("bare", "actor", "runner", "bucketing")
WORKLOAD_SECTIONS = ("bare", "runner")  # what --workload photos|moderation runs its rows in

MIXED_MAX_PIXELS = 768 * 28 * 28  # 602112: the largest image stays at 768 vision tokens

# --------------------------------------------------------------------------------- model


def _ensure_model(args: argparse.Namespace) -> str:
    """``--model``, built with random weights first if it is not a complete model directory."""
    model = args.model or str(Path(args.workdir) / f"model-{args.size}")
    # Weights are written last (the index last of all when sharded): without them a directory
    # is an interrupted build, though config.json is there.
    weights = ("model.safetensors", "model.safetensors.index.json")
    if not Path(model, "config.json").exists() or not any(Path(model, w).exists() for w in weights):
        from ..tooling.modelgen import make_test_model

        print(f"building a random-weight Qwen2.5-VL {args.size} in {model} ...", flush=True)
        t0 = time.perf_counter()
        make_test_model(model, size=args.size)
        print(f"  built in {time.perf_counter() - t0:.0f}s", flush=True)
    return model


# -------------------------------------------------------------------------------- runner


def batch_room(batch_size: int, pixels: int, args: argparse.Namespace) -> int:
    """A token budget (``batching.max_tokens_per_batch``) with room for ``batch_size`` rows of
    images of ``pixels``: their vision tokens, a prompt and the answer. So the batch size, not
    the memory budget, bounds a batch, as in the bare section."""
    return batch_size * (pixels // 28**2 + 128 + args.max_tokens)


def job_overrides(
    args: argparse.Namespace,
    model: str,
    data: Path,
    out: Path,
    batch_size: int,
    cuda: bool,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """Overrides of the job file for one run: this benchmark's settings, then the user's."""
    return [
        *job_io(data, out),
        "engine.name=hf",
        f"engine.model={model}",
        f"engine.dtype={args.dtype}",
        f"sampling.max_tokens={args.max_tokens}",
        "cluster.num_actors=1",
        f"cluster.local_num_cpus={args.cores}",
        # The actor may use every core (Ray sets its OMP_NUM_THREADS from this), as the bare
        # engine in this process does.
        f"cluster.cpus_per_actor={args.cores}",
        *(["cluster.num_gpus_per_actor=1"] if cuda else []),
        f"batching.max_batch_size={batch_size}",
        # (with max_tokens 300 the default budget cut 448x448 batches of 128 to ~102 rows)
        f"batching.max_tokens_per_batch={batch_room(batch_size, args.image_size**2, args)}",
        # Rows in flight (3 units of 4 batches) exceed the prepared window (8 batches by
        # default), so the window fills and bucketing has rows to choose from.
        f"batching.unit_rows={4 * batch_size}",
        "batching.min_units_per_actor=0",  # units of exactly that size, whatever --rows
        "batching.units_in_flight_per_actor=3",
        f"batching.prepare_threads={args.prepare_threads}",
        *extra,
        *args.overrides,
    ]


# ---------------------------------------------------------------------------------- main


def _device() -> tuple[str, bool]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), True
    return "cpu", False


def variants(args: argparse.Namespace) -> tuple[Variant, ...]:
    """Every --vision x --decode x --decode-attention x --answer-lengths x --schedules, in
    that order (each schedule right after the other on the same variant), less in flight with
    the compiled decode where the job puts it on the dynamic cache
    (``engine.hf.inflight_cache=dynamic``, whose decode is eager)."""
    static = static_slots(args)
    return tuple(
        Variant(vision, decode, attention, lengths, schedule)
        for vision in args.vision
        for decode in args.decode
        for attention in args.decode_attention
        for lengths in args.answer_lengths
        for schedule in args.schedules
        if _runs(decode, schedule, static)
    )


def static_slots(args: argparse.Namespace) -> bool:
    """Does the job (its file, then the overrides) let the in-flight engine's compiled decode
    take static slots (``engine.hf.inflight_cache``: static or auto)?"""
    from ..config import load_config
    from ..engines import settings_of

    cfg = load_config(args.job, [*job_io("unused", "unused"), "engine.name=hf", *args.overrides])
    return settings_of(cfg, "hf").inflight_cache != "dynamic"


def _runs(decode: str, schedule: str, static: bool) -> bool:
    """In flight, the compiled decode runs on the static slots only."""
    return static or not (decode == "compiled" and schedule == "inflight")


def runner_variants(args: argparse.Namespace) -> list[Variant]:
    """Each --runner-variants vision/decode[/attention] at every --answer-lengths and
    --schedules (in flight: eager decode only, unless on static slots)."""
    first = f"{args.vision[0]}/{args.decode[0]}/{args.decode_attention[0]}"
    static = static_slots(args)
    out = []
    for spec in args.runner_variants or [first]:
        vision, decode, *rest = spec.split("/")
        attention = rest[0] if rest else args.decode_attention[0]
        asked = {"vision": vision, "decode": decode, "attention": attention}
        if len(rest) > 1 or any(v not in VARIANT_CHOICES[k] for k, v in asked.items()):
            raise SystemExit(
                f"--runner-variants {spec!r}: use VISION/DECODE[/ATTENTION], e.g. "
                "dense/compiled or dense/compiled/grouped"
            )
        out += [
            Variant(vision, decode, attention, lengths, schedule)
            for lengths in args.answer_lengths
            for schedule in args.schedules
            if _runs(decode, schedule, static)
        ]
    if not out:
        raise SystemExit("--runner-variants: every one is compiled, and --schedules inflight only")
    return out


def _bucketing(args: argparse.Namespace, config, batch_size: int, cuda: bool) -> dict:
    """The mixed-size set with bucketing on, then off."""
    n = args.bucket_rows or args.rows
    mixed = Path(args.workdir) / f"gpu-mixed-{n}"
    dataset(mixed, mixed_sizes(n, seed=0))
    result: dict = {
        "batch_size": batch_size,
        "rows": n,
        "max_pixels": args.max_pixels,
        "sizes": [list(s) for s in MIXED_SIZES],
    }
    # B rows of the largest image: in both modes the batch size bounds a batch
    budget = batch_room(batch_size, args.max_pixels, args)
    result["max_tokens_per_batch"] = budget
    for label, flag, padding in BUCKETING_VARIANTS:
        if label not in args.bucketing_variants:
            continue
        extra = (
            f"image.max_pixels={args.max_pixels}",
            f"batching.bucketing={flag}",
            f"batching.max_tokens_per_batch={budget}",
            *([f"batching.max_padding_fraction={padding}"] if padding is not None else []),
        )
        cfg = config(f"gpu-bucketing-{label}-out", batch_size, extra, mixed)
        result[label] = run_runner(cfg, f"bucketing {label:>3} B={batch_size}", cuda)
    off = result.get("off")
    for label in ("on", "exact"):
        if label in result:
            rate = result[label]["steady_rows_per_s"]
            if off:
                result[f"gain_{label}_vs_off"] = round(rate / off["steady_rows_per_s"], 4)
            result[f"padding_fraction_{label}"] = result[label]["padding"].get("padding_fraction")
    if off:
        result["padding_fraction_off"] = off["padding"].get("padding_fraction")
    if "on" in result:
        result["padding_target_met"] = (result["padding_fraction_on"] or 0) <= 0.10
    return result


def _sections(args: argparse.Namespace) -> list[str]:
    """--sections in order (default: DEFAULT_SECTIONS; a workload's: its bare and runner)."""
    square = args.workload == "square"
    given = args.sections or ",".join(DEFAULT_SECTIONS if square else WORKLOAD_SECTIONS)
    sections = [s.strip() for s in given.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}")
    if not square and set(sections) - set(WORKLOAD_SECTIONS):
        raise SystemExit(
            f"--workload {args.workload} runs the {'/'.join(WORKLOAD_SECTIONS)} sections; "
            "the others run on --workload square"
        )
    return sections


def bench_gpu(args: argparse.Namespace) -> int:
    import torch
    import transformers

    resolve(args)  # --answer-lengths and --max-tokens left out: the workload's
    sections = _sections(args)
    if not variants(args):
        raise SystemExit(
            "--schedules inflight runs the eager decode on the dynamic cache: add --decode "
            "eager, or leave engine.hf.inflight_cache auto (or static)"
        )
    if "inflight" in args.schedules and "compiled" in args.decode and not static_slots(args):
        print(
            "in flight: the compiled decode needs static slots (engine.hf.inflight_cache=dynamic "
            "was set); in-flight runs are eager only"
        )
    work = Path(args.workdir)
    device, cuda = _device()
    model = _ensure_model(args)
    report: dict = {
        "bench": "gpu",
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": model,
        "size": args.size,
        "dtype": args.dtype,
        "rows": args.rows,
        "workload": {"name": args.workload},  # a workload's figures join it (workload.py)
        "image_size": args.image_size,
        "max_tokens": args.max_tokens,
        "answer_lengths": args.answer_lengths,
        "variants": [asdict(v) for v in variants(args)],
        "schedules": list(args.schedules),
        "sections": sections,
        "compute_floor": {"images_per_s": FLOOR_IMAGES_PER_S, "for": FLOOR_NOTE},
    }
    side = args.image_size
    shape, floor = f"{side}x{side}", f"{FLOOR_IMAGES_PER_S:g} images/s ({FLOOR_NOTE})"
    if args.workload != "square":
        shape = f"{args.workload} (mixed sizes, answers {' '.join(args.answer_lengths)})"
        floor = "from the workload's token counts"
    print(
        f"device {device} | model {args.size} {args.dtype} ({model}) | {args.rows} rows "
        f"{shape} | max_tokens {args.max_tokens} | compute floor {floor}",
        flush=True,
    )
    square = work / f"gpu-square-{args.rows}-{side}"

    def config(out: str, batch_size: int, extra: tuple[str, ...] = (), data: Path = square):
        overrides = job_overrides(args, model, data, work / out, batch_size, cuda, extra)
        return load_job(args.job, overrides)

    def batch_size() -> int:
        bare = report.get("bare")
        return args.runner_batch_size or (
            bare["best_batch_size"] if bare else max(args.batch_sizes)
        )

    if args.bare_from and "bare" not in sections:
        bare = json.loads(Path(args.bare_from).read_text().strip().splitlines()[-1]).get("bare")
        report["bare"], report["bare_from"] = bare, args.bare_from
    if args.workload == "square":
        rows = dataset(square, [(side, side)] * args.rows)
        failed = _square_sections(args, sections, report, rows, config, batch_size, cuda)
    else:
        lent = Lent(config, run_runner, in_child, variants(args), runner_variants(args))
        failed = run_workload(args, sections, report, lent, device, cuda)
    add_ratios(report)
    add_schedule_ratios(report)

    print_table(report)
    print_workload(report)
    print_schedules(report)
    emit_json(report, args.json_out)
    return 1 if failed else 0


def _square_sections(args, sections, report, rows, config, batch_size, cuda) -> bool:
    """The sections on ``--image-size`` squares (``--workload square``); True if one failed."""
    failed = False
    for section in sections:  # in the order given: what runs first meets the GPU fresh
        if section == "bare":
            # The same resolved config as the runner's (engine, prompt, image).
            preprocess = tuple(args.bare_preprocess)
            run = in_child if not args.bare_in_process else (lambda fn, *a: fn(*a))
            report["bare"] = run(
                bench_bare,
                # max_batch_size: the compiled decode's rungs cover every batch size timed
                config("gpu-unused", max(args.batch_sizes)),
                rows,
                args.batch_sizes,
                args.bare_max_s,
                preprocess,
                variants(args),
            )
        elif section == "actor":
            b = batch_size()
            first = replace(variants(args)[0], schedule="lockstep")  # it times batches
            actor = bench_in_actor(
                config("gpu-unused", b, first.overrides()), rows, b, args.bare_max_s
            )
            report["actor"] = {**actor, "variant": asdict(first)}
        elif section == "runner":
            b = batch_size()
            report["runners"] = []
            for variant in runner_variants(args):
                cfg = config("gpu-runner-out", b, variant.overrides())
                runner = run_runner(cfg, f"runner B={b} {variant.label()}", cuda)
                runner.update(batch_size=b, variant=asdict(variant))
                report["runners"].append(runner)
                failed |= runner["status"] != "succeeded"
            report["runner"] = report["runners"][0]
        elif section == "bucketing":
            report["bucketing"] = bucketing = _bucketing(args, config, batch_size(), cuda)
            runs = [bucketing[k] for k, _, _ in BUCKETING_VARIANTS if k in bucketing]
            failed |= any(run["status"] != "succeeded" for run in runs)
        elif section == "scaling":
            report["scaling"] = result = scaling(
                args, config, dataset, run_runner, batch_size(), cuda
            )
            runs = [v for job in result["jobs"] for k, v in job.items() if k.startswith("actors_")]
            runs += [result["split"]] if "split" in result else []
            failed |= any(run["status"] != "succeeded" for run in runs)
        elif section == "contention":
            b = batch_size()
            gpus = max(args.scaling_actors)
            report["contention"] = result = in_child(
                contention,
                config("gpu-unused", b),
                rows,
                b,
                args.bare_max_s,
                gpus,
                variants(args)[0],
            )
            print(
                f"contention B={b}: per GPU with {gpus} engines at once vs one alone "
                f"{result['per_gpu_ratio']}, scaling {result['scaling']}",
                flush=True,
            )
    return failed


def add_gpu_bench(kinds, common) -> None:
    p = kinds.add_parser("gpu", help="engine alone vs whole runner, and bucketing, on one GPU")
    common(p)
    p.add_argument("--rows", type=int, default=512, help="rows for bare and runner")
    p.add_argument(
        "--workload",
        choices=tuple(WORKLOADS),
        default="square",
        help="square: --image-size squares, fixed answers; photos: mixed photo sizes under the "
        "job's image.max_pixels, caption-like answers (lognormal:110:300); moderation: the same "
        "photos, a moderation prompt, short answers (uniform:12:28, cap 32). Its answers and cap "
        "unless --answer-lengths / --max-tokens say; sections bare and runner only",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--max-tokens", type=int, default=None, help="default: the workload's (64)")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--model", default=None, help="model dir (built if it lacks config.json)")
    p.add_argument("--size", choices=("7b", "3b", "tiny"), default="7b", help="size to build")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument(
        "--sections",
        default=None,
        help="comma list of " + "/".join(SECTIONS) + " (default: all but scaling, contention; "
        "with --workload photos|moderation: bare,runner)",
    )
    p.add_argument("--json-out", default=None, help="also write the JSON line here")
    p.add_argument("--prepare-threads", type=int, default=8, help="runner decode threads")
    p.add_argument(
        "--bare-max-s",
        type=float,
        default=60.0,
        help="stop timing one batch size after this (0=off)",
    )
    p.add_argument(
        "--bare-preprocess",
        nargs="+",
        choices=("device", "processor"),
        default=["device"],
        help="engine.hf.preprocess modes the bare section times (one model load)",
    )
    p.add_argument(
        "--bare-in-process",
        action="store_true",
        help="run the bare engine in this process (shows how it slows later sections)",
    )
    p.add_argument("--bare-from", default=None, help="bare figures from an earlier --json-out")
    p.add_argument("--runner-batch-size", type=int, default=0, help="0 = best bare batch size")
    p.add_argument("--bucket-rows", type=int, default=0, help="mixed-size rows; 0 = --rows")
    p.add_argument("--max-pixels", type=int, default=MIXED_MAX_PIXELS, help="bucketing section")
    p.add_argument(
        "--bucketing-variants",
        nargs="+",
        choices=[v[0] for v in BUCKETING_VARIANTS],
        default=[v[0] for v in BUCKETING_VARIANTS],
        help="on: buckets topped up from near sizes; exact: same-size only; off: arrival order",
    )
    p.add_argument(
        "--vision",
        nargs="+",
        choices=VARIANT_CHOICES["vision"],
        default=["stock"],
        help="engine.hf.vision modes the bare section times",
    )
    p.add_argument(
        "--decode",
        nargs="+",
        choices=VARIANT_CHOICES["decode"],
        default=["eager"],
        help="eager, or compiled (engine.hf.compile: static cache, CUDA graphs)",
    )
    p.add_argument(
        "--decode-attention",
        nargs="+",
        choices=VARIANT_CHOICES["attention"],
        default=["stock"],
        help="the text model's decode attention (engine.hf.decode_attention): stock "
        "(transformers copies each KV head to its query heads every step) or grouped",
    )
    p.add_argument(
        "--answer-lengths",
        nargs="+",
        type=_lengths,
        default=None,
        help="fixed (every answer runs to --max-tokens) | uniform:LO:HI | lognormal:MEAN:CAP "
        "(each row's answer ends at a length drawn from its id; benchmark-only); default: the "
        "workload's (square: fixed)",
    )
    p.add_argument(
        "--schedules",
        nargs="+",
        choices=VARIANT_CHOICES["schedule"],
        default=["lockstep"],
        help="engine.hf.schedule of every variant, bare and runner: lockstep (batches), "
        "inflight (a stream engine with B slots, on the bare section's loaded model: the "
        "compiled variant on static slots, whose step compiles, the eager one on the dynamic "
        "cache under engine.hf.inflight_cache=auto); with both, in flight / lock-step is "
        "printed and in the JSON",
    )
    p.add_argument(
        "--runner-variants",
        nargs="+",
        default=None,
        metavar="VISION/DECODE[/ATTENTION]",
        help="runner runs, e.g. stock/eager dense/compiled/grouped (default: the first of each; "
        "ATTENTION defaults to the first --decode-attention)",
    )
    add_scaling_args(p)
    p.set_defaults(func=bench_gpu)


def _lengths(spec: str) -> str:
    from ..engines.lengths import parse_lengths

    if spec != "fixed":
        try:
            parse_lengths(spec)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return spec
