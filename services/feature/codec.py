"""How one feature value is stored as bytes, the same in every online store.

Numbers are fixed-width little-endian (8 bytes for DOUBLE/INT64, 1 for BOOL), a
string is b"s" + UTF-8, a null is b"". Fixed widths let a read join a column's
cells and view them as one numpy array, instead of decoding value by value.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from modelplane.services.feature.domain import ValueType

NULL_CELL = b""
_DTYPES: dict[ValueType, np.dtype] = {
    ValueType.DOUBLE: np.dtype("<f8"),
    ValueType.INT64: np.dtype("<i8"),
    ValueType.BOOL: np.dtype("u1"),
}


@dataclass(slots=True)
class Column:
    """Values of one feature for many rows; `null` marks null slots."""

    type: ValueType
    values: np.ndarray
    null: np.ndarray

    def __len__(self) -> int:
        return len(self.values)


def numpy_dtype(value_type: ValueType) -> np.dtype:
    """The in-memory dtype of a column of this type (object for strings)."""
    if value_type is ValueType.BOOL:
        return np.dtype(bool)
    return _DTYPES.get(value_type, np.dtype(object))


def encode(column: Column) -> list[bytes]:
    """One cell per row."""
    if column.type is ValueType.STRING:
        cells = [b"s" + str(v).encode() for v in column.values.tolist()]
    else:
        dtype = _DTYPES[column.type]
        raw = np.ascontiguousarray(column.values, dtype=dtype).tobytes()
        width = dtype.itemsize
        cells = [raw[i : i + width] for i in range(0, len(raw), width)]
    if column.null.any():
        for index in np.flatnonzero(column.null).tolist():
            cells[index] = NULL_CELL
    return cells


def decode_block(
    value_type: ValueType, cells: Sequence[Sequence[bytes | None]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Several features of one numeric type at once: values, null and found, each
    [features, rows]. When every cell holds a value this is one join and one copy."""
    features = len(cells)
    rows = len(cells[0]) if features else 0
    dtype = _DTYPES[value_type]
    try:
        joined = b"".join(itertools.chain.from_iterable(cells))  # type: ignore[arg-type]
    except TypeError:  # a None among the cells
        joined = b""
    if len(joined) == dtype.itemsize * features * rows:
        values = np.frombuffer(joined, dtype=dtype).reshape(features, rows)
        values = values.astype(numpy_dtype(value_type))
        none = np.zeros((features, rows), dtype=bool)
        return values, none, ~none
    decoded = [decode(value_type, column) for column in cells]
    return (
        np.stack([c.values for c, _ in decoded]),
        np.stack([c.null for c, _ in decoded]),
        np.stack([found for _, found in decoded]),
    )


def decode(value_type: ValueType, cells: Sequence[bytes | None]) -> tuple[Column, np.ndarray]:
    """The column and a `found` mask (False where the cell is None: never written)."""
    count = len(cells)
    if value_type is not ValueType.STRING:
        dtype = _DTYPES[value_type]
        width = dtype.itemsize
        try:
            joined = b"".join(cells)  # type: ignore[arg-type]
        except TypeError:  # a None among the cells
            joined = b""
        if len(joined) == width * count:
            # Every cell holds a value: one array copy, no per-value work.
            values = np.frombuffer(joined, dtype=dtype)
            if value_type is ValueType.BOOL:
                values = values.astype(bool)
            else:
                values = values.astype(numpy_dtype(value_type), copy=True)
            none = np.zeros(count, dtype=bool)
            return Column(value_type, values, none), ~none
    found = np.ones(count, dtype=bool)
    null = np.zeros(count, dtype=bool)
    if value_type is ValueType.STRING:
        values = np.empty(count, dtype=object)
        for i, cell in enumerate(cells):
            if cell is None:
                found[i] = False
                values[i] = ""
            elif cell == NULL_CELL:
                null[i] = True
                values[i] = ""
            else:
                values[i] = cell[1:].decode()
        return Column(value_type, values, null), found
    dtype = _DTYPES[value_type]
    filler = bytes(dtype.itemsize)
    fixed = []
    for i, cell in enumerate(cells):
        if cell is None:
            found[i] = False
            fixed.append(filler)
        elif cell == NULL_CELL:
            null[i] = True
            fixed.append(filler)
        else:
            fixed.append(cell)
    values = np.frombuffer(b"".join(fixed), dtype=dtype).astype(numpy_dtype(value_type))
    return Column(value_type, values, null), found
