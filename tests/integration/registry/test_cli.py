"""`modelplane registry ...` against a running registry."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import onnx
import pytest

from modelplane.cli.main import main
from modelplane.client.registry import file_sha256
from modelplane.examples.models import mlp
from tests.integration.registry.conftest import ThreadedServer

METADATA = """
description: weekly retrain
lineage:
  training_data_ref: s3://lake/fraud
  training_data_version: "2026-11-20"
  params: {max_depth: 6}
  metrics:
    - {name: auc, value: 0.91}
    - {name: auc, value: 0.88, slice: {region: eu}}
card:
  intended_use: flag card transactions for review
  limitations: not calibrated for merchants outside EU/US
feature_statistics:
  - {name: amount, bin_edges: [0, 10, 100], counts: [70, 30]}
"""


def _run(capsys: pytest.CaptureFixture[str], address: str, *args: str, actor: str = "cli") -> str:
    code = main(["registry", "--address", address, "--actor", actor, *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_register_review_promote_download_audit(
    registry: ThreadedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = registry.address
    model_file = tmp_path / "fraud.onnx"
    onnx.save(mlp((6, 8, 2)), model_file)
    (tmp_path / "meta.yaml").write_text(METADATA)

    _run(
        capsys,
        address,
        "create",
        "fraud",
        "--owner",
        "risk",
        "--tag",
        "team=risk",
        "--required-approvals",
        "1",
        "--protect",
        "production",
    )
    out = _run(
        capsys,
        address,
        "register",
        "fraud",
        str(model_file),
        "--metadata",
        str(tmp_path / "meta.yaml"),
        "--code-revision",
        "abc123",
        "--metric",
        "recall=0.7@region=us",
    )
    assert "registered fraud v1" in out and file_sha256(model_file) in out

    out = _run(capsys, address, "list", "--tag", "team=risk")
    assert "fraud" in out
    out = _run(capsys, address, "show", "fraud", "--version", "1")
    for text in (
        "input FP32[-1, 6]",
        "code revision: abc123",
        "param max_depth = 6",
        "auc = 0.88 [region=eu]",
        "recall = 0.7 [region=us]",
        "intended use: flag card transactions",
        "reference stats amount: 2 bins",
    ):
        assert text in out, text

    assert main(["registry", "--address", address, "promote", "fraud", "production", "1"]) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
    _run(capsys, address, "approve", "fraud", "1", "--comment", "ok", actor="reviewer")
    out = _run(capsys, address, "promote", "fraud", "production", "1", "--reason", "launch")
    assert "fraud@production -> v1 (was unset)" in out
    moment = datetime.now(UTC).isoformat()
    out = _run(capsys, address, "history", "fraud", "--alias", "production", "--at", moment)
    assert "v1" in out
    out = _run(capsys, address, "show", "fraud")
    assert "production" in out and "approved" in out

    target = tmp_path / "copy.onnx"
    out = _run(capsys, address, "download", "fraud", "--alias", "production", "-o", str(target))
    assert target.read_bytes() == model_file.read_bytes()

    out = _run(capsys, address, "--json", "audit", "--target", "fraud")
    actions = [(e["actor"], e["action"]) for e in json.loads(out)]
    assert ("reviewer", "version.review.approve") in actions
    assert ("cli", "alias.set") in actions
    assert actions[-1] == ("cli", "model.create")


def test_unknown_model_exits_non_zero(
    registry: ThreadedServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["registry", "--address", registry.address, "show", "ghost"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
