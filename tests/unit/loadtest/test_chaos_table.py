"""The chaos table: columns, codes by count, notes under each scenario."""

from __future__ import annotations

import math

from modelplane.loadtest.chaos.calls import Call, Tally, format_codes
from modelplane.loadtest.chaos.table import ScenarioRow, render_table


def test_rows_line_up_under_the_header_with_codes_and_units() -> None:
    tally = Tally()
    for code in ["OK"] * 7 + ["UNAVAILABLE"] * 2 + ["RESOURCE_EXHAUSTED", "CANCELLED"]:
        tally.add(code)
    rows = [
        ScenarioRow.from_tally(
            "overload 5x: inference",
            tally,
            rss_before_mb=100.4,
            rss_after_mb=120.6,
            recover_s=0.25,
            notes=["rejection latency p99 1.00 ms"],
        ),
        ScenarioRow("SIGKILL+restart: feature", sent=3, accepted=3, lost=0, recover_s=2.5),
        ScenarioRow("slow clients: registry", recover_s=math.inf),
    ]
    lines = render_table(rows).splitlines()
    header, rule, first, second, third = lines[:5]
    assert header.startswith("scenario") and set(rule) <= {"-", " "}
    assert len(header) <= len(rule)
    assert "UNAVAILABLE 2, RESOURCE_EXHAUSTED 1" in first
    assert "CANCELLED 1" in first
    assert " 11 " in first and " 7 " in first
    assert "100>121" in first and "250 ms" in first
    assert second.split()[-3:] == ["-", "2.50", "s"]  # no RSS measured
    assert third.rstrip().endswith("never")
    assert lines[-2:] == ["overload 5x: inference:", "   rejection latency p99 1.00 ms"]
    # Every cell starts where its header does.
    column = header.index("accepted")
    assert first[column - 1] == " " and second[column - 1] == " "


def test_codes_are_listed_largest_first_and_zero_when_none() -> None:
    assert format_codes({}) == "0"
    assert format_codes({"UNAVAILABLE": 0}) == "0"
    assert format_codes({"A": 1, "B": 5, "C": 1}) == "B 5, A 1, C 1"


def test_tally_sorts_calls_into_accepted_rejected_and_failed() -> None:
    calls = [Call(0.0, 0.1, code) for code in ("OK", "UNAVAILABLE", "DEADLINE_EXCEEDED", "OK")]
    tally = Tally.of(calls)
    assert (tally.sent, tally.accepted) == (4, 2)
    assert tally.rejected == {"UNAVAILABLE": 1}
    assert tally.failed == {"DEADLINE_EXCEEDED": 1}
    assert tally.codes == {"OK": 2, "UNAVAILABLE": 1, "DEADLINE_EXCEEDED": 1}
