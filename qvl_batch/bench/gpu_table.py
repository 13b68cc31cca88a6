"""``bench gpu``'s closing table and its ratios (runner / bare, on the same card in one run)."""

from __future__ import annotations

from .engine import same_variant, variant_label
from .gpu_runner import errors_line

# (label, batching.bucketing, batching.max_padding_fraction or None for the job's default):
# size buckets topped up from near sizes, exact-size buckets only, and arrival order.
BUCKETING_VARIANTS = (("on", "true", None), ("exact", "true", 0), ("off", "false", None))


def bare_figure(bare: dict | None, batch_size: int, variant: dict | None = None) -> float | None:
    """The bare images/s at ``batch_size`` (of the same variant, when one is given)."""
    for run in (bare or {}).get("runs", []):
        same = variant is None or same_variant(run, variant)
        if run["batch_size"] == batch_size and same:
            return run["images_per_s"]
    return None


def add_ratios(report: dict) -> None:
    """Runner and actor figures over the bare engine's at the same batch size and variant."""
    bare = report.get("bare")
    pairs = [("runner", x) for x in report.get("runners", [])]
    pairs += [("actor", report["actor"])] if "actor" in report else []
    for key, x in pairs:
        rate = "steady_rows_per_s" if key == "runner" else "images_per_s"
        bare_rate = bare_figure(bare, x["batch_size"], x.get("variant"))
        x["bare_images_per_s"] = bare_rate
        x["ratio_steady_vs_bare" if key == "runner" else "ratio_vs_bare"] = (
            round(x[rate] / bare_rate, 4) if bare_rate else None
        )
        if key == "runner":
            e2e = x["e2e_rows_per_s"]
            x["ratio_e2e_vs_bare"] = round(e2e / bare_rate, 4) if bare_rate else None


def print_table(r: dict) -> None:
    """Every figure side by side, each also as a fraction of the compute floor."""
    floor = r["compute_floor"]["images_per_s"]
    print(f"--- {r['device']}, {r['size']} {r['dtype']}, floor {floor:g} images/s")
    for run in (r.get("bare") or {}).get("runs", []):
        print(
            f"bare      B={run['batch_size']:<4} {run['images_per_s']:8.2f} images/s "
            f"{run['output_tokens_per_s']:9.1f} tok/s   floor x{run['floor_fraction']:.3f}"
            f"   [{run.get('preprocess', '?')} preprocess, {variant_label(run)}]{per_batch(run)}"
        )
    if "actor" in r:
        x = r["actor"]
        print(
            f"actor     B={x['batch_size']:<4} {x['images_per_s']:8.2f} images/s "
            f"(x{x['ratio_vs_bare'] or float('nan'):.3f} of bare; an idle Ray worker, "
            f"torch threads {x['torch_threads']}){per_batch(x)}"
        )
    for x in r.get("runners", []):
        fr = x["stage_fractions"]
        gpu = x.get("gpu", {})
        busy = gpu.get("busy_fraction_mean")
        print(
            f"runner    B={x['batch_size']:<4} {x['steady_rows_per_s']:8.2f} rows/s steady "
            f"(x{x['ratio_steady_vs_bare'] or float('nan'):.3f} of bare, target >= 0.95), "
            f"{x['e2e_rows_per_s']:.2f} end-to-end   floor x{x['floor_fraction']:.3f}"
            f"   [{variant_label(x.get('variant') or {})}]"
        )
        if x.get("engine_s_per_batch"):
            print(f"         {per_batch(x)}")
        stages = ("read", "prepare", "engine", "engine_idle")
        line = "          of pipeline time: " + ", ".join(
            f"{k} {fr[k]:.3f}" for k in stages if k in fr
        )
        if busy is not None:
            line += f" | GPU busy {busy:.3f}, peak {gpu['memory_used_peak_mib'] / 1024:.1f} GiB"
        elif gpu.get("note"):
            line += f" | {gpu['note']}"
        print(line)
        if x.get("error_codes"):
            print(f"          {errors_line(x)}")
    if "contention" in r:
        c = r["contention"]
        alone = c["alone"]
        print(
            f"contention B={c['batch_size']:<4} alone {alone['images_per_s']:8.2f} images/s, "
            f"together {[x['images_per_s'] for x in c['together']]}: per GPU "
            f"{c['per_gpu_ratio']}, scaling {c['scaling']}   [{variant_label(c['variant'])}]"
        )
    if "bucketing" in r:
        b = r["bucketing"]
        for label, _, _ in BUCKETING_VARIANTS:
            if label not in b:
                continue
            x = b[label]
            pad = x["padding"]
            print(
                f"bucketing {label:<5} B={b['batch_size']:<4} {x['steady_rows_per_s']:8.2f} "
                f"rows/s padding {pad.get('padding_fraction', 0):.3f} (arrival order "
                f"{pad.get('fifo_padding_fraction', 0):.3f}), mean batch "
                f"{pad.get('mean_batch_size')}   floor x{x['floor_fraction']:.3f}"
                f"{per_batch(x)}"
            )
        gains = [
            f"{k} x{b[f'gain_{k}_vs_off']:.3f}" for k in ("on", "exact") if f"gain_{k}_vs_off" in b
        ]
        if gains:
            print(f"          rows/s vs off: {', '.join(gains)}")
        if "padding_target_met" in b:
            print(
                f"          padding with bucketing {b['padding_fraction_on']:.3f} "
                f"{'<=' if b['padding_target_met'] else '>'} 0.10 target"
            )


def per_batch(run: dict) -> str:
    """' | per batch: inputs 0.10s, generate 5.2s, ... | GPU busy 0.45' where known."""
    stages = run.get("engine_s_per_batch") or {}
    text = ", ".join(f"{k} {v:.3f}s" for k, v in stages.items())
    busy = (run.get("gpu") or {}).get("busy_fraction_mean")
    return (f" | per batch: {text}" if text else "") + (
        f" | GPU busy {busy:.3f}" if busy is not None else ""
    )
