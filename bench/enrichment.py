"""Features in, measured: the demo scorer (8 -> 16 -> 2) registered with the demo feature
bundle as its FeatureInput, served from the registry by `modelplane serve inference
--feature-service …`, called two ways in alternation: with its input tensor (plain) and
with one customer id (enriched: the service fetches the bundle row, one feature-service
call per batch). Prints p50/p99 at c=1 and throughput at c=64 of both, and the ratio the
issue targets (enriched c=64 throughput >= 0.7x plain). `make bench` runs it."""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would
# shadow the generated `inference` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import tempfile  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from inference import grpc_service_pb2 as pb  # noqa: E402
from modelplane.client.registry import RegistryClient  # noqa: E402
from modelplane.examples import features  # noqa: E402
from modelplane.examples.models import ensure_demo_repository  # noqa: E402
from modelplane.feature.v1 import feature_pb2, feature_pb2_grpc  # noqa: E402
from modelplane.loadtest import LevelPlan, LevelResult, SweepConfig, build_payload  # noqa: E402
from modelplane.loadtest.payload import Payload  # noqa: E402
from modelplane.loadtest.scenarios import Served, serving  # noqa: E402
from modelplane.loadtest.sweep import fetch_metadata, sweep  # noqa: E402
from modelplane.registry.v1 import registry_pb2 as rpb  # noqa: E402

MODEL = features.SCORER


def command(service: str, data: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "modelplane.cli.main", "serve", service, "--port", "0",
        "--metrics-port", "0", "--data-dir", str(data), "--log-level", "WARNING", *extra,
    ]  # fmt: skip


def entity_payload(customer: int) -> Payload:
    request = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="customer_id", datatype="INT64", shape=[1])
        ],
        raw_input_contents=[np.array([customer], np.int64).tobytes()],
    )
    return Payload(MODEL, "", request.SerializeToString(), 1, {"customer_id": (1,)})


def run(served: Served, payload: Payload, concurrency: int, seconds: float) -> LevelResult:
    config = SweepConfig(
        target=served.address,
        levels=[LevelPlan(concurrency=concurrency)],
        duration_s=seconds,
        warmup_s=1.0,
        metrics_url=served.metrics_url,
        processes=1,
        timeout_s=30.0,
    )
    return asyncio.run(sweep(config, payload, progress=False))[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of plain/enriched")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelplane-bench-") as temp:
        root = Path(temp)
        definitions = features.ensure_demo_features(root / "features")
        ensure_demo_repository(root / "models")
        with (
            serving(command("registry", root / "registry"), root / "registry.log") as registry,
            serving(
                command("feature", root / "feature", "--definitions-file", str(definitions)),
                root / "feature.log",
            ) as feature,
        ):
            with grpc.insecure_channel(feature.address) as channel:
                feature_pb2_grpc.FeatureServiceStub(channel).Materialize(
                    feature_pb2.MaterializeRequest(), timeout=120
                )
            with RegistryClient(registry.address) as client:
                client.create_model(MODEL)
                metadata = rpb.UploadMetadata(
                    model=MODEL, feature_input=rpb.FeatureInput(bundle=features.SCORER)
                )
                version = client.upload_file(
                    root / "models" / MODEL / "1" / "model.onnx", metadata
                ).version
                client.set_alias(MODEL, "production", version, expected_version=0)
            inference = command(
                "inference",
                root / "inference",
                "--registry", registry.address, "--load-model", MODEL,
                "--feature-service", feature.address,
            )  # fmt: skip
            with serving(inference, root / "inference.log") as served:
                plain = build_payload(fetch_metadata(served.address, MODEL), batch_rows=1)
                enriched = entity_payload(42)
                results: dict[tuple[str, int], list[LevelResult]] = {}
                for _ in range(args.rounds):
                    for name, payload in (("plain", plain), ("enriched", enriched)):
                        for concurrency in (1, 64):
                            result = run(served, payload, concurrency, args.duration)
                            results.setdefault((name, concurrency), []).append(result)
    print(f"\n-- features in: {MODEL}, {args.rounds} alternations of {args.duration:.0f} s runs")
    for (name, concurrency), runs in sorted(results.items()):
        for result in runs:
            errors = sum(result.errors.values())
            cpu = result.server_cpu_s / result.ok * 1e6 if result.server_cpu_s and result.ok else 0
            print(
                f"{name:<9} c={concurrency:<3} {result.throughput_rps:7.0f} req/s   "
                f"p50 {result.latency.p50_ms:6.2f} ms   p99 {result.latency.p99_ms:6.2f} ms   "
                f"server CPU {cpu:5.0f} us/req   failed {errors}"
            )
    best = {key: max(r.throughput_rps for r in runs) for key, runs in results.items()}
    ratio = best[("enriched", 64)] / max(best[("plain", 64)], 1e-9)
    print(f"enriched / plain throughput at c=64 (best runs): {ratio:.2f}x")
    print(f"target: enriched >= 0.7x plain at c=64: {'PASS' if ratio >= 0.7 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
