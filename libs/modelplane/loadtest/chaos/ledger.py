"""Acknowledged writes: what a writer was told was stored, kept so that after a crash
the harness can read every one back and count the ones the service lost.

Each acknowledgement is appended to a JSON-lines file as it arrives (one object
`{"key": ..., "value": ...}` a line), so the record survives the harness itself and
can be checked again by hand; `count_lost` compares it with what the service returns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any


class AckLedger:
    """Keys and the value the service acknowledged for each (the latest one wins)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.entries: dict[str, Any] = {}
        self._file: IO[str] | None = path.open("a") if path is not None else None

    def acknowledge(self, key: str, value: Any) -> None:
        self.entries[key] = value
        if self._file is not None:
            self._file.write(json.dumps({"key": key, "value": value}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __len__(self) -> int:
        return len(self.entries)


def read_ledger(lines: Iterable[str]) -> dict[str, Any]:
    """The acknowledged key -> value from a ledger's lines (blank and torn lines, such
    as a last line cut off by a crash, are skipped)."""
    entries: dict[str, Any] = {}
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "key" in entry:
            entries[str(entry["key"])] = entry.get("value")
    return entries


def lost_keys(acknowledged: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """Acknowledged keys the service does not return, or returns with another value,
    sorted."""
    return sorted(
        key for key, value in acknowledged.items() if key not in found or found[key] != value
    )
