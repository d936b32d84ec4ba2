"""TLS and mutual TLS on the kernel's servers, and the clients' credentials (TLS, client
certificates, bearer token), with certificates made in the test."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.client.credentials import ClientCredentials
from modelplane.client.monitoring import MonitoringClient
from modelplane.client.registry import RegistryClient
from modelplane.kernel.server import AioServiceServer
from modelplane.kernel.settings import ServiceSettings
from modelplane.kernel.startup import StartupError
from tests.certificates import CertificateAuthority
from tests.integration.kernel import echo_service
from tests.support import running_aio, running_sync

METADATA_SERVICE = "test.Metadata"
METADATA_METHOD = f"/{METADATA_SERVICE}/Authorization"
TLS_ENV = (
    "MODELPLANE_TLS_CA",
    "MODELPLANE_TLS_CERT",
    "MODELPLANE_TLS_KEY",
    "MODELPLANE_TLS",
    "MODELPLANE_TLS_SERVER_NAME",
    "MODELPLANE_TOKEN",
)


@pytest.fixture(autouse=True)
def _no_credentials_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TLS_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory / "ca")
    stranger = CertificateAuthority(directory / "other", name="stranger CA")
    return {
        "ca": ca,
        "server": ca.server(),
        "client": ca.client("alice"),
        "stranger": stranger.client("mallory"),
    }


def tls_settings(tmp_path: Path, pki: dict, mutual: bool = False, **extra) -> dict:
    server = pki["server"]
    return {
        "port": 0,
        "data_dir": tmp_path,
        "log_json": False,
        "log_level": "WARNING",
        "tls_cert_file": server.cert,
        "tls_key_file": server.key,
        "tls_client_ca_file": pki["ca"].cert_file if mutual else None,
        **extra,
    }


def trusting(pki: dict, client: str | None = None, token: str | None = None) -> ClientCredentials:
    issued = pki[client] if client else None
    return ClientCredentials(
        ca_file=pki["ca"].cert_file,
        cert_file=issued.cert if issued else None,
        key_file=issued.key if issued else None,
        token=token,
    )


def echo(channel: grpc.Channel, text: str = "hi") -> bytes:
    return channel.unary_unary(echo_service.METHOD)(f"echo:{text}".encode(), timeout=5)


def health(channel: grpc.Channel, timeout: float = 15.0) -> None:
    response = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=True
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


@contextmanager
def serving_in_thread(server: AioServiceServer, credentials: ClientCredentials) -> Iterator[str]:
    """tests.support.running_aio_in_thread, with readiness checked over `credentials`
    (a TLS port refuses the plaintext health check that helper makes)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="tls-server-loop", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(120)
        with credentials.channel(server.address) as channel:
            health(channel)
        yield server.address
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# --- the server side -----------------------------------------------------------------


def test_tls_server_answers_tls_clients_and_refuses_plaintext(tmp_path, pki):
    server = echo_service.sync_server(ServiceSettings(**tls_settings(tmp_path, pki)))
    server.start()
    try:
        with trusting(pki).channel(server.address) as channel:
            health(channel)
            assert echo(channel) == b"hi"
        with grpc.insecure_channel(server.address) as plain:
            with pytest.raises(grpc.RpcError) as refused:
                echo(plain)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        # A client that does not trust the server's CA fails the handshake too.
        with ClientCredentials(tls=True).channel(server.address) as untrusting:
            with pytest.raises(grpc.RpcError) as untrusted:
                echo(untrusting)
            assert untrusted.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0)


def test_mutual_tls_requires_a_certificate_from_the_client_ca(tmp_path, pki):
    server = echo_service.sync_server(ServiceSettings(**tls_settings(tmp_path, pki, mutual=True)))
    server.start()
    try:
        with trusting(pki, client="client").channel(server.address) as channel:
            health(channel)
            assert echo(channel, "mtls") == b"mtls"
        for refused_credentials in (trusting(pki), trusting(pki, client="stranger")):
            with refused_credentials.channel(server.address) as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    echo(channel)
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0)


async def test_aio_server_serves_mutual_tls(tmp_path, pki):
    settings = ServiceSettings(**tls_settings(tmp_path, pki, mutual=True))
    server = echo_service.aio_server(settings)
    await server.start()
    try:
        credentials = trusting(pki, client="client")
        async with credentials.aio_channel(server.address) as channel:
            answer = await channel.unary_unary(echo_service.METHOD)(b"echo:aio", timeout=10)
        assert answer == b"aio"
        async with trusting(pki).aio_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary(echo_service.METHOD)(b"echo:aio", timeout=5)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(grace=0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tls_key_file": None}, "tls_cert_file is set but tls_key_file is not"),
        ({"tls_cert_file": None}, "tls_key_file is set but tls_cert_file is not"),
        (
            {"tls_cert_file": None, "tls_key_file": None, "tls_client_ca_file": "CA"},
            "tls_client_ca_file is set but",
        ),
        ({"tls_key_file": "missing.key"}, "cannot read the TLS key"),
    ],
)
def test_incomplete_tls_settings_stop_the_start(tmp_path, pki, fields, message):
    values = tls_settings(tmp_path, pki)
    for key, value in fields.items():
        if value == "CA":
            value = pki["ca"].cert_file
        elif isinstance(value, str):
            value = tmp_path / value
        values[key] = value
    server = echo_service.sync_server(ServiceSettings(**values))
    with pytest.raises(StartupError, match=message):
        server.start()


