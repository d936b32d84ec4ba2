"""The feature service's settings: environment prefix and the online store choice."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from modelplane.services.feature.main import Settings


def test_online_store_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MODELPLANE_FEATURE_ONLINE_STORE", "redis://127.0.0.1:6379/2")
    monkeypatch.setenv("MODELPLANE_FEATURE_REDIS_CONNECT_TIMEOUT_S", "0.2")
    settings = Settings()
    assert settings.online_store == "redis://127.0.0.1:6379/2"
    assert settings.redis_connect_timeout_s == 0.2


@pytest.mark.parametrize("value", ["postgres://x", "memory", ""])
def test_unknown_online_stores_are_refused(value):
    with pytest.raises(ValidationError):
        Settings(online_store=value)


def test_every_setting_is_documented():
    assert all(field.description for field in Settings.model_fields.values())
