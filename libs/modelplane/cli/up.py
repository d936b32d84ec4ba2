"""`modelplane up`: all four services as separate processes on localhost.

Each service runs as its own `modelplane serve` process (exactly as in
production, one process per service). The registry starts first: on the first run
`up` registers the demo models in it and points their `production` alias at them,
and the inference service then serves every model that has that alias, from the
registry (as a deployment would). `up` waits until every service reports SERVING on
the standard health service, materializes the demo features, prints the addresses
and calls that work (a model; features into a model), and on Ctrl-C or SIGTERM stops
them all gracefully.

Every call `up` makes (health checks, registering the demo, materializing) goes through
`ClientCredentials.from_env()`, like any client: with nothing set it is plaintext; with
MODELPLANE_TLS_CA (and a token, client certificate) set, the same settings the children
inherit for their own calls to each other, it reaches services serving TLS.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.cli.services import DEFAULT_PORTS, SERVICES
from modelplane.client.credentials import ClientCredentials
from modelplane.client.monitoring import MonitoringClient
from modelplane.client.registry import RegistryClient
from modelplane.examples import fraud
from modelplane.examples.features import SCORER, ensure_demo_features
from modelplane.examples.models import DEMO_MODEL_NAME, ensure_demo_repository
from modelplane.feature.v1 import feature_pb2, feature_pb2_grpc
from modelplane.monitoring.v1 import monitoring_pb2
from modelplane.registry.v1 import registry_pb2

START_TIMEOUT_S = 60.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen[str]
    address: str = ""
    metrics_port: int | None = None


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "up",
        help="start all four services on localhost with embedded defaults",
        description="Start registry, feature, inference and monitoring as separate processes "
        "(SQLite and local disk under --data-dir; demo models and demo features generated on "
        "first run), wait until each is SERVING, materialize the demo features, print the "
        "addresses and calls that work, and stop them all on Ctrl-C.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".modelplane"),
        help="directory for state (default .modelplane)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--any-ports",
        action="store_true",
        help="let every service pick a free port (printed once serving)",
    )
    parser.set_defaults(handler=up)


def _read_serving_line(stream: IO[str], found: dict[str, Any]) -> None:
    for line in stream:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "serving":
            found.update(event)
            return


def _start(name: str, args: argparse.Namespace, peers: dict[str, str] | None = None) -> Child:
    port, metrics_port = (0, 0) if args.any_ports else DEFAULT_PORTS[name]
    command = [
        sys.executable,
        "-m",
        "modelplane.cli.main",
        "serve",
        name,
        "--host",
        args.host,
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--data-dir",
        str(args.data_dir),
    ]
    if name == "inference":
        peers = peers or {}
        command += ["--registry", peers["registry"], "--model-control-mode", "registry"]
        command += ["--feature-service", peers["feature"], "--monitoring", peers["monitoring"]]
    if name == "feature":
        command += ["--definitions-file", str(args.data_dir / "features" / "features.yaml")]
    if name == "monitoring":
        # References (training distributions) come from the registry's versions.
        command += ["--registry", (peers or {})["registry"]]
    env = dict(os.environ)
    env.setdefault(f"MODELPLANE_{name.upper()}_LOG_JSON", "false")
    # A session of its own: Ctrl-C reaches only `up`, which then stops the children in order.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    return Child(name, process)


def _wait_serving(child: Child, deadline: float, credentials: ClientCredentials) -> None:
    found: dict[str, Any] = {}
    assert child.process.stdout is not None
    reader = threading.Thread(
        target=_read_serving_line, args=(child.process.stdout, found), daemon=True
    )
    reader.start()
    reader.join(max(0.0, deadline - time.monotonic()))
    if not found:
        raise RuntimeError(f"{child.name} did not start (exit code {child.process.poll()})")
    child.address, child.metrics_port = found["address"], found.get("metrics_port")
    with credentials.channel(child.address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(),
            timeout=max(1.0, deadline - time.monotonic()),
            wait_for_ready=True,
        )
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"{child.name} reports {response.status}")
    # Keep draining stdout so a chatty child can never block on a full pipe.
    threading.Thread(target=child.process.stdout.read, daemon=True).start()


def _stop_all(children: list[Child], grace: float = 15.0) -> bool:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    clean = True
    for child in children:
        try:
            code = child.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            child.process.kill()
            code = child.process.wait()
        clean = clean and code == 0
    return clean


def _register_demo(registry: Child, data_dir: Path, credentials: ClientCredentials) -> list[str]:
    """Registers the demo models on the first run and points `production` at them; a
    later run finds them there (and leaves any alias you moved where it is). The fraud
    model is trained here, on the demo feature view's history."""
    repository = data_dir / "models"
    said = []
    with RegistryClient(
        registry.address, actor="modelplane-up", timeout=30, credentials=credentials
    ) as client:
        said += _register_fraud(client, data_dir)
        for name in (DEMO_MODEL_NAME, SCORER):
            try:
                client.get_model(name)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                client.create_model(name, description="demo model made by modelplane up")
            aliases = {a.alias: a.version for a in client.list_aliases(name)}
            if "production" in aliases:
                said.append(f"{name}@production is version {aliases['production']}")
                continue
            metadata = registry_pb2.UploadMetadata(
                model=name, description="generated by modelplane up (synthetic weights)"
            )
            version = client.upload_file(repository / name / "1" / "model.onnx", metadata)
            client.set_alias(name, "production", version.version, expected_version=0, reason="demo")
            said.append(f"registered {name} version {version.version} as {name}@production")
    return said


