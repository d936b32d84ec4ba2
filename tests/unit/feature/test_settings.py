"""The feature service's settings: environment prefix and the online store choice."""

from __future__ import annotations

from pathlib import Path

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


def test_source_roots_default_to_the_data_dir_the_demo_and_the_files_folder(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.source_folders() == [
        tmp_path / "sources",
        tmp_path / "features",  # where `modelplane up` writes the demo's Parquet
        tmp_path / "files" / "sources",  # deploy/: FILES_DIR=/files, sources in /files/sources
    ]
    assert Settings(data_dir=tmp_path, files_dir="/files").source_folders()[2] == Path(
        "/files/sources"
    )
    assert settings.max_entities_per_read == 10_000


def test_source_roots_come_from_the_environment_comma_separated(monkeypatch):
    monkeypatch.setenv("MODELPLANE_FEATURE_SOURCE_ROOTS", "/files/sources, /data/more")
    monkeypatch.setenv("MODELPLANE_FEATURE_MAX_ENTITIES_PER_READ", "500")
    settings = Settings()
    assert settings.source_folders() == [Path("/files/sources"), Path("/data/more")]
    assert settings.max_entities_per_read == 500
    with pytest.raises(ValidationError):
        Settings(max_entities_per_read=0)
