"""Cells: one byte layout for both stores; whole columns decode without per-value work."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from modelplane.services.feature import codec
from modelplane.services.feature.codec import Column
from modelplane.services.feature.domain import ValueType


def column(kind, values, null=None):
    dtype = codec.numpy_dtype(kind)
    return Column(kind, np.array(values, dtype=dtype), np.array(null or [False] * len(values)))


@given(
    st.lists(st.tuples(st.floats(allow_nan=False), st.booleans()), max_size=20),
    st.lists(st.booleans(), max_size=20),
)
def test_doubles_round_trip_with_nulls_and_absent_cells(pairs, absent):
    values = [v for v, _ in pairs]
    null = [n for _, n in pairs]
    cells: list[bytes | None] = list(codec.encode(column(ValueType.DOUBLE, values, null)))
    gone = [a for a, _ in zip(absent, cells, strict=False)] + [False] * (len(cells) - len(absent))
    cells = [None if g else c for c, g in zip(cells, gone, strict=True)]
    decoded, found = codec.decode(ValueType.DOUBLE, cells)
    assert found.tolist() == [not g for g in gone]
    for i, (value, is_null) in enumerate(pairs):
        if gone[i]:
            continue
        assert decoded.null[i] == is_null
        if not is_null:
            assert decoded.values[i] == value


def test_every_type_round_trips():
    for kind, values in [
        (ValueType.INT64, [0, -5, 2**62]),
        (ValueType.BOOL, [True, False, True]),
        (ValueType.STRING, ["", "é", "s"]),
    ]:
        cells = codec.encode(column(kind, values, [False, False, True]))
        decoded, found = codec.decode(kind, cells)
        assert found.all()
        assert decoded.null.tolist() == [False, False, True]
        assert decoded.values.tolist()[:2] == values[:2]


def test_an_empty_string_is_not_a_null():
    cells = codec.encode(column(ValueType.STRING, ["", "a"]))
    decoded, _ = codec.decode(ValueType.STRING, cells)
    assert decoded.null.tolist() == [False, False]