def test_plaintext_stays_the_default(tmp_path):
    server = echo_service.sync_server(ServiceSettings(port=0, data_dir=tmp_path, log_json=False))
    with running_sync(server) as address, ClientCredentials().channel(address) as channel:
        assert echo(channel) == b"hi"


# --- the token -----------------------------------------------------------------------


def metadata_server(settings: ServiceSettings) -> AioServiceServer:
    """Answers each call with the `authorization` metadata it received (empty if none)."""

    async def authorization(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        return "|".join(str(v) for v in values).encode()

    async def authorization_stream(request_iterator, context: grpc.aio.ServicerContext):
        async for _ in request_iterator:
            yield await authorization(b"", context)

    handler = grpc.method_handlers_generic_handler(
        METADATA_SERVICE,
        {
            "Authorization": grpc.unary_unary_rpc_method_handler(authorization),
            "Stream": grpc.stream_stream_rpc_method_handler(authorization_stream),
        },
    )
    return AioServiceServer(
        settings,
        "metadata",
        [METADATA_SERVICE],
        lambda server: server.add_generic_rpc_handlers((handler,)),
    )


def test_token_is_sent_as_bearer_authorization_over_tls(tmp_path, pki):
    server = metadata_server(ServiceSettings(**tls_settings(tmp_path, pki, mutual=True)))
    credentials = trusting(pki, client="client", token="s3cret")
    with (
        serving_in_thread(server, credentials) as address,
        credentials.channel(address) as channel,
    ):
        assert channel.unary_unary(METADATA_METHOD)(b"", timeout=5) == b"Bearer s3cret"
        replies = channel.stream_stream(f"/{METADATA_SERVICE}/Stream")(iter([b"", b""]), timeout=5)
        assert list(replies) == [b"Bearer s3cret", b"Bearer s3cret"]
        # Metadata the caller adds itself travels alongside, not instead.
        answer = channel.unary_unary(METADATA_METHOD)(b"", timeout=5, metadata=(("x-a", "1"),))
        assert answer == b"Bearer s3cret"


async def test_token_is_sent_over_plaintext_loopback_too(tmp_path):
    settings = ServiceSettings(port=0, data_dir=tmp_path, log_json=False, log_level="WARNING")
    async with running_aio(metadata_server(settings)) as address:
        async with ClientCredentials(token="t0k").aio_channel(address) as channel:
            assert await channel.unary_unary(METADATA_METHOD)(b"", timeout=5) == b"Bearer t0k"
        async with ClientCredentials().aio_channel(address) as channel:
            assert await channel.unary_unary(METADATA_METHOD)(b"", timeout=5) == b""


# --- the typed clients against real services ------------------------------------------


def test_monitoring_client_over_mutual_tls(tmp_path, pki):
    from services.monitoring.main import Settings, build

    server = build(Settings(**tls_settings(tmp_path, pki, mutual=True)))
    credentials = trusting(pki, client="client")
    with serving_in_thread(server, credentials) as address:
        with MonitoringClient(address, timeout=10, credentials=credentials) as client:
            assert client.list_alerts() == []
        with (
            MonitoringClient(
                address, timeout=2, connect_timeout=2, credentials=trusting(pki)
            ) as refused,
            pytest.raises(ConnectionError),
        ):
            refused.list_alerts()


def test_registry_client_over_mutual_tls_with_credentials_from_env(tmp_path, pki, monkeypatch):
    from services.registry.main import Settings, build

    server = build(Settings(**tls_settings(tmp_path, pki, mutual=True, tracing_enabled=False)))
    credentials = trusting(pki, client="client")
    with serving_in_thread(server, credentials) as address:
        with RegistryClient(address, actor="alice", timeout=10, credentials=credentials) as client:
            client.create_model("fraud", description="over mTLS")
            assert [m.name for m in client.list_models()] == ["fraud"]
        # A watch (server stream) through the token interceptor: snapshot, then cancel.
        with RegistryClient(
            address, timeout=10, credentials=trusting(pki, client="client", token="s3cret")
        ) as with_token:
            watch = with_token.watch("fraud", timeout=10)
            assert next(iter(watch)).HasField("snapshot")
            watch.cancel()
        # The services' own clients take their credentials from the environment.
        monkeypatch.setenv("MODELPLANE_TLS_CA", str(pki["ca"].cert_file))
        monkeypatch.setenv("MODELPLANE_TLS_CERT", str(pki["client"].cert))
        monkeypatch.setenv("MODELPLANE_TLS_KEY", str(pki["client"].key))
        with RegistryClient(address, timeout=10) as from_env:
            assert from_env.get_model("fraud").description == "over mTLS"
        monkeypatch.delenv("MODELPLANE_TLS_CERT")
        monkeypatch.delenv("MODELPLANE_TLS_KEY")
        with RegistryClient(address, timeout=3) as no_client_cert:
            with pytest.raises(grpc.RpcError) as refused:
                no_client_cert.get_model("fraud")
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
