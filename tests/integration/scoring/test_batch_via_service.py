"""`modelplane score batch --via-service`: the same job scored through a real inference
service (port 0, following the test registry) gives the in-process predictions and
records the version that answered; a bundle model's point-in-time tensor is sent as
is; an unreachable service is named."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from modelplane.examples.models import write_model
from modelplane.scoring.batch import ROW_COLUMN
from modelplane.services.inference.main import Settings, build
from tests.integration.scoring.conftest import BUNDLE_MODEL, MODEL, bundle_job, ort_outputs
from tests.integration.scoring.test_batch import (
    FEATURES,
    matrix,
    read_output,
    score,
    write_inputs,
)
from tests.support import running_aio_in_thread


@contextmanager
def inference(
    registry_address: str, model: str, data_dir: Path, feature_service: str = ""
) -> Iterator[str]:
    """An inference server following the registry for `model`; yields its address."""
    config = Settings(
        registry=registry_address,
        load_model=[model],
        feature_service=feature_service or None,
        data_dir=data_dir,
        port=0,
        log_json=False,
        log_level="WARNING",
        registry_timeout_s=2.0,
    )  # type: ignore[call-arg]
    with running_aio_in_thread(build(config)) as address:
        yield address


def test_via_service_gives_the_in_process_predictions_and_the_serving_version(
    registry, tmp_path, capsys
):
    path = registry.register(MODEL, seed=31)
    rows = write_inputs(tmp_path / "in", files=2, rows=1_200, row_group=500)
    common = [
        str(tmp_path / "in"),
        "--features",
        ",".join(FEATURES),
        "--keys",
        "id",
        "--chunk-rows",
        "500",
    ]
    assert score(registry, *common, "--output", str(tmp_path / "local")) == 0
    with inference(registry.address, MODEL, tmp_path / "inference") as address:
        assert (
            score(
                registry,
                *common,
                "--output",
                str(tmp_path / "remote"),
                "--via-service",
                address,
                "--service-in-flight",
                "3",
            )
            == 0
        )
        assert "scored 2,400 rows" in capsys.readouterr().out

        # Pinned to a version the service does not serve: named before anything is scored.
        registry.register(MODEL, seed=32, alias="staging")
        code = score(
            registry,
            *common,
            "--output",
            str(tmp_path / "pinned"),
            "--via-service",
            address,
            model=f"{MODEL}/2",
        )
        assert code == 1
        assert f"does not serve {MODEL}/2" in capsys.readouterr().err

    local, remote = read_output(tmp_path / "local"), read_output(tmp_path / "remote")
    assert remote[ROW_COLUMN].to_pylist() == list(range(2_400))
    assert remote["id"].to_pylist() == rows["id"].to_pylist()
    assert set(remote["model_version"].to_pylist()) == {1}  # the version that answered
    expected = np.array(local["output"].to_pylist(), dtype=np.float32)
    got = np.array(remote["output"].to_pylist(), dtype=np.float32)
    # The same float32 inputs and ONNX Runtime: equal, though the service's batches
    # (at most its max_batch_size rows) are not the job's.
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, ort_outputs(path, matrix(rows)))
    assert not list((tmp_path / "pinned").glob("part-*"))


def test_via_service_scores_a_bundle_models_point_in_time_tensor(
    registry, feature_service, tmp_path
):
    common, entities = bundle_job(
        registry, feature_service, tmp_path, seed=33, hidden=16, events_seed=5
    )
    model = f"{BUNDLE_MODEL}@production"
    assert score(registry, *common, "--output", str(tmp_path / "local"), model=model) == 0
    features_at = feature_service[0]
    with inference(registry.address, BUNDLE_MODEL, tmp_path / "inference", features_at) as served:
        assert (
            score(
                registry,
                *common,
                "--output",
                str(tmp_path / "remote"),
                "--via-service",
                served,
                model=model,
            )
            == 0
        )
    local, remote = read_output(tmp_path / "local"), read_output(tmp_path / "remote")
    assert remote["customer_id"].to_pylist() == entities["customer_id"].to_pylist()
    assert remote["rejected"].to_pylist() == local["rejected"].to_pylist()
    assert 0 < remote["rejected"].null_count < 400  # scored and rejected rows both
    assert set(remote["model_version"].to_pylist()) == {1}
    scored = [p for p in local["output"].to_pylist() if p is not None]
    scored_remote = [p for p in remote["output"].to_pylist() if p is not None]
    np.testing.assert_array_equal(np.array(scored_remote, np.float32), np.array(scored, np.float32))


def test_the_version_column_is_the_version_that_answered(registry, monitoring, tmp_path):
    """A service serving the same model from a repository as version 7: the rows, and the
    predictions logged to monitoring, say 7, not the registry's 1 resolved at the start."""
    path = registry.register(MODEL, seed=35)
    rows = write_inputs(tmp_path / "in", files=1, rows=300, row_group=100)
    write_model(onnx.load(path), tmp_path / "repository", MODEL, version=7)
    config = Settings(
        model_repository=tmp_path / "repository", port=0, log_json=False, log_level="WARNING"
    )  # type: ignore[call-arg]
    with running_aio_in_thread(build(config)) as address:
        code = score(
            registry,
            str(tmp_path / "in"),
            "--features",
            ",".join(FEATURES),
            "--output",
            str(tmp_path / "out"),
            "--via-service",
            address,
            "--monitoring",
            monitoring[0],
            "--monitoring-sample",
            "1.0",
        )
    assert code == 0
    result = read_output(tmp_path / "out")
    assert set(result["model_version"].to_pylist()) == {7}
    summary = monitoring[1].summary(MODEL)
    assert [(v.model_version, v.count) for v in summary.by_version_route] == [("7", 300)]
    got = np.array(result["output"].to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(got, ort_outputs(path, matrix(rows)))


def test_an_unreachable_service_is_named(registry, tmp_path, capsys):
    registry.register(MODEL, seed=34)
    write_inputs(tmp_path / "in", files=1, rows=100, row_group=100)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    code = score(
        registry,
        str(tmp_path / "in"),
        "--features",
        ",".join(FEATURES),
        "--output",
        str(tmp_path / "out"),
        "--via-service",
        f"127.0.0.1:{port}",
    )
    assert code == 1
    error = capsys.readouterr().err
    assert f"inference service 127.0.0.1:{port}" in error and "cannot connect" in error
