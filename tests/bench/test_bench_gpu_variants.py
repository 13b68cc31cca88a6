"""``bench gpu``'s variants: in flight, the compiled decode runs only on the static slots
(``engine.hf.inflight_cache`` auto, the default, or static), as the engine refuses it on the
dynamic cache (``inflight_cache=dynamic`` in the job or its overrides). No model: the arguments
alone."""

from __future__ import annotations

import pytest

from qvl_batch.bench.gpu import runner_variants, static_slots, variants
from qvl_batch.bench.workload import resolve
from qvl_batch.cli import build_parser

pytestmark = pytest.mark.timeout(60)


def _args(*overrides: str):
    argv = ["bench", "gpu", *overrides, "--decode", "eager", "compiled"]
    return _resolved([*argv, "--schedules", "lockstep", "inflight"])


def _resolved(argv: list[str]):
    args = build_parser().parse_args(argv)
    resolve(args)  # the workload's answer lengths, as bench_gpu does first
    return args


def _runs(variants_) -> set[tuple[str, str]]:
    return {(v.decode, v.schedule) for v in variants_}


def test_compiled_in_flight_only_on_static_slots():
    every = {(d, s) for d in ("eager", "compiled") for s in ("lockstep", "inflight")}
    auto = _args("cluster.address=null")
    assert static_slots(auto)
    assert _runs(variants(auto)) == every
    dynamic = _args("engine.hf.inflight_cache=dynamic")
    assert not static_slots(dynamic)
    assert _runs(variants(dynamic)) == every - {("compiled", "inflight")}
    static = _args("engine.hf.inflight_cache=static")
    assert static_slots(static)
    assert _runs(variants(static)) == every
    back = _args("engine.hf.inflight_cache=static", "engine.hf.inflight_cache='dynamic'")
    assert not static_slots(back)  # the last override wins, as in the job
    argv = ["engine.hf.inflight_cache=static", "--schedules", "inflight"]
    runner = _resolved(["bench", "gpu", *argv, "--runner-variants", "dense/compiled"])
    assert _runs(runner_variants(runner)) == {("compiled", "inflight")}


def test_static_slots_from_the_job_file(tmp_path):
    """A job file that puts the in-flight engine on static slots counts as the overrides do
    (read from the loaded job, not the override strings)."""
    job = tmp_path / "job.yaml"
    job.write_text("engine:\n  hf:\n    inflight_cache: static\n")
    args = _resolved(
        ["bench", "gpu", "--job", str(job), "--decode", "compiled", "--schedules", "inflight"]
    )
    assert static_slots(args)
    assert _runs(variants(args)) == {("compiled", "inflight")}
    back = _resolved(["bench", "gpu", "--job", str(job), "engine.hf.inflight_cache=dynamic"])
    assert not static_slots(back)
