"""The unmodified tritonclient (grpc and grpc.aio) against `modelplane serve inference`
started as a process on port 0, as a user would run it. The client side runs in its own
process (triton_checks.py): tritonclient's stubs and the server's declare the same
protobuf package and cannot be imported into one process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelplane.examples.models import HEAVY_MLP, LIGHT_MLP, mlp, write_model
from tests.integration.inference import models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    write_model(mlp(LIGHT_MLP, seed=5, name="light"), root, "light")
    write_model(mlp(LIGHT_MLP, seed=6, name="unbatched"), root, "unbatched")
    (root / "unbatched" / "config.pbtxt").write_text("max_batch_size: 8\n")
    write_model(mlp(HEAVY_MLP, seed=7, name="heavy"), root, "heavy")
    (root / "heavy" / "config.pbtxt").write_text(
        "max_batch_size: 64\n"
        "dynamic_batching { preferred_batch_size: [ 64 ] max_queue_delay_microseconds: 2000 }\n"
    )
    write_model(models.echo_all_types(), root, "echo")
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    log = (tmp_path_factory.mktemp("log") / "server.log").open("w+")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelplane.cli.main",
            "serve",
            "inference",
            "--model-repository",
            str(repository),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--data-dir",
            str(tmp_path_factory.mktemp("data")),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            log.seek(0)
            pytest.fail(f"server did not start: {log.read()[-3000:]}")
        serving = json.loads(line)
        assert serving["event"] == "serving" and serving["service"] == "inference"
        yield serving
    finally:
        process.terminate()
        process.wait(30)
        log.close()


CHECKS = (
    "liveness_readiness_and_metadata",
    "model_config_tells_batching_and_provider",
    "outputs_equal_onnx_runtime",
    "64_concurrent_aio_requests_are_batched_together",
    "every_datatype_round_trips_including_bytes_and_fp16",
    "bad_requests_get_codes_and_messages_naming_the_tensor",
    "statistics_index_load_and_unload",
    "stream_infer_reports_errors_per_response",
    "metrics_endpoint_has_process_cpu_and_inference_series",
)


@pytest.fixture(scope="module")
def results(server: dict, repository: Path) -> dict[str, str]:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.integration.inference.triton_checks",
            server["address"],
            str(server["metrics_port"]),
            str(repository),
            *CHECKS,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("check", CHECKS)
def test_tritonclient(results: dict[str, str], check: str) -> None:
    assert results[check] == "ok", results[check]
