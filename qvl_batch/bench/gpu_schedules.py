"""``bench gpu --schedules lockstep inflight``: each in-flight figure over the lock-step figure
of the same variant and batch size (slots = B), bare and through the runner, from one call.

The targets of issue #27 (docs/INFLIGHT.md) are read off these ratios: in flight >= 1.8x
lock-step on caption-length answers, >= 0.95x at fixed answer lengths, occupancy >= 0.9.
"""

from __future__ import annotations

from dataclasses import asdict

from .engine import Variant, same_variant, variant_label

KEYS = [k for k in asdict(Variant()) if k != "schedule"]


def _twin(x: dict, candidates: list[dict], variant_of) -> dict | None:
    """The lock-step run among ``candidates`` with ``x``'s batch size and variant but for its
    schedule (and its preprocess mode, for bare runs)."""
    want = {k: variant_of(x).get(k) for k in KEYS}
    for c in candidates:
        if (
            c["batch_size"] == x["batch_size"]
            and c.get("preprocess") == x.get("preprocess")
            and same_variant(variant_of(c), {**want, "schedule": "lockstep"})
        ):
            return c
    return None


def _ratio(a, b) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def _both(twin: dict | None, x: dict, key: str) -> list:
    """[the lock-step twin's figure, the in-flight run's]."""
    return [twin.get(key) if twin else None, x.get(key)]


def _peak(run: dict) -> float | None:
    return (run.get("gpu") or {}).get("memory_used_peak_mib")


def _runner_occupancy(x: dict) -> float | None:
    """Occupied slot-seconds over stepped seconds per slot, from the actors' clocks."""
    timings = x.get("actor_timings_s") or {}
    busy, slot = timings.get("engine_busy_s"), timings.get("engine_slot_s")
    slots = sum((m or {}).get("slots", 0) for m in x.get("engine_modes") or [])
    return round(slot / busy / slots, 4) if busy and slot is not None and slots else None


def add_schedule_ratios(report: dict) -> None:
    """``report["inflight_vs_lockstep"]``: one row per in-flight run with its lock-step twin
    and the ratio in-flight / lock-step (also set on the in-flight run: ``ratio_vs_lockstep``)."""
    runs = (report.get("bare") or {}).get("runs", [])
    bare = []
    for x in runs:
        if x.get("schedule") != "inflight":
            continue
        twin = _twin(x, runs, lambda r: r)
        x["ratio_vs_lockstep"] = _ratio(x["images_per_s"], twin and twin["images_per_s"])
        bare.append(
            {
                "variant": variant_label({k: x[k] for k in KEYS if k in x}),
                "preprocess": x.get("preprocess"),
                "batch_size": x["batch_size"],
                "lockstep_rows_per_s": twin and twin["images_per_s"],
                "inflight_rows_per_s": x["images_per_s"],
                "ratio": x["ratio_vs_lockstep"],
                # in flight in its steady state (no fill, no drain: stream.steady_rate)
                "inflight_steady_rows_per_s": x.get("steady_images_per_s"),
                "ratio_steady": _ratio(x.get("steady_images_per_s"), twin and twin["images_per_s"]),
                "occupancy": x.get("occupancy"),
                "occupancy_steady": x.get("occupancy_steady"),
                "output_tokens_mean": _both(twin, x, "output_tokens_mean"),
                "errors": _both(twin, x, "errors"),
                "torch_max_reserved_mib": _both(twin, x, "torch_max_reserved_mib"),
                "torch_max_allocated_mib": _both(twin, x, "torch_max_allocated_mib"),
                "gpu_memory_peak_mib": [twin and _peak(twin), _peak(x)],
            }
        )
    runners = report.get("runners") or []
    runner = []
    for x in runners:
        if x["variant"].get("schedule") != "inflight":
            continue
        twin = _twin(x, runners, lambda r: r["variant"])
        x["ratio_vs_lockstep"] = _ratio(x["steady_rows_per_s"], twin and twin["steady_rows_per_s"])
        x["occupancy"] = _runner_occupancy(x)
        runner.append(
            {
                "variant": variant_label({k: x["variant"][k] for k in KEYS}),
                "batch_size": x["batch_size"],
                "lockstep_rows_per_s": twin and twin["steady_rows_per_s"],
                "inflight_rows_per_s": x["steady_rows_per_s"],
                "ratio": x["ratio_vs_lockstep"],
                "ratio_e2e": _ratio(x["e2e_rows_per_s"], twin and twin["e2e_rows_per_s"]),
                # each schedule's runner over its own bare run (add_ratios)
                "vs_bare": _both(twin, x, "ratio_steady_vs_bare"),
                "occupancy": x["occupancy"],
                "error_rows": _both(twin, x, "error_rows"),
                "gpu_memory_peak_mib": [twin and _peak(twin), _peak(x)],
            }
        )
    if bare or runner:
        report["inflight_vs_lockstep"] = {"bare": bare, "runner": runner}


def print_schedules(report: dict) -> None:
    """The in-flight vs lock-step rows of ``report["inflight_vs_lockstep"]``."""
    schedules = report.get("inflight_vs_lockstep")
    if not schedules:
        return
    print("--- in flight vs lock-step (slots = B; pairs are [lock-step, in flight])")
    for side in ("bare", "runner"):
        for x in schedules[side]:
            ratio = f"x{_cell(x['ratio'])}"
            if x.get("ratio_steady") is not None:
                ratio += f" (steady x{_cell(x['ratio_steady'])})"
            errors = x["errors"] if "errors" in x else x["error_rows"]
            occupancy = _cell(x["occupancy"])
            if x.get("occupancy_steady") is not None:
                occupancy += f" (steady {_cell(x['occupancy_steady'])})"
            print(
                f"{side:<9} B={x['batch_size']:<4} lock-step {_cell(x['lockstep_rows_per_s'])} "
                f"in flight {_cell(x['inflight_rows_per_s'])} rows/s: {ratio}, occupancy "
                f"{occupancy}, errors {errors}, GPU peak MiB "
                f"{x['gpu_memory_peak_mib']}   [{x['variant']}]"
            )


def _cell(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
