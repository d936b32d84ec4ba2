"""Checks with the unmodified tritonclient (grpc and grpc.aio) against a running
`modelplane serve inference`, run in their own process by test_tritonclient.py.

tritonclient's generated stubs declare the same protobuf package (`inference`) as the
server's and the two cannot share a process's descriptor pool; this script therefore
never imports the server's stubs. Usage: python -m tests.integration.inference.triton_checks
ADDRESS METRICS_PORT REPOSITORY CHECK... ; prints one JSON object {check: "ok" | error}.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from tests.integration.inference import models


class Context:
    def __init__(self, address: str, metrics_port: int, repository: Path) -> None:
        self.address = address
        self.metrics_port = metrics_port
        self.repository = repository
        self.client = triton.InferenceServerClient(address)


def raises(exc_type: type[BaseException], call: Callable[[], object]) -> BaseException:
    try:
        call()
    except exc_type as exc:
        return exc
    raise AssertionError(f"expected {exc_type.__name__}")


def onnx_outputs(repository: Path, model: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repository / model / "1" / "model.onnx"))
    return session.run(None, {"input": x})[0]


def fp32_input(x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def check_liveness_readiness_and_metadata(ctx: Context) -> None:
    client = ctx.client
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("light")
    assert client.is_model_ready("light", "1")
    assert not client.is_model_ready("light", "9")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "modelplane"
    assert {"model_repository", "statistics", "schedule_policy"} <= set(server["extensions"])
    metadata = client.get_model_metadata("light", as_json=True)
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert metadata["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "8"]}]


def check_model_config_tells_batching_and_provider(ctx: Context) -> None:
    client = ctx.client
    config = client.get_model_config("light", as_json=True)["config"]
    assert config["max_batch_size"] == 64
    assert "dynamic_batching" in config
    assert config["input"][0]["dims"] == ["64"]
    assert config["parameters"]["execution_provider"]["string_value"] == "CPUExecutionProvider"
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    heavy = client.get_model_config("heavy", as_json=True)["config"]
    assert heavy["dynamic_batching"]["preferred_batch_size"] == [64]
    unbatched = client.get_model_config("unbatched", as_json=True)["config"]
    assert unbatched["max_batch_size"] == 8
    assert "dynamic_batching" not in unbatched


def check_outputs_equal_onnx_runtime(ctx: Context) -> None:
    for rows in (1, 5):
        outputs_equal_onnx_runtime(ctx.client, ctx.repository, rows)


def outputs_equal_onnx_runtime(client, repository, rows):
    x = np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)
    result = client.infer(
        "light",
        [fp32_input(x)],
        outputs=[triton.InferRequestedOutput("output")],
        request_id=f"req-{rows}",
    )
    assert result.get_response().id == f"req-{rows}"
    assert result.get_response().model_version == "1"
    np.testing.assert_allclose(
        result.as_numpy("output"), onnx_outputs(repository, "light", x), rtol=1e-5, atol=1e-6
    )


def check_64_concurrent_aio_requests_are_batched_together(ctx: Context) -> None:
    asyncio.run(concurrent_aio_requests(ctx.address, ctx.repository))


async def concurrent_aio_requests(address, repository):
    rng = np.random.default_rng(64)
    rows = [rng.standard_normal((1, 512)).astype(np.float32) for _ in range(64)]
    async with triton_aio.InferenceServerClient(address) as client:
        before = (await client.get_inference_statistics("heavy", as_json=True))["model_stats"][0]

        async def one(x: np.ndarray) -> np.ndarray:
            tensor = triton_aio.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            return (await client.infer("heavy", [tensor])).as_numpy("output")

        outputs = await asyncio.gather(*(one(x) for x in rows))
        after = (await client.get_inference_statistics("heavy", as_json=True))["model_stats"][0]
    expected = onnx_outputs(repository, "heavy", np.concatenate(rows))
    np.testing.assert_allclose(np.concatenate(outputs), expected, rtol=1e-4, atol=1e-5)
    rows_run = int(after.get("inference_count", 0)) - int(before.get("inference_count", 0))
    batches = int(after.get("execution_count", 0)) - int(before.get("execution_count", 0))
    assert rows_run == 64
    assert batches < 64, "concurrent requests must share batches"
    assert max(int(b["batch_size"]) for b in after["batch_stats"]) > 1


def check_every_datatype_round_trips_including_bytes_and_fp16(ctx: Context) -> None:
    client = ctx.client
    inputs, expected = [], {}
    rng = np.random.default_rng(1)
    for wire, dtype in models.NUMPY.items():
        if wire == "BYTES":
            value = np.array([[b"hello", "wörld".encode()], [b"", b"x" * 300]], dtype=np.object_)
        elif wire == "BOOL":
            value = np.array([[True, False], [False, True]])
        else:
            value = (rng.random((2, 2)) * 100).astype(dtype)
        tensor = triton.InferInput(f"in_{wire}", [2, 2], wire)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
        expected[f"out_{wire}"] = value
    result = client.infer("echo", inputs)
    for name, value in expected.items():
        got = result.as_numpy(name)
        assert got.dtype == value.dtype or name == "out_BYTES", name
        np.testing.assert_array_equal(got, value, err_msg=name)
    config = client.get_model_config("echo", as_json=True)["config"]
    types = {i["name"]: i["data_type"] for i in config["input"]}
    assert types["in_FP16"] == "TYPE_FP16" and types["in_BYTES"] == "TYPE_STRING"


def status_of(call: Callable[[], object]) -> tuple[str, str]:
    exc = raises(InferenceServerException, call)
    assert isinstance(exc, InferenceServerException)
    return str(exc.status()), str(exc.message())


def check_bad_requests_get_codes_and_messages_naming_the_tensor(ctx: Context) -> None:
    client = ctx.client
    x = np.zeros((1, 64), np.float32)
    status, message = status_of(lambda: client.infer("nope", [fp32_input(x)]))
    assert status == "StatusCode.NOT_FOUND" and "nope" in message
    status, message = status_of(lambda: client.infer("light", [fp32_input(x)], model_version="7"))
    assert status == "StatusCode.NOT_FOUND" and "'7'" in message

    wrong_name = triton.InferInput("inputs", [1, 64], "FP32")
    wrong_name.set_data_from_numpy(x)
    status, message = status_of(lambda: client.infer("light", [wrong_name]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "'inputs'" in message

    wrong_type = triton.InferInput("input", [1, 64], "FP64")
    wrong_type.set_data_from_numpy(x.astype(np.float64))
    status, message = status_of(lambda: client.infer("light", [wrong_type]))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "'input'" in message and "FP32" in message

    status, message = status_of(
        lambda: client.infer("light", [fp32_input(np.zeros((1, 63), np.float32))])
    )
    assert status == "StatusCode.INVALID_ARGUMENT" and "[-1,64]" in message

    status, message = status_of(
        lambda: client.infer("light", [fp32_input(np.zeros((65, 64), np.float32))])
    )
    assert status == "StatusCode.INVALID_ARGUMENT" and "max_batch_size" in message

    status, message = status_of(
        lambda: client.infer(
            "light", [fp32_input(x)], outputs=[triton.InferRequestedOutput("logits")]
        )
    )
    assert status == "StatusCode.INVALID_ARGUMENT" and "'logits'" in message


def check_statistics_index_load_and_unload(ctx: Context) -> None:
    client = ctx.client
    client.infer("light", [fp32_input(np.zeros((2, 64), np.float32))])
    stats = client.get_inference_statistics("light", as_json=True)["model_stats"][0]
    assert stats["name"] == "light" and stats["version"] == "1"
    assert int(stats["inference_stats"]["success"]["count"]) >= 1
    assert int(stats["inference_count"]) >= 2
    assert any(int(b["batch_size"]) >= 1 for b in stats["batch_stats"])

    index = client.get_model_repository_index(as_json=True)["models"]
    assert {"name": "echo", "version": "1", "state": "READY"} in index
    client.unload_model("unbatched")
    assert not client.is_model_ready("unbatched")
    index = client.get_model_repository_index(as_json=True)["models"]
    assert any(m["name"] == "unbatched" and m["state"] == "UNAVAILABLE" for m in index)
    client.load_model("unbatched")
    assert client.is_model_ready("unbatched")
    status, message = status_of(lambda: client.load_model("absent"))
    assert status == "StatusCode.NOT_FOUND" and "absent" in message


def check_stream_infer_reports_errors_per_response(ctx: Context) -> None:
    client = ctx.client
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        good = fp32_input(np.ones((1, 64), np.float32))
        bad = triton.InferInput("nope", [1, 64], "FP32")
        bad.set_data_from_numpy(np.ones((1, 64), np.float32))
        client.async_stream_infer("light", [good], request_id="good")
        client.async_stream_infer("light", [bad], request_id="bad")
        client.async_stream_infer("light", [good], request_id="again")
        outcomes = [results.get(timeout=20) for _ in range(3)]
    finally:
        client.stop_stream()
    ok = sorted(r.get_response().id for r, e in outcomes if e is None)
    errors = [e for r, e in outcomes if e is not None]
    assert ok == ["again", "good"]
    assert len(errors) == 1 and "'nope'" in errors[0].message()


def check_metrics_endpoint_has_process_cpu_and_inference_series(ctx: Context) -> None:
    client = ctx.client
    client.infer("light", [fp32_input(np.zeros((1, 64), np.float32))])
    url = f"http://127.0.0.1:{ctx.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert "process_cpu_seconds_total" in text
    assert (
        'modelplane_inference_requests_total{model="light",outcome="success",reason="",version="1"}'
        in text
    )
    assert "modelplane_inference_batch_size_bucket" in text
    assert "modelplane_inference_queue_rows" in text


def main(argv: list[str]) -> None:
    address, metrics_port, repository, *names = argv
    ctx = Context(address, int(metrics_port), Path(repository))
    results: dict[str, str] = {}
    for name in names:
        try:
            globals()[f"check_{name}"](ctx)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    ctx.client.close()
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
