"""``qvl-batch bench gpu --workload``: the floor from token counts, the workloads' settings, bare
batches bucketed as the runner's, and the photos and moderation runs end to end on CPU."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest

from qvl_batch.bench.floor import (
    FLOOR_IMAGES_PER_S,
    PARAMS_7B,
    REFERENCE_TOKENS,
    card_rate,
    floor_for,
    floor_rows_per_s,
    model_params,
)
from qvl_batch.bench.gpu import bench_gpu
from qvl_batch.bench.workload import MIXED_SIZES, WORKLOADS, resolve
from qvl_batch.bench.workload_bare import bucketed, room
from qvl_batch.cli import build_parser
from qvl_batch.commands.demo import demo_job_file
from qvl_batch.run.validate import load_job
from qvl_batch.tooling.gpu_sampler import GpuSampler
from qvl_batch.tooling.modelgen import model_config

STAGES = {"inputs", "generate", "outputs", "vision", "prefill", "decode"}


def _config(overrides: list[str]):
    """The demo job's config (as bench gpu's default --job) with OVERRIDES."""
    return load_job(demo_job_file(), ["output.path=unused", *overrides])


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["bench", "gpu", *argv])


# -------------------------------------------------------------------------- floor


def test_floor_gives_back_the_issue_figure_and_follows_tokens():
    h200, card = card_rate("NVIDIA H200")
    assert card == "H200" and h200 == 989e12
    assert floor_rows_per_s(*PARAMS_7B, *REFERENCE_TOKENS, h200) == pytest.approx(126.0)
    assert FLOOR_IMAGES_PER_S == 126.0
    base = floor_rows_per_s(*PARAMS_7B, 256, 50, 64)
    # more vision tokens, a longer prompt or a longer answer: more FLOPs per row, a lower floor
    assert floor_rows_per_s(*PARAMS_7B, 1280, 50, 64) < base / 3
    assert floor_rows_per_s(*PARAMS_7B, 256, 100, 64) < base
    assert floor_rows_per_s(*PARAMS_7B, 256, 50, 300) < base
    # the smaller model, the same tokens: a higher floor; a slower card: a lower one
    assert floor_rows_per_s(3.0e9, 0.67e9, 256, 50, 64) > base
    a100, _ = card_rate("NVIDIA A100-SXM4-80GB")
    assert floor_rows_per_s(*PARAMS_7B, 256, 50, 64, a100) == pytest.approx(base * 312 / 989)
    assert card_rate("NVIDIA H100 80GB HBM3") == (989e12, "H100")
    assert card_rate("NVIDIA H100 PCIe")[1] == "H100 PCIe"
    assert card_rate("cpu")[1].startswith("H200 (assumed")


def test_model_params_from_config(tmp_path):
    for size, (text, vision) in {"7b": PARAMS_7B, "3b": (3.09e9, 0.668e9)}.items():
        (tmp_path / size).mkdir()
        (tmp_path / size / "config.json").write_text(json.dumps(model_config(size)))
        got = model_params(tmp_path / size)
        assert got == pytest.approx((text, vision), rel=0.003)
    tokens = {"vision": 256.0, "prompt": 50.0, "answer": 64.0}
    floor = floor_for(tmp_path / "7b", "NVIDIA H200", tokens)
    assert floor["rows_per_s"] == pytest.approx(126.0, rel=0.001)
    assert floor["card"] == "H200" and floor["tokens_per_row"] == tokens


# ---------------------------------------------------------------------------- settings


def test_workload_settings_and_explicit_flags():
    args = _parse(["--workload", "photos"])
    resolve(args)
    assert (args.answer_lengths, args.max_tokens) == (["lognormal:110:300"], 300)
    args = _parse(["--workload", "moderation"])
    resolve(args)
    assert (args.answer_lengths, args.max_tokens) == (["uniform:12:28"], 32)
    args = _parse(["--workload", "moderation", "--max-tokens", "8", "--answer-lengths", "fixed"])
    resolve(args)
    assert (args.answer_lengths, args.max_tokens) == (["fixed"], 8)
    args = _parse([])  # square: today's defaults
    resolve(args)
    assert (args.workload, args.answer_lengths, args.max_tokens) == ("square", ["fixed"], 64)

    cfg = _config(list(WORKLOADS["moderation"].overrides))
    assert cfg.prompt.template.startswith("Moderate this image.")
    assert cfg.prompt.system.startswith("You are a content moderator")
    assert cfg.structured.json_schema is None  # random weights under a schema would never end
    assert cfg.image.max_pixels == 1003520  # the job's default: 1280 vision tokens


def test_workload_takes_only_bare_and_runner(tmp_path):
    args = _parse(["--workload", "photos", "--sections", "bare,actor", "--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match="bare/runner"):
        bench_gpu(args)


def test_bare_batches_are_the_runners_buckets():
    """Mixed sizes cut as the batching adapter cuts them: every row once, B at most, within
    the budget, and far less padding than arrival order."""
    from qvl_batch.bench.workload import mixed_sizes
    from qvl_batch.rows.images import smart_resize, vision_tokens

    cfg = _config(["batching.max_batch_size=16"])
    budget = room(cfg, MIXED_SIZES, 16)
    cfg = _config(["batching.max_batch_size=16", f"batching.max_tokens_per_batch={budget}"])
    requests = []
    for i, (w, h) in enumerate(mixed_sizes(200, seed=0)):
        rh, rw = smart_resize(h, w, cfg.image.min_pixels, cfg.image.max_pixels)
        image = SimpleNamespace(size=(rw, rh))
        requests.append(
            SimpleNamespace(id=i, image=image, vision_tokens=vision_tokens(rh, rw), text_tokens=40)
        )
    batches, padding = bucketed(requests, cfg)
    assert sorted(r.id for b in batches for r in b) == list(range(200))
    assert all(len(b) <= 16 for b in batches)
    per_row = [max(r.vision_tokens for r in b) + 40 + cfg.sampling.max_tokens for b in batches]
    assert all(len(b) * n <= budget for b, n in zip(batches, per_row))
    assert padding["token_capped_batches"] == 0  # the batch size, not the budget, bounds them
    assert len({r.image.size for r in requests}) >= 6
    assert padding["padding_fraction"] <= 0.1 < padding["fifo_padding_fraction"]
    off = _config(["batching.max_batch_size=16", "batching.bucketing=false"])
    arrival, _ = bucketed(requests, off)
    assert [r.id for b in arrival for r in b] == list(range(200))  # arrival order


def test_gpu_sampler_reads_memory_total():
    sampler = GpuSampler()
    sampler.source = "nvidia-smi"
    sampler._parse_smi("2026/01/02 03:04:05.678, 0, 87, 41234, 81559\n")
    sampler._parse_smi("2026/01/02 03:04:05.878, 0, 91, 52000, 81559\n")
    summary = sampler.summary(0, 2e9)
    assert summary["memory_used_peak_mib"] == 52000
    assert summary["memory_total_mib"] == 81559
    assert summary["busy_fraction_mean"] == pytest.approx(0.89)


# ---------------------------------------------------------------------- on CPU, whole


def _tiny_gpu_args(
    tmp_path, ray_head: str, argv: list[str], overrides: tuple[str, ...] = ()
) -> argparse.Namespace:
    """As tests/bench/test_bench_gpu.py: the session's Ray, the tiny model in float32, then ARGV."""
    common = [f"cluster.address={ray_head}", *overrides, "--workdir", str(tmp_path)]
    return _parse([*common, "--size", "tiny", "--dtype", "float32", *argv])


