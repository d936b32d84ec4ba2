"""The table `make chaos` prints: one row per scenario and service, then each row's
notes (latencies, targets with PASS/MISS, what the slow clients got back)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from modelplane.loadtest.chaos.calls import Tally, format_codes

COLUMNS = (
    "scenario",
    "sent",
    "accepted",
    "rejected (by code)",
    "failed (by code)",
    "ack-lost",
    "RSS MiB before>after",
    "recover",
)


@dataclass
class ScenarioRow:
    scenario: str
    sent: int = 0
    accepted: int = 0
    rejected: Mapping[str, int] = field(default_factory=dict)
    failed: Mapping[str, int] = field(default_factory=dict)
    lost: int | None = None
    """Acknowledged writes not found afterwards; None where nothing is written."""
    rss_before_mb: float = math.nan
    rss_after_mb: float = math.nan
    recover_s: float | None = None
    """None: not measured here; inf: never recovered within the harness's bound."""
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_tally(cls, scenario: str, tally: Tally, **fields: object) -> ScenarioRow:
        return cls(
            scenario,
            sent=tally.sent,
            accepted=tally.accepted,
            rejected=dict(tally.rejected),
            failed=dict(tally.failed),
            **fields,  # type: ignore[arg-type]
        )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _mb(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def _rss(before: float, after: float) -> str:
    if math.isnan(before) and math.isnan(after):
        return "-"
    return f"{_mb(before)}>{_mb(after)}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "never"
    return f"{value * 1e3:.0f} ms" if value < 1 else f"{value:.2f} s"


def cells(row: ScenarioRow) -> list[str]:
    return [
        row.scenario,
        str(row.sent),
        str(row.accepted),
        format_codes(row.rejected),
        format_codes(row.failed),
        "-" if row.lost is None else str(row.lost),
        _rss(row.rss_before_mb, row.rss_after_mb),
        _seconds(row.recover_s),
    ]


def render_table(rows: Sequence[ScenarioRow]) -> str:
    """Plain columns sized to their content (numbers right-aligned), then the notes of
    each row under its scenario's name."""
    table = [list(COLUMNS), *(cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    numeric = {1, 2, 5}

    def line(values: list[str]) -> str:
        parts = [
            value.rjust(width) if index in numeric else value.ljust(width)
            for index, (value, width) in enumerate(zip(values, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [line(table[0]), "  ".join("-" * width for width in widths)]
    out += [line(values) for values in table[1:]]
    noted = [row for row in rows if row.notes]
    if noted:
        out.append("")
    for row in noted:
        out.append(f"{row.scenario}:")
        out += [f"   {note}" for note in row.notes]
    return "\n".join(out)
