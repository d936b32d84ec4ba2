"""Serving from the registry as a user runs it: `modelplane serve registry` and
`modelplane serve inference --registry …` as separate processes on port 0, the
unmodified tritonclient calling the model, and the registry killed (SIGKILL) and
brought back while inference serves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from modelplane.client.registry import RegistryClient
from modelplane.examples.models import LIGHT_MLP, mlp
from tests.integration.inference.conftest import fp32_request, output
from tests.support import wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
MODEL = "fraud"
X = np.random.default_rng(1).standard_normal((1, LIGHT_MLP[0])).astype(np.float32)

TRITON_CHECK = """
import sys, json
import numpy as np
import tritonclient.grpc as tc
client = tc.InferenceServerClient(sys.argv[1])
x = tc.InferInput("input", [1, 64], "FP32")
x.set_data_from_numpy(np.array(json.loads(sys.argv[2]), dtype=np.float32))
result = client.infer("fraud", [x])
response = result.get_response()
print(json.dumps({"version": response.model_version, "output": result.as_numpy("output").tolist(),
                  "route": response.parameters["route"].string_param}))
"""


@contextmanager
def service(args: list[str], log_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict]]:
    log = log_path.open("a")
    process = subprocess.Popen(
        [sys.executable, "-m", "modelplane.cli.main", "serve", *args, "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            process.wait(30)
            pytest.fail(f"{args[0]} did not start: {log_path.read_text()[-3000:]}")
        yield process, json.loads(line)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(30)
        log.close()


def registry_args(data: Path, port: int = 0) -> list[str]:
    return ["registry", "--port", str(port), "--data-dir", str(data)]


def inference_args(registry_port: int, data: Path) -> list[str]:
    return [
        "inference",
        "--registry",
        f"127.0.0.1:{registry_port}",
        "--load-model",
        f"{MODEL}@production",
        "--port",
        "0",
        "--data-dir",
        str(data),
    ]


def ort_output(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["output"], {"input": X})[0]


def version_of(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return str(stub.ModelInfer(fp32_request(MODEL, X), timeout=10).model_version)


def test_registry_to_tritonclient_surviving_registry_kills(tmp_path: Path) -> None:
    paths = {}
    for seed in (1, 2):
        paths[seed] = tmp_path / f"v{seed}.onnx"
        onnx.save(mlp(LIGHT_MLP, seed=seed, name=MODEL), paths[seed])
    logs = tmp_path / "services.log"
    with service(registry_args(tmp_path / "registry"), logs) as (registry, serving):
        registry_port = serving["port"]
        with RegistryClient(f"127.0.0.1:{registry_port}") as client:
            client.create_model(MODEL)
            client.upload_file(paths[1], _metadata())
            client.upload_file(paths[2], _metadata())
            client.set_alias(MODEL, "production", 1, expected_version=0)
        with service(inference_args(registry_port, tmp_path / "inference"), logs) as (_, inf):
            address = inf["address"]
            # The unmodified tritonclient, in a process of its own (its stubs and ours
            # share a protobuf package), gets v1's outputs and number.
            checked = subprocess.run(
                [sys.executable, "-c", TRITON_CHECK, address, json.dumps(X.tolist())],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            )
            assert checked.returncode == 0, checked.stderr[-2000:]
            answer = json.loads(checked.stdout)
            assert answer["version"] == "1"
            assert answer["route"] == "production"
            np.testing.assert_allclose(answer["output"], ort_output(paths[1]), rtol=1e-5)

            # The registry dies: inference keeps serving what it has.
            os.kill(registry.pid, signal.SIGKILL)
            registry.wait(10)
            assert all(version_of(address) == "1" for _ in range(20))

        # Inference restarted while the registry is down: serves the cached version.
        with service(inference_args(registry_port, tmp_path / "inference"), logs) as (_, inf):
            address = inf["address"]
            assert version_of(address) == "1"
            assert "serving fraud as last seen" in logs.read_text()

            # The registry comes back on its port; a change made then is applied.
            with service(registry_args(tmp_path / "registry", registry_port), logs) as (_, _s):
                with RegistryClient(f"127.0.0.1:{registry_port}") as client:
                    client.set_alias(MODEL, "production", 2, expected_version=1)
                wait_until(lambda: version_of(address) == "2", timeout=40)
                with grpc.insecure_channel(address) as channel:
                    stub = pb_grpc.GRPCInferenceServiceStub(channel)
                    np.testing.assert_allclose(
                        output(stub.ModelInfer(fp32_request(MODEL, X), timeout=10)),
                        ort_output(paths[2]),
                        rtol=1e-5,
                    )


def test_an_unknown_model_stops_the_start_with_a_clear_message(tmp_path: Path) -> None:
    logs = tmp_path / "services.log"
    with service(registry_args(tmp_path / "registry"), logs) as (_, serving):
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "modelplane.cli.main",
                "serve",
                *inference_args(serving["port"], tmp_path / "inference"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert completed.returncode == 2
    assert "has no model 'fraud'" in completed.stderr
    assert "Traceback" not in completed.stderr


def _metadata():  # type: ignore[no-untyped-def]
    from modelplane.registry.v1 import registry_pb2 as rpb

    return rpb.UploadMetadata(model=MODEL)


__all__ = ["pb"]
