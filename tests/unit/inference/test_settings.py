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


def test_input_limits_and_message_size_have_safe_defaults(monkeypatch):
    settings = Settings()
    # Tens of MB, not the kernel's 2 GiB - 1 (issue #17: a 100 MB request was accepted).
    assert settings.max_message_bytes == 64 * 2**20
    limits = settings.input_limits
    assert limits.max_request_elements == 2**24
    assert limits.max_request_bytes == 64 * 2**20
    assert limits.max_bytes_element_length == 2**20
    assert limits.max_rows_per_request == 65_536
    monkeypatch.setenv("MODELPLANE_INFERENCE_MAX_REQUEST_ELEMENTS", "1000")
    monkeypatch.setenv("MODELPLANE_INFERENCE_MAX_MESSAGE_BYTES", "4096")
    settings = Settings()
    assert settings.input_limits.max_request_elements == 1000
    assert settings.max_message_bytes == 4096
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--max-rows-per-request", "7", "--max-bytes-element-length", "9"])
    assert (args.max_rows_per_request, args.max_bytes_element_length) == (7, 9)
