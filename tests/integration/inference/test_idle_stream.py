"""Issue #17: a ModelStreamInfer stream on which neither side sent anything for the idle
timeout is ended by the server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from inference import grpc_service_pb2 as pb
from modelplane.examples.models import LIGHT_MLP
from modelplane.kernel.call_bounds import STREAM_IDLE
from tests.integration.inference.conftest import WAIT, fp32_request, serving

IDLE_S = 0.5


def test_an_idle_stream_is_ended_after_the_idle_timeout(repository: Path) -> None:
    release = threading.Event()

    def one_request_then_silence() -> Iterator[pb.ModelInferRequest]:
        yield fp32_request("light", np.ones((1, LIGHT_MLP[0]), np.float32), request_id="only")
        release.wait(WAIT)  # the client keeps the stream open and sends nothing more

    with serving(repository, stream_idle_timeout_s=IDLE_S) as (server, stub):
        try:
            # No client deadline: only the server's idle bound ends the stream.
            stream = stub.ModelStreamInfer(one_request_then_silence())
            first = next(stream)
            assert first.error_message == "" and first.infer_response.id == "only"
            with pytest.raises(grpc.RpcError) as ended:
                next(stream)
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert ended.value.details() == STREAM_IDLE.format(IDLE_S)
            idle = server.registry.get_sample_value(
                "modelplane_grpc_calls_timed_out_total", {"reason": "stream_idle"}
            )
            assert idle == 1
        finally:
            release.set()
