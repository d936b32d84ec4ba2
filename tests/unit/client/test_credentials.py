"""ClientCredentials: reading the environment, choosing TLS or plaintext, the token."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from modelplane.client.credentials import ClientCredentials, is_loopback, resolve
from modelplane.client.monitoring import MonitoringClient
from modelplane.client.registry import RegistryClient
from tests.certificates import CertificateAuthority

ENV = {
    "MODELPLANE_TLS_CA": "/pki/ca.crt",
    "MODELPLANE_TLS_CERT": "/pki/alice.crt",
    "MODELPLANE_TLS_KEY": "/pki/alice.key",
    "MODELPLANE_TOKEN": "s3cret",
}


def test_from_env_reads_every_variable():
    credentials = ClientCredentials.from_env(
        {**ENV, "MODELPLANE_TLS_SERVER_NAME": "registry.internal", "OTHER": "x"}
    )
    assert credentials == ClientCredentials(
        ca_file=Path("/pki/ca.crt"),
        cert_file=Path("/pki/alice.crt"),
        key_file=Path("/pki/alice.key"),
        token="s3cret",
        server_name="registry.internal",
    )
    assert credentials.uses_tls
    assert credentials.metadata() == (("authorization", "Bearer s3cret"),)


def test_nothing_set_means_plaintext_without_token():
    for environ in ({}, dict.fromkeys(ENV, ""), {"MODELPLANE_TLS": "0"}):
        credentials = ClientCredentials.from_env(environ)
        assert credentials == ClientCredentials()
        assert not credentials.uses_tls
        assert credentials.channel_credentials() is None
        assert credentials.metadata() == ()


def test_tls_flag_alone_turns_tls_on_with_system_roots():
    credentials = ClientCredentials.from_env({"MODELPLANE_TLS": "true"})
    assert credentials.uses_tls
    assert isinstance(credentials.channel_credentials(), grpc.ChannelCredentials)


def test_from_env_reads_os_environ(monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    assert ClientCredentials.from_env().token == "s3cret"
    assert resolve(None).cert_file == Path("/pki/alice.crt")
    given = ClientCredentials(token="mine")
    assert resolve(given) is given


@pytest.mark.parametrize("missing", ["MODELPLANE_TLS_CERT", "MODELPLANE_TLS_KEY"])
def test_a_client_certificate_needs_its_key(missing):
    environ = {k: v for k, v in ENV.items() if k != missing}
    with pytest.raises(ValueError, match=f"{missing} is not"):
        ClientCredentials.from_env(environ)


def test_unreadable_files_are_named(tmp_path):
    credentials = ClientCredentials(ca_file=tmp_path / "nope.crt")
    with pytest.raises(ValueError, match=r"cannot read the TLS CA .*nope\.crt"):
        credentials.channel_credentials()


def test_files_are_read_into_channel_credentials(tmp_path):
    ca = CertificateAuthority(tmp_path)
    alice = ca.client("alice")
    credentials = ClientCredentials(ca_file=ca.cert_file, cert_file=alice.cert, key_file=alice.key)
    assert isinstance(credentials.channel_credentials(), grpc.ChannelCredentials)


def test_repr_never_shows_the_token():
    assert "s3cret" not in repr(ClientCredentials(token="s3cret"))
    assert "s3cret" not in str(ClientCredentials(token="s3cret"))


def test_clients_take_credentials_from_env_by_default(monkeypatch, tmp_path):
    ca = CertificateAuthority(tmp_path)
    monkeypatch.setenv("MODELPLANE_TLS_CA", str(ca.cert_file))
    monkeypatch.setenv("MODELPLANE_TOKEN", "from-env")
    with MonitoringClient("127.0.0.1:1", connect_timeout=None) as monitoring:
        assert monitoring.credentials.token == "from-env"
        assert monitoring.credentials.ca_file == ca.cert_file
    with RegistryClient("127.0.0.1:1") as registry:
        assert registry.credentials.token == "from-env"
    explicit = ClientCredentials()
    with RegistryClient("127.0.0.1:1", credentials=explicit) as registry:
        assert registry.credentials is explicit


def test_plaintext_token_to_a_remote_address_warns(caplog):
    credentials = ClientCredentials(token="s3cret")
    with caplog.at_level(logging.WARNING, logger="modelplane.client"):
        credentials.channel("127.0.0.1:50051").close()
        credentials.channel("localhost:50051").close()
        assert caplog.records == []
        credentials.channel("10.0.0.7:50051").close()
    assert len(caplog.records) == 1
    assert "without TLS" in caplog.records[0].getMessage()
    assert "s3cret" not in caplog.text


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("localhost:1", True),
        ("[::1]:50051", True),
        ("dns:///localhost:50051", True),
        ("unix:/tmp/sock", True),
        ("registry:50051", False),
        ("10.1.2.3:50051", False),
    ],
)
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback
