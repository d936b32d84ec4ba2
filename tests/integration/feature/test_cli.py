"""`modelplane features ...` against a running service (SQLite store)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modelplane.cli import features
from modelplane.cli.main import COMMAND_MODULES
from tests.integration.feature.messages import DEFINITIONS, now_us


def run(address: str, *argv: str, address_last: bool = False) -> int:
    # Only this command group: the test does not depend on other groups importing cleanly.
    parser = argparse.ArgumentParser(prog="modelplane")
    features.register(parser.add_subparsers(dest="command", required=True))
    if address_last:
        args = parser.parse_args(["features", *argv, "--address", address])
    else:
        args = parser.parse_args(["features", "--address", address, *argv])
    return int(args.handler(args) or 0)


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_apply_materialize_get_and_training_set(feature_server, tmp_path, capsys):
    assert "modelplane.cli.features" in COMMAND_MODULES
    (tmp_path / "data").mkdir()
    # A relative source path is taken relative to the YAML file.
    definitions = tmp_path / "features.yaml"
    definitions.write_text(DEFINITIONS.format(source="data/stats.parquet"))
    now = now_us()
    pq.write_table(
        pa.table(
            {
                "customer_id": pa.array([1, 2], pa.int64()),
                "event_timestamp": pa.array(
                    [now - 5_000_000, now - 4_000_000], pa.timestamp("us", tz="UTC")
                ),
                "trips": [1.5, 2.5],
                "rating": [4.0, 3.0],
                "orders": [1, 2],
                "vip": [True, False],
                "city": ["a", "b"],
            }
        ),
        tmp_path / "data" / "stats.parquet",
    )

    assert run(feature_server, "apply", str(definitions), "--dry-run") == 0
    assert "dry run" in capsys.readouterr().out
    assert run(feature_server, "apply", str(definitions)) == 0
    assert "customer_stats" in capsys.readouterr().out
    assert run(feature_server, "list", address_last=True) == 0
    assert str(tmp_path / "data" / "stats.parquet") in capsys.readouterr().out

    assert run(feature_server, "materialize") == 0
    assert "read 2, written 2" in capsys.readouterr().out

    assert (
        run(
            feature_server,
            "get",
            "--features",
            "customer_stats:trips,customer_stats:city",
            "--key",
            "customer_id=1,3",
            "--json",
        )
        == 0
    )
    records = json.loads(capsys.readouterr().out)
    assert records[0]["customer_stats:trips"]["value"] == 1.5
    assert records[0]["customer_stats:city"]["status"] == "PRESENT"
    assert records[1]["customer_stats:trips"] == {
        "value": None,
        "status": "NOT_FOUND",
        "event_time": None,
    }

    assert (
        run(feature_server, "get", "--bundle", "fraud_model", "--key", "customer_id=2", "--tensor")
        == 0
    )
    tensor = json.loads(capsys.readouterr().out)
    assert tensor["shape"] == [1, 3] and tensor["values"] == [[2.5, 3.0, 2.0]]

    entities = tmp_path / "entities.csv"
    moment = datetime.fromtimestamp(now / 1e6, tz=UTC).isoformat()
    entities.write_text(f"customer_id,event_timestamp\n1,2000-01-01T00:00:00Z\n2,{moment}\n")
    output = tmp_path / "train.parquet"
    assert (
        run(
            feature_server,
            "training-set",
            "--entities",
            str(entities),
            "--bundle",
            "fraud_model",
            "--output",
            str(output),
            "--statuses",
        )
        == 0
    )
    rows = pq.read_table(output).to_pylist()
    assert rows[0]["customer_stats__trips__status"] == "NOT_FOUND"  # before any value
    assert rows[1]["customer_stats__trips"] == 2.5


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_errors_are_reported_with_their_code(feature_server, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(feature_server, "get", "--features", "ghost:x", "--key", "customer_id=1")
    assert "NOT_FOUND" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("feature_views: [{name: v}]")
    with pytest.raises(SystemExit):
        run(feature_server, "apply", str(broken))
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
