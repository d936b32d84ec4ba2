"""A sweep's results: the table printed at the end, and the JSON file kept for
comparing runs (`--json`, `--compare`)."""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelplane import __version__
from modelplane.loadtest.stats import LevelResult

SCHEMA = "modelplane.loadtest/1"

COLUMNS = (
    ("level", 14),
    ("req/s", 9),
    ("rows/s", 9),
    ("p50 ms", 8),
    ("p90 ms", 8),
    ("p99 ms", 8),
    ("errors", 18),
    ("srv µs/req", 10),
    ("srv cores", 9),
    ("cli µs/req", 10),
)


@dataclass
class Report:
    """Everything needed to read a run later: where it ran, what it sent, the results."""

    target: str
    model: str
    model_version: str
    batch_rows: int
    request_bytes: int
    settings: dict[str, Any]
    levels: list[LevelResult]
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    host: str = field(default_factory=platform.node)
    tool_version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "tool_version": self.tool_version,
            "started_at": self.started_at,
            "host": self.host,
            "target": self.target,
            "model": self.model,
            "model_version": self.model_version,
            "batch_rows": self.batch_rows,
            "request_bytes": self.request_bytes,
            "settings": self.settings,
            "levels": [level.to_json() for level in self.levels],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Report:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} file (schema {data.get('schema')!r})")
        return cls(
            target=data["target"],
            model=data["model"],
            model_version=data.get("model_version", ""),
            batch_rows=int(data["batch_rows"]),
            request_bytes=int(data["request_bytes"]),
            settings=dict(data.get("settings", {})),
            levels=[LevelResult.from_json(level) for level in data["levels"]],
            started_at=data["started_at"],
            host=data.get("host", ""),
            tool_version=data.get("tool_version", ""),
        )


def write_report(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def load_report(path: Path) -> Report:
    return Report.from_json(json.loads(path.read_text(encoding="utf-8")))


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


def format_errors(errors: Mapping[str, int]) -> str:
    return ",".join(f"{code}:{count}" for code, count in errors.items()) or "0"


def row(level: LevelResult) -> list[str]:
    latency = level.latency
    return [
        level.label,
        _num(level.throughput_rps, 0),
        _num(level.rows_per_s, 0),
        _num(latency.p50_ms, 2),
        _num(latency.p90_ms, 2),
        _num(latency.p99_ms, 2),
        format_errors(level.errors),
        _num(level.server_cpu_us_per_request, 0),
        _num(level.server_cpu_cores, 2),
        _num(level.client_cpu_us_per_request, 0),
    ]


def format_table(levels: Sequence[LevelResult]) -> str:
    lines = ["  ".join(name.rjust(width) for name, width in COLUMNS)]
    for level in levels:
        cells = row(level)
        lines.append(
            "  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, COLUMNS, strict=True))
        )
    late = [level for level in levels if level.mode == "open" and level.max_send_lag_ms > 50]
    for level in late:
        lines.append(
            f"note: {level.label}: the generator sent up to {level.max_send_lag_ms:.0f} ms late "
            "(latencies count from the scheduled time; consider --processes)"
        )
    return "\n".join(lines)


def _ratio(new: float | None, old: float | None) -> str:
    if new is None or old is None or not math.isfinite(new) or not math.isfinite(old) or old == 0:
        return "-"
    return f"{new / old:.2f}x"


def format_comparison(current: Sequence[LevelResult], baseline: Report) -> str:
    """Ratios to a previous run, level by level (matched by label)."""
    before = {level.label: level for level in baseline.levels}
    lines = [f"compared with {baseline.started_at} ({baseline.target}, {baseline.model}):"]
    lines.append(
        "  ".join(
            name.rjust(width)
            for name, width in (("level", 14), ("req/s", 9), ("p50", 7), ("p99", 7), ("srv cpu", 8))
        )
    )
    for level in current:
        old = before.get(level.label)
        if old is None:
            lines.append(f"{level.label:>14}  (not in the baseline)")
            continue
        cells = [
            _ratio(level.throughput_rps, old.throughput_rps),
            _ratio(level.latency.p50_ms, old.latency.p50_ms),
            _ratio(level.latency.p99_ms, old.latency.p99_ms),
            _ratio(level.server_cpu_us_per_request, old.server_cpu_us_per_request),
        ]
        lines.append(
            f"{level.label:>14}  {cells[0]:>9}  {cells[1]:>7}  {cells[2]:>7}  {cells[3]:>8}"
        )
    return "\n".join(lines)
