"""Totals over an output folder and the versions recorded with a job."""

from __future__ import annotations

import importlib.metadata
import platform
from collections import Counter

PACKAGES = (
    "qvl-batch",
    "ray",
    "pyarrow",
    "pillow",
    "fsspec",
    "omegaconf",
    "numpy",
    "torch",
    "transformers",
    "tensorrt_llm",
    "tensorrt",
)


def versions() -> dict[str, str]:
    """Installed versions of what shapes the outputs (read from metadata; nothing imported)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def totals_of(records: list[dict]) -> dict:
    """Units, rows, data rows, error rows and errors by code over commit marker records."""
    codes: Counter[str] = Counter()
    for r in records:
        codes.update(r.get("error_codes") or {})
    return {
        "units": len(records),
        "rows": sum(r["num_rows"] for r in records),
        "data_rows": sum(r["data_rows"] for r in records),
        "reused_rows": sum(r.get("reused_rows", 0) for r in records),
        "error_rows": sum(r["error_rows"] for r in records),
        "error_codes": dict(sorted(codes.items())),
    }


def error_codes_line(codes: dict[str, int]) -> str:
    """``  errors by code: A=1, B=2`` for the summaries people read."""
    return "  errors by code: " + ", ".join(f"{k}={v}" for k, v in sorted(codes.items()))
