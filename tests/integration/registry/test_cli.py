"""`modelplane registry ...` against a running registry."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path

import onnx
import pytest

from modelplane.cli.main import main
from modelplane.cli.registry import metadata_from_file
from modelplane.client.registry import RegistryClient, file_sha256
from modelplane.examples.models import mlp
from modelplane.services.registry import convert, domain
from tests.integration.registry.conftest import ThreadedServer
from tests.support import wait_until

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
  - {name: merchant, categories: [grocery, fuel, travel], counts: [50, 30, 20]}
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
        "recall = 0.7 [region=us]",
        "intended use: flag card transactions",
        "reference stats amount: 2 bins",
        "reference stats merchant: 3 categories, 100 rows",
    ):
        assert text in out, text
    # --metric replaces the file's metrics list rather than adding to it.
    assert "metric auc" not in out

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


def _fail(capsys: pytest.CaptureFixture[str], address: str, code: int, *args: str) -> str:
    assert main(["registry", "--address", address, "--actor", "cli", *args]) == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "fraud.onnx"
    onnx.save(mlp((6, 8, 2)), path)
    return path


def test_rollout_and_rollback(
    registry: ThreadedServer, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = registry.address
    _run(capsys, address, "create", "fraud")
    for _ in range(3):
        _run(capsys, address, "register", "fraud", str(model_file))
    for alias, version in (("production", "1"), ("canary", "2"), ("shadow", "3")):
        _run(capsys, address, "promote", "fraud", alias, version)

    assert "no rollout policy" in _run(capsys, address, "rollout", "fraud")
    out = _run(capsys, address, "rollout", "fraud", "--canary", "10", "--reason", "try v2")
    assert out.strip() == "fraud rollout revision 1: routes production 90%, canary 10%; shadow none"
    out = _run(capsys, address, "rollout", "fraud", "--shadow", "5")
    assert "routes production 90%, canary 10%; shadow shadow 5%" in out
    out = _run(capsys, address, "rollout", "fraud", "--canary", "100")
    assert "revision 3: routes canary 100%; shadow shadow 5%" in out
    out = _run(capsys, address, "rollout", "fraud")
    assert "revision 3" in out and "canary 100%" in out and "shadow 5%" in out
    policy = json.loads(_run(capsys, address, "--json", "rollout", "fraud"))
    assert policy["revision"] == 3 and policy["updated_by"] == "cli"
    assert policy["routes"] == [{"alias": "canary", "weight": 100}]
    assert policy["shadow"] == {"alias": "shadow", "percent": 5}

    assert "--off" in _fail(capsys, address, 2, "rollout", "fraud", "--off", "--canary", "5")
    with pytest.raises(SystemExit) as info:  # argparse's own usage error
        main(["registry", "--address", address, "rollout", "fraud", "--canary", "101"])
    assert info.value.code == 2
    assert "between 0 and 100" in capsys.readouterr().err
    err = _fail(capsys, address, 2, "rollout", "fraud", "--canary", "5", "--primary", "canary")
    assert "different" in err
    assert "ABORTED" in _fail(capsys, address, 1, "rollout", "fraud", "--off", "--expect", "1")
    err = _fail(capsys, address, 1, "rollout", "fraud", "--shadow", "5", "--shadow-alias", "nope")
    assert "INVALID_ARGUMENT" in err and "shadow.alias" in err

    out = _run(capsys, address, "rollback", "fraud")
    assert "turned off the rollout policy of fraud (revision 4)" in out
    assert "it routed canary 100%, shadow shadow 5%" in out
    assert "routes:  none" in _run(capsys, address, "rollout", "fraud")
    err = _fail(capsys, address, 1, "rollback", "fraud")
    assert "was unset before v1" in err
    _run(capsys, address, "promote", "fraud", "production", "3", "--reason", "v3 is out")
    out = _run(capsys, address, "rollback", "fraud")
    assert out.strip() == "fraud@production -> v1 (rolled back from v3)"
    moved = json.loads(_run(capsys, address, "--json", "rollback", "fraud"))
    assert moved["alias_moved"]["version"] == 3 and moved["alias_moved"]["event_id"] > 0
    history = json.loads(
        _run(capsys, address, "--json", "history", "fraud", "--alias", "production")
    )
    assert [(e.get("from_version", 0), e["to_version"]) for e in history] == [
        (0, 1),
        (1, 3),
        (3, 1),
        (1, 3),
    ]
    assert history[2]["reason"] == "rollback from v3"
    assert "never set" in _fail(capsys, address, 1, "rollback", "fraud", "--alias", "beta")


def test_register_with_a_serving_config(
    registry: ThreadedServer,
    model_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "config.pbtxt"
    config.write_text("max_batch_size: 16\ninstance_group [ { count: 2 kind: KIND_CPU } ]\n")
    (tmp_path / "meta.yaml").write_text("serving_config: 'max_batch_size: 4'\n")
    out = _run(
        capsys,
        registry.address,
        "--json",
        "register",
        "fraud",
        str(model_file),
        "--create",
        "--metadata",
        str(tmp_path / "meta.yaml"),
        "--serving-config",
        str(config),
    )
    version = json.loads(out)
    assert version["version"] == 1  # a number, not protobuf JSON's string for int64
    assert version["serving_config"] == config.read_text()
    out = _run(capsys, registry.address, "--json", "show", "fraud", "--version", "1")
    assert json.loads(out)["serving_config"] == config.read_text()
    config.write_text("max_batch_size: 16\nbatch_me: true\n")
    err = _fail(
        capsys,
        registry.address,
        1,
        "register",
        "fraud",
        str(model_file),
        "--serving-config",
        str(config),
    )
    assert "INVALID_ARGUMENT" in err and 'no field named "batch_me"' in err


def test_register_with_a_feature_bundle_by_flags(
    registry: ThreadedServer, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = registry.address
    version = json.loads(
        _run(
            capsys,
            address,
            "--json",
            "register",
            "fraud",
            str(model_file),
            "--create",
            "--feature-bundle",
            "customer_scorer",
            "--missing-features",
            "fill",
        )
    )
    assert version["feature_input"] == {
        "bundle": "customer_scorer",
        "input": "input",
        "missing_policy": "MISSING_FEATURE_POLICY_FILL",
    }
    shown = json.loads(_run(capsys, address, "--json", "show", "fraud", "--version", "1"))
    assert shown["feature_input"] == version["feature_input"]
    listed = json.loads(_run(capsys, address, "--json", "show", "fraud"))
    assert listed["versions"][0]["feature_input"]["bundle"] == "customer_scorer"
    out = _run(capsys, address, "show", "fraud", "--version", "1")
    assert "features:    bundle customer_scorer -> input input, missing values: fill" in out
    _run(capsys, address, "register", "fraud", str(model_file))
    out = _run(capsys, address, "show", "fraud", "--version", "2")
    assert "features:" not in out
    assert "feature_input" not in json.loads(
        _run(capsys, address, "--json", "show", "fraud", "--version", "2")
    )
    err = _fail(
        capsys,
        address,
        1,
        "register",
        "fraud",
        str(model_file),
        "--feature-bundle",
        "customer_scorer",
        "--feature-input",
        "amount",
    )
    assert "INVALID_ARGUMENT" in err and "feature_input.input 'amount'" in err


def test_feature_input_from_the_metadata_file_with_flags_overriding(
    registry: ThreadedServer,
    model_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    meta = tmp_path / "meta.yaml"
    meta.write_text("feature_input:\n  bundle: from_file\n  input: input\n  missing_policy: fill\n")
    address = registry.address
    first = json.loads(
        _run(
            capsys,
            address,
            "--json",
            "register",
            "fraud",
            str(model_file),
            "--create",
            "--metadata",
            str(meta),
        )
    )
    assert first["feature_input"] == {
        "bundle": "from_file",
        "input": "input",
        "missing_policy": "MISSING_FEATURE_POLICY_FILL",
    }
    # Each flag replaces its own field; the file's others stay.
    second = json.loads(
        _run(
            capsys,
            address,
            "--json",
            "register",
            "fraud",
            str(model_file),
            "--metadata",
            str(meta),
            "--feature-bundle",
            "from_flag",
        )
    )
    assert second["feature_input"]["bundle"] == "from_flag"
    assert second["feature_input"]["missing_policy"] == "MISSING_FEATURE_POLICY_FILL"
    third = json.loads(
        _run(
            capsys,
            address,
            "--json",
            "register",
            "fraud",
            str(model_file),
            "--metadata",
            str(meta),
            "--missing-features",
            "reject",
        )
    )
    assert third["feature_input"] == {
        "bundle": "from_file",
        "input": "input",
        "missing_policy": "MISSING_FEATURE_POLICY_REJECT",
    }


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--feature-input", "input"), "--feature-input and --missing-features need"),
        (("--missing-features", "fill"), "need --feature-bundle"),
    ],
)
def test_feature_flags_without_a_bundle_exit_2(
    model_file: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], fragment: str
) -> None:
    err = _fail(capsys, "127.0.0.1:1", 2, "register", "fraud", str(model_file), *args)
    assert fragment in err


def test_an_unknown_missing_features_choice_is_refused_by_the_parser(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["registry", "register", "fraud", str(model_file), "--missing-features", "zero"])
    assert info.value.code == 2
    assert "invalid choice: 'zero'" in capsys.readouterr().err


def test_metadata_file_slices_in_flag_form_and_file_metrics_kept_once(
    registry: ThreadedServer,
    model_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "meta.yaml").write_text(
        "lineage:\n"
        "  training_data_version: 2026-11-20\n"
        "  metrics:\n"
        "    - {name: auc, value: 0.91}\n"
        "    - {name: auc, value: 0.88, slice: region=eu}\n"
        "    - {name: auc, value: 0.87, slice: 'region=us,segment=new'}\n"
    )
    _run(
        capsys,
        registry.address,
        "register",
        "fraud",
        str(model_file),
        "--create",
        "--metadata",
        str(tmp_path / "meta.yaml"),
    )
    out = _run(capsys, registry.address, "show", "fraud", "--version", "1")
    assert "training data: - @ 2026-11-20" in out
    metrics = [line.strip() for line in out.splitlines() if line.strip().startswith("metric ")]
    assert metrics == [
        "metric auc = 0.91 [overall]",
        "metric auc = 0.88 [region=eu]",
        "metric auc = 0.87 [region=us,segment=new]",
    ]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("lineage:\n  params: [a, b]\n", "lineage.params must be a mapping"),
        ("lineage:\n  metrics:\n    - {name: auc, value: 0.9, slice: eu}\n", "metrics[0].slice"),
        ("lineage:\n  metrics: {auc: 0.9}\n", "lineage.metrics must be a list"),
        ("lineage:\n  metrics:\n    - {name: auc, value: high}\n", "metrics[0].value"),
        ("lineage:\n  metrics:\n    - {value: 0.9}\n", "metrics[0].name is required"),
        ("lineage:\n  metric: []\n", "lineage.metric is not a field"),
        ("descripton: typo\n", "descripton is not a field"),
        ("card: just text\n", "card must be a mapping"),
        ("card:\n  limitations: [a]\n", "card.limitations must be text"),
        ("feature_statistics:\n  - {name: x, bin_edges: [0, 1], counts: [1.5]}\n", "counts[0]"),
        ("- a\n- b\n", "must hold a mapping"),
        ("lineage: {params: {a: 1}\n", "not valid YAML"),
        ("feature_input: customer_scorer\n", "feature_input must be a mapping"),
        ("feature_input:\n  input: x\n", "feature_input.bundle is required"),
        ("feature_input:\n  bundle: [a]\n", "feature_input.bundle must be text"),
        ("feature_input:\n  bundle: b\n  policy: fill\n", "feature_input.policy is not a"),
        (
            "feature_input:\n  bundle: b\n  missing_policy: zero\n",
            "feature_input.missing_policy must be one of reject, fill, got 'zero'",
        ),
    ],
)
def test_a_bad_metadata_file_names_the_field_and_exits_2(
    tmp_path: Path,
    model_file: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    fragment: str,
) -> None:
    meta = tmp_path / "meta.yaml"
    meta.write_text(text)
    # Refused before any call: no server is needed.
    err = _fail(
        capsys, "127.0.0.1:1", 2, "register", "fraud", str(model_file), "--metadata", str(meta)
    )
    assert err.startswith(f"error: {meta}: ") or "not valid YAML" in err
    assert fragment in err


def test_watch_prints_the_same_json_as_the_other_commands(
    registry: ThreadedServer, model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = registry.address
    _run(capsys, address, "create", "fraud")
    _run(capsys, address, "register", "fraud", str(model_file))
    _run(capsys, address, "promote", "fraud", "production", "1")
    codes: list[int] = []
    watcher = threading.Thread(
        target=lambda: codes.append(main(["registry", "--address", address, "watch", "fraud"]))
    )
    watcher.start()
    hub = registry.server._hub  # type: ignore[attr-defined]
    wait_until(lambda: registry.call(lambda: hub.subscribers))
    with RegistryClient(address) as client:  # not the CLI: its output would mix in
        client.set_rollout("fraud", {"production": 100})
    registry.stop()  # ends the watch (UNAVAILABLE) after what it had queued
    watcher.join(30)
    assert codes == [1]
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert len(lines) == 2, captured
    snapshot, changed = lines
    assert snapshot["snapshot"]["latest_version"] == 1
    (alias,) = snapshot["snapshot"]["aliases"]
    assert alias["alias"] == "production" and isinstance(alias["event_id"], int)
    assert "update_time" in alias and "updateTime" not in alias
    assert changed["rollout_changed"]["revision"] == 1
    assert changed["rollout_changed"]["routes"] == [{"alias": "production", "weight": 100}]


def test_the_readme_metadata_example_is_accepted(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    section = readme[readme.index("## Registry") :]
    example = section[section.index("```yaml\n") + 8 :]
    meta = tmp_path / "meta.yaml"
    meta.write_text(example[: example.index("```")])
    metadata = metadata_from_file(meta)
    assert [dict(m.slice) for m in metadata.lineage.metrics][2] == {
        "region": "us",
        "segment": "new",
    }
    assert metadata.feature_input.bundle == "customer_scorer"
    domain.validate_metadata(convert.metadata_from_pb(metadata))
