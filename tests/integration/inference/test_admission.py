"""Admission control over real gRPC: a request whose deadline comes before the work queued
ahead of it is refused at once with UNAVAILABLE and a `grpc-retry-pushback-ms` trailer,
and counted by reason; a request without a deadline still waits its turn. While every
loaded model would refuse any request, calls are refused at their headers (the door).

The instance is held busy by the gate and the model's batch times are set by hand, so the
work ahead is known exactly (no sleeps, no timing assertions)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from modelplane.examples.models import LIGHT_MLP, mlp, write_model
from tests.integration.inference.conftest import WAIT, Gate, fp32_request, output, serving
from tests.integration.inference.test_batching_service import hold_instance
from tests.support import wait_until
from tests.unit.inference.test_admission import KnownLine


def test_a_deadline_shorter_than_the_work_ahead_is_rejected_at_once(repository):
    gate = Gate()
    x = np.zeros((1, 64), np.float32)
    with serving(repository, gate) as (server, stub):
        batcher = server.repository.get("light").batcher
        first = hold_instance(server, stub, gate, "light", fp32_request("light", x))
        batcher.rate = KnownLine(0.0, 1.0)  # one row a second
        # Only the deadline here (the queue-wait bound has unit tests of its own).
        batcher.policy = dataclasses.replace(batcher.policy, max_queue_wait_s=0.0)
        queued = [stub.ModelInfer.future(fp32_request("light", x), timeout=WAIT) for _ in range(4)]
        wait_until(lambda: batcher.queued_rows == 4, WAIT)

        # 5 rows ahead (1 running, 4 queued) at 1 row/s: about 6 s with its own row.
        with pytest.raises(grpc.RpcError) as rejected:
            stub.ModelInfer(fp32_request("light", x), timeout=2.0)
        assert rejected.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Cannot answer before the deadline" in rejected.value.details()
        trailers = dict(rejected.value.trailing_metadata())
        assert trailers["grpc-retry-pushback-ms"] == "5001"
        assert "retry after 5001 ms" in rejected.value.details()
        assert batcher.queued_rows == 4  # never queued

        unhurried = stub.ModelInfer.future(fp32_request("light", x))  # no deadline
        wait_until(lambda: batcher.queued_rows == 5, WAIT)
        gate.open()
        answers = [f.result(WAIT) for f in [first, *queued, unhurried]]
        assert all(output(a).shape == (1, 8) for a in answers)

        def count(reason: str) -> float | None:
            return server.registry.get_sample_value(
                "modelplane_inference_requests_total",
                {"model": "light", "version": "1", "outcome": "rejected", "reason": reason},
            )

        assert (count("deadline"), count("queue_full")) == (1, 0)


def test_a_shed_call_is_refused_at_its_headers_and_other_methods_go_on(repository):
    """With shedding on and the shedder refusing, ModelInfer answers UNAVAILABLE with a
    retry hint before its body is read (an unparseable body is not even noticed), and
    counted; other methods are never shed; once the shedder admits, calls are served."""
    x = np.zeros((1, 64), np.float32)
    with serving(repository, shed_loop_lag_us=1_000) as (server, stub):
        shedder = server._shedder
        assert shedder is not None
        shedder.admit = lambda: False  # type: ignore[method-assign]
        assert_refused_at_headers(server.address, x, "overloaded", "50")
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=WAIT).live
        assert stub.ModelReady(pb.ModelReadyRequest(name="light"), timeout=WAIT).ready

        del shedder.admit  # the real one: the idle loop keeps up, so all are let through
        assert output(stub.ModelInfer(fp32_request("light", x), timeout=WAIT)).shape == (1, 8)


def assert_refused_at_headers(address: str, x: np.ndarray, words: str, retry_ms: str) -> None:
    """ModelInfer answers UNAVAILABLE with `words` and the retry hint before its body is
    read: an unparseable body is refused the same way."""
    with grpc.insecure_channel(address) as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for body in (fp32_request("light", x).SerializeToString(), b"\xff\x00 not protobuf"):
            with pytest.raises(grpc.RpcError) as refused:
                raw(body, timeout=WAIT)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert words in refused.value.details()
            assert dict(refused.value.trailing_metadata())["grpc-retry-pushback-ms"] == retry_ms


def _lift_the_bound(server) -> None:
    """Lifts `light`'s queue-wait bound before the gate opens: the calls queued meanwhile
    have waited as long as the test took, and one still queued past the bound would be
    refused then (the unit tests cover that)."""
    batcher = server.repository.get("light").batcher
    batcher.policy = dataclasses.replace(batcher.policy, max_queue_wait_s=0.0)


def _past_the_bound(server, stub, gate: Gate, x: np.ndarray) -> list[grpc.Future]:
    """`light` busy with 1 row, batches of 0.1 s a row, a 0.25 s queue-wait bound and 2
    rows queued: 0.3 s ahead, so any further request would be refused."""
    batcher = server.repository.get("light").batcher
    first = hold_instance(server, stub, gate, "light", fp32_request("light", x))
    batcher.rate = KnownLine(0.0, 0.1)
    batcher.policy = dataclasses.replace(batcher.policy, max_queue_wait_s=0.25)
    queued = [stub.ModelInfer.future(fp32_request("light", x), timeout=WAIT) for _ in range(2)]
    wait_until(lambda: batcher.queued_rows == 2, WAIT)
    return [first, *queued]


def test_while_every_model_would_refuse_calls_are_refused_at_their_headers(tmp_path: Path):
    root = tmp_path / "models"
    write_model(mlp(LIGHT_MLP, seed=3, name="light"), root, "light")
    gate = Gate()
    x = np.zeros((1, 64), np.float32)
    with serving(root, gate) as (server, stub):
        admitted = _past_the_bound(server, stub, gate, x)
        assert_refused_at_headers(server.address, x, "past its bound", "301")  # 3 rows ahead
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=WAIT).live  # not guarded

        def count(name: str, **labels: str) -> float | None:
            return server.registry.get_sample_value(name, labels)

        assert count("modelplane_grpc_calls_refused_at_door_total") == 2
        rejected = {"model": "light", "version": "1", "outcome": "rejected"}
        assert count("modelplane_inference_requests_total", **rejected, reason="queue_wait") == 0

        _lift_the_bound(server)
        gate.open()
        assert all(output(f.result(WAIT)).shape == (1, 8) for f in admitted)
        # Nothing ahead any more: calls go through again.
        assert output(stub.ModelInfer(fp32_request("light", x), timeout=WAIT)).shape == (1, 8)


def test_while_another_model_would_take_a_request_the_door_lets_calls_in(repository):
    gate = Gate()
    x = np.zeros((1, 64), np.float32)
    with serving(repository, gate) as (server, stub):
        admitted = _past_the_bound(server, stub, gate, x)
        # `echo` and the others are idle, so the call is read and refused by `light`'s
        # own admission, by reason.
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(fp32_request("light", x), timeout=WAIT)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Queue too long" in refused.value.details()
        assert (
            server.registry.get_sample_value(
                "modelplane_inference_requests_total",
                {"model": "light", "version": "1", "outcome": "rejected", "reason": "queue_wait"},
            )
            == 1
        )
        assert server.registry.get_sample_value("modelplane_grpc_calls_refused_at_door_total") == 0
        _lift_the_bound(server)
        gate.open()
        assert all(output(f.result(WAIT)).shape == (1, 8) for f in admitted)
