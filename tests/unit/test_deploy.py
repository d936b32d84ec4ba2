"""deploy/ cannot run here (no Docker engine, no cluster), so it is validated.

Every Kubernetes manifest, the GPU overlay rendered by kustomize included, against the
Kubernetes schemas (kubernetes-validate, offline, strict: an unknown field fails);
compose.yaml against the Compose Specification's schema (vendored in schemas/). Every
command goes through the real CLI parser, every environment variable (container env,
ConfigMaps, env files, the image's ENV) must name a setting of its service, and the
settings each container would start with are built for real. Then what must agree is
checked together: ports, probes, metrics annotations and Prometheus targets; Services
and the pods they select; the autoscaler and its target; disruption budgets and
replicas; volumes, access modes and where each service keeps its state; the names
replicas keep their state under.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from modelplane.cli import auth_bootstrap, health
from modelplane.cli.main import build_parser
from modelplane.cli.serve import settings_from_args
from modelplane.cli.services import DEFAULT_PORTS, SERVICES, service_main
from modelplane.client import credentials as client_credentials
from modelplane.examples import features as demo_features
from modelplane.kernel import auth
from modelplane.services.feature.definitions import definitions_from_yaml
from modelplane.services.feature.domain import FeatureView

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_GPU = DEPLOY / "k8s-gpu"
DEPENDENCIES = K8S / "dependencies"
COMPOSE_SCHEMA = Path(__file__).resolve().parent / "schemas" / "compose-spec.json"

IMAGE = "modelplane"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
# The oldest Kubernetes the manifests promise to fit, and the newest the package knows.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
# Services whose state must outlive their pods.
STATEFUL = ("registry", "feature", "monitoring")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
# What the downward API gives a container, as the tests stand it in.
POD_FIELDS = {"metadata.name": "modelplane-pod-0", "metadata.namespace": "default"}
Doc = dict[str, Any]
# What every client reads (modelplane.client.credentials), not a service's setting.
CLIENT_VARIABLES = {
    client_credentials.ENV_CA,
    client_credentials.ENV_CERT,
    client_credentials.ENV_KEY,
    client_credentials.ENV_TLS,
    client_credentials.ENV_SERVER_NAME,
    client_credentials.ENV_TOKEN,
    client_credentials.ENV_TOKEN_FILE,
}
# The TLS Secret the operator (or cert-manager) makes; deploy/ only mounts it.
TLS_SECRET = "modelplane-tls"
TLS_SECRET_KEYS = {"tls.crt", "tls.key", "ca.crt"}
HEALTHCHECK = "/opt/modelplane/healthcheck.py"


# --- loading -----------------------------------------------------------------------------


def load_documents(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(directory: Path) -> Doc:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def files_of(directory: Path) -> list[Doc]:
    """The documents a patch-free kustomization lists (what `kubectl apply -k` applies)."""
    documents = []
    for resource in kustomization(directory)["resources"]:
        path = (directory / resource).resolve()
        documents += files_of(path) if path.is_dir() else load_documents(path)
    return documents


def kustomize(directory: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (for `kubectl kustomize`) is not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [d for d in yaml.safe_load_all(rendered.stdout) if d]


@cache
def _system(name: str) -> tuple[Doc, ...]:
    base = kustomize(K8S_GPU) if name == "gpu" else files_of(K8S)
    return tuple(base + files_of(DEPENDENCIES))


def system(name: str) -> list[Doc]:
    """Everything applied to a cluster: the services (CPU or GPU variant) + dependencies/."""
    return [dict(d) for d in _system(name)]


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def pod_template(workload: Doc) -> Doc:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]
    return workload["spec"]["template"]


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def all_containers(pod: Doc) -> list[Doc]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def runs_our_image(container: Doc) -> bool:
    return container["image"].rsplit("/", 1)[-1].split(":")[0] == IMAGE


def our_containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc, Doc]]:
    """(workload, pod template, container) for every container of the modelplane image."""
    for workload in workloads(docs):
        pod = pod_template(workload)
        for container in all_containers(pod):
            if runs_our_image(container):
                yield workload, pod, container


def served(docs: list[Doc], service: str) -> tuple[Doc, Doc, Doc]:
    """The one workload running `modelplane serve <service>`."""
    found = [(w, p, c) for w, p, c in our_containers(docs) if c["args"][:2] == ["serve", service]]
    assert len(found) == 1, f"{len(found)} workloads serve {service}"
    return found[0]


def selects(selector: dict[str, str], pod: Doc) -> bool:
    return selector.items() <= pod["metadata"].get("labels", {}).items()


# --- the image ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


@cache
def dockerfile_stages() -> dict[str, Doc]:
    """Per stage: its parent stage (if FROM names one), ENV, USER, ENTRYPOINT, COPYs."""
    stages: dict[str, Doc] = {}
    current: Doc | None = None
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            base, _, name = rest.partition(" AS ")
            current = {"parent": base.strip(), "env": {}, "copy": [], "order": len(stages)}
            stages[name.strip()] = current
        elif current is None:
            continue
        elif keyword == "ENV":
            current["env"].update(dict(item.split("=", 1) for item in shlex.split(rest)))
        elif keyword in ("USER", "ENTRYPOINT", "CMD", "WORKDIR"):
            current[keyword.lower()] = rest
        elif keyword == "COPY":
            current["copy"].append(shlex.split(rest))
    return stages


def stage_setting(stage: str, key: str) -> Any:
    """A stage's own value, else the one it inherits from its parent stage."""
    stages = dockerfile_stages()
    while stage in stages:
        if key in stages[stage]:
            return stages[stage][key]
        stage = stages[stage]["parent"]
    return None


def image_env(stage: str = "cpu") -> dict[str, str]:
    stages = dockerfile_stages()
    chain = []
    while stage in stages:
        chain.append(stages[stage]["env"])
        stage = stages[stage]["parent"]
    env: dict[str, str] = {}
    for layer in reversed(chain):
        env.update(layer)
    return env


# --- settings ----------------------------------------------------------------------------


def known_variables(service: str) -> set[str]:
    settings = service_main(service).Settings
    prefix = settings.model_config["env_prefix"]
    return {f"{prefix}{field.upper()}" for field in settings.model_fields}


def service_of_variable(name: str) -> str | None:
    return next((s for s in SERVICES if name in known_variables(s)), None)


def effective_settings(monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str]):
    """The Settings `modelplane <args>` would run with in this environment, built by the
    CLI's own code (a bad value fails here as it would at start)."""
    parsed = build_parser().parse_args(args)
    assert parsed.command == "serve", args
    for key in list(os.environ):
        if key.startswith("MODELPLANE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return settings_from_args(parsed.service_module, parsed)


def secret_value(docs: list[Doc], name: str, key: str) -> str:
    secret = find(docs, "Secret", name)
    assert key in secret.get("stringData", {}), f"Secret {name} has no key {key}"
    return secret["stringData"][key]


def container_env(docs: list[Doc], container: Doc, stage: str) -> tuple[dict[str, str], set[str]]:
    """The environment the process sees (image ENV first) and the names the manifest sets."""
    env = image_env(stage)
    declared: set[str] = set()
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = find(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
        else:
            data = find(docs, "Secret", source["secretRef"]["name"])["stringData"]
        env.update(data)
        declared |= set(data)
    for variable in container.get("env", []):
        declared.add(variable["name"])
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        ref = variable["valueFrom"]
        if "secretKeyRef" in ref:
            key_ref = ref["secretKeyRef"]
            env[variable["name"]] = secret_value(docs, key_ref["name"], key_ref["key"])
        elif "fieldRef" in ref:
            env[variable["name"]] = POD_FIELDS[ref["fieldRef"]["fieldPath"]]
        else:
            key_ref = ref["configMapKeyRef"]
            env[variable["name"]] = find(docs, "ConfigMap", key_ref["name"])["data"][key_ref["key"]]
    return env, declared


def image_stage(container: Doc) -> str:
    tag = container["image"].rsplit(":", 1)[-1]
    return "gpu" if tag.endswith("-gpu") else "cpu"


def pre_stop_sleep(container: Doc) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    return float(command[1]) if command and command[0] == "sleep" else 0.0


def mount_for(pod: Doc, container: Doc, path: Path | str) -> tuple[Doc, Doc] | None:
    """(volumeMount, volume) holding `path` in the container, the deepest mount first."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    target = PurePosixPath(str(path))
    best = None
    for mount in container.get("volumeMounts", []):
        mount_path = PurePosixPath(mount["mountPath"])
        if (target == mount_path or mount_path in target.parents) and (
            best is None or len(mount_path.parts) > len(PurePosixPath(best[0]["mountPath"]).parts)
        ):
            best = (mount, volumes[mount["name"]])
    return best


def on_claim(pod: Doc, container: Doc, path: Path | str, writable: bool = True) -> Doc:
    """Asserts `path` lives on a PersistentVolumeClaim; returns the volume."""
    found = mount_for(pod, container, path)
    assert found is not None, f"{path} is on the container's own filesystem"
    mount, volume = found
    assert "persistentVolumeClaim" in volume, f"{path} is on {volume}, not a claim"
    if writable:
        assert not mount.get("readOnly"), f"{path} is mounted read-only"
    return volume


def replicas_of(docs: list[Doc], workload: Doc) -> int:
    """Replicas, or the autoscaler's minimum when one scales the workload."""
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        if (target["kind"], target["name"]) == (workload["kind"], workload["metadata"]["name"]):
            return hpa["spec"].get("minReplicas", 1)
    return workload["spec"].get("replicas", 1)


def service_address(docs: list[Doc], address: str) -> tuple[Doc, int]:
    """The Service an in-cluster HOST:PORT names, and the port."""
    host, port = address.rsplit(":", 1)
    service = find(docs, "Service", host.split(".")[0])
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}, address
    return service, int(port)


def pods_behind(docs: list[Doc], service: Doc) -> list[Doc]:
    return [
        pod_template(w)
        for w in workloads(docs)
        if selects(service["spec"]["selector"], pod_template(w))
    ]


# --- Kubernetes: files and schemas -------------------------------------------------------

MANIFEST_FILES = sorted(
    p
    for d in (K8S, DEPENDENCIES, K8S_GPU)
    for p in d.glob("*.yaml")
    if p.name != "kustomization.yaml"
)
PATCHES = {K8S_GPU / p["path"] for p in kustomization(K8S_GPU).get("patches", [])}


@pytest.mark.parametrize("directory", [K8S, DEPENDENCIES], ids=lambda d: d.name)
def test_each_kustomization_lists_every_manifest_beside_it(directory):
    listed = {r for r in kustomization(directory)["resources"] if not (directory / r).is_dir()}
    beside = {p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == beside


def test_the_gpu_overlay_is_the_base_with_patches():
    overlay = kustomization(K8S_GPU)
    assert [(K8S_GPU / r).resolve() for r in overlay["resources"]] == [K8S]
    beside = {p for p in K8S_GPU.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert beside == PATCHES and all(p.exists() for p in PATCHES)


@pytest.mark.parametrize("directory", [K8S, DEPENDENCIES], ids=lambda d: d.name)
def test_kustomize_renders_the_listed_files_unchanged(directory):
    rendered = kustomize(directory)
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(rendered, key=key) == sorted(files_of(directory), key=key)


@pytest.mark.parametrize(
    "path",
    [p for p in MANIFEST_FILES if p not in PATCHES],
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_matches_the_kubernetes_schema(path, version):
    for document in load_documents(path):
        kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_rendered_gpu_variant_matches_the_kubernetes_schema(version):
    for document in kustomize(K8S_GPU):
        kubernetes_validate.validate(document, version, strict=True)


def test_the_schema_check_catches_a_misspelt_field():
    deployment = find(files_of(K8S), "Deployment", "modelplane-registry")
    pod = json.loads(json.dumps(pod_template(deployment)))
    pod["spec"]["containers"][0]["readinesProbe"] = pod["spec"]["containers"][0].pop(
        "readinessProbe"
    )
    broken = {**deployment, "spec": {**deployment["spec"], "template": pod}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


# --- Kubernetes: every modelplane container ----------------------------------------------

VARIANTS = ("cpu", "gpu")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_runs_a_valid_command_with_known_settings(variant, monkeypatch):
    docs = system(variant)
    served_services = set()
    for workload, pod, container in our_containers(docs):
        name = f"{workload['metadata']['name']}/{container['name']}"
        assert container["image"].split(":")[-1] in (VERSION, f"{VERSION}-gpu"), name
        args = build_parser().parse_args(container["args"])
        env, declared = container_env(docs, container, image_stage(container))
        if args.command != "serve":
            unknown = declared - CLIENT_VARIABLES
            assert not unknown, f"{name}: settings for a client command: {sorted(unknown)}"
            continue
        served_services.add(args.service)
        unknown = declared - known_variables(args.service) - CLIENT_VARIABLES
        assert not unknown, f"{name}: {sorted(unknown)} are not settings of {args.service}"
        effective_settings(monkeypatch, container["args"], env)
        # Service links would inject MODELPLANE_<SERVICE>_PORT=tcp://... (a setting's name).
        assert pod["spec"].get("enableServiceLinks") is False, name
    assert served_services == set(SERVICES)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_configmap_is_used_and_its_variables_exist(variant):
    docs = system(variant)
    used: set[str] = set()
    for _, pod, container in our_containers(docs):
        service = container["args"][1] if container["args"][0] == "serve" else None
        for source in container.get("envFrom", []):
            name = source["configMapRef"]["name"]
            used.add(name)
            assert service is not None
            unknown = set(find(docs, "ConfigMap", name)["data"]) - known_variables(service)
            assert not unknown, f"ConfigMap {name}: {sorted(unknown)}"
        for volume in pod["spec"].get("volumes", []):
            if "configMap" in volume:
                used.add(volume["configMap"]["name"])
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert configmaps == used


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", SERVICES)
def test_ports_probes_and_metrics_agree(variant, service, monkeypatch):
    docs = system(variant)
    workload, pod, container = served(docs, service)
    env, _ = container_env(docs, container, image_stage(container))
    settings = effective_settings(monkeypatch, container["args"], env)
    assert settings.host == "0.0.0.0"
    assert (settings.port, settings.metrics_port) == DEFAULT_PORTS[service]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # Exec probes: the kubelet's gRPC probes speak plaintext, and the port is TLS.
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["python", HEALTHCHECK], probe
        assert HEALTHCHECK in {c[-1] for c in dockerfile_stages()["runtime"]["copy"]}
        parser = argparse.ArgumentParser()
        health.add_arguments(parser)
        asked = parser.parse_args(command[2:])
        assert asked.address == f"127.0.0.1:{settings.port}", probe
        # The name checked in the certificate is the Service's, the one clients dial.
        probed = find(docs, "Service", asked.server_name)
        assert pod in pods_behind(docs, probed), probe
        assert container[probe]["timeoutSeconds"] > asked.timeout, probe
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # The pod must outlive the endpoint drain (preStop) plus the service's own drain.
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.grace_period_s + pre_stop_sleep(container)
    # Monitoring replicas keep their state under their names (see its own test).
    assert workload["kind"] == ("StatefulSet" if service == "monitoring" else "Deployment")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_has_resources_and_runs_unprivileged(variant):
    docs = system(variant)
    for workload, pod, container in our_containers(docs):
        name = f"{workload['metadata']['name']}/{container['name']}"
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), name
        assert "memory" in resources["limits"], name
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True, name
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_the_feature_service_gets_a_whole_cpu_of_its_own(monkeypatch):
    docs = system("cpu")
    _, _, container = served(docs, "feature")
    resources = container["resources"]
    # Guaranteed QoS with an integer CPU: the static CPU manager pins it (README, Feature).
    assert resources["requests"] == resources["limits"]
    assert cpus(resources["limits"]["cpu"]) == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_threads_fit_its_cpu_request(variant, monkeypatch):
    docs = system(variant)
    _, _, container = served(docs, "inference")
    env, _ = container_env(docs, container, image_stage(container))
    settings = effective_settings(monkeypatch, container["args"], env)
    assert 1 <= settings.thread_budget <= cpus(container["resources"]["requests"]["cpu"])
    assert settings.workers == 1  # scaled by pods (the autoscaler), not processes


# --- Kubernetes: state, stores and the calls between services ----------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", STATEFUL)
def test_no_stateful_service_keeps_state_on_emptydir(variant, service):
    docs = system(variant)
    _, pod, container = served(docs, service)
    for mount in container.get("volumeMounts", []):
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
        if "emptyDir" in volume:
            assert mount["mountPath"] == "/tmp", f"{service}: emptyDir at {mount['mountPath']}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_registry_keeps_metadata_in_postgresql_and_artifacts_on_a_claim(variant, monkeypatch):
    docs = system(variant)
    _, pod, container = served(docs, "registry")
    env, _ = container_env(docs, container, "cpu")
    settings = effective_settings(monkeypatch, container["args"], env)
    assert settings.database_url.startswith("postgresql://")
    service_address(docs, urlsplit(settings.database_url).netloc.rsplit("@", 1)[-1])
    on_claim(pod, container, settings.artifact_dir or settings.data_dir / "artifacts")


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_feature_service_shares_postgresql_redis_and_its_files(variant, monkeypatch):
    docs = system(variant)
    _, pod, container = served(docs, "feature")
    env, _ = container_env(docs, container, "cpu")
    settings = effective_settings(monkeypatch, container["args"], env)
    assert settings.definitions_db.startswith("postgresql://")
    service_address(docs, urlsplit(settings.definitions_db).netloc.rsplit("@", 1)[-1])
    assert settings.online_store.startswith("redis://")
    service_address(docs, urlsplit(settings.online_store).netloc.rsplit("@", 1)[-1])
    files = on_claim(pod, container, settings.files_dir)

    # The definitions file comes from a ConfigMap, the same text compose mounts, and every
    # source it names is on the shared files volume.
    mount, volume = mount_for(pod, container, settings.definitions_file) or ({}, {})
    assert mount.get("readOnly") and "configMap" in volume, settings.definitions_file
    relative = PurePosixPath(settings.definitions_file).relative_to(mount["mountPath"])
    text = find(docs, "ConfigMap", volume["configMap"]["name"])["data"][str(relative)]
    assert text == (DEPLOY / "config" / "features.yaml").read_text()
    views = [d for d in definitions_from_yaml(text) if isinstance(d, FeatureView)]
    assert views
    for view in views:
        assert view.source is not None
        assert on_claim(pod, container, view.source.path, writable=False) == files


@pytest.mark.parametrize("variant", VARIANTS)
def test_monitoring_replicas_share_postgresql_under_their_pod_names(variant, monkeypatch):
    docs = system(variant)
    workload, pod, container = served(docs, "monitoring")
    env, _ = container_env(docs, container, "cpu")
    settings = effective_settings(monkeypatch, container["args"], env)
    # Everything in PostgreSQL, in a schema of its own; nothing on the pod.
    assert settings.database.startswith("postgresql://")
    service_address(docs, urlsplit(settings.database).netloc.rsplit("@", 1)[-1])
    assert settings.database_schema == "monitoring"
    for volume in pod["spec"].get("volumes", []):
        assert "persistentVolumeClaim" not in volume, volume["name"]
    assert not workload["spec"].get("volumeClaimTemplates")
    # Each replica's statistics and checkpoint are kept, and replayed after a crash,
    # under its replica id: the pod's name, which only a StatefulSet gives back to the
    # replacement pod (and never to two pods at once).
    assert workload["kind"] == "StatefulSet"
    (replica_id,) = [v for v in container["env"] if v["name"] == "MODELPLANE_MONITORING_REPLICA_ID"]
    assert replica_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert settings.replica_id == POD_FIELDS["metadata.name"]
    # The StatefulSet's governing Service is headless and selects its pods.
    governing = find(docs, "Service", workload["spec"]["serviceName"])
    assert governing["spec"].get("clusterIP") == "None"
    assert pods_behind(docs, governing) == [pod]
    # References come from the registry, through its Service.
    assert settings.registry
    service, port = service_address(docs, settings.registry)
    assert pods_behind(docs, service) == [served(docs, "registry")[1]]
    assert port == DEFAULT_PORTS["registry"][0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_reaches_registry_feature_and_monitoring_through_their_services(
    variant, monkeypatch
):
    docs = system(variant)
    _, pod, container = served(docs, "inference")
    env, _ = container_env(docs, container, image_stage(container))
    settings = effective_settings(monkeypatch, container["args"], env)
    assert settings.model_control_mode == "registry"
    for service_name, address in (
        ("registry", settings.registry),
        ("feature", settings.feature_service),
        ("monitoring", settings.monitoring),
    ):
        service, port = service_address(docs, address)
        assert pods_behind(docs, service) == [served(docs, service_name)[1]], address
        assert port == DEFAULT_PORTS[service_name][0]
    # The artifact cache is writable (the root filesystem is not).
    assert mount_for(pod, container, settings.cache_path) is not None


def test_the_materialization_job_calls_the_feature_service():
    docs = system("cpu")
    jobs = [
        (w, c) for w, _, c in our_containers(docs) if c["args"][:2] == ["features", "materialize"]
    ]
    assert len(jobs) == 1
    workload, container = jobs[0]
    assert workload["kind"] == "CronJob" and workload["spec"]["concurrencyPolicy"] == "Forbid"
    args = build_parser().parse_args(container["args"])
    service, _ = service_address(docs, args.address)
    assert served(docs, "feature")[1] in pods_behind(docs, service)


def test_the_demo_secrets_point_at_the_demo_stores():
    docs = files_of(DEPENDENCIES)
    postgres = find(docs, "Secret", "modelplane-postgres")["stringData"]
    for key in ("registry-url", "feature-url", "monitoring-url"):
        url = urlsplit(secret_value(docs, "modelplane-database", key))
        assert (url.username, url.password) == (postgres["user"], postgres["password"])
        assert url.path == f"/{postgres['database']}"
        service, port = service_address(docs, f"{url.hostname}:{url.port}")
        assert pods_behind(docs, service) and port == 5432
    redis = urlsplit(secret_value(docs, "modelplane-redis", "url"))
    assert pods_behind(docs, service_address(docs, f"{redis.hostname}:{redis.port}")[0])


def test_the_services_read_only_the_secrets_dependencies_makes():
    referenced = set()
    for _, _, container in our_containers(files_of(K8S)):
        for variable in container.get("env", []):
            ref = variable.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                referenced.add((ref["name"], ref["key"]))
    made = {
        (d["metadata"]["name"], key)
        for d in files_of(DEPENDENCIES)
        if d["kind"] == "Secret"
        for key in d["stringData"]
    }
    assert referenced and referenced <= made


# --- Kubernetes: Services, autoscaler, disruption budgets, volumes -----------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_service_selects_pods_that_have_its_target_ports(variant):
    docs = system(variant)
    for service in (d for d in docs if d["kind"] == "Service"):
        pods = pods_behind(docs, service)
        assert pods, f"Service {service['metadata']['name']} selects no pod"
        for pod in pods:
            names = {p.get("name") for c in pod["spec"]["containers"] for p in c.get("ports", [])}
            numbers = {p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in names | numbers, service["metadata"]["name"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_has_a_headless_service_for_client_side_balancing(variant):
    docs = system(variant)
    _, pod, _ = served(docs, "inference")
    headless = [
        d
        for d in docs
        if d["kind"] == "Service"
        and d["spec"].get("clusterIP") == "None"
        and selects(d["spec"]["selector"], pod)
    ]
    assert len(headless) == 1
    assert {p["targetPort"] for p in headless[0]["spec"]["ports"]} == {"grpc"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_autoscaler_scales_inference_on_cpu(variant):
    docs = system(variant)
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    deployment = find(docs, target["kind"], target["name"])
    assert deployment is served(docs, "inference")[0]
    # A replica count in the manifest would reset the autoscaler's on every apply.
    assert "replicas" not in deployment["spec"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    for container in pod_template(deployment)["spec"]["containers"]:
        assert "cpu" in container["resources"]["requests"]  # utilization is of the request


@pytest.mark.parametrize("variant", VARIANTS)
def test_disruption_budgets_cover_replicated_services_and_allow_a_drain(variant):
    docs = system(variant)
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    covered = set()
    for budget in budgets:
        selector = budget["spec"]["selector"]["matchLabels"]
        (workload,) = [w for w in workloads(docs) if selects(selector, pod_template(w))]
        covered.add(workload["metadata"]["name"])
        replicas = replicas_of(docs, workload)
        if "minAvailable" in budget["spec"]:
            assert budget["spec"]["minAvailable"] < replicas, budget["metadata"]["name"]
        else:
            assert budget["spec"]["maxUnavailable"] >= 1
    for workload, _, container in our_containers(docs):
        if container["args"][0] == "serve" and replicas_of(docs, workload) > 1:
            assert workload["metadata"]["name"] in covered


@pytest.mark.parametrize("variant", VARIANTS)
def test_claims_exist_and_their_access_modes_fit_the_replicas(variant):
    docs = system(variant)
    for workload in (d for d in docs if d["kind"] == "Deployment"):
        for volume in pod_template(workload)["spec"].get("volumes", []):
            if "persistentVolumeClaim" not in volume:
                continue
            claim = find(
                docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]
            )
            modes = set(claim["spec"]["accessModes"])
            if replicas_of(docs, workload) > 1:
                assert modes & {"ReadWriteMany", "ReadOnlyMany"}, claim["metadata"]["name"]
            if modes == {"ReadWriteOnce"}:
                # One node mounts it: a rolling update would wait for the old pod forever.
                assert replicas_of(docs, workload) == 1
                assert workload["spec"]["strategy"]["type"] == "Recreate"


def test_the_gpu_variant_asks_for_a_gpu_and_cuda(monkeypatch):
    docs = system("gpu")
    _, pod, container = served(docs, "inference")
    assert container["image"] == f"{IMAGE}:{VERSION}-gpu"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    env, _ = container_env(docs, container, "gpu")
    assert effective_settings(monkeypatch, container["args"], env).execution_provider == "cuda"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["spec"]["tolerations"])
    # The rest of the system is the CPU variant's; the patch repeats the CPU arguments
    # (a strategic merge replaces a list of strings whole) and adds the provider only.
    cpu = system("cpu")
    args = list(container["args"])
    at = args.index("--execution-provider")
    del args[at : at + 2]
    assert args == served(cpu, "inference")[2]["args"]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, docs)) == sorted(map(key, cpu))
    for service in ("registry", "feature", "monitoring"):
        assert served(docs, service)[2] == served(cpu, service)[2]


def test_the_cpu_variant_asks_for_no_gpu():
    for _, _, container in our_containers(system("cpu")):
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
        assert container["image"] == f"{IMAGE}:{VERSION}"


# --- the Dockerfile ----------------------------------------------------------------------


def test_the_image_sets_only_known_variables_and_container_defaults():
    env = image_env("cpu")
    ours = {k for k in env if k.startswith("MODELPLANE_")}
    for name in ours:
        assert service_of_variable(name), f"{name} is no service's setting"
    for service in SERVICES:
        prefix = f"MODELPLANE_{service.upper()}_"
        assert env[f"{prefix}HOST"] == "0.0.0.0"
        assert env[f"{prefix}DATA_DIR"] == "/data"
    assert "/opt/venv/bin" in env["PATH"].split(":")


def test_the_default_target_and_the_gpu_target_run_modelplane_unprivileged():
    stages = dockerfile_stages()
    assert max(stages, key=lambda s: stages[s]["order"]) == "cpu"  # the default target
    for stage in ("cpu", "gpu"):
        uid = stage_setting(stage, "user").split(":")[0]
        assert uid.isdigit() and int(uid) != 0, stage
        entrypoint = json.loads(stage_setting(stage, "entrypoint"))
        # compose and Kubernetes give only arguments: `serve <service> ...`.
        assert entrypoint[-1] == "modelplane", stage
        copies = stages[stage]["copy"]
        assert any(
            c[0].startswith("--from=build") and c[1:] == ["/opt/venv", "/opt/venv"] for c in copies
        )


def test_the_build_context_holds_what_the_dockerfile_copies():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:] for line in ignore if line.startswith("!")}
    assert "*" in ignore  # everything else (.venv, .modelplane, caches) stays out
    for stage in dockerfile_stages().values():
        for copy in stage["copy"]:
            if copy[0].startswith("--from="):
                continue
            for source in copy[:-1]:
                assert (REPO / source).exists(), source
                assert source.strip("./") in kept, f"{source} is not in the build context"


# --- compose -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Doc:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default}, with the defaults (the variables unset)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def compose_env(spec: Doc) -> dict[str, str]:
    env: dict[str, str] = {}
    for env_file in spec.get("env_file", []):
        for line in (DEPLOY / env_file).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, value = line.split("=", 1)
                env[key] = value
    environment = spec.get("environment", {})
    assert isinstance(environment, dict)
    env.update({k: interpolate(str(v)) for k, v in environment.items()})
    return env


def compose_host(compose: Doc, address: str) -> str:
    host = urlsplit(address if "//" in address else f"//{address}").hostname
    assert host in compose["services"], f"{address}: no compose service {host}"
    return host


def test_compose_matches_the_compose_specification(compose):
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.validate(compose, schema, cls=jsonschema.Draft7Validator)
    broken = json.loads(json.dumps(compose))
    broken["services"]["registry"]["comand"] = broken["services"]["registry"].pop("command")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft7Validator)


@pytest.mark.parametrize("service", SERVICES)
def test_compose_service_runs_a_valid_command_on_the_default_ports(compose, service, monkeypatch):
    spec = compose["services"][service]
    assert spec["image"] == f"{IMAGE}:{VERSION}"
    env = compose_env(spec)
    unknown = set(env) - known_variables(service) - CLIENT_VARIABLES
    assert not unknown, f"{service}: {sorted(unknown)}"
    settings = effective_settings(monkeypatch, spec["command"], {**image_env("cpu"), **env})
    assert settings.host == "0.0.0.0"
    assert (settings.port, settings.metrics_port) == DEFAULT_PORTS[service]
    published = {(p.split(":")[0], int(p.split(":")[-1])) for p in spec["ports"]}
    assert published == {("127.0.0.1", port) for port in DEFAULT_PORTS[service]}
    # Docker's stop timeout must cover the service's own drain.
    assert float(spec["stop_grace_period"].rstrip("s")) > settings.grace_period_s
    # Spans go to the collector.
    assert compose_host(compose, settings.otlp_endpoint) == "otel-collector"
    # The healthcheck asks this service's port with the script the image carries.
    test = spec["healthcheck"]["test"]
    script = next(c[-1] for c in dockerfile_stages()["runtime"]["copy"] if "healthcheck" in c[0])
    assert test[:3] == ["CMD", "python", script]
    # Run by path, the script's folder comes first on sys.path: a script named like a
    # module it imports (grpc_health.py) would import itself.
    assert importlib.util.find_spec(PurePosixPath(script).stem) is None, script
    assert test[3] == f"127.0.0.1:{settings.port}"
    for volume in spec.get("volumes", []):
        name, _ = volume.split(":", 1)
        assert name in compose["volumes"], volume
    for dependency in spec.get("depends_on", {}):
        assert dependency in compose["services"]


def test_compose_stores_are_the_shared_ones(compose, monkeypatch):
    services = compose["services"]

    def settings(name: str) -> Any:
        spec = services[name]
        return effective_settings(
            monkeypatch, spec["command"], {**image_env("cpu"), **compose_env(spec)}
        )

    registry = settings("registry")
    assert compose_host(compose, registry.database_url) == "postgres"
    assert "/data" in {v.split(":")[1] for v in services["registry"]["volumes"]}

    feature = settings("feature")
    assert compose_host(compose, feature.definitions_db) == "postgres"
    assert compose_host(compose, feature.online_store) == "redis"
    (definitions,) = services["feature"]["configs"]
    assert definitions["target"] == feature.definitions_file
    source = compose["configs"][definitions["source"]]["file"]
    assert (DEPLOY / source).resolve() == DEPLOY / "config" / "features.yaml"
    (files,) = [v for v in services["feature"]["volumes"] if v.startswith("feature-files:")]
    files_mount = files.split(":")[1]
    assert feature.files_dir == files_mount
    for view in definitions_from_yaml((DEPLOY / source).read_text()):
        if isinstance(view, FeatureView) and view.source is not None:
            assert PurePosixPath(files_mount) in PurePosixPath(view.source.path).parents

    inference = settings("inference")
    assert inference.model_control_mode == "registry"
    monitoring = settings("monitoring")
    for address, callee, port in (
        (inference.registry, "registry", registry.port),
        (inference.feature_service, "feature", feature.port),
        (inference.monitoring, "monitoring", monitoring.port),
    ):
        assert compose_host(compose, address) == callee
        assert address.endswith(f":{port}")

    assert compose_host(compose, monitoring.database) == "postgres"
    assert monitoring.database_schema == "monitoring"
    # A fixed replica id: the default, the host name, is the container id, which a
    # recreated container does not keep (and a crashed replica is replayed by its id).
    assert monitoring.replica_id
    assert compose_host(compose, monitoring.registry) == "registry"
    assert monitoring.registry.endswith(f":{registry.port}")

    # Every password the services use is the one PostgreSQL starts with.
    password = interpolate(services["postgres"]["environment"]["POSTGRES_PASSWORD"])
    for url in (registry.database_url, feature.definitions_db, monitoring.database):
        assert urlsplit(url).password == password


@pytest.mark.parametrize("service", SERVICES)
def test_compose_services_serve_tls_with_auth_on_from_the_bootstrapped_volume(
    compose, service, monkeypatch
):
    services = compose["services"]
    boot = services["credentials"]
    assert boot["command"][:2] == ["auth", "bootstrap"]
    (volume,) = boot["volumes"]
    name, mount = volume.split(":")
    spec = services[service]
    assert f"{name}:{mount}:ro" in spec["volumes"]
    assert spec["depends_on"]["credentials"] == {"condition": "service_completed_successfully"}
    env = compose_env(spec)
    settings = effective_settings(monkeypatch, spec["command"], {**image_env("cpu"), **env})
    root = PurePosixPath(boot["command"][2])
    assert PurePosixPath(mount) == root
    # The files `modelplane auth bootstrap` writes (tested in
    # tests/integration/registry/test_auth_bootstrap.py).
    assert PurePosixPath(str(settings.auth_tokens_file)) == root / "tokens.jsonl"
    assert PurePosixPath(str(settings.tls_cert_file)) == root / "server.crt"
    assert PurePosixPath(str(settings.tls_key_file)) == root / "server.key"
    assert PurePosixPath(env[client_credentials.ENV_CA]) == root / "ca.crt"
    # The services that call others do so with their own token (the health probe needs
    # none: health stays open).
    token = env.get(client_credentials.ENV_TOKEN_FILE)
    callers = {"inference": "inference", "monitoring": "monitoring"}
    if service in callers:
        assert token is not None
        assert PurePosixPath(token) == root / "tokens" / f"{callers[service]}.token"
        assert callers[service] in auth_bootstrap.PRINCIPALS
    else:
        assert token is None
    # The image makes the mount point the services' user owns, so a new volume is theirs.
    runs = [rest for keyword, rest in dockerfile_instructions() if keyword == "RUN"]
    assert any("mkdir -p" in r and mount in r and "chown -R 10001:10001" in r for r in runs)


def test_the_deployed_definitions_are_the_demos_with_sources_on_the_files_volume():
    deployed = yaml.safe_load((DEPLOY / "config" / "features.yaml").read_text())
    demo = yaml.safe_load(demo_features.DEFINITIONS)
    for document, root in ((deployed, "/files/sources"), (demo, "")):
        for view in document["feature_views"]:
            path = PurePosixPath(view["source"].pop("path"))
            assert path.parent == PurePosixPath(root or ".") and path.name.endswith(".parquet")
    assert deployed == demo


def test_every_compose_helper_is_used_and_checked(compose):
    services = compose["services"]
    ours = set(SERVICES)
    mentioned: set[str] = set()
    for name in ours:
        spec = services[name]
        mentioned |= set(spec.get("depends_on", {}))
        for value in [*spec["command"], *compose_env(spec).values()]:
            mentioned |= {s for s in services if re.search(rf"\b{re.escape(s)}:\d+", value)}
    helpers = set(services) - ours
    # otel-collector forwards to jaeger; prometheus scrapes the services.
    assert helpers - mentioned == {"jaeger", "prometheus"}
    assert "jaeger" in services["otel-collector"]["depends_on"]
    for name in ("postgres", "redis", "prometheus", *ours):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name


def test_prometheus_scrapes_every_metrics_port(compose):
    config = yaml.safe_load((DEPLOY / "observability" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "modelplane"]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    expected = {f"{s}:{DEFAULT_PORTS[s][1]}" for s in SERVICES}
    assert targets == expected
    (mount,) = compose["services"]["prometheus"]["configs"]
    assert compose["configs"][mount["source"]]["file"] == "./observability/prometheus.yml"
    assert f"--config.file={mount['target']}" in compose["services"]["prometheus"]["command"]


def test_the_collector_pipeline_receives_otlp_and_exports_to_jaeger(compose):
    config = yaml.safe_load((DEPLOY / "observability" / "otel-collector.yaml").read_text())
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline[kind]:
                assert component in config[kind], f"{kind}: {component} is not configured"
    grpc_endpoint = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    for service in SERVICES:
        endpoint = compose_env(compose["services"][service])[
            f"MODELPLANE_{service.upper()}_OTLP_ENDPOINT"
        ]
        assert urlsplit(endpoint).port == int(grpc_endpoint.rsplit(":", 1)[1])
    for name, exporter in config["exporters"].items():
        if name.startswith("otlp"):
            compose_host(compose, exporter["endpoint"])
    (mount,) = compose["services"]["otel-collector"]["configs"]
    assert compose["configs"][mount["source"]]["file"] == "./observability/otel-collector.yaml"
    assert compose["services"]["otel-collector"]["command"] == [f"--config={mount['target']}"]


# --- Kubernetes: authentication and TLS ----------------------------------------------------


def secret_mount(docs: list[Doc], pod: Doc, container: Doc, path: str) -> tuple[str, str]:
    """(Secret name, key) of the read-only Secret volume file at `path`."""
    found = mount_for(pod, container, path)
    assert found is not None, f"{path} is not mounted"
    mount, volume = found
    assert mount.get("readOnly") is True, path
    assert "secret" in volume, f"{path} is on {volume}, not a Secret"
    name = volume["secret"]["secretName"]
    relative = str(PurePosixPath(path).relative_to(mount["mountPath"]))
    items = volume["secret"].get("items")
    if items is not None:
        (key,) = [i["key"] for i in items if i["path"] == relative]
    else:
        key = relative
    if name == TLS_SECRET:
        assert key in TLS_SECRET_KEYS, path
    else:
        secret_value(docs, name, key)  # made by dependencies/
    return name, key


def token_store(docs: list[Doc], tmp_path: Path, secret: str, key: str) -> auth.TokenStore:
    path = tmp_path / f"{secret}-{key}"
    path.write_text(secret_value(docs, secret, key))
    return auth.TokenStore(path)


def secrets_readable(pod: Doc) -> None:
    """Secret volumes are readable by the process: by everyone, or by its fsGroup."""
    fs_group = pod["spec"]["securityContext"].get("fsGroup")
    for volume in pod["spec"].get("volumes", []):
        if "secret" in volume:
            mode = volume["secret"].get("defaultMode", 0o644)
            assert mode & 0o004 or (fs_group == 10001 and mode & 0o040), volume["name"]


# The RPCs each caller in the cluster makes.
CALLS = {
    "inference": [
        "/modelplane.registry.v1.RegistryService/WatchModel",
        "/modelplane.registry.v1.RegistryService/GetVersion",
        "/modelplane.registry.v1.RegistryService/DownloadArtifact",
        "/modelplane.feature.v1.FeatureService/GetBundleTensor",
        "/modelplane.monitoring.v1.MonitoringService/LogPredictions",
    ],
    "monitoring": [
        "/modelplane.registry.v1.RegistryService/GetVersion",
        "/modelplane.registry.v1.RegistryService/DownloadArtifact",
    ],
    "materialize": ["/modelplane.feature.v1.FeatureService/Materialize"],
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", SERVICES)
def test_every_service_serves_tls_with_auth_on(variant, service, monkeypatch, tmp_path):
    docs = system(variant)
    _, pod, container = served(docs, service)
    env, _ = container_env(docs, container, image_stage(container))
    settings = effective_settings(monkeypatch, container["args"], env)
    assert settings.auth_tokens_file is not None and settings.tls_cert_file is not None
    tokens = secret_mount(docs, pod, container, str(settings.auth_tokens_file))
    assert token_store(docs, tmp_path, *tokens)  # the file parses
    cert = secret_mount(docs, pod, container, str(settings.tls_cert_file))
    key = secret_mount(docs, pod, container, str(settings.tls_key_file))
    assert (cert, key) == ((TLS_SECRET, "tls.crt"), (TLS_SECRET, "tls.key"))
    # Server TLS, no client certificates: callers (the probes too) prove who they are
    # with bearer tokens.
    assert settings.tls_client_ca_file is None
    # The probes and the service's own calls trust the CA of the same Secret.
    ca = env[client_credentials.ENV_CA]
    assert secret_mount(docs, pod, container, ca) == (TLS_SECRET, "ca.crt")
    secrets_readable(pod)


def caller_token(container: Doc) -> tuple[str, str]:
    (variable,) = [v for v in container["env"] if v["name"] == client_credentials.ENV_TOKEN]
    ref = variable["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_calls_between_services_carry_tokens_with_the_roles_they_need(variant, tmp_path):
    docs = system(variant)
    (job,) = [
        (p, c) for _, p, c in our_containers(docs) if c["args"][:2] == ["features", "materialize"]
    ]
    callers = {
        "inference": served(docs, "inference")[1:],
        "monitoring": served(docs, "monitoring")[1:],
        "materialize": job,
    }
    for caller, (pod, container) in callers.items():
        name, key = caller_token(container)
        env = {v["name"]: v.get("value") for v in container["env"]}
        assert secret_mount(docs, pod, container, env[client_credentials.ENV_CA]) == (
            TLS_SECRET,
            "ca.crt",
        )
        secrets_readable(pod)
        for service in SERVICES:
            # Every service reads the same token file.
            _, served_pod, served_container = served(docs, service)
            served_env, _ = container_env(docs, served_container, image_stage(served_container))
            path = served_env[f"MODELPLANE_{service.upper()}_AUTH_TOKENS_FILE"]
            mounted = secret_mount(docs, served_pod, served_container, path)
            principal = token_store(docs, tmp_path, *mounted).authenticate(
                secret_value(docs, name, key)
            )
            assert principal is not None, f"{caller}'s token is not in {service}'s file"
            for method in CALLS[caller]:
                assert principal.may(auth.REQUIRED_ROLE[method]), (caller, method)
            # No more than it needs: no caller here approves or administers.
            assert not principal.may(auth.APPROVER) and not principal.may(auth.ADMIN), caller


def test_secret_volumes_are_made_by_dependencies_or_are_the_tls_secret():
    made = {d["metadata"]["name"] for d in files_of(DEPENDENCIES) if d["kind"] == "Secret"}
    for _, pod, _ in our_containers(files_of(K8S)):
        for volume in pod["spec"].get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in made | {TLS_SECRET}
    assert TLS_SECRET not in made  # a private key is never committed


# --- Batch scoring examples (deploy/batch/, outside the kustomization) --------------------

# The RayJob example is a KubeRay custom resource, not in the Kubernetes schemas: checked
# in tests/unit/scoring/test_rayjob_example.py.
BATCH_EXAMPLES = sorted(
    path
    for path in (DEPLOY / "batch").glob("*.yaml")
    if all(d["apiVersion"] != "ray.io/v1" for d in load_documents(path))
)


@pytest.mark.parametrize("path", BATCH_EXAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_batch_examples_match_the_kubernetes_schema(path, version):
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("path", BATCH_EXAMPLES, ids=lambda p: p.name)
def test_batch_examples_run_a_valid_score_command(path):
    for document in yaml.safe_load_all(path.read_text()):
        pod = document["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        for container in pod["containers"]:
            assert container["image"].split(":")[-1] == VERSION
            script = " ".join(container["args"])
            command = shlex.split(script.split("exec modelplane", 1)[1].replace("$DAY", "day"))
            args = build_parser().parse_args(command)
            assert (args.command, args.score_command) == ("score", "batch")
            assert args.output.is_absolute() and args.output.parts[1] == "data"
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert document["spec"]["concurrencyPolicy"] == "Forbid"
