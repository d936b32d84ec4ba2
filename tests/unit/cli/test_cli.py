"""The command line: every command has help, settings are discoverable."""

from __future__ import annotations

import pytest

from modelplane.cli.main import build_parser, main
from modelplane.cli.serve import settings_from_args


def _command_names() -> list[str]:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    return sorted(commands.choices)  # type: ignore[arg-type]


def test_top_level_help_lists_serve_and_up(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "up", "config"):
        assert command in out


@pytest.mark.parametrize("command", _command_names())
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("service", ["registry", "feature", "inference", "monitoring"])
def test_serve_has_help_for_every_service(service, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", service, "--help"])
    assert exit_info.value.code == 0
    assert "--port" in capsys.readouterr().out


def test_flags_override_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELPLANE_MONITORING_PORT", "7000")
    monkeypatch.setenv("MODELPLANE_MONITORING_LOG_LEVEL", "DEBUG")
    args = build_parser().parse_args(
        ["serve", "monitoring", "--port", "0", "--data-dir", str(tmp_path)]
    )
    settings = settings_from_args(args.service_module, args)
    assert settings.port == 0  # the flag wins
    assert settings.log_level == "DEBUG"  # the environment fills what flags leave out
    assert settings.data_dir == tmp_path


def test_config_prints_each_setting_with_its_variable(capsys):
    assert main(["config", "monitoring"]) == 0
    out = capsys.readouterr().out
    assert "`MODELPLANE_MONITORING_PORT`" in out
    assert "`MODELPLANE_MONITORING_GRACE_PERIOD_S`" in out