def _configure_monitoring(monitoring: Child, credentials: ClientCredentials) -> str:
    """How the fraud model is judged: its score is output probabilities[1] of a binary
    classifier (quality once labels arrive), and an alert fires when a feature drifts in
    two 5-minute windows in a row. Left as it is when already set."""
    with MonitoringClient(monitoring.address, timeout=10, credentials=credentials) as client:
        if client.get_config(fraud.MODEL).revision:
            return "monitoring config of fraud kept as it was"
        client.set_config(
            monitoring_pb2.MonitorConfig(
                model_name=fraud.MODEL,
                task=monitoring_pb2.TASK_TYPE_BINARY_CLASSIFICATION,
                prediction_output=fraud.SCORE_OUTPUT,
                prediction_column=1,
                rules=[
                    monitoring_pb2.AlertRule(
                        name="feature-drift",
                        kind=monitoring_pb2.ALERT_KIND_DRIFT,
                        window_seconds=300,
                        for_windows=2,
                    )
                ],
            )
        )
    return "monitoring config of fraud set: binary classifier, alert on drift"


def _register_fraud(client: RegistryClient, data_dir: Path) -> list[str]:
    try:
        aliases = {a.alias: a.version for a in client.list_aliases(fraud.MODEL)}
        return [f"{fraud.MODEL}@production is version {aliases.get('production', '-')}"]
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
    trained = fraud.train(data_dir / "features", data_dir / "training")
    client.create_model(
        fraud.MODEL,
        description="demo fraud risk per customer, fed by the customer_scorer bundle",
        owner="modelplane demo",
    )
    said = []
    for number, version in enumerate(trained, start=1):
        registered = client.upload_file(version.path, version.metadata)
        auc = next(m.value for m in version.metadata.lineage.metrics if m.name == "auc")
        said.append(
            f"trained and registered {fraud.MODEL} version {registered.version} (AUC {auc:.3f})"
        )
        if number == 1:
            client.set_alias(
                fraud.MODEL, "production", registered.version, expected_version=0, reason="demo"
            )
            said[-1] += f" as {fraud.MODEL}@production"
    return said


def _materialize_demo(feature: Child, credentials: ClientCredentials) -> str:
    """Copies the demo source's rows into the online store (incremental: a later run
    reads only rows newer than the last) and says what it did."""
    with credentials.channel(feature.address) as channel:
        response = feature_pb2_grpc.FeatureServiceStub(channel).Materialize(
            feature_pb2.MaterializeRequest(), timeout=60
        )
    read = sum(view.rows_read for view in response.views)
    written = sum(view.rows_written for view in response.views)
    if not read:
        return "demo features: the online store is up to date"
    return f"demo features materialized: {read:,} source rows read, {written:,} stored"


