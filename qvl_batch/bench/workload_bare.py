"""The bare engine on a workload's rows (``bench gpu --workload``), batched as the runner does.

Mixed sizes in arrival order pad heavily while the runner buckets them, so the bare batches come
from the runner's own :class:`~qvl_batch.engines.bucketing.Bucketer`, fed as the batching
adapter feeds it (its window of ``batching.window_batches`` batches, the same token budget and
padding limit).
The warm-up is the actor's (``engine.warmup(B)``), timed; rows are prepared once, untimed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, replace

from ..config import Config
from ..engines.bucketing import Bucketer, budget_tokens
from ..rows.images import smart_resize, vision_tokens
from .engine import Variant, _free, _print_run, loaded_with_requests, time_generate
from .stream import bench_inflight

PROMPT_ROOM = 128  # tokens a row's prompt may take in the budget (chat template included)


def room(cfg: Config, sizes, batch_size: int) -> int:
    """A token budget with room for ``batch_size`` rows of the largest of ``sizes`` ((w, h,
    ...)) once resized under ``cfg.image``: so the batch size, not the budget, bounds a batch."""
    largest = max(
        vision_tokens(*smart_resize(h, w, cfg.image.min_pixels, cfg.image.max_pixels))
        for w, h, *_ in sizes
    )
    return batch_size * (largest + PROMPT_ROOM + cfg.sampling.max_tokens)


def bucketed(requests: list, cfg: Config) -> tuple[list[list], dict]:
    """``requests`` cut into the batches the batching adapter would form (bucketing on or off,
    its window, token budget and padding limit), all rows arriving at once; and their padding."""
    b = cfg.batching
    bucketer = Bucketer(
        b.max_batch_size,
        b.max_tokens_per_batch,
        b.max_wait_s,
        clock=lambda: 0.0,  # no row ever waits out max_wait_s: only full or forced batches go
        max_padding=b.max_padding_fraction,
    )
    window = b.window_batches * b.max_batch_size
    batches = []
    for r in requests:
        seq_len = r.vision_tokens + r.text_tokens
        key = r.image.size if b.bucketing else "arrival"
        bucketer.add(r, key, budget_tokens(seq_len, cfg.sampling.max_tokens), seq_len)
        while batch := bucketer.next_batch(force=bucketer.pending >= window):
            batches.append(batch)
    while batch := bucketer.next_batch(force=True):
        batches.append(batch)
    return batches, bucketer.stats.as_dict()


def bench_bare_workload(
    cfgs: dict[int, Config], rows: list[dict], max_s: float, variants: tuple[Variant, ...]
) -> dict:
    """The engine alone (one load) on ``rows``: per variant and batch size B (``cfgs[B]``, the
    runner's config at B), the runner's batches of the prepared rows after the actor's warm-up;
    an in-flight variant streams them through B slots of the same loaded model instead."""
    first = cfgs[max(cfgs)]  # max_batch_size: the compiled decode's rungs cover every B
    engine, requests, load_s, prepare_s = loaded_with_requests(first, rows)
    try:
        runs = []
        warmed = set()  # (B, variant but its answer lengths): the warm-up runs the longest
        for variant in variants:
            variant.apply(engine)
            for b, cfg in sorted(cfgs.items()):
                shape = (b, *asdict(replace(variant, answer_lengths="")).values())
                warm = shape not in warmed
                warmed.add(shape)
                if variant.schedule == "inflight":  # slots = B, rows in arrival order
                    timed = bench_inflight(engine, cfg, requests, b, max_s, warm)
                    run = {**asdict(variant), **timed}
                else:
                    batches, padding = bucketed(requests, cfg)
                    run = {**asdict(variant), **time_generate(engine, batches, b, max_s, warm)}
                    run["padding"] = padding
                    run["max_tokens_per_batch"] = cfg.batching.max_tokens_per_batch
                run["preprocess"] = engine.modes().get("preprocess", "?")
                runs.append(run)
                _print_run(f"bare {variant.label()}", run)
    finally:
        _free(engine)  # the runner's actor loads its own copy: free this one first
        del engine
    first_variant = runs[: len(cfgs)]
    sizes = Counter("{}x{}".format(*r.image.size) for r in requests)
    return {
        "load_s": round(load_s, 1),
        "prepare_s": round(prepare_s, 2),
        "resized_sizes": dict(sorted(sizes.items())),
        "runs": runs,
        "best_batch_size": max(first_variant, key=lambda r: r["images_per_s"])["batch_size"],
    }
