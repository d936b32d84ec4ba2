"""Serving from the registry under load: `modelplane serve registry` and `modelplane
serve inference --registry …` as processes, the heavy MLP registered twice (v1, v2),
and the same closed-loop load measured twice: steady (production stays on v1), then
while production moves v2 → v1 → v2. Prints p50/p99, throughput and failed requests of
both, and how long each move took to show in responses. `make bench` runs it."""

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would
# shadow the generated `inference` package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]

import argparse  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402

from inference import grpc_service_pb2 as pb  # noqa: E402
from inference import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from modelplane.client.registry import RegistryClient  # noqa: E402
from modelplane.examples.models import HEAVY_MLP, mlp  # noqa: E402
from modelplane.loadtest import LevelPlan, LevelResult  # noqa: E402
from modelplane.loadtest.scenarios import measure, serving  # noqa: E402
from modelplane.registry.v1 import registry_pb2 as rpb  # noqa: E402

MODEL = "heavy"


def registry_command(data: Path) -> list[str]:
    return [
        sys.executable, "-m", "modelplane.cli.main", "serve", "registry", "--port", "0",
        "--metrics-port", "0", "--data-dir", str(data), "--log-level", "WARNING",
    ]  # fmt: skip


def inference_command(registry: str, data: Path) -> list[str]:
    return [
        sys.executable, "-m", "modelplane.cli.main", "serve", "inference",
        "--registry", registry, "--load-model", f"{MODEL}@production", "--port", "0",
        "--metrics-port", "0", "--data-dir", str(data), "--log-level", "WARNING",
    ]  # fmt: skip


def served_version(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> str:
    return str(stub.ModelInfer(request, timeout=10).model_version)


def move_aliases(
    client: RegistryClient,
    address: str,
    moves: list[int],
    every_s: float,
    visible_ms: list[float],
) -> None:
    """Moves production through `moves`, one every `every_s`, timing how long each
    move took to answer requests (polled from a separate channel)."""
    x = np.zeros((1, HEAVY_MLP[0]), np.float32)
    request = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 512])
        ],
        raw_input_contents=[x.tobytes()],
    )
    current = 1
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for version in moves:
            time.sleep(every_s)  # ok-sleep: pacing the moves inside the measured window
            started = time.perf_counter()
            client.set_alias(MODEL, "production", version, expected_version=current)
            current = version
            while served_version(stub, request) != str(version):
                time.sleep(0.005)  # ok-sleep: polling until the move shows
            visible_ms.append((time.perf_counter() - started) * 1e3)


def line(title: str, result: LevelResult) -> str:
    errors = sum(result.errors.values())
    return (
        f"{title:<28} {result.throughput_rps:8.0f} req/s   p50 {result.latency.p50_ms:6.2f} ms"
        f"   p99 {result.latency.p99_ms:6.2f} ms   max {result.latency.max_ms:7.2f} ms"
        f"   failed {errors}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    args.processes = 1
    with tempfile.TemporaryDirectory(prefix="modelplane-bench-") as temp:
        root = Path(temp)
        for seed in (1, 2):
            onnx.save(mlp(HEAVY_MLP, seed=seed, name=MODEL), root / f"v{seed}.onnx")
        with serving(registry_command(root / "registry"), root / "registry.log") as registry:
            client = RegistryClient(registry.address)
            client.create_model(MODEL)
            for seed in (1, 2):
                client.upload_file(root / f"v{seed}.onnx", rpb.UploadMetadata(model=MODEL))
            client.set_alias(MODEL, "production", 1, expected_version=0)
            command = inference_command(registry.address, root / "inference")
            with serving(command, root / "inference.log") as served:
                level = [LevelPlan(concurrency=args.concurrency)]
                steady, _ = measure(served, MODEL, level, args.duration, args)
                visible: list[float] = []
                every = args.duration / 4
                mover = threading.Thread(
                    target=move_aliases,
                    args=(client, served.address, [2, 1, 2], every, visible),
                )
                mover.start()
                switching, _ = measure(served, MODEL, level, args.duration, args)
                mover.join()
            client.close()
    print(f"\n-- serving from the registry: heavy MLP, c={args.concurrency}, {args.duration:.0f} s")
    print(line("steady (production = v1)", steady[0]))
    print(line("alias moves v2 -> v1 -> v2", switching[0]))
    ratio = switching[0].latency.p99_ms / max(steady[0].latency.p99_ms, 1e-9)
    print(f"p99 during moves / steady p99: {ratio:.2f}x")
    print("each move visible in responses after: " + ", ".join(f"{v:.0f} ms" for v in visible))
    failed = sum(switching[0].errors.values())
    print(f"target: zero failed requests during moves: {'PASS' if failed == 0 else 'MISS'}")
    print(f"target: every move visible within 1 s: {'PASS' if max(visible) < 1000 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
