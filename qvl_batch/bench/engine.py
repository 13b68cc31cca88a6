"""The engine alone, for ``qvl-batch bench gpu``: in a plain process (``bare``; ``bench gpu``
runs it in a child process that exits before the next section) or inside an idle Ray actor
placed as the runner places its actors (``actor``).

Both prepare every row first, exactly as the runner's actor does (decode, orient, resize to the
grid; the engine's token count), then time ``engine.generate`` over the rows in batches of B
after one warm-up batch, with the engine's own stage clocks (inputs, generate, outputs; inside
generate: vision tower, prefill, decode) and the GPU's busy fraction over the timed window. The
runner's figure divided by these says what the runner costs; ``actor`` vs ``bare`` says what
being a Ray worker costs, with nothing else running. ``contention``: bare engines on several GPUs
of one host at once vs one alone.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields

from ..config import Config
from ..tooling.gpu_sampler import GpuSampler

# The issue's compute floor: images/s one H200 can reach for Qwen2.5-VL-7B in bf16 at 448x448
# with ~50 prompt and 64 output tokens. Only comparable on that GPU with that model; workloads
# other than 448x448 squares compute theirs from their token counts (floor.py).
from .floor import FLOOR_IMAGES_PER_S
from .stream import bench_inflight, stream_line, torch_peaks


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def loaded_with_requests(cfg: Config, rows: list[dict]) -> tuple:
    """(the engine built from ``cfg``, ``rows`` as its requests, load seconds, prepare seconds):
    what every bare section starts with."""
    from ..engines.build import make_batch_engine

    t0 = time.perf_counter()
    engine = make_batch_engine(cfg)
    load_s = time.perf_counter() - t0
    print(f"bare: engine loaded in {load_s:.1f}s", flush=True)
    try:
        t0 = time.perf_counter()
        requests = prepared_requests(engine, cfg, rows)
    except BaseException:
        engine.close()
        raise
    return engine, requests, load_s, time.perf_counter() - t0


def prepared_requests(engine, cfg: Config, rows: list[dict]) -> list:
    """Rows prepared as the actor prepares them (``UnitWorker._prepare``), as engine Requests."""
    from ..engines.base import Request
    from ..rows.images import prepare_image
    from ..rows.prompts import render_prompt, template_fields

    fields = template_fields(cfg.prompt.template)
    system = cfg.prompt.system
    out = []
    for i, row in enumerate(rows):
        prompt = render_prompt(cfg.prompt.template, fields, row)
        img = prepare_image(row["image"], cfg.image)
        out.append(
            Request(
                key=("bare", i),
                row_id=row["id"],
                prompt=prompt,
                system=system,
                image=img.image,
                image_sha256=img.sha256,
                vision_tokens=img.vision_tokens,
                text_tokens=engine.count_text_tokens(prompt, system),
            )
        )
    return out


# The stages a batch's time splits into (hf): inputs + generate + outputs is the whole batch;
# vision, prefill (vision included) and decode split generate.
BATCH_STAGES = ("inputs", "generate", "outputs")


def time_batches(
    engine, requests: list, batch_size: int, max_s: float, warm: bool = True, barrier=None
) -> dict:
    """:func:`time_generate` over ``requests`` cut into batches of ``batch_size`` in order, with
    the fraction of the 448x448 compute floor."""
    batches = [requests[lo : lo + batch_size] for lo in range(0, len(requests), batch_size)]
    run = time_generate(engine, batches, batch_size, max_s, warm, barrier)
    run["floor_fraction"] = round(run["images_per_s"] / FLOOR_IMAGES_PER_S, 4)
    return run


def time_generate(
    engine, batches: list[list], batch_size: int, max_s: float, warm: bool = True, barrier=None
) -> dict:
    """The engine's own warm-up, as an actor's (timed; unless ``warm`` is False: this shape ran
    already), then ``generate`` over ``batches`` (stops after max_s): rows/s, tokens per row,
    stage seconds per batch, memory. ``barrier``: waited on after the warm-up, so engines in
    several processes time the same seconds. (A real batch as the warm-up made the hf engine's
    first timed batch its shape's second meeting: compiled inside the clock, 100 s on an H100,
    session 13.)"""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:  # memory peaks count the warm-up, as the runner's sampler does
        torch.cuda.reset_peak_memory_stats()
    engine.reset_stage_times()
    t0 = time.perf_counter()
    if warm:
        engine.warmup(batch_size)
    _sync()
    warmup_s = time.perf_counter() - t0
    warmup_stages = engine.stage_times()  # with a "compile" key where the engine has one
    if barrier is not None:
        barrier.wait()
    engine.reset_stage_times()
    sampler = GpuSampler() if cuda else None
    sampling = sampler.start() if sampler else False
    done = ran = errors = 0
    tokens = Counter()
    start = time.time()
    t0 = time.perf_counter()
    try:
        for batch in batches:
            results = engine.generate(batch)
            _sync()
            ran += 1
            done += len(results)
            errors += sum(r.error_code is not None for r in results)
            tokens["answer"] += sum(r.output_tokens or 0 for r in results)
            tokens["vision"] += sum(r.vision_tokens for r in batch)
            tokens["prompt"] += sum(r.text_tokens for r in batch)
            if max_s and time.perf_counter() - t0 >= max_s:
                break  # the device run is budgeted: time what fits
        secs = time.perf_counter() - t0
    finally:
        if sampler:
            sampler.stop()
    run = {
        "batch_size": batch_size,
        "batches": ran,
        "rows": done,
        "capped": ran < len(batches),
        "seconds": round(secs, 3),
        "images_per_s": round(done / secs, 3),
        "output_tokens_per_s": round(tokens["answer"] / secs, 1),
        "output_tokens_mean": round(tokens["answer"] / max(1, done - errors), 2),
        "errors": errors,
        "tokens_per_row": {
            k: round(tokens[k] / max(1, done), 2) for k in ("vision", "prompt", "answer")
        },
        # Seconds per batch in each of the engine's stages (hf: inputs, generate, outputs; and
        # inside generate vision, prefill with vision, decode).
        "engine_s_per_batch": {
            k: round(v / ran, 4) for k, v in engine.stage_times().items() if ran
        },
        "warmup_s": round(warmup_s, 3) if warm else None,
        "warmup_stage_s": {k: round(v, 3) for k, v in warmup_stages.items()} if warm else None,
        **torch_peaks(),
    }
    if sampler is not None:
        run["gpu"] = sampler.summary(start, time.time()) if sampling else {"note": sampler.note}
    return run


def _free(engine) -> None:
    import torch

    engine.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _print_run(label: str, run: dict) -> None:
    if "occupancy" in run:  # an in-flight run: no batches
        print(stream_line(label, run), flush=True)
        return
    stages = ", ".join(f"{k} {v:.3f}s" for k, v in run["engine_s_per_batch"].items())
    busy = (run.get("gpu") or {}).get("busy_fraction_mean")
    print(
        f"{label} B={run['batch_size']:<4} {run['images_per_s']:8.2f} images/s "
        f"{run['output_tokens_per_s']:9.1f} output tokens/s ({run['rows']} rows, "
        f"{run['seconds']:.1f}s{', capped' if run['capped'] else ''}); per batch: {stages}"
        + (f"; GPU busy {busy:.3f}" if busy is not None else ""),
        flush=True,
    )


def vision_deviation(engine, requests: list) -> dict:
    """The dense vision tower's embeddings against the stock tower's on one batch (the engine's
    dtype and device): how far apart they are (bf16 on a GPU is not bit-equal; fp32 on the CPU
    is, to 1e-5, in tests/engines/test_hf_vision.py)."""
    import torch

    from ..engines.hf.vision import vision_tower

    inputs = engine.model_inputs(requests)
    tower = vision_tower(engine.model)
    was = engine.vision
    out = {}
    with torch.inference_mode():
        for mode in ("stock", "dense"):
            engine.set_modes(vision=mode)
            got = tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            got = getattr(got, "pooler_output", got)
            out[mode] = got.float()
    engine.set_modes(vision=was)
    diff = (out["dense"] - out["stock"]).abs()
    scale = float(out["stock"].abs().max())
    return {
        "rows": len(requests),
        "dtype": str(inputs["pixel_values"].dtype).removeprefix("torch."),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_stock": scale,
        "max_relative": float(diff.max()) / scale if scale else None,
    }


@dataclass(frozen=True)
class Variant:
    """One way to run the hf engine on a loaded model: its vision attention, its decode, the
    benchmark's answer lengths ("fixed": every answer runs to max_tokens), the text model's
    decode attention, and its schedule (lock-step batches, or in flight: the bare section
    drives it as a stream, ``stream.py``, on the same loaded model)."""

    vision: str = "stock"  # stock | dense (engine.hf.vision)
    decode: str = "eager"  # eager | compiled (engine.hf.compile)
    attention: str = "stock"  # stock | grouped (engine.hf.decode_attention)
    answer_lengths: str = "fixed"
    schedule: str = "lockstep"  # lockstep | inflight (engine.hf.schedule)

    def apply(self, engine) -> None:
        """Its modes on a loaded lock-step engine (the schedule is the caller's to run)."""
        if engine.name != "hf":
            return
        engine.set_modes(
            vision=self.vision,
            compile=self.decode == "compiled",
            decode_attention=self.attention,
            answer_lengths="" if self.answer_lengths == "fixed" else self.answer_lengths,
        )

    def overrides(self) -> tuple[str, ...]:
        """The same variant as job overrides (the runner's actor builds its own engine)."""
        lengths = "" if self.answer_lengths == "fixed" else self.answer_lengths
        return (
            f"engine.hf.vision={self.vision}",
            f"engine.hf.compile={'true' if self.decode == 'compiled' else 'false'}",
            f"engine.hf.decode_attention={self.attention}",
            f"engine.benchmark.answer_lengths='{lengths}'",
            f"engine.hf.schedule={self.schedule}",
        )

    def label(self) -> str:
        return variant_label(asdict(self))


# The values each Variant field takes (the benchmark's choices).
VARIANT_CHOICES = {
    "vision": ("stock", "dense"),
    "decode": ("eager", "compiled"),
    "attention": ("stock", "grouped"),
    "schedule": ("lockstep", "inflight"),
}


def same_variant(run: dict, variant: dict) -> bool:
    """Whether ``run`` (a run or a runner's variant) ran ``variant``; a field it lacks (a JSON
    from before the field existed) counts as that field's default."""
    default = asdict(Variant())
    return all(run.get(k, default.get(k)) == v for k, v in variant.items())


def variant_label(run: dict) -> str:
    """``vision/decode/attention/answer_lengths`` of a Variant, or of a run that holds one."""
    return "/".join(str(run[f.name]) for f in fields(Variant) if f.name in run) or "-"


def bench_bare(
    cfg: Config,
    rows: list[dict],
    batch_sizes: list[int],
    max_s: float,
    preprocess: tuple[str, ...] = ("device",),
    variants: tuple[Variant, ...] = (Variant(),),
    barrier=None,
) -> dict:
    """The engine alone in the calling process: load once, then per ``engine.hf.preprocess``
    mode, variant and batch size a timed pass (after a warm-up batch where that shape has not
    run yet). ``best_batch_size``: the first mode's and variant's."""
    engine, requests, load_s, prepare_s = loaded_with_requests(cfg, rows)
    try:
        runs = []
        deviation = None
        if engine.name == "hf" and {"stock", "dense"} <= {v.vision for v in variants}:
            deviation = vision_deviation(engine, requests[: max(batch_sizes)])
            print(f"bare: dense vs stock vision embeddings: {deviation}", flush=True)
        warmed = set()  # shapes whose kernels are chosen and graphs compiled
        for mode in preprocess:
            if engine.name == "hf":  # the same loaded model, the other image path
                engine.set_modes(preprocess=mode)
            for variant in variants:
                variant.apply(engine)
                for b in batch_sizes:
                    # Other answer lengths meet other shapes (eager: KV lengths never seen;
                    # compiled: another cache length, a graph): warmed up on their own.
                    shape = (mode, b, *asdict(variant).values())
                    warm = shape not in warmed
                    warmed.add(shape)
                    if variant.schedule == "inflight":  # slots = B, on the same loaded model
                        timed = bench_inflight(engine, cfg, requests, b, max_s, warm)
                    else:
                        timed = time_batches(engine, requests, b, max_s, warm, barrier)
                    run = {"preprocess": mode, **asdict(variant), **timed}
                    runs.append(run)
                    _print_run(f"bare {mode} {variant.label()}", run)
    finally:
        _free(engine)  # the runner's actor loads its own copy: free this one first
        del engine
    first = [r for r in runs if r["preprocess"] == preprocess[0]][: len(batch_sizes)]
    best = max(first, key=lambda r: r["images_per_s"])
    return {
        "load_s": round(load_s, 1),
        "prepare_s": round(prepare_s, 2),
        "vision_tokens_mean": sum(r.vision_tokens for r in requests) / len(requests),
        "text_tokens_mean": sum(r.text_tokens for r in requests) / len(requests),
        "runs": runs,
        "best_batch_size": best["batch_size"],
        "vision_deviation": deviation,
    }


class EngineInActor:
    """A Ray actor that loads the engine and times it, with nothing else in the process."""

    def __init__(self, cfg: Config):
        from ..engines.build import make_batch_engine

        t0 = time.perf_counter()
        self.cfg = cfg
        self.engine = make_batch_engine(cfg)
        self.load_s = time.perf_counter() - t0

    def run(self, rows: list[dict], batch_size: int, max_s: float) -> dict:
        import os

        import torch

        requests = prepared_requests(self.engine, self.cfg, rows)
        run = time_batches(self.engine, requests, batch_size, max_s)
        run["load_s"] = round(self.load_s, 1)
        run["torch_threads"] = torch.get_num_threads()
        run["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
        _free(self.engine)
        return run


def bench_in_actor(cfg: Config, rows: list[dict], batch_size: int, max_s: float) -> dict:
    """``time_batches`` inside one Ray actor with the runner's resources (GPU, CPUs)."""
    import ray

    from ..run.cluster import connect

    started = connect(cfg)
    try:
        options = {"num_cpus": cfg.cluster.cpus_per_actor}
        if ray.cluster_resources().get("GPU", 0) >= cfg.cluster.num_gpus_per_actor > 0:
            options["num_gpus"] = cfg.cluster.num_gpus_per_actor
        actor = ray.remote(EngineInActor).options(**options).remote(cfg)
        run = ray.get(actor.run.remote(rows, batch_size, max_s))
        ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
    _print_run("actor (idle Ray worker)", run)
    return run


def _bare_worker(gpu: int, cfg: Config, rows, batch_size, max_s, variant, barrier, results):
    """One process's bare engine on CUDA device ``gpu`` (the only one it sees)."""
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before torch initialises CUDA
    bare = bench_bare(cfg, rows, [batch_size], max_s, ("device",), (variant,), barrier)
    results.put((gpu, bare["runs"][0]))


def contention(
    cfg: Config, rows: list[dict], batch_size: int, max_s: float, gpus: int, variant: Variant
) -> dict:
    """The bare engine on GPU 0 alone, then one bare engine per GPU on ``gpus`` GPUs at once
    (one process each, seeing only its GPU; timed together after every warm-up). Per-GPU
    images/s together over alone is what the host makes engines share (the CPU threads that
    launch their kernels, memory, PCIe), with no Ray and no runner around them."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")

    def together(n: int) -> list[dict]:
        barrier, results = ctx.Barrier(n), ctx.Queue()
        args = (cfg, rows, batch_size, max_s, variant, barrier, results)
        procs = [ctx.Process(target=_bare_worker, args=(g, *args)) for g in range(n)]
        for proc in procs:
            proc.start()
        got = dict(results.get() for _ in procs)
        for proc in procs:
            proc.join()
        return [got[g] for g in range(n)]

    (alone,) = together(1)
    runs = together(gpus)
    rates = [r["images_per_s"] for r in runs]
    return {
        "batch_size": batch_size,
        "variant": asdict(variant),
        "alone": alone,
        "together": runs,
        "per_gpu_ratio": [round(r / alone["images_per_s"], 4) for r in rates],
        "scaling": round(sum(rates) / (gpus * alone["images_per_s"]), 4),
    }
