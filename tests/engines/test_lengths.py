"""Answer lengths for benchmarks (engines/lengths.py): one length per row id whatever the call,
``fixed:N`` exact, ``uniform:LO:HI`` within its bounds, ``lognormal:MEAN:CAP`` capped and with
a mean near MEAN."""

from __future__ import annotations

import statistics

import pytest

from qvl_batch.engines.lengths import answer_length

IDS = [f"row-{i}" for i in range(5000)]


def test_a_rows_length_depends_only_on_spec_and_id():
    spec = "uniform:1:1000"
    first = [answer_length(spec, i) for i in IDS[:200]]
    assert [answer_length(spec, i) for i in IDS[:200]] == first
    assert len(set(first)) > 100  # different ids draw different lengths


def test_fixed_is_exact_and_a_bad_spec_is_refused():
    assert {answer_length("fixed:64", i) for i in IDS[:100]} == {64}
    with pytest.raises(ValueError, match="use fixed:N"):
        answer_length("gauss:10:2", "row-0")


def test_uniform_stays_within_lo_hi_and_reaches_both_ends():
    lengths = [answer_length("uniform:3:7", i) for i in IDS[:2000]]
    assert set(lengths) == {3, 4, 5, 6, 7}
    assert min(lengths.count(k) for k in range(3, 8)) > 300  # ~400 each


def test_lognormal_is_capped_and_its_mean_is_near_mean():
    capped = [answer_length("lognormal:110:300", i) for i in IDS]
    assert min(capped) >= 1 and max(capped) == 300
    assert 0.005 < capped.count(300) / len(capped) < 0.05  # a few per cent at the cap
    uncapped = [answer_length("lognormal:110:100000", i) for i in IDS]
    assert abs(statistics.mean(uncapped) - 110) < 11
    assert abs(statistics.mean(capped) - 110) < 11
    assert statistics.median(uncapped) < 110  # skewed: median below mean
