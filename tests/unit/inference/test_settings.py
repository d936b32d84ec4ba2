"""The inference service's flags and environment variables reach its Settings."""

from __future__ import annotations

import argparse
from pathlib import Path

from modelplane.services.inference.main import Settings, add_arguments


def test_every_flag_names_a_settings_field():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    dests = {action.dest for action in parser._actions if action.dest != "help"}
    assert dests <= set(Settings.model_fields)
    args = parser.parse_args(
        ["--model-repository", "/srv/models", "--load-model", "a", "--load-model", "b"]
    )
    assert args.model_repository == Path("/srv/models")
    assert args.load_model == ["a", "b"]


def test_environment_and_the_default_repository(monkeypatch, tmp_path):
    assert Settings(data_dir=tmp_path).repository_path == tmp_path / "models"
    monkeypatch.setenv("MODELPLANE_INFERENCE_MODEL_REPOSITORY", "/srv/models")
    monkeypatch.setenv("MODELPLANE_INFERENCE_MAX_QUEUE_ROWS", "99")
    monkeypatch.setenv("MODELPLANE_INFERENCE_LOAD_MODEL", '["a"]')
    settings = Settings()
    assert settings.repository_path == Path("/srv/models")
    assert settings.max_queue_rows == 99
    assert settings.load_model == ["a"]
