"""The smaller items of issue 27 finding 11: values the server refuses, the CLI refused too; bad rows and
files named by file and column; what people read cannot be forged by an id."""
from __future__ import annotations

import pytest
from conftest import cli, one_line_error, photo


@pytest.mark.parametrize("value", ["2", "-0.5", "nan", "inf"])
def test_min_confidence_outside_zero_one_is_refused(bundle, value):
    """Why: the CLI took 2 and nan (abstain on everything, or on nothing) where the server answers 422."""
    r = cli("query", photo(3), "--index", bundle, "--min-confidence", value)
    one_line_error(r, "--min-confidence", "0 to 1")
