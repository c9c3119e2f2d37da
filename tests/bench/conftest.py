"""Shared helpers of the benchmark smoke tests (each runs one bench/ script end to end on a tiny model)."""

from __future__ import annotations

import math

import pytest


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


@pytest.fixture(scope="session")
def all_finite():
    """``all_finite(report)``: True when every number in a JSON value (bools excluded) is finite."""
    return lambda report: all(math.isfinite(x) for x in _numbers(report))
