"""Answer lengths drawn per row for benchmarks: one rule, shared by the fake engine (the lengths
of its simulated answers) and the transformers engine (``engine.benchmark.answer_lengths``: where a
random-weight model never emits EOS, each row's answer ends at its drawn length).

A row's length depends only on the spec and its id (:func:`answer_length`), so every run, actor,
engine and feeding mode gives a row the same length.
"""

from __future__ import annotations

import hashlib
import math
from statistics import NormalDist

# Spread of the lognormal answer lengths (sigma of the log): with a mean of ~110 and a cap of
# 300 this gives a caption-like spread, median ~95 and a few per cent at the cap.
LOGNORMAL_SIGMA = 0.55


def parse_lengths(spec: str) -> tuple[str, tuple[float, ...]]:
    """``fixed:N``, ``uniform:LO:HI`` or ``lognormal:MEAN:CAP`` -> (kind, numbers)."""
    kind, *args = spec.split(":")
    want = {"fixed": 1, "uniform": 2, "lognormal": 2}
    if kind not in want or len(args) != want[kind]:
        raise ValueError(
            f"answer lengths {spec!r}: use fixed:N, uniform:LO:HI or lognormal:MEAN:CAP"
        )
    try:
        numbers = tuple(float(a) for a in args)
    except ValueError:
        raise ValueError(f"answer lengths {spec!r}: the numbers must be numbers") from None
    if min(numbers) < 1 or (kind == "uniform" and numbers[0] > numbers[1]):
        raise ValueError(f"answer lengths {spec!r}: lengths are >= 1 (and LO <= HI)")
    return kind, numbers


def answer_length(spec: str, row_id: str) -> int:
    """The answer length (tokens) of one row: drawn from ``spec`` (``fixed:N``,
    ``uniform:LO:HI`` or ``lognormal:MEAN:CAP``) by a hash of its id."""
    kind, n = parse_lengths(spec)
    digest = hashlib.sha256(f"len\0{row_id}".encode()).digest()
    u = (int.from_bytes(digest[:8], "big") + 0.5) / 2.0**64  # uniform in (0, 1)
    if kind == "fixed":
        return int(n[0])
    if kind == "uniform":
        return int(n[0] + u * (n[1] - n[0] + 1))
    mean, cap = n
    mu = math.log(mean) - LOGNORMAL_SIGMA**2 / 2  # the uncapped mean is `mean`
    return max(1, min(int(cap), round(math.exp(mu + LOGNORMAL_SIGMA * NormalDist().inv_cdf(u)))))
