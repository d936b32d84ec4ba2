"""Every service refuses messages over 64 MiB by default (issue #17: a 100 MB request was
accepted under gRPC's own 2 GiB - 1); larger data travels in chunks or as files."""

from __future__ import annotations

import pytest

from modelplane.kernel.server import grpc_options
from modelplane.kernel.settings import MAX_MESSAGE_BYTES, ServiceSettings
from modelplane.services.feature.main import Settings as FeatureSettings
from modelplane.services.inference.main import Settings as InferenceSettings
from modelplane.services.monitoring.main import Settings as MonitoringSettings
from modelplane.services.registry.main import Settings as RegistrySettings

LIMIT = 64 * 2**20


@pytest.mark.parametrize(
    "settings",
    [ServiceSettings, RegistrySettings, FeatureSettings, MonitoringSettings, InferenceSettings],
)
def test_every_service_bounds_messages_at_64_mib(settings):
    options = dict(grpc_options(settings()))
    assert options["grpc.max_receive_message_length"] == LIMIT
    assert options["grpc.max_send_message_length"] == LIMIT


def test_the_bound_is_a_setting_up_to_grpcs_largest_frame(monkeypatch):
    monkeypatch.setenv("MODELPLANE_MAX_MESSAGE_BYTES", str(MAX_MESSAGE_BYTES))
    assert ServiceSettings().max_message_bytes == MAX_MESSAGE_BYTES
    monkeypatch.setenv("MODELPLANE_MAX_MESSAGE_BYTES", str(MAX_MESSAGE_BYTES + 1))
    with pytest.raises(ValueError, match="max_message_bytes"):
        ServiceSettings()


def test_registry_chunks_fit_well_inside_the_bound():
    from modelplane.client.registry import CHUNK_BYTES
    from modelplane.services.registry.servicer import MAX_CHUNK_BYTES

    assert CHUNK_BYTES <= MAX_CHUNK_BYTES < LIMIT // 8
