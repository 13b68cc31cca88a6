"""The exactly-once rule (qvl_batch/output/coverage.py), and the writer refusing a unit that
breaks it."""

from __future__ import annotations

import pyarrow as pa
import pytest

from qvl_batch.output.coverage import coverage
from qvl_batch.output.writer import UnitIncomplete, check_exactly_once
from qvl_batch.rows.manifest import WorkUnit


def test_an_exact_cover():
    found = coverage([12, 10, 11], 10, 13)
    assert found.exact and found.describe() == "exact"


def test_missing_duplicated_and_outside_rows_are_each_named():
    found = coverage([10, 10, 12, 99], 10, 14)
    assert found.missing.tolist() == [11, 13]
    assert found.duplicated.tolist() == [10]
    assert found.outside.tolist() == [99]
    assert found.describe() == "2 missing [11, 13]; 1 duplicated [10]; 1 outside [99]"


def test_a_subset_of_a_unit():
    assert coverage([5, 7], 0, expected=[7, 5]).exact
    assert coverage([5], 0, expected=[5, 7]).missing.tolist() == [7]


def test_the_writer_refuses_a_unit_that_is_not_covered_exactly_once():
    unit = WorkUnit("u", 0, "mem://s", 100, 3)
    check_exactly_once(unit, pa.table({"source_row": [102, 100, 101]}))
    with pytest.raises(UnitIncomplete, match=r"1 missing \[102\]; 1 duplicated \[100\]"):
        check_exactly_once(unit, pa.table({"source_row": [100, 100, 101]}))
    with pytest.raises(UnitIncomplete, match="1 missing"):
        check_exactly_once(unit, pa.table({"source_row": [100]}), expected=[100, 101])
