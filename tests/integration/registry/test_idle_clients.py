"""Issue #17: an upload whose client stops sending is ended after the idle timeout, its
slot and its partial file freed; a watch waiting for events is never idle."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import onnx
import pytest

from modelplane.client.registry import RegistryClient
from modelplane.examples.models import mlp
from modelplane.kernel.call_bounds import STREAM_IDLE
from modelplane.registry.v1 import registry_pb2 as pb
from modelplane.registry.v1 import registry_pb2_grpc as pb_grpc
from tests.integration.registry.conftest import ThreadedServer

IDLE_S = 0.5


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(mlp((8, 16, 3), seed=1), path)
    return path


@pytest.fixture
def server(server_factory: Callable[..., ThreadedServer]) -> ThreadedServer:
    server = server_factory(stream_idle_timeout_s=IDLE_S, request_body_timeout_s=IDLE_S)
    with RegistryClient(server.address) as client:
        client.create_model("fraud")
    return server


def _stalled(first_chunk: bytes, sent: asyncio.Event) -> AsyncIterator[pb.UploadVersionRequest]:
    async def requests() -> AsyncIterator[pb.UploadVersionRequest]:
        yield pb.UploadVersionRequest(metadata=pb.UploadMetadata(model="fraud"))
        yield pb.UploadVersionRequest(chunk=first_chunk)
        sent.set()
        await asyncio.Event().wait()  # the client stalls: it never sends again

    return requests()


async def _until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.01)  # ok-sleep: polling a metric the server updates


async def _upload(stub: pb_grpc.RegistryServiceStub, model_file: Path) -> pb.UploadVersionResponse:
    async def requests() -> AsyncIterator[pb.UploadVersionRequest]:
        yield pb.UploadVersionRequest(metadata=pb.UploadMetadata(model="fraud"))
        yield pb.UploadVersionRequest(chunk=model_file.read_bytes())

    return await stub.UploadVersion(requests(), timeout=30)


async def test_stalled_uploads_time_out_and_free_their_slots(
    server: ThreadedServer, model_file: Path
) -> None:
    slots = server.settings.max_concurrent_uploads
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.RegistryServiceStub(channel)
        sent = [asyncio.Event() for _ in range(slots)]
        # No client deadline: only the server's idle bound ends them.
        stalled = [stub.UploadVersion(_stalled(b"\x08\x07", event)) for event in sent]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in sent)), 30)

        codes = await asyncio.wait_for(asyncio.gather(*(c.code() for c in stalled)), 30)
        assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}
        assert await stalled[0].details() == STREAM_IDLE.format(IDLE_S)

        # They held every upload slot (each had sent bytes) until the timeout ended them;
        # each frees its slot right after its status is sent.
        metrics = server.server.registry
        await _until(lambda: metrics.get_sample_value("modelplane_registry_uploads_in_flight") == 0)
        outcome = {"outcome": "aborted"}
        assert metrics.get_sample_value("modelplane_registry_uploads_total", outcome) == slots
        assert metrics.get_sample_value("modelplane_registry_uploaded_bytes_total") == 2 * slots

        # Every slot is free again, and no partial file is left behind.
        response = await _upload(stub, model_file)
        assert response.version.version == 1
    assert os.listdir(server.settings.data_dir / "artifacts" / "tmp") == []


async def test_a_watch_waiting_for_events_outlives_the_idle_timeout(
    server: ThreadedServer, model_file: Path
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.RegistryServiceStub(channel)
        watch = stub.WatchModel(pb.WatchModelRequest(model="fraud"))
        first = await asyncio.wait_for(watch.read(), 30)
        assert first.HasField("snapshot")

        # Twice in a row, an idle upload opened after the watch is cut: the idle timeout
        # has passed at least twice over while the watch waited.
        for _ in range(2):
            sent = asyncio.Event()
            idle = stub.UploadVersion(_stalled(b"\x08\x07", sent))
            assert await asyncio.wait_for(idle.code(), 30) == grpc.StatusCode.DEADLINE_EXCEEDED

        await _upload(stub, model_file)
        event = await asyncio.wait_for(watch.read(), 30)
        assert event.version_created.version.version == 1
        watch.cancel()
