"""Totals over an output folder and the versions recorded with a job."""

from __future__ import annotations

import importlib.metadata
import platform
from collections import Counter

from ..output.marker import Marker

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


def totals_of(markers: list[Marker]) -> dict:
    """Units, rows, data rows, error rows and errors by code over commit markers."""
    codes: Counter[str] = Counter()
    for m in markers:
        codes.update(m.error_codes)
    return {
        "units": len(markers),
        "rows": sum(m.num_rows for m in markers),
        "data_rows": sum(m.data_rows for m in markers),
        "reused_rows": sum(m.reused_rows for m in markers),
        "error_rows": sum(m.error_rows for m in markers),
        "error_codes": dict(sorted(codes.items())),
    }


def error_codes_line(codes: dict[str, int]) -> str:
    """``  errors by code: A=1, B=2`` for the summaries people read."""
    return "  errors by code: " + ", ".join(f"{k}={v}" for k, v in sorted(codes.items()))
