"""One ONNX model served by Triton through PyTriton, default settings: the anchor of the
stability comparison (triton_stability.py), run in PyTriton's own venv, never the project's.

The model runs in ONNX Runtime inside PyTriton's inference callable, behind Triton's
dynamic batcher (max_batch_size 64, no queue delay), as the issue's anchor was measured.
Prints the same JSON "serving" line `modelplane serve` prints, so the bench starts it the
same way; its metrics port serves `process_cpu_seconds_total` of the whole process tree
(this process, tritonserver and its Python backend stub), which is what the load
generator's server-CPU probe reads.

With --max-queue-size or --queue-timeout-us, Triton's queue policy refuses what does not
fit (UNAVAILABLE), as an operator sets it for overload: the anchor of the overload
comparison (triton_overload.py). --threads: ONNX Runtime's intra-op threads (default: its
own choice).

Usage: python pytriton_server.py MODEL_NAME MODEL.onnx [--max-queue-size N]
       [--queue-timeout-us US] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import psutil
from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor, TimeoutAction
from pytriton.triton import Triton, TritonConfig

MAX_BATCH_SIZE = 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TreeCpu:
    """process_cpu_seconds_total summed over this process and its descendants."""

    def __init__(self) -> None:
        self.root = psutil.Process()

    def collect(self) -> Iterator[CounterMetricFamily]:
        total = 0.0
        for process in [self.root, *self.root.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        family = CounterMetricFamily(
            "process_cpu", "CPU seconds of the PyTriton process tree", unit="seconds"
        )
        family.add_metric([], total)
        yield family


def batcher(max_queue_size: int, queue_timeout_us: int) -> DynamicBatcher:
    """Triton's dynamic batcher with no queue delay; with a bound, its queue policy."""
    if not max_queue_size and not queue_timeout_us:
        return DynamicBatcher()
    policy = QueuePolicy(
        timeout_action=TimeoutAction.REJECT,
        default_timeout_microseconds=queue_timeout_us,
        max_queue_size=max_queue_size,
    )
    return DynamicBatcher(default_queue_policy=policy)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("path")
    parser.add_argument("--max-queue-size", type=int, default=0)
    parser.add_argument("--queue-timeout-us", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    name, path = args.name, args.path
    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    (model_output,) = session.get_outputs()

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        (result,) = session.run(None, {model_input.name: inputs[model_input.name]})
        return {model_output.name: result}

    registry = CollectorRegistry()  # only the tree's CPU: the default one has this process's
    registry.register(TreeCpu())  # type: ignore[arg-type]
    metrics_port = free_port()
    start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
    grpc_port = free_port()
    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        http_address="127.0.0.1",
        http_port=free_port(),
        metrics_port=free_port(),
        metrics_address="127.0.0.1",
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=name,
            infer_func=infer,
            inputs=[Tensor(name=model_input.name, dtype=np.float32, shape=(model_input.shape[1],))],
            outputs=[
                Tensor(name=model_output.name, dtype=np.float32, shape=(model_output.shape[1],))
            ],
            config=ModelConfig(
                max_batch_size=MAX_BATCH_SIZE,
                batcher=batcher(args.max_queue_size, args.queue_timeout_us),
            ),
            strict=False,
        )
        triton.run()
        line = {"event": "serving", "port": grpc_port, "metrics_port": metrics_port}
        print(json.dumps(line), flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
