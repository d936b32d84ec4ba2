"""`modelplane auth bootstrap` gives a deployment working TLS and tokens: a registry run
with its files (as deploy/compose.yaml runs it) is reached over TLS with the admin
token read from its file, and each service's token has only its roles."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from modelplane.cli.auth_bootstrap import PRINCIPALS, AlreadyBootstrapped, bootstrap
from modelplane.cli.main import main as cli_main
from modelplane.client.credentials import ClientCredentials
from modelplane.client.registry import RegistryClient
from modelplane.kernel.auth import TokenStore
from tests.integration.registry.conftest import ThreadedServer


def test_bootstrap_writes_owner_only_keys_and_tokens_with_their_roles(tmp_path: Path) -> None:
    directory = tmp_path / "credentials"
    assert cli_main(["auth", "bootstrap", str(directory), "--host", "models.example"]) == 0
    for secret in ["ca.key", "server.key", *(f"tokens/{name}.token" for name in PRINCIPALS)]:
        assert stat.S_IMODE((directory / secret).stat().st_mode) == 0o600, secret
    store = TokenStore(directory / "tokens.jsonl")
    for name, roles in PRINCIPALS.items():
        principal = store.authenticate((directory / "tokens" / f"{name}.token").read_text().strip())
        assert principal is not None and principal.name == name
        assert set(roles) <= set(principal.roles)
    cert = x509.load_pem_x509_certificate((directory / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"registry", "inference", "models.example", "localhost"} <= set(
        names.get_values_for_type(x509.DNSName)
    )
    # A second run changes nothing (compose runs it before every start).
    before = (directory / "tokens.jsonl").read_bytes()
    assert cli_main(["auth", "bootstrap", str(directory)]) == 0
    assert (directory / "tokens.jsonl").read_bytes() == before
    with pytest.raises(AlreadyBootstrapped):
        bootstrap(directory)


def test_a_registry_on_bootstrapped_credentials(
    tmp_path: Path,
    server_factory: Callable[..., ThreadedServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = tmp_path / "credentials"
    bootstrap(directory)
    server = server_factory(
        ClientCredentials(ca_file=directory / "ca.crt"),
        auth_tokens_file=directory / "tokens.jsonl",
        tls_cert_file=directory / "server.crt",
        tls_key_file=directory / "server.key",
    )
    for name in ("MODELPLANE_TOKEN", "MODELPLANE_TLS_CERT", "MODELPLANE_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MODELPLANE_TLS_CA", str(directory / "ca.crt"))
    monkeypatch.setenv("MODELPLANE_TOKEN_FILE", str(directory / "tokens" / "admin.token"))
    with RegistryClient(server.address, timeout=10) as admin:
        assert admin.create_model("fraud").created_by == "admin"
    monitoring = ClientCredentials.from_env(
        {
            "MODELPLANE_TLS_CA": str(directory / "ca.crt"),
            "MODELPLANE_TOKEN_FILE": str(directory / "tokens" / "monitoring.token"),
        }
    )
    with RegistryClient(server.address, timeout=10, credentials=monitoring) as reader:
        assert [model.name for model in reader.list_models()] == ["fraud"]
        with pytest.raises(grpc.RpcError) as refused:
            reader.create_model("other")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def test_an_unreadable_token_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.token"
    with pytest.raises(ValueError, match="MODELPLANE_TOKEN_FILE"):
        ClientCredentials.from_env({"MODELPLANE_TOKEN_FILE": str(missing)})
    # MODELPLANE_TOKEN wins over the file.
    assert (
        ClientCredentials.from_env(
            {"MODELPLANE_TOKEN": "abc", "MODELPLANE_TOKEN_FILE": str(missing)}
        ).token
        == "abc"
    )
