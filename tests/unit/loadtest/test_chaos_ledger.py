"""Acknowledged-but-lost: the ledger written as acknowledgements arrive, read back and
compared with what the service returns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from modelplane.loadtest.chaos.calls import Call, latency_ms
from modelplane.loadtest.chaos.config import ChaosConfig
from modelplane.loadtest.chaos.ledger import AckLedger, lost_keys, read_ledger


def test_the_ledger_file_holds_every_acknowledgement(tmp_path: Path) -> None:
    path = tmp_path / "acks.jsonl"
    ledger = AckLedger(path)
    ledger.acknowledge("model:a", "d1")
    ledger.acknowledge("7", 3.5)
    ledger.acknowledge("model:a", "d2")  # the latest acknowledgement wins
    ledger.close()
    assert len(ledger) == 2
    assert read_ledger(path.read_text().splitlines()) == {"model:a": "d2", "7": 3.5}


def test_a_torn_last_line_is_skipped() -> None:
    lines = ['{"key": "a", "value": 1}', "", '{"key": "b", "val']
    assert read_ledger(lines) == {"a": 1}


def test_lost_are_the_missing_and_the_changed() -> None:
    acknowledged = {"a": 1, "b": 2, "c": 3, "d": 4}
    found = {"a": 1, "b": 20, "d": 4, "extra": 9}
    assert lost_keys(acknowledged, found) == ["b", "c"]
    assert lost_keys(acknowledged, acknowledged) == []
    assert lost_keys({}, found) == []


def test_latency_percentiles_are_nearest_rank_in_ms() -> None:
    calls = [Call(0.0, seconds, "OK") for seconds in (0.001, 0.002, 0.003, 0.004, 0.1)]
    assert latency_ms(calls, 50) == pytest.approx(3.0)
    assert latency_ms(calls, 99) == pytest.approx(100.0)
    assert latency_ms(calls, 100) == pytest.approx(100.0)
    assert math.isnan(latency_ms([], 99))


def test_knobs_come_from_the_environment() -> None:
    config = ChaosConfig.from_env(
        {
            "MODELPLANE_CHAOS_SCENARIOS": "term, kill",
            "MODELPLANE_CHAOS_SERVICES": "feature",
            "MODELPLANE_CHAOS_SLOW_CLIENTS": "20",
            "MODELPLANE_CHAOS_LOAD_S": "0.5",
            "MODELPLANE_CHAOS_OVERLOAD_LAYERS": "512,64,16",
        }
    )
    assert config.overload_layers == "512,64,16"
    assert config.scenarios == ("term", "kill")
    assert config.services == ("feature",)
    assert config.slow_clients == 20 and config.load_s == 0.5
    assert ChaosConfig.from_env({}) == ChaosConfig()
    with pytest.raises(ValueError, match="unknown"):
        ChaosConfig.from_env({"MODELPLANE_CHAOS_SCENARIOS": "flood"})
