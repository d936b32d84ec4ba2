"""Client-certificate identities on a mutual-TLS port with auth on: a certificate whose
common name the token file registers is that principal; an unregistered one is refused;
a bearer token still works over the same port."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import pytest

from modelplane.client.credentials import ClientCredentials
from modelplane.kernel.auth import add_certificate, add_token
from modelplane.kernel.server import AioServiceServer, SyncServiceServer
from modelplane.kernel.settings import ServiceSettings
from tests.certificates import CertificateAuthority
from tests.integration.kernel.test_auth import (
    GET_MODEL,
    REGISTRY,
    SET_ALIAS,
    WATCH_MODEL,
    _aio_stream,
    _aio_unary,
    _aio_upload,
    _handlers,
    _sync_stream,
    _sync_unary,
    _sync_upload,
)
from tests.support import running_aio_in_thread, running_sync


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory / "ca")
    return {
        "ca": ca,
        "server": ca.server(),
        "approver": ca.client("release-bot"),
        "unregistered": ca.client("mallory"),
        "plain": ca.client("token-user"),
    }


def _credentials(pki: dict, client: str, token: str | None = None) -> ClientCredentials:
    issued = pki[client]
    return ClientCredentials(
        ca_file=pki["ca"].cert_file, cert_file=issued.cert, key_file=issued.key, token=token
    )


def _serve(
    kind: str, settings: ServiceSettings, ready: ClientCredentials
) -> AbstractContextManager[str]:
    if kind == "aio":
        aio = AioServiceServer(
            settings,
            "auth-cert-test",
            [REGISTRY],
            lambda server: server.add_generic_rpc_handlers(
                _handlers(_aio_unary, _aio_stream, _aio_upload)
            ),
        )
        return running_aio_in_thread(aio, credentials=ready)
    sync = SyncServiceServer(
        settings,
        "auth-cert-test",
        [REGISTRY],
        lambda server: server.add_generic_rpc_handlers(
            _handlers(_sync_unary, _sync_stream, _sync_upload)
        ),
        max_workers=4,
    )
    return running_sync(sync, credentials=ready)


def _code(call: Callable[[], object]) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined, no-any-return]
    return None


@pytest.mark.parametrize("kind", ["aio", "sync"])
def test_a_registered_client_certificate_is_its_principal(kind, tmp_path: Path, pki) -> None:
    tokens = tmp_path / "tokens.jsonl"
    add_certificate(tokens, "release-bot", ["approver"])
    rita = add_token(tokens, "rita", ["reader"])
    settings = ServiceSettings(
        auth_tokens_file=tokens,
        tls_cert_file=pki["server"].cert,
        tls_key_file=pki["server"].key,
        tls_client_ca_file=pki["ca"].cert_file,
        tracing_enabled=False,
        log_json=False,
        log_level="WARNING",
    )
    with _serve(kind, settings, _credentials(pki, "unregistered")) as address:
        # The registered CN gets its roles (approver grants reader), unary and streaming.
        with _credentials(pki, "approver").channel(address) as channel:
            assert channel.unary_unary(SET_ALIAS)(b"", timeout=5) == b"release-bot"
            assert channel.unary_unary(GET_MODEL)(b"", timeout=5) == b"release-bot"
            watch = channel.unary_stream(WATCH_MODEL)
            assert list(watch(b"", timeout=5)) == [b"release-bot", b"release-bot"]
        # A certificate the CA signed, but whose CN is not registered: no principal.
        with _credentials(pki, "unregistered").channel(address) as channel:
            assert _code(lambda: channel.unary_unary(GET_MODEL)(b"", timeout=5)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
        # A bearer token still works over mTLS, and decides alone: its own roles...
        with _credentials(pki, "plain", token=rita).channel(address) as channel:
            assert channel.unary_unary(GET_MODEL)(b"", timeout=5) == b"rita"
            assert _code(lambda: channel.unary_unary(SET_ALIAS)(b"", timeout=5)) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
        # ...even over a registered certificate (a wrong token is not topped up by it).
        with _credentials(pki, "approver", token="mp_0_bad").channel(address) as channel:
            assert _code(lambda: channel.unary_unary(SET_ALIAS)(b"", timeout=5)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
        with _credentials(pki, "approver", token=rita).channel(address) as channel:
            assert channel.unary_unary(GET_MODEL)(b"", timeout=5) == b"rita"


def test_without_a_client_ca_certificate_entries_authenticate_nobody(tmp_path: Path, pki) -> None:
    """Server-only TLS: the client's certificate is not asked for, so a CN is no identity."""
    tokens = tmp_path / "tokens.jsonl"
    add_certificate(tokens, "release-bot", ["approver"])
    settings = ServiceSettings(
        auth_tokens_file=tokens,
        tls_cert_file=pki["server"].cert,
        tls_key_file=pki["server"].key,
        tracing_enabled=False,
        log_json=False,
        log_level="WARNING",
    )
    ready = ClientCredentials(ca_file=pki["ca"].cert_file)
    with (
        _serve("sync", settings, ready) as address,
        _credentials(pki, "approver").channel(address) as channel,
    ):
        assert _code(lambda: channel.unary_unary(GET_MODEL)(b"", timeout=5)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
