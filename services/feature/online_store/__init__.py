"""Where the latest row of each entity and feature view lives, behind one protocol.

A row is the event time plus one encoded cell per feature (see `codec`). Every
store keeps the rule that makes pushes idempotent: a row is replaced only by a
row with the same or a newer event time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(slots=True)
class RowsRead:
    """The stored rows of some entities, in the order asked.

    found[i] says whether entity i has a row; event_us[i] is its event time (0 when
    not found); cells[f][i] is feature f's cell, None when absent.
    """

    found: np.ndarray
    event_us: np.ndarray
    cells: Sequence[Sequence[bytes | None]]


# One entity's stored row without arrays: its event time and one cell per feature asked
# (None for a feature the row lacks, e.g. one added to the view after it was written).
Row = tuple[int, Sequence[bytes | None]]


@dataclass(frozen=True)
class WriteOutcome:
    written: int
    ignored: int


class OnlineStore(Protocol):
    """Blocking; thread-safe. Callers run it off any event loop."""

    name: str

    def ensure_view(self, view: str, features: Sequence[str]) -> None:
        """Prepares storage for a view's features (idempotent)."""
        ...

    def write_rows(
        self,
        view: str,
        features: Sequence[str],
        keys: Sequence[str],
        event_us: Sequence[int],
        cells: Sequence[Sequence[bytes]],
    ) -> WriteOutcome:
        """Stores rows; cells are per feature. A row whose event time is older than the
        stored row of its entity is ignored. SQLite applies a call atomically; Redis
        applies it in transactions of a few thousand rows (safe to retry: idempotent)."""
        ...

    def read_rows(self, view: str, features: Sequence[str], keys: Sequence[str]) -> RowsRead:
        """The stored rows of `keys`, in order."""
        ...

    def read_row(self, view: str, features: Sequence[str], key: str) -> Row | None:
        """The stored row of one key, None when it has none: `read_rows` for the
        one-entity online read, whose arrays would cost more than the read itself."""
        ...

    def close(self) -> None: ...
