"""Issue #17: calls that send headers and never a request body cost the feature service a
bounded wait as a coroutine, never a handler thread, and never lock the others out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from modelplane.feature.v1 import feature_pb2 as pb
from modelplane.feature.v1 import feature_pb2_grpc as pb_grpc
from modelplane.kernel.call_bounds import BODY_TIMED_OUT
from modelplane.services.feature.main import build
from tests.integration.feature.messages import DEFINITIONS, customers, doubles, now_us, stats_write
from tests.integration.feature.servers import settings_for, unique_prefix
from tests.support import running_aio

GET_ONLINE = "/modelplane.feature.v1.FeatureService/GetOnlineFeatures"
# More than the old ceiling (max_workers x 4 = 128 calls in flight) and than the threads.
SILENT_CALLS = 200


async def _nothing() -> AsyncIterator[bytes]:
    """A request stream that never sends: on the wire, a unary call whose body never comes."""
    await asyncio.Event().wait()
    yield b""  # pragma: no cover


async def _until(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.01)  # ok-sleep: polling a metric the server updates


async def test_calls_without_a_body_are_ended_and_never_starve_a_real_read(tmp_path):
    settings = settings_for("sqlite", tmp_path / "state", unique_prefix()).model_copy(
        update={"request_body_timeout_s": 0.5, "max_workers": 4}
    )
    server = build(settings)
    in_flight = "modelplane_grpc_calls_in_flight"
    async with running_aio(server) as address, grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        await stub.ApplyDefinitions(
            pb.ApplyDefinitionsRequest(yaml=DEFINITIONS.format(source=tmp_path / "s.parquet")),
            timeout=30,
        )
        await stub.WriteFeatures(stats_write([7], [now_us()], trips=doubles([3.0])), timeout=30)

        silent = channel.stream_unary(GET_ONLINE)
        # No client deadline: only the server's bound ends them.
        calls = [silent(_nothing()) for _ in range(SILENT_CALLS)]
        await _until(lambda: (server.registry.get_sample_value(in_flight) or 0) >= SILENT_CALLS)

        # Every silent call is waiting on the server; a real read is still answered.
        response = await stub.GetOnlineFeatures(
            pb.GetOnlineFeaturesRequest(
                entity_keys=customers(7), features=["customer_stats:trips"]
            ),
            timeout=10,
        )
        assert list(response.columns[0].values.double_values) == [3.0]

        codes = await asyncio.wait_for(asyncio.gather(*(c.code() for c in calls)), 30)
        assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}
        assert await calls[0].details() == BODY_TIMED_OUT.format(0.5)
        timed_out = server.registry.get_sample_value(
            "modelplane_grpc_calls_timed_out_total", {"reason": "request_body"}
        )
        assert timed_out == SILENT_CALLS
        await _until(lambda: server.registry.get_sample_value(in_flight) == 0)
