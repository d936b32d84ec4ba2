"""`modelplane up` (what `make run` starts): four processes, each SERVING, each
listing its API through reflection, the demo model answering, Ctrl-C stops all."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

pytestmark = pytest.mark.e2e

EXPECTED_SERVICES = {
    "registry": "modelplane.registry.v1.RegistryService",
    "feature": "modelplane.feature.v1.FeatureService",
    "inference": "inference.GRPCInferenceService",
    "monitoring": "modelplane.monitoring.v1.MonitoringService",
}


def _listed_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        return {s.name for r in responses for s in r.list_services_response.service}


def run_snippet(lines: list[str]) -> str:
    call = subprocess.run(
        ["bash", "-c", "".join(lines)], capture_output=True, text=True, timeout=60
    )
    assert call.returncode == 0, call.stderr
    return call.stdout


def numbers(printed: str) -> int:
    return len(re.findall(r"-?\d+\.\d*(?:e[-+]?\d+)?", printed))


TRITON_BY_ID = """
import sys, json
import numpy as np
import tritonclient.grpc as tc
client = tc.InferenceServerClient(sys.argv[1])
ids = tc.InferInput("customer_id", [3], "INT64")
ids.set_data_from_numpy(np.array([1, 2, 3], dtype=np.int64))
result = client.infer("fraud", [ids])
print(json.dumps({"version": result.get_response().model_version,
                  "probabilities": result.as_numpy("probabilities").tolist()}))
"""


def expected_fraud(feature: str, data_dir: Path) -> np.ndarray:
    """The fraud model (version 1, as `up` trained it) on customers 1-3's bundle tensor."""
    from modelplane.client.feature import FeatureClient

    with FeatureClient(feature, timeout=10) as client:
        tensor = client.get_bundle_tensor("customer_scorer", {"customer_id": [1, 2, 3]})
    model = data_dir / "training" / "fraud-v1.onnx"
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": tensor.values})[0]


