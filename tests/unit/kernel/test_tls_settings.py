"""The server's TLS settings: which combinations serve TLS, which stop the start."""

from __future__ import annotations

import grpc
import pytest

from modelplane.kernel.settings import ServiceSettings
from modelplane.kernel.startup import StartupError
from modelplane.kernel.tls import server_credentials
from tests.certificates import CertificateAuthority


def test_no_tls_settings_mean_plaintext():
    assert server_credentials(ServiceSettings()) is None


def test_cert_and_key_give_server_credentials(tmp_path):
    ca = CertificateAuthority(tmp_path)
    server = ca.server()
    for client_ca in (None, ca.cert_file):
        settings = ServiceSettings(
            tls_cert_file=server.cert, tls_key_file=server.key, tls_client_ca_file=client_ca
        )
        assert isinstance(server_credentials(settings), grpc.ServerCredentials)


def test_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELPLANE_TLS_CERT_FILE", str(tmp_path / "s.crt"))
    monkeypatch.setenv("MODELPLANE_TLS_KEY_FILE", str(tmp_path / "s.key"))
    monkeypatch.setenv("MODELPLANE_TLS_CLIENT_CA_FILE", str(tmp_path / "ca.crt"))
    settings = ServiceSettings()
    assert settings.tls_cert_file == tmp_path / "s.crt"
    assert settings.tls_key_file == tmp_path / "s.key"
    assert settings.tls_client_ca_file == tmp_path / "ca.crt"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tls_cert_file": "s.crt"}, "tls_cert_file is set but tls_key_file is not"),
        ({"tls_key_file": "s.key"}, "tls_key_file is set but tls_cert_file is not"),
        ({"tls_client_ca_file": "ca.crt"}, "tls_client_ca_file is set but"),
        (
            {"tls_cert_file": "absent.crt", "tls_key_file": "absent.key"},
            r"cannot read the TLS key .*absent\.key",
        ),
    ],
)
def test_incomplete_or_unreadable_tls_settings_are_startup_errors(tmp_path, fields, message):
    settings = ServiceSettings(**{k: tmp_path / v for k, v in fields.items()})
    with pytest.raises(StartupError, match=message):
        server_credentials(settings)