def _usage(children: list[Child]) -> str:
    address = {c.name: c.address for c in children}
    inference, feature, registry = address["inference"], address["feature"], address["registry"]
    monitoring = address["monitoring"]
    script = Path(sys.executable).with_name("modelplane")
    cli = str(script) if script.exists() else "modelplane"
    registry_cli = f"{cli} registry --address {registry}"
    canary = (
        f"{registry_cli} promote {fraud.MODEL} canary 2 && "
        f"{registry_cli} rollout {fraud.MODEL} --canary 10"
    )
    # Unindented so it can be pasted as is (a heredoc's end marker must start its line).
    return f"""
Try it (paste into a shell):

{sys.executable} - <<'PY'
import numpy as np, tritonclient.grpc as tc
client = tc.InferenceServerClient("{inference}")
x = tc.InferInput("input", [1, 64], "FP32")
x.set_data_from_numpy(np.random.rand(1, 64).astype(np.float32))
print(client.infer("{DEMO_MODEL_NAME}", [x]).as_numpy("output"))
PY

The models come from the registry (their production alias); the same call from the CLI,
and what inference serves with versions, digests and routes:

{cli} predict {DEMO_MODEL_NAME} --random --address {inference}
{cli} models --address {inference}

The fraud model (trained just now, registered with its card, lineage, metrics and
reference statistics) takes customer ids: inference fetches their features from the
feature service, one call per batch.

{cli} predict {fraud.MODEL} --entity customer_id=42,7 --feature-statuses --address {inference}

Every prediction is logged to the monitoring service (off the request path), which
compares it with the training data's distribution the registry holds (drift), with
ground truth once you send it (quality), and raises alerts:

{cli} monitor summary {fraud.MODEL} --address {monitoring}
{cli} monitor report {fraud.MODEL} --address {monitoring} --html fraud-report.html
{cli} monitor alerts {fraud.MODEL} --address {monitoring}
{cli} monitor labels {fraud.MODEL} --file labels.csv --address {monitoring}   # request_id,label

Put version 2 on canary for 10% of requests (a request's routing_key keeps it on one):

{canary}

Features into a model: customers 1-3's "{SCORER}" bundle as a tensor, then scored.

{sys.executable} - <<'PY'
import grpc, numpy as np, tritonclient.grpc as tc
from modelplane.feature.v1 import feature_pb2 as pb, feature_pb2_grpc
features = feature_pb2_grpc.FeatureServiceStub(grpc.insecure_channel("{feature}"))
ids = pb.Values(type=pb.VALUE_TYPE_INT64, int64_values=[1, 2, 3])
keys = [pb.EntityKeyColumn(name="customer_id", values=ids)]
t = features.GetBundleTensor(pb.GetBundleTensorRequest(bundle="{SCORER}", entity_keys=keys))
x = tc.InferInput("input", list(t.shape), "FP32")
x.set_data_from_numpy(np.array(t.values, np.float32).reshape(t.shape))
client = tc.InferenceServerClient("{inference}")
print(client.infer("{SCORER}", [x]).as_numpy("output"))
PY

Every service lists its API through reflection, e.g.  grpcurl -plaintext {inference} list
Press Ctrl-C to stop."""


def up(args: argparse.Namespace) -> int:
    ensure_demo_repository(args.data_dir / "models")
    ensure_demo_features(args.data_dir / "features")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    children: list[Child] = []
    try:
        credentials = ClientCredentials.from_env()
        deadline = time.monotonic() + START_TIMEOUT_S
        # Monitoring after the registry (it reads references from there); inference
        # last: it is started with the others' addresses, serves what the registry's
        # aliases say and fetches features for models that name a bundle.
        children = [_start(name, args) for name in ("registry", "feature")]
        for child in children:
            _wait_serving(child, deadline, credentials)
        peers = {child.name: child.address for child in children}
        monitoring = _start("monitoring", args, peers)
        children.append(monitoring)
        _wait_serving(monitoring, deadline, credentials)
        peers["monitoring"] = monitoring.address
        registry = next(child for child in children if child.name == "registry")
        registered = _register_demo(registry, args.data_dir, credentials)
        configured = _configure_monitoring(monitoring, credentials)
        inference = _start("inference", args, peers)
        children.append(inference)
        _wait_serving(inference, deadline, credentials)
        children.sort(key=lambda child: SERVICES.index(child.name))
        for child in children:
            print(
                f"{child.name:<11} grpc {child.address:<18} metrics "
                f"http://{args.host}:{child.metrics_port}/metrics",
                flush=True,
            )
        for line in registered:
            print(f"{'registry':<11} {line}", flush=True)
        print(f"{'monitoring':<11} {configured}", flush=True)
        feature = next(c for c in children if c.name == "feature")
        print(f"{feature.name:<11} {_materialize_demo(feature, credentials)}", flush=True)
        print(_usage(children), flush=True)
        while not stop.is_set():
            if any(child.process.poll() is not None for child in children):
                failed = [c.name for c in children if c.process.poll() is not None]
                print(f"stopped unexpectedly: {', '.join(failed)}", file=sys.stderr)
                _stop_all(children)
                return 1
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        print(f"modelplane up failed: {exc}", file=sys.stderr)
        _stop_all(children)
        return 1
    print("\nstopping...", flush=True)
    return 0 if _stop_all(children) else 1