def test_up_serves_all_four_and_stops_cleanly_on_ctrl_c(tmp_path):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelplane.cli.main",
            "up",
            "--any-ports",
            "--data-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        addresses: dict[str, str] = {}
        snippets: list[list[str]] = []
        commands: list[str] = []
        reports: list[str] = []
        inside = False
        assert process.stdout is not None
        for line in process.stdout:
            words = line.split()
            if len(words) >= 3 and words[0] in EXPECTED_SERVICES and words[1] == "grpc":
                addresses[words[0]] = words[2]
            if any(word in line for word in (" predict ", " models --", " rollout ", " summary ")):
                commands.append(line.strip())
            if " monitor report " in line:
                reports.append(line.strip())
            if line.rstrip().endswith("<<'PY'"):
                snippets.append([])
                inside = True
            if inside:
                snippets[-1].append(line)
                inside = line.rstrip("\n") != "PY"
            if line.startswith("Press Ctrl-C"):
                break
        assert len(snippets) == 2, "up prints a model call and a features-into-a-model call"
        assert set(addresses) == set(EXPECTED_SERVICES), addresses

        for name, address in addresses.items():
            with grpc.insecure_channel(address) as channel:
                status = (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(), timeout=10)
                    .status
                )
            assert status == health_pb2.HealthCheckResponse.SERVING, name
            assert EXPECTED_SERVICES[name] in _listed_services(address), name

        # The calls `make run` prints work, pasted as printed into a shell, against the demo
        # models and features it generated. They run in processes of their own anyway:
        # tritonclient registers Triton's descriptors for the `inference` package, which
        # clash with ours in one pool.
        model_call, features_call = (run_snippet(snippet) for snippet in snippets)
        assert model_call.startswith("[[") and numbers(model_call) == 8  # the (1, 8) output
        # Three customers' bundle tensors (3, 8), all features present, scored into (3, 2).
        assert features_call.startswith("[[") and numbers(features_call) == 6
        assert "nan" not in features_call

        # The models were registered in the registry and are served from it: the printed
        # CLI calls say which version and route answered and where the model came from.
        assert len(commands) == 5, commands
        predicted, listed, by_id = (run_snippet([command]) for command in commands[:3])
        assert "version 1" in predicted and "route production" in predicted, predicted
        assert "registry" in listed and "production" in listed, listed
        # The fraud model, trained and registered by `up`, predicts by customer id: the
        # inference service fetched customers 42 and 7's features, all present.
        assert "model fraud  version 1  route production" in by_id, by_id
        assert "probabilities  FP32 [2, 2]" in by_id and "feature_status  INT32 [2, 8]" in by_id
        assert "2" not in by_id.split("feature_status  INT32 [2, 8]")[1]  # every status is 1

        # The unmodified tritonclient predicts by customer id too, and gets what the model
        # computes on the bundle tensor the feature service serves.
        by_triton = subprocess.run(
            [sys.executable, "-c", TRITON_BY_ID, addresses["inference"]],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert by_triton.returncode == 0, by_triton.stderr
        answer = json.loads(by_triton.stdout)
        assert answer["version"] == "1"
        np.testing.assert_allclose(
            answer["probabilities"], expected_fraud(addresses["feature"], tmp_path), rtol=1e-5
        )

        # Every one of those five predictions reached monitoring, once.
        def logged() -> int:
            return int(json.loads(run_snippet([commands[3] + " --json"])).get("count", 0))

        deadline = time.monotonic() + 30
        while logged() < 5:  # customers 42 and 7, then 1, 2 and 3
            assert time.monotonic() < deadline, "the fraud predictions never reached monitoring"
            time.sleep(0.2)  # ok-sleep: polling monitoring until the records arrive
        assert logged() == 5

        # The printed report compares them with the training data the registry holds,
        # column by column, and writes the HTML report.
        (report_command,) = reports
        report = run_snippet([f"cd {tmp_path} && {report_command}"])
        assert "REGISTRY" in report.upper() and "customer_stats:trips_7d" in report, report
        assert "probabilities[1]" in report, report
        assert (tmp_path / "fraud-report.html").stat().st_size > 5_000

        assert "canary" in run_snippet([commands[4]])

        # The printed canary command sends about 10% of requests to version 2.
        from modelplane.client.inference import InferenceClient

        with InferenceClient(addresses["inference"], timeout=10) as client:

            def versions() -> set[str]:
                return {
                    client.predict_entities(
                        "fraud", {"customer_id": [1]}, routing_key=f"user-{n}"
                    ).model_version
                    for n in range(200)
                }

            deadline = time.monotonic() + 30
            while versions() != {"1", "2"}:
                assert time.monotonic() < deadline, "version 2 never answered"

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            # Ctrl-C first: `up` then stops its four children, which run in sessions of
            # their own and would outlive a killed `up`.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_up_with_tls_and_auth_from_the_environment(tmp_path):
    """With every service serving TLS with auth on, and the client settings (CA, token)
    in the environment, `up` checks health, registers the demo and materializes over
    them; the children call each other with the same credentials."""
    from modelplane.client.credentials import ClientCredentials
    from modelplane.kernel.auth import add_token
    from tests.certificates import CertificateAuthority

    ca = CertificateAuthority(tmp_path / "pki")
    server = ca.server()
    tokens = tmp_path / "tokens.jsonl"
    token = add_token(tokens, "operator", ["admin"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPLANE_")}
    for service in EXPECTED_SERVICES:
        prefix = f"MODELPLANE_{service.upper()}_"
        env[f"{prefix}TLS_CERT_FILE"] = str(server.cert)
        env[f"{prefix}TLS_KEY_FILE"] = str(server.key)
        env[f"{prefix}AUTH_TOKENS_FILE"] = str(tokens)
    env["MODELPLANE_TLS_CA"] = str(ca.cert_file)
    env["MODELPLANE_TOKEN"] = token
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelplane.cli.main",
            "up",
            "--any-ports",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        addresses: dict[str, str] = {}
        assert process.stdout is not None
        for line in process.stdout:
            words = line.split()
            if len(words) >= 3 and words[0] in EXPECTED_SERVICES and words[1] == "grpc":
                addresses[words[0]] = words[2]
            if line.startswith("Press Ctrl-C"):
                break
        assert set(addresses) == set(EXPECTED_SERVICES), addresses
        credentials = ClientCredentials(ca_file=ca.cert_file, token=token)
        for name, address in addresses.items():
            with credentials.channel(address) as channel:
                response = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
            assert response.status == health_pb2.HealthCheckResponse.SERVING, name
            with grpc.insecure_channel(address) as plain, pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
        # The demo was registered through TLS with the token: inference serves it.
        from modelplane.client.inference import InferenceClient

        with InferenceClient(addresses["inference"], timeout=10, credentials=credentials) as client:
            answer = client.predict_entities("fraud", {"customer_id": [1]})
        assert answer.model_version == "1"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
