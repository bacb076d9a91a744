"""Sizes as messages quote them back (sidecar.core.units.format_size)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.units import format_size, parse_size


@pytest.mark.parametrize(("size", "text"), [
    (256 * 1024**2, "256MiB"), (2 * 1024**3, "2GiB"), (1536, "1536 bytes"),
    (64 * 1024, "64KiB"), (1000, "1000 bytes"), (0, "0 bytes"),
])
def test_sizes_read_as_written(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(0, 2**50))
def test_a_formatted_size_parses_back(size: int) -> None:
    assert parse_size(format_size(size).removesuffix(" bytes")) == size
