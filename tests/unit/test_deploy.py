"""The compose file and Kubernetes manifests cannot run here (no Docker engine, no
cluster), so they are validated: every command parses with the real CLI, every
environment variable names a real setting, ports and probes agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from modelplane.cli.main import build_parser
from modelplane.cli.services import DEFAULT_PORTS, SERVICES, service_main

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def known_variables(service: str) -> set[str]:
    settings = service_main(service).Settings
    prefix = settings.model_config["env_prefix"]
    return {f"{prefix}{field.upper()}" for field in settings.model_fields}


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.mark.parametrize("service", SERVICES)
def test_compose_service_runs_a_valid_command_on_the_default_ports(compose, service):
    spec = compose["services"][service]
    args = build_parser().parse_args(spec["command"])
    assert (args.command, args.service) == ("serve", service)
    assert (args.port, args.metrics_port) == DEFAULT_PORTS[service]
    published = {int(p.split(":")[1]) for p in spec["ports"]}
    assert published == set(DEFAULT_PORTS[service])
    for env_file in spec["env_file"]:
        for line in (DEPLOY / env_file).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert line.split("=", 1)[0] in known_variables(service), line


@pytest.mark.parametrize("service", SERVICES)
def test_kubernetes_manifest_is_consistent(service):
    documents = list(yaml.safe_load_all((DEPLOY / "k8s" / f"{service}.yaml").read_text()))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    k8s_service = next(d for d in documents if d["kind"] == "Service")
    assert deployment["apiVersion"] == "apps/v1" and k8s_service["apiVersion"] == "v1"

    pod = deployment["spec"]["template"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    assert k8s_service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()

    container = pod["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.service) == ("serve", service)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    assert container["readinessProbe"]["grpc"]["port"] == args.port
    assert container["livenessProbe"]["grpc"]["port"] == args.port
    for variable in container["env"]:
        assert variable["name"] in known_variables(service), variable["name"]
    assert {p["targetPort"] for p in k8s_service["spec"]["ports"]} <= set(ports)
    # The pod must outlive the service's own drain period.
    grace = next(
        float(v["value"]) for v in container["env"] if v["name"].endswith("GRACE_PERIOD_S")
    )
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace
