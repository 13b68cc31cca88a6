"""Totals over an output folder and the versions recorded with a job."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from concurrent.futures import ThreadPoolExecutor

from .state import OutputState

MARKER_READ_THREADS = 16  # small GETs in parallel: object stores answer each in ~10-50 ms

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


def summarize_output(state: OutputState) -> dict:
    """Rows in data/ and errors/ and errors by code, from the commit markers."""
    paths = state.marker_paths()
    with ThreadPoolExecutor(MARKER_READ_THREADS) as pool:
        records = list(pool.map(lambda p: json.loads(state.read_path(p)), paths))
    codes: dict[str, int] = {}
    for r in records:
        for code, n in r.get("error_codes", {}).items():
            codes[code] = codes.get(code, 0) + n
    return {
        "units": len(records),
        "rows": sum(r["num_rows"] for r in records),
        "data_rows": sum(r["data_rows"] for r in records),
        "error_rows": sum(r["error_rows"] for r in records),
        "error_codes": codes,
    }