def _check_sides(report: dict, rows: int) -> None:
    """Bare and runner ran every row with the figures the comparison needs."""
    (bare,) = report["bare"]["runs"]
    runner = report["runner"]
    assert bare["rows"] == rows and bare["errors"] == 0 and not bare["capped"]
    assert runner["status"] == "succeeded" and runner["rows"] == rows
    for side, rate in ((bare, "images_per_s"), (runner, "steady_rows_per_s")):
        tokens = side["tokens_per_row"]
        assert tokens["vision"] > 0 and tokens["prompt"] > 0 and tokens["answer"] > 0
        # the floor from this side's own token counts (not the 448x448 constant)
        floor = floor_for(report["model"], report["device"], tokens)["rows_per_s"]
        assert side["floor_rows_per_s"] == floor
        assert side["floor_fraction"] == round(side[rate] / floor, 4)
        assert side["warmup_s"] > 0
        assert set(side["engine_s_per_batch"]) >= STAGES
    assert bare["torch_max_reserved_mib"] is None  # CPU: no CUDA memory, no sampler
    assert set(bare["warmup_stage_s"]) >= STAGES
    assert bare["tokens_per_row"]["vision"] == runner["tokens_per_row"]["vision"]
    assert bare["tokens_per_row"]["prompt"] == runner["tokens_per_row"]["prompt"]
    comparison = report["workload"]["comparison"]
    for key in ("rows_per_s", "floor_fraction", "warmup_s", "gpu_memory_peak_mib"):
        assert key in comparison
    assert comparison["rows_per_s"]["ratio"] == pytest.approx(
        runner["steady_rows_per_s"] / bare["images_per_s"], rel=1e-3
    )
    assert {f"s_per_batch_{k}" for k in STAGES} <= set(comparison)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_gpu_photos_on_cpu(tmp_path, ray_head, capsys):
    out = tmp_path / "photos.json"
    argv = ["--workload", "photos", "--rows", "12", "--batch-sizes", "4", "--cores", "1"]
    argv += ["--max-tokens", "4", "--answer-lengths", "uniform:2:4", "--json-out", str(out)]
    args = _tiny_gpu_args(tmp_path, ray_head, argv)
    assert bench_gpu(args) == 0
    report = json.loads(out.read_text())
    assert report["sections"] == ["bare", "runner"]
    info = report["workload"]
    assert info["name"] == "photos" and info["image_max_pixels"] == 1003520
    assert len(info["resized_sizes"]) >= 3 and sum(info["resized_sizes"].values()) == 12
    assert info["resized_sizes"] == report["runner"]["resized_sizes"]
    assert max(int(w) * int(h) for w, h in (s.split("x") for s in info["resized_sizes"])) > 448**2
    _check_sides(report, 12)
    assert report["runner"]["tokens_per_row"]["vision"] > 256  # mixed sizes above 448x448
    # room for B rows of the largest image: 1280x720 resizes to 1288x728, 1196 tokens
    assert report["runner"]["max_tokens_per_batch"] == 4 * (1196 + 128 + 4)
    assert report["bare"]["runs"][0]["max_tokens_per_batch"] == 4 * (1196 + 128 + 4)
    # the runner's batches and the bare ones alike (the same bucketing, budget and window)
    bare_sizes = report["bare"]["runs"][0]["padding"]["batch_size_counts"]
    assert bare_sizes == report["runner"]["padding"]["batch_size_counts"]
    assert report["compute_floor"]["images_per_s"] == info["floor"]["rows_per_s"]
    printed = capsys.readouterr().out
    assert "--- workload photos: 12 rows" in printed and "runner/bare" in printed


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_gpu_moderation_on_cpu(tmp_path, ray_head):
    """Its own answers (uniform:12:28, cap 32) and prompt, on the same photos, smaller."""
    out = tmp_path / "moderation.json"
    argv = ["--workload", "moderation", "--rows", "8", "--batch-sizes", "4", "--cores", "1"]
    argv += ["--json-out", str(out)]
    args = _tiny_gpu_args(tmp_path, ray_head, argv, ("image.max_pixels=200704",))
    assert bench_gpu(args) == 0
    report = json.loads(out.read_text())
    assert (report["answer_lengths"], report["max_tokens"]) == (["uniform:12:28"], 32)
    assert report["workload"]["image_max_pixels"] == 200704
    assert any("Moderate this image" in o for o in report["workload"]["overrides"])
    _check_sides(report, 8)
    assert report["bare"]["runs"][0]["output_tokens_mean"] <= 28
