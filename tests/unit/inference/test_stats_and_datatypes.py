"""Per-request spans carry their batch; statistics count rows and batches; BYTES codec."""

from __future__ import annotations

import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from modelplane.kernel.errors import InvalidArgument
from modelplane.services.inference.batcher import PendingRequest
from modelplane.services.inference.datatypes import decode_bytes, encode_bytes
from modelplane.services.inference.stats import InferenceMetrics, VersionStats


def finished_request(rows: int, batch_id: int) -> PendingRequest:
    request = PendingRequest({}, rows)
    request.enqueued_ns = request.received_ns
    request.started_ns = request.received_ns + 1000
    request.batch_id = batch_id
    return request


def test_each_request_gets_a_span_with_its_batch_and_stats_count_rows():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    stats = VersionStats("m", "1", InferenceMetrics(registry), provider.get_tracer("test"))
    batch = [finished_request(3, 42), finished_request(2, 42)]
    stats.batch_done(batch, 5, 100, 2000, 300)
    stats.request_dropped(finished_request(1, 0), "expired")

    spans = exporter.get_finished_spans()
    assert [s.attributes["batch.id"] for s in spans[:2]] == [42, 42]
    assert [s.attributes["request.rows"] for s in spans[:2]] == [3, 2]
    assert all(s.attributes["batch.rows"] == 5 for s in spans[:2])
    assert not spans[2].status.is_ok

    snapshot = stats.snapshot()
    assert snapshot.inference_count == 5
    assert snapshot.execution_count == 1
    assert snapshot.success.count == 2
    assert snapshot.queue.count == 2
    assert snapshot.fail.count == 1 and snapshot.expired == 1
    assert list(snapshot.batches) == [5]
    assert snapshot.batches[5].compute_infer.ns == 2000
    labels = {"model": "m", "version": "1"}
    assert registry.get_sample_value("modelplane_inference_batch_size_sum", labels) == 5
    assert (
        registry.get_sample_value(
            "modelplane_inference_requests_total", {**labels, "outcome": "success", "reason": ""}
        )
        == 2
    )


def test_bytes_round_trip_with_length_prefixes():
    values = np.array(["", "a", "wörld", "x" * 1000], dtype=object)
    encoded = encode_bytes(values)
    assert encoded[:4] == b"\x00\x00\x00\x00"
    assert decode_bytes(encoded, 4, "t").tolist() == values.tolist()


@pytest.mark.parametrize(
    "data, count, message",
    [
        (b"\x05\x00\x00\x00abc", 1, "beyond the end"),
        (b"\x01\x00\x00\x00a", 2, "hold at most 1"),
        (b"\x01\x00\x00\x00a\x00", 1, "more than"),
        (b"\x01\x00\x00\x00\xff", 1, "not UTF-8"),
    ],
)
def test_malformed_bytes_are_refused_naming_the_tensor(data, count, message):
    with pytest.raises(InvalidArgument, match=message) as refused:
        decode_bytes(data, count, "tokens")
    assert "'tokens'" in refused.value.message
