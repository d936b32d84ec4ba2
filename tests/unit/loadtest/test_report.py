from pathlib import Path

import pytest

from modelplane.loadtest.report import (
    Report,
    format_comparison,
    format_errors,
    format_table,
    load_report,
    write_report,
)
from modelplane.loadtest.stats import LatencySummary, LevelResult


def _level(label: str, ok: int, p99_s: float, mode: str = "closed") -> LevelResult:
    return LevelResult(
        label=label,
        mode=mode,
        concurrency=8 if mode == "closed" else None,
        rate=None if mode == "closed" else 100.0,
        elapsed_s=1.0,
        ok=ok,
        errors={"DEADLINE_EXCEEDED": 2} if mode == "open" else {},
        scheduled=ok,
        rows_per_request=1,
        latency=LatencySummary.of([0.001] * 98 + [p99_s] * 2),
        server_cpu_s=None,
        client_cpu_s=0.1,
        max_send_lag_ms=120.0 if mode == "open" else 0.0,
    )


def _report(levels: list[LevelResult]) -> Report:
    return Report(
        target="127.0.0.1:8001",
        model="demo",
        model_version="",
        batch_rows=1,
        request_bytes=300,
        settings={"duration_s": 1.0},
        levels=levels,
    )


def test_json_written_and_read_back(tmp_path: Path) -> None:
    report = _report([_level("c=1", 100, 0.005), _level("rate=100/s", 98, 0.009, "open")])
    path = tmp_path / "runs" / "a.json"
    write_report(report, path)
    again = load_report(path)
    assert again == report
    assert not list(path.parent.glob("*.tmp"))


def test_foreign_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"levels": []}')
    with pytest.raises(ValueError, match="schema"):
        load_report(path)


def test_table_shows_each_level_and_late_generator_note() -> None:
    table = format_table([_level("c=1", 100, 0.005), _level("rate=100/s", 98, 0.009, "open")])
    lines = table.splitlines()
    assert "p99 ms" in lines[0]
    assert lines[1].split()[0] == "c=1"
    assert "DEADLINE_EXCEEDED:2" in lines[2]
    assert "sent up to 120 ms late" in table
    assert format_errors({}) == "0"


def test_comparison_ratios_by_label() -> None:
    baseline = _report([_level("c=1", 100, 0.005), _level("c=8", 100, 0.005)])
    text = format_comparison([_level("c=1", 200, 0.010), _level("c=64", 1, 0.1)], baseline)
    assert "2.00x" in text.splitlines()[2]
    assert "not in the baseline" in text
