"""The service under concurrency, over real gRPC: batching, the bounded queue, deadlines,
cancellation, isolation of bad requests, load/unload under traffic, streaming."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from inference import grpc_service_pb2 as pb
from tests.integration.inference.conftest import WAIT, Gate, fp32_request, output, serving
from tests.support import wait_until


def reference(repository, model: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repository / model / "1" / "model.onnx"))
    return session.run(None, {"input": x})[0]


def index_request(*indices: int) -> pb.ModelInferRequest:
    x = np.array([[i] for i in indices], dtype=np.int64)
    return pb.ModelInferRequest(
        model_name="lookup",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="index", datatype="INT64", shape=x.shape)
        ],
        raw_input_contents=[x.tobytes()],
    )


def hold_instance(server, stub, gate: Gate, model: str, request: pb.ModelInferRequest):
    """Sends `request` and returns once it is blocked inside the runtime."""
    gate.close()
    first = stub.ModelInfer.future(request, timeout=WAIT)
    assert gate.entered.wait(WAIT)
    return first


def test_64_concurrent_requests_are_batched_and_match_onnx_runtime(repository):
    gate = Gate()
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(64)]
    with serving(repository, gate) as (server, stub):
        batcher = server.repository.get("light").batcher
        first = hold_instance(server, stub, gate, "light", fp32_request("light", rows[0], "r0"))
        rest = [
            stub.ModelInfer.future(fp32_request("light", x, f"r{i}"), timeout=WAIT)
            for i, x in enumerate(rows[1:], start=1)
        ]
        wait_until(lambda: batcher.queued_rows >= 63, WAIT)
        gate.open()
        responses = [first.result(), *(f.result() for f in rest)]
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="light")).model_stats[0]
    expected = reference(repository, "light", np.concatenate(rows))
    for i, response in enumerate(responses):
        assert response.id == f"r{i}"
        np.testing.assert_allclose(output(response), expected[i : i + 1], rtol=1e-5, atol=1e-6)
    assert gate.rows[-1] == 63  # the 63 queued rows ran as one batch
    assert stats.inference_count == 64 + 0  # rows of user requests (warm-up not counted)
    assert stats.execution_count == 2
    assert {b.batch_size for b in stats.batch_stats} == {1, 63}
    assert stats.inference_stats.success.count == 64


def test_a_full_queue_rejects_at_once_with_unavailable(repository):
    (repository / "light" / "config.pbtxt").write_text(
        "max_batch_size: 8 dynamic_batching { default_queue_policy { max_queue_size: 4 } }"
    )
    gate = Gate()
    x = np.zeros((2, 64), np.float32)
    with serving(repository, gate) as (server, stub):
        first = hold_instance(server, stub, gate, "light", fp32_request("light", x[:1]))
        queued = [stub.ModelInfer.future(fp32_request("light", x), timeout=WAIT) for _ in range(2)]
        wait_until(lambda: server.repository.get("light").batcher.queued_rows >= 4, WAIT)
        with pytest.raises(grpc.RpcError) as rejected:
            stub.ModelInfer(fp32_request("light", x[:1]), timeout=WAIT)
        assert rejected.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Exceeds maximum queue size" in rejected.value.details()
        gate.open()
        assert [len(output(f.result())) for f in [first, *queued]] == [1, 2, 2]
        rejected_count = server.registry.get_sample_value(
            "modelplane_inference_requests_total",
            {"model": "light", "version": "1", "outcome": "rejected", "reason": "queue_full"},
        )
    assert rejected_count == 1


def test_expired_and_cancelled_requests_are_not_executed(repository):
    gate = Gate()
    with serving(repository, gate) as (server, stub):
        batcher = server.repository.get("lookup").batcher
        first = hold_instance(server, stub, gate, "lookup", index_request(0))
        with pytest.raises(grpc.RpcError) as expired:
            stub.ModelInfer(index_request(1), timeout=0.2)
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server drops it when grpc cancels its handler at the deadline.
        wait_until(lambda: batcher.queued_rows == 0, WAIT)
        cancelled = stub.ModelInfer.future(index_request(2), timeout=WAIT)
        wait_until(lambda: batcher.queued_rows == 1, WAIT)
        cancelled.cancel()
        # Both left the queue before the instance came free.
        wait_until(lambda: batcher.queued_rows == 0, WAIT)
        gate.open()
        assert output(first.result()).tolist() == [[10.0]]
        after = stub.ModelInfer(index_request(2), timeout=WAIT)
        assert output(after).tolist() == [[30.0]]

        def count(outcome: str) -> float | None:
            return server.registry.get_sample_value(
                "modelplane_inference_requests_total",
                {"model": "lookup", "version": "1", "outcome": outcome, "reason": ""},
            )

        assert count("expired") == 1
        assert count("cancelled") == 1
    assert gate.rows == [1, 1]  # the held request and the one sent after: nothing else ran


def test_a_bad_request_in_a_batch_fails_alone(repository):
    gate = Gate()
    with serving(repository, gate) as (server, stub):
        first = hold_instance(server, stub, gate, "lookup", index_request(0))
        good1 = stub.ModelInfer.future(index_request(1), timeout=WAIT)
        bad = stub.ModelInfer.future(index_request(7), timeout=WAIT)  # out of the table
        good2 = stub.ModelInfer.future(index_request(2, 0), timeout=WAIT)
        wait_until(lambda: server.repository.get("lookup").batcher.queued_rows >= 4, WAIT)
        # A malformed request is refused before it reaches the queue.
        malformed = index_request(1)
        malformed.inputs[0].datatype = "INT32"
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(malformed, timeout=WAIT)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        gate.open()
        assert output(first.result()).tolist() == [[10.0]]
        assert output(good1.result()).tolist() == [[20.0]]
        assert output(good2.result()).tolist() == [[30.0], [10.0]]
        with pytest.raises(grpc.RpcError) as failed:
            bad.result()
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lookup" in failed.value.details()
    assert 4 in gate.rows  # the three queued requests were first tried as one batch


def test_variable_dims_are_batched_only_with_equal_shapes(repository):
    gate = Gate()

    def request(length: int, value: float) -> pb.ModelInferRequest:
        x = np.full((1, length), value, np.float32)
        return pb.ModelInferRequest(
            model_name="row_sum",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=x.shape)
            ],
            raw_input_contents=[x.tobytes()],
        )

    with serving(repository, gate) as (server, stub):
        first = hold_instance(server, stub, gate, "row_sum", request(2, 1.0))
        futures = [
            stub.ModelInfer.future(request(length, value), timeout=WAIT)
            for length, value in [(3, 1.0), (5, 1.0), (3, 2.0), (5, 2.0)]
        ]
        wait_until(lambda: server.repository.get("row_sum").batcher.queued_rows >= 4, WAIT)
        gate.open()
        sums = [output(f.result()).item() for f in [first, *futures]]
    assert sums == [2.0, 3.0, 5.0, 6.0, 10.0]
    assert gate.rows == [1, 2, 2]


def test_load_and_unload_under_traffic_lose_no_request(repository):
    x = np.ones((1, 64), np.float32)
    stop = threading.Event()
    warmed_up = threading.Event()
    errors: list[BaseException] = []
    served = [0]

    with serving(repository) as (_server, stub):

        def traffic() -> None:
            while not stop.is_set():
                try:
                    stub.ModelInfer(fp32_request("light", x), timeout=WAIT)
                    served[0] += 1
                    if served[0] >= 20:
                        warmed_up.set()
                except grpc.RpcError as exc:
                    errors.append(exc)

        with ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(traffic) for _ in range(4)]
            assert warmed_up.wait(WAIT)
            before = served[0]
            for _ in range(5):
                stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="echo"))
                assert not stub.ModelReady(pb.ModelReadyRequest(name="echo")).ready
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="echo"))
                # Reloading the model under traffic swaps in warmed versions, drains the old.
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="light"))
            stop.set()
            for client in clients:
                client.result()
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest()).models
    assert errors == []
    assert served[0] > before  # traffic kept flowing while models came and went
    assert {(m.name, m.state) for m in index} >= {("echo", "READY"), ("light", "READY")}


def test_unload_finishes_queued_requests_then_the_model_is_gone(repository):
    gate = Gate()
    with serving(repository, gate) as (server, stub):
        first = hold_instance(server, stub, gate, "lookup", index_request(0))
        queued = stub.ModelInfer.future(index_request(1), timeout=WAIT)
        wait_until(lambda: server.repository.get("lookup").batcher.queued_rows >= 1, WAIT)
        unload = stub.RepositoryModelUnload.future(
            pb.RepositoryModelUnloadRequest(model_name="lookup"), timeout=WAIT
        )
        gate.open()
        unload.result()
        assert output(first.result()).tolist() == [[10.0]]
        assert output(queued.result()).tolist() == [[20.0]]
        with pytest.raises(grpc.RpcError) as gone:
            stub.ModelInfer(index_request(0), timeout=WAIT)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest()).models
        assert ("lookup", "UNAVAILABLE") in {(m.name, m.state) for m in index}


def test_stream_answers_each_request_and_reports_errors_per_response(repository):
    x = np.ones((1, 64), np.float32)
    bad = fp32_request("light", x, "bad")
    bad.inputs[0].name = "nope"
    requests = [
        fp32_request("light", x, "a"),
        bad,
        fp32_request("missing", x, "m"),
        fp32_request("light", 2 * x, "b"),
    ]
    with serving(repository) as (_, stub):
        responses = list(stub.ModelStreamInfer(iter(requests), timeout=WAIT))
    by_id = {r.infer_response.id: r for r in responses}
    assert set(by_id) == {"a", "bad", "m", "b"}
    assert "'nope'" in by_id["bad"].error_message
    assert "missing" in by_id["m"].error_message
    expected = reference(repository, "light", np.concatenate([x, 2 * x]))
    np.testing.assert_allclose(output(by_id["a"].infer_response), expected[:1], rtol=1e-5)
    np.testing.assert_allclose(output(by_id["b"].infer_response), expected[1:], rtol=1e-5)
    assert not by_id["a"].error_message


def test_a_stream_that_goes_away_withdraws_its_queued_requests(repository):
    gate = Gate()
    with serving(repository, gate) as (server, stub):
        batcher = server.repository.get("lookup").batcher
        first = hold_instance(server, stub, gate, "lookup", index_request(0))
        stream = stub.ModelStreamInfer(iter([index_request(1), index_request(2)]), timeout=WAIT)
        wait_until(lambda: batcher.queued_rows == 2, WAIT)
        stream.cancel()
        wait_until(lambda: batcher.queued_rows == 0, WAIT)
        gate.open()
        assert output(first.result()).tolist() == [[10.0]]
    assert gate.rows == [1]  # only the held request ran
