"""MonitoringClient without a server: batches built from numpy, UNAVAILABLE retried
inside one deadline, other errors raised at once."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from modelplane.client.monitoring import MonitoringClient, prediction_batch
from modelplane.monitoring.v1 import monitoring_pb2 as pb


class Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class FlakyMethod:
    """Fails with `codes` in turn, then answers."""

    def __init__(self, *codes: grpc.StatusCode) -> None:
        self.codes = list(codes)
        self.timeouts: list[float] = []

    def __call__(
        self, request: pb.LogPredictionsRequest, timeout: float, metadata: object = ()
    ) -> object:
        self.timeouts.append(timeout)
        if self.codes:
            raise Failure(self.codes.pop(0))
        return pb.LogPredictionsResponse(stored=len(request.batches[0].request_ids))


def client(method: FlakyMethod, timeout: float = 5.0) -> MonitoringClient:
    monitoring = MonitoringClient("127.0.0.1:1", timeout=timeout, connect_timeout=None)
    monitoring.stub.LogPredictions = method  # type: ignore[method-assign,assignment]
    return monitoring


def one_record() -> pb.PredictionBatch:
    return prediction_batch(
        "m", "1", ["r"], [1.0], np.zeros((1, 2)), ["a", "b"], {"y": np.ones((1, 1))}
    )


def test_unavailable_is_retried_inside_the_deadline():
    method = FlakyMethod(grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE)
    with client(method) as monitoring:
        assert monitoring.log_predictions([one_record()]).stored == 1
    assert len(method.timeouts) == 3
    assert all(t <= 5.0 for t in method.timeouts)
    assert method.timeouts == sorted(method.timeouts, reverse=True)  # one deadline for all


def test_other_errors_are_not_retried():
    method = FlakyMethod(grpc.StatusCode.INVALID_ARGUMENT)
    with client(method) as monitoring, pytest.raises(grpc.RpcError):
        monitoring.log_predictions([one_record()])
    assert len(method.timeouts) == 1


def test_retries_stop_at_the_deadline():
    method = FlakyMethod(*[grpc.StatusCode.UNAVAILABLE] * 1000)
    started = time.monotonic()
    with client(method, timeout=0.3) as monitoring, pytest.raises(grpc.RpcError):
        monitoring.log_predictions([one_record()], timeout=0.3)
    assert time.monotonic() - started < 1.0


def test_a_batch_from_numpy():
    batch = prediction_batch(
        "m",
        "1",
        ["a", "b"],
        np.array([1.5, 2.5]),
        np.arange(6, dtype=np.float64).reshape(2, 3),
        ["x", "y", "z"],
        {"p": np.array([[0.1], [0.2]]), "q": np.array([[1, 2], [3, 4]])},
        route="canary",
        slices={"region": ["eu", "us"]},
    )
    assert list(batch.latency_ms) == [1.5, 2.5]
    assert np.frombuffer(batch.feature_values, "<f4").tolist() == [0, 1, 2, 3, 4, 5]
    assert [(o.name, o.width) for o in batch.outputs] == [("p", 1), ("q", 2)]
    values = np.frombuffer(batch.output_values, "<f4").reshape(2, 3)
    np.testing.assert_allclose(values, [[0.1, 1, 2], [0.2, 3, 4]], rtol=1e-6)
    assert batch.slices[0].values == ["eu", "us"]
    with pytest.raises(ValueError, match="features"):
        prediction_batch("m", "1", ["a"], [1.0], np.zeros((1, 2)), ["x"], {})
    with pytest.raises(ValueError, match="output 'p'"):
        prediction_batch("m", "1", ["a"], [1.0], np.zeros((1, 0)), [], {"p": np.zeros(3)})
