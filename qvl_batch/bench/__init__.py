"""``qvl-batch bench``: benchmarks that print figures and ratios measured side by side.

One module per benchmark; this package's ``add_bench_parser`` gathers their parsers.

- ``host``: the whole runner (fake engine, zero latency) vs a bare decode+resize loop over the
  same images on the same number of cores. The ratio says how much the runner costs on top of
  the image work it cannot avoid.
- ``driver-memory``: peak RSS of the driver process for jobs of growing size (tiny rows), each
  in its own process so peaks do not mix. Flat means bounded by what is in flight.
- ``storage``: the input read path from an S3 server vs local disk.
- ``gpu``: the hf engine alone vs the whole runner, and bucketing on vs off.
- ``attention``: one decode step's text attention, K/V copied per query head vs grouped.
- ``step``: one hf decode step, lock-step vs in flight at the same shape, and its kernels.
- ``feed``: an in-flight engine fed as a stream vs batch by batch vs its capacity.
- ``submit``: CPU per request in TensorRT-LLM's one submitting thread.
- ``chaos``: a job under random SIGKILLs of its actors and driver, verified.
"""

from __future__ import annotations

import os


def add_bench_parser(sub) -> None:
    """``qvl-batch bench <kind>``: each benchmark module adds its own subcommand."""
    from ..commands.demo import demo_job_file
    from .attention import add_attention_bench
    from .chaos import add_chaos_bench
    from .driver import add_driver_bench
    from .feed import add_feed_bench
    from .gpu import add_gpu_bench
    from .host import add_host_bench
    from .scale import add_scale_bench
    from .step import add_step_bench
    from .storage import add_storage_bench
    from .submit import add_submit_bench

    bench = sub.add_parser("bench", help="benchmarks (see docs/PERFORMANCE.md)")
    kinds = bench.add_subparsers(dest="bench", required=True)

    def common(p):
        p.add_argument("--workdir", default="bench-out")
        p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
        p.add_argument("--job", default=demo_job_file())
        p.add_argument("overrides", nargs="*", help="section.key=value overrides")

    for add in (
        add_host_bench,
        add_storage_bench,
        add_driver_bench,
        add_scale_bench,
        add_feed_bench,
        add_chaos_bench,
        add_submit_bench,
        add_gpu_bench,
        add_attention_bench,
        add_step_bench,
    ):
        add(kinds, common)
