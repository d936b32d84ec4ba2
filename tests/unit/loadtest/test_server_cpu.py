import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from modelplane.kernel.metrics import new_registry
from modelplane.loadtest.server_cpu import (
    MetricsError,
    ServerCpuProbe,
    metrics_url,
    metrics_urls,
    parse_cpu_seconds,
)


def test_reads_the_process_cpu_counter() -> None:
    text = (
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
        "# TYPE process_cpu_seconds_total counter\n"
        "process_cpu_seconds_total 12.5\n"
        "process_open_fds 7.0\n"
    )
    assert parse_cpu_seconds(text) == 12.5


def test_reads_the_kernel_registry_exposition() -> None:
    text = generate_latest(new_registry()).decode()
    assert parse_cpu_seconds(text) > 0


def test_labelled_counters_add_up() -> None:
    text = (
        "# TYPE process_cpu_seconds counter\n"
        'process_cpu_seconds_total{worker="0"} 1.5\n'
        'process_cpu_seconds_total{worker="1"} 2.0\n'
    )
    assert parse_cpu_seconds(text) == 3.5


def test_missing_counter_is_an_error() -> None:
    registry = CollectorRegistry()
    Counter("other", "x", registry=registry).inc()
    with pytest.raises(MetricsError):
        parse_cpu_seconds(generate_latest(registry).decode())


def test_metrics_url_forms() -> None:
    assert metrics_url("127.0.0.1:8002") == "http://127.0.0.1:8002/metrics"
    assert metrics_url("http://h:1") == "http://h:1/metrics"
    assert metrics_url("http://h:1/custom") == "http://h:1/custom"


def test_several_endpoints_are_one_probe() -> None:
    # One endpoint per server process (workers that each expose their own): summed.
    assert metrics_urls("127.0.0.1:9001, http://h:9002") == [
        "http://127.0.0.1:9001/metrics",
        "http://h:9002/metrics",
    ]
    assert ServerCpuProbe("h:1,h:2").urls == ["http://h:1/metrics", "http://h:2/metrics"]
    with pytest.raises(MetricsError):
        metrics_urls(" , ")
