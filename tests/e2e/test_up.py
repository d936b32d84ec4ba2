"""`modelplane up` (what `make run` starts): four processes, each SERVING, each
listing its API through reflection, the demo model answering, Ctrl-C stops all."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import grpc
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
        inside = False
        assert process.stdout is not None
        for line in process.stdout:
            words = line.split()
            if len(words) >= 3 and words[0] in EXPECTED_SERVICES and words[1] == "grpc":
                addresses[words[0]] = words[2]
            if " predict " in line or " models --address " in line:
                commands.append(line.strip())
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
        assert len(commands) == 2, commands
        predicted, listed = (run_snippet([command]) for command in commands)
        assert "version 1" in predicted and "route production" in predicted, predicted
        assert "registry" in listed and "production" in listed, listed

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
