"""`modelplane serve` TLS flags."""

from __future__ import annotations

from pathlib import Path

from modelplane.cli.main import build_parser, main
from modelplane.cli.serve import settings_from_args


def test_tls_flags_set_the_tls_settings(tmp_path):
    args = build_parser().parse_args(
        [
            "serve",
            "registry",
            "--tls-cert",
            str(tmp_path / "s.crt"),
            "--tls-key",
            str(tmp_path / "s.key"),
            "--tls-client-ca",
            str(tmp_path / "ca.crt"),
        ]
    )
    settings = settings_from_args(args.service_module, args)
    assert settings.tls_cert_file == tmp_path / "s.crt"
    assert settings.tls_key_file == tmp_path / "s.key"
    assert settings.tls_client_ca_file == tmp_path / "ca.crt"


def test_tls_flags_default_to_plaintext(tmp_path):
    args = build_parser().parse_args(["serve", "monitoring", "--data-dir", str(tmp_path)])
    settings = settings_from_args(args.service_module, args)
    assert settings.tls_cert_file is None
    assert settings.tls_key_file is None
    assert settings.tls_client_ca_file is None


def test_a_certificate_without_its_key_exits_with_a_message(tmp_path, capsys):
    cert = Path(tmp_path / "s.crt")
    code = main(
        ["serve", "monitoring", "--port", "0", "--data-dir", str(tmp_path), "--tls-cert", str(cert)]
    )
    assert code == 2
    assert "tls_cert_file is set but tls_key_file is not" in capsys.readouterr().err
