"""Admission control over real gRPC: a request whose deadline comes before the work queued
ahead of it is refused at once with UNAVAILABLE and a `grpc-retry-pushback-ms` trailer,
and counted by reason; a request without a deadline still waits its turn.

The instance is held busy by the gate and the model's service rate is set by hand, so the
work ahead is known exactly (no sleeps, no timing assertions)."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest

from modelplane.services.inference.batcher import ServiceRate
from tests.integration.inference.conftest import WAIT, Gate, fp32_request, output, serving
from tests.integration.inference.test_batching_service import hold_instance
from tests.support import wait_until


def test_a_deadline_shorter_than_the_work_ahead_is_rejected_at_once(repository):
    gate = Gate()
    x = np.zeros((1, 64), np.float32)
    with serving(repository, gate) as (server, stub):
        batcher = server.repository.get("light").batcher
        first = hold_instance(server, stub, gate, "light", fp32_request("light", x))
        batcher.rate = ServiceRate()
        batcher.rate.add(1, 1_000_000_000)  # one row a second
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
